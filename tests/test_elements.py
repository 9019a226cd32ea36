"""Elemental descriptor table: shipped values agree with pymatgen; gaps filled as documented."""

import csv
import warnings

import numpy as np
import pytest
from pymatgen.core import Element

from matjax.data.elements import DESCRIPTORS, MAX_Z, TABLE_PATH, atomic_number, element_descriptors, symbols


def shipped_rows():
    with open(TABLE_PATH, newline="") as f:
        return {int(r["Z"]): r for r in csv.DictReader(f)}


def test_table_covers_every_element_without_gaps():
    values = element_descriptors(standardize=False)
    assert values.shape == (MAX_Z + 1, len(DESCRIPTORS))
    assert np.isfinite(values).all()
    assert not values[0].any()  # padding row
    assert symbols()[26] == "Fe" and atomic_number("Fe") == 26


@pytest.mark.parametrize("symbol", ["H", "O", "Fe", "Cu", "Au", "Bi"])
def test_values_equal_pymatgen(symbol):
    row = shipped_rows()[atomic_number(symbol)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = Element(symbol)
        expected = [e.X, float(e.atomic_radius), e.ionization_energy, e.electron_affinity]
    np.testing.assert_allclose([float(row[d]) for d in DESCRIPTORS], expected, atol=1e-6)
    assert row["imputed"] == ""


def test_missing_values_are_filled_from_the_same_group_and_flagged():
    rows = shipped_rows()
    for noble in ["He", "Ne", "Ar"]:  # no Pauling electronegativity in pymatgen: Kr's 3.0
        row = rows[atomic_number(noble)]
        assert float(row["electronegativity"]) == pytest.approx(3.0)
        assert "electronegativity" in row["imputed"]
    assert "atomic_radius" in rows[atomic_number("Cm")]["imputed"]


def test_standardized_columns_have_zero_mean_unit_variance():
    table = element_descriptors()[1:]
    np.testing.assert_allclose(table.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(table.std(0), 1.0, atol=1e-5)


def test_unknown_symbol_is_named():
    with pytest.raises(ValueError, match="'Xx'"):
        atomic_number("Xx")
