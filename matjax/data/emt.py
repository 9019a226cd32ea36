"""Built-in offline dataset: EMT-relaxed binary and ternary alloys of Al, Cu, Ag, Au, Ni, Pd, Pt.

Effective-medium theory (ASE's ``EMT``) is a real, cheap many-body potential for these
fcc metals, so this set needs no network, no API key and no shared data, yet its targets
come from a physical model. Each crystal is a random decoration of an fcc, bcc or hcp
supercell (4-16 atoms) at the Vegard's-law volume, rattled, then briefly relaxed
(``matjax.data.relax``: positions and cell, BFGS, ``fmax`` 0.02 eV/A, at most 100 steps). Formation energy per
atom is relative to each element's relaxed fcc crystal, EMT's own ground state:

    E_form = (E_total - sum_i n_i mu_i) / N

The rows are cached as a CDVAE-style CSV, so a second call only reads it; ``cif_initial``
keeps each crystal's unrelaxed input, so a model can also learn the relaxed energy from an
unrelaxed structure, which is what screening asks of it. The same relaxation (``relax``)
is the oracle of the discovery pipeline.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from matjax.data.cache import cached_frame, default_cache_dir
from matjax.data.dataset import Dataset
from matjax.data.relax import FMAX, MAX_STEPS, Relaxed, relax_and_score, relax_atoms
from matjax.data.sources import dataset_from_frame

ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
# Supercell repeats of ASE's cubic fcc (4 atoms), cubic bcc (2) and hcp (2) cells.
PROTOTYPES = {
    "fcc": ((1, 1, 1), (2, 1, 1), (2, 2, 1)),
    "bcc": ((2, 1, 1), (2, 2, 1), (2, 2, 2)),
    "hcp": ((2, 1, 1), (2, 2, 1), (2, 2, 2)),
}
DATASET_VERSION = 2


def emt_calculator():
    from ase.calculators.emt import EMT

    return EMT()


@functools.cache
def _fcc_references() -> dict[str, tuple[float, float]]:
    from ase.build import bulk

    refs = {}
    for el in ELEMENTS:
        atoms, _, _ = relax_atoms(bulk(el, "fcc", cubic=True), emt_calculator, FMAX / 10, 200)
        refs[el] = (atoms.get_potential_energy() / len(atoms), atoms.get_volume() / len(atoms))
    return refs


def references() -> dict[str, float]:
    """element -> EMT energy per atom of its relaxed fcc crystal (the formation-energy zero)."""
    return {el: energy for el, (energy, _) in _fcc_references().items()}


def relax(atoms, fmax: float = FMAX, steps: int = MAX_STEPS) -> Relaxed:
    """Relax with EMT and score against the fcc elements; ValueError names unsupported elements."""
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(ELEMENTS))
    if unknown:
        raise ValueError(f"EMT covers {', '.join(ELEMENTS)}; got unsupported element(s) {unknown}")
    return relax_and_score(atoms, emt_calculator, references(), fmax, steps)


def _prototype_cell(prototype: str, volume_per_atom: float):
    from ase.build import bulk

    if prototype == "fcc":
        return bulk("Cu", "fcc", a=(4 * volume_per_atom) ** (1 / 3), cubic=True)
    if prototype == "bcc":
        return bulk("Cu", "bcc", a=(2 * volume_per_atom) ** (1 / 3), cubic=True)
    if prototype == "hcp":  # ideal c/a: volume per atom = a^3 / sqrt(2)
        a = (np.sqrt(2) * volume_per_atom) ** (1 / 3)
        return bulk("Cu", "hcp", a=a, c=a * np.sqrt(8 / 3))
    raise ValueError(f"unknown prototype {prototype!r}; choose from {sorted(PROTOTYPES)}")


def random_alloy(rng: np.random.Generator):
    """(ase.Atoms, prototype name): a random binary/ternary decoration at Vegard's volume."""
    prototype = str(rng.choice(list(PROTOTYPES)))
    repeats = PROTOTYPES[prototype][rng.integers(len(PROTOTYPES[prototype]))]
    n_sites = len(_prototype_cell(prototype, 10.0).repeat(repeats))
    n_species = 2 if rng.random() < 0.6 else 3
    elements = rng.choice(ELEMENTS, size=n_species, replace=False)
    # Counts: a random composition with every chosen element present at least once.
    cuts = np.sort(rng.choice(np.arange(1, n_sites), size=n_species - 1, replace=False))
    counts = np.diff(np.concatenate([[0], cuts, [n_sites]]))
    symbols = rng.permutation(np.repeat(elements, counts))
    volume = np.mean([_fcc_references()[s][1] for s in symbols])
    atoms = _prototype_cell(prototype, volume).repeat(repeats)
    atoms.set_chemical_symbols(symbols.tolist())
    atoms.rattle(0.02, seed=int(rng.integers(2**31)))
    return atoms, prototype


def generate_alloys(n: int, seed: int = 0) -> pd.DataFrame:
    """n EMT-relaxed random alloys as CDVAE-style rows (material_id, cif, targets, ...).

    Relaxations that reach the same formula and formation energy (to 0.1 meV/atom) are
    the same crystal found twice; only the first is kept.
    """
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(n), desc="EMT alloys", mininterval=1.0):
        atoms, prototype = random_alloy(rng)
        result = relax(atoms)
        structure = AseAtomsAdaptor.get_structure(result.atoms)
        rows.append({
            "material_id": f"emt-{seed}-{i:05d}",
            "cif": str(CifWriter(structure)),
            "cif_initial": str(CifWriter(AseAtomsAdaptor.get_structure(atoms))),
            "formation_energy_per_atom": result.formation_energy_per_atom,
            "energy_per_atom": result.energy_per_atom,
            "pretty_formula": structure.composition.reduced_formula,
            "elements": str(sorted({s.symbol for s in structure.species})),
            "prototype": prototype,
            "relax_steps": result.steps,
            "converged": result.converged,
        })
    frame = pd.DataFrame(rows)
    key = frame["pretty_formula"] + frame["formation_energy_per_atom"].round(4).astype(str)
    return frame[~key.duplicated()].reset_index(drop=True)


def emt_alloy_rows(n: int = 400, seed: int = 0, cache_dir: str | Path | None = None) -> pd.DataFrame:
    """``generate_alloys(n, seed)``, cached as ``<cache>/emt/alloys-v*-n*-seed*.csv.gz``."""
    path = Path(cache_dir or default_cache_dir()) / "emt" / f"alloys-v{DATASET_VERSION}-n{n}-seed{seed}.csv.gz"
    return cached_frame(path, lambda: generate_alloys(n, seed))


def emt_alloy_dataset(
    n: int = 400,
    seed: int = 0,
    cutoff: float = 6.0,
    max_neighbors: int | None = None,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """The built-in dataset: EMT alloys with target ``formation_energy_per_atom`` (eV/atom)."""
    rows = emt_alloy_rows(n, seed, cache_dir)
    return dataset_from_frame(rows, ("formation_energy_per_atom",), cutoff, max_neighbors, cache_dir)
