"""Per-element descriptor table, built once from pymatgen and shipped as ``elements.csv``.

Descriptors (the seed's four, in this order)::

    electronegativity   Pauling electronegativity (dimensionless)
    atomic_radius       empirical atomic radius (Angstrom)
    ionization_energy   first ionisation energy (eV)
    electron_affinity   electron affinity (eV; negative where the anion is unbound)

Missing values are filled, in this order, and flagged in the ``imputed`` column:

1. an alternative pymatgen source: ``atomic_radius_calculated`` for the radius;
2. the element nearest in Z within the same periodic-table group that has a value
   (He, Ne, Ar take Kr's electronegativity 3.0; Kr, Xe, Rn radii come from their group);
3. the element nearest in Z that has a value (actinides without radii).

Rows are indexed by atomic number; row 0 is the padding species (all zeros).
Regenerate the CSV with ``python -m matjax.data.elements`` after a pymatgen upgrade;
``tests/test_elements.py`` checks the shipped table against pymatgen.
"""

from __future__ import annotations

import csv
import functools
import math
import warnings
from pathlib import Path

import numpy as np

DESCRIPTORS = ("electronegativity", "atomic_radius", "ionization_energy", "electron_affinity")
MAX_Z = 103
TABLE_PATH = Path(__file__).with_name("elements.csv")

_PYMATGEN_ATTRS = {
    "electronegativity": ("X",),
    "atomic_radius": ("atomic_radius", "atomic_radius_calculated"),
    "ionization_energy": ("ionization_energy",),
    "electron_affinity": ("electron_affinity",),
}


def _first_value(element, attrs: tuple[str, ...]) -> float:
    for attr in attrs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = getattr(element, attr)
        if value is not None and not math.isnan(float(value)):
            return float(value)
    return math.nan


def _fill_missing(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill NaNs by the nearest-in-Z element of the same group, else nearest in Z.

    values: [MAX_Z] descriptor for Z = 1..MAX_Z; groups: [MAX_Z] periodic-table group.
    Returns (filled values, bool mask of filled entries).
    """
    filled = values.copy()
    missing = np.isnan(values)
    z = np.arange(len(values))
    for i in np.nonzero(missing)[0]:
        same_group = ~missing & (groups == groups[i])
        donors = same_group if same_group.any() else ~missing
        filled[i] = values[z[donors][np.argmin(np.abs(z[donors] - i))]]
    return filled, missing


def build_element_table() -> list[dict]:
    """Read the descriptors of Z = 1..MAX_Z from pymatgen, filling gaps as documented."""
    from pymatgen.core import Element

    elements = [Element.from_Z(z) for z in range(1, MAX_Z + 1)]
    groups = np.array([e.group for e in elements])
    rows = [{"Z": e.Z, "symbol": e.symbol, "imputed": ""} for e in elements]
    for name in DESCRIPTORS:
        raw = np.array([_first_value(e, _PYMATGEN_ATTRS[name]) for e in elements])
        direct = np.array([_first_value(e, _PYMATGEN_ATTRS[name][:1]) for e in elements])
        filled, missing = _fill_missing(raw, groups)
        for row, value, was_missing, alt_source in zip(rows, filled, missing, np.isnan(direct) & ~missing):
            row[name] = round(float(value), 6)
            if was_missing or alt_source:
                row["imputed"] = " ".join(filter(None, [row["imputed"], name]))
    return rows


def write_element_table(path: Path = TABLE_PATH) -> None:
    rows = build_element_table()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["Z", "symbol", *DESCRIPTORS, "imputed"])
        writer.writeheader()
        writer.writerows(rows)


@functools.cache
def _read_table() -> tuple[tuple[str, ...], np.ndarray]:
    with open(TABLE_PATH, newline="") as f:
        rows = list(csv.DictReader(f))
    symbols = ("X",) + tuple(r["symbol"] for r in rows)  # index = Z; "X" marks padding
    values = np.zeros((MAX_Z + 1, len(DESCRIPTORS)))
    for r in rows:
        values[int(r["Z"])] = [float(r[d]) for d in DESCRIPTORS]
    return symbols, values


def symbols() -> tuple[str, ...]:
    """Element symbols indexed by Z (index 0 is the padding species 'X')."""
    return _read_table()[0]


def atomic_number(symbol: str) -> int:
    """Z of an element symbol; raises ValueError naming the symbol if unknown."""
    try:
        return symbols().index(symbol, 1)
    except ValueError:
        raise ValueError(f"unknown element symbol {symbol!r} (matjax covers Z = 1..{MAX_Z})") from None


def element_descriptors(standardize: bool = True) -> np.ndarray:
    """[MAX_Z + 1, 4] float32 descriptor table indexed by Z; row 0 (padding) is zero.

    With ``standardize`` each column is shifted and scaled to zero mean and unit variance
    over the real elements, so the table can feed a network directly.
    """
    values = _read_table()[1].copy()
    if standardize:
        real = values[1:]
        values[1:] = (real - real.mean(0)) / real.std(0)
    return values.astype(np.float32)


if __name__ == "__main__":
    write_element_table()
    print(f"wrote {TABLE_PATH}")
