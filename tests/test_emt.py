"""Built-in EMT alloy dataset: physically sensible formation energies, reproducible, cached."""

import numpy as np
import pytest
from ase.build import bulk

import matjax.data.emt as emt


def decorated(host, a, replace, by):
    atoms = bulk(host, "fcc", a=a, cubic=True)
    symbols = atoms.get_chemical_symbols()
    for i in replace:
        symbols[i] = by
    atoms.set_chemical_symbols(symbols)
    return atoms


def test_formation_energy_is_zero_for_fcc_elements_and_positive_for_bcc_copper():
    assert emt.relax(bulk("Cu", "fcc", a=3.5, cubic=True)).formation_energy_per_atom == pytest.approx(0, abs=1e-4)
    assert emt.relax(bulk("Au", "fcc", a=4.2, cubic=True)).formation_energy_per_atom == pytest.approx(0, abs=1e-4)
    # bcc Cu lies above fcc (DFT: about +0.04 eV/atom).
    assert 0.01 < emt.relax(bulk("Cu", "bcc", a=2.9, cubic=True)).formation_energy_per_atom < 0.1


def test_ordered_cu3au_is_stable_against_its_elements():
    result = emt.relax(decorated("Cu", 3.75, [0], "Au"))
    assert result.converged and result.formation_energy_per_atom < 0


def test_relaxation_lowers_the_energy():
    atoms = decorated("Cu", 3.9, [0, 1], "Ni")
    atoms.calc = emt.emt_calculator()
    before = atoms.get_potential_energy() / len(atoms)
    assert emt.relax(atoms).energy_per_atom < before


def test_unsupported_elements_are_named():
    with pytest.raises(ValueError, match=r"\['Fe'\]"):
        emt.relax(bulk("Fe", "bcc", a=2.87))


def test_random_alloys_are_reproducible_binary_or_ternary():
    a, proto_a = emt.random_alloy(np.random.default_rng(3))
    b, proto_b = emt.random_alloy(np.random.default_rng(3))
    assert proto_a == proto_b and a.get_chemical_symbols() == b.get_chemical_symbols()
    np.testing.assert_array_equal(a.positions, b.positions)
    for seed in range(20):
        atoms, _ = emt.random_alloy(np.random.default_rng(seed))
        assert 2 <= len(set(atoms.get_chemical_symbols())) <= 3 and 4 <= len(atoms) <= 16


def test_dataset_is_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    data = emt.emt_alloy_dataset(n=5, seed=11, cutoff=5.0, cache_dir=tmp_path)
    assert len(data) >= 4 and data.target_names == ("formation_energy_per_atom",)
    assert np.all(np.abs(data.targets) < 1.0)
    monkeypatch.setattr(emt, "generate_alloys", lambda *a: pytest.fail("regenerated a cached dataset"))
    again = emt.emt_alloy_dataset(n=5, seed=11, cutoff=5.0, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.targets, data.targets)
