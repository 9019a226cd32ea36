"""Latent inverse design, decoding to structures, and the validity / uniqueness / novelty checks."""

from __future__ import annotations

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Composition, Element, Lattice, Structure

from matjax.data.graphs import build_graph, pack
from matjax.data.dataset import Dataset
from matjax.data.sources import shared_data_dir
from matjax.discovery.latent_design import (Templates, aggregate_posterior_latents, assign_species, hit_rate, lattice_problem,
                                            optimise_latents, realise)
from matjax.discovery.validity import charge_balanced, composition_valid, novel_mask, smact_style_valid, structure_problem, unique_mask
from matjax.models.vae import N_ELEMENTS
from matjax.train.vae import DecodedCrystals
from test_experiments import run_experiment


def test_optimiser_reaches_the_exact_optimum_of_a_linear_property():
    """For y(z) = w.z the minimiser of (y - t)^2 + lam |z|^2 / 2 is z* = 2 t w / (2 |w|^2 + lam)."""
    w = jnp.array([0.5, -1.0, 2.0, 0.0])
    z0 = np.random.default_rng(0).normal(size=(32, 4))
    for lam in (0.0, 0.5, 4.0):
        z, trajectory = optimise_latents(lambda v: v @ w, z0, 3.0, steps=3000, learning_rate=0.02, prior_weight=lam)
        assert trajectory.shape == (3001, 32)
        exact = 2 * 3.0 * w / (2 * w @ w + lam)
        if lam > 0:  # unique minimiser: every start ends there, short of the target
            np.testing.assert_allclose(z, np.broadcast_to(exact, z.shape), atol=2e-3)
        else:  # no prior: every start reaches the target
            np.testing.assert_allclose(trajectory[-1], 3.0, atol=1e-3)
        np.testing.assert_allclose(trajectory[-1], z @ w, rtol=1e-5)
        np.testing.assert_allclose(trajectory[0], z0 @ w, rtol=1e-5)
    # Stopping within 0.1 of the target (z* . w = 2.97 lies inside): the starts keep their own places
    # instead of meeting at z*; the last Adam step moves each coordinate by at most ~lr.
    z, trajectory = optimise_latents(lambda v: v @ w, z0, 3.0, 3000, 0.02, 0.1, stop_within=0.1)
    assert np.all(np.abs(trajectory[-1] - 3.0) <= 0.1 + 0.02 * np.abs(w).sum())
    assert len(np.unique(np.round(z, 3), axis=0)) == len(z0)
    # A stronger prior keeps the latents closer to the origin (and the property further from the target).
    norms = [np.linalg.norm(optimise_latents(lambda v: v @ w, z0, 3.0, 400, 0.05, lam)[0], axis=1).mean() for lam in (0.01, 1.0, 10.0)]
    assert norms[0] > norms[1] > norms[2]


def _perovskite(a_z: int, b_z: int, x_z: int) -> Structure:
    frac = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(4.0), [a_z, b_z, x_z, x_z, x_z], frac)


def _templates(structures, seed=0):
    graphs = pack([build_graph(s.atomic_numbers, s.frac_coords, s.lattice.matrix, 6.0, 12) for s in structures])
    data = Dataset(np.array([f"t{i}" for i in range(len(structures))]), graphs, np.zeros((len(structures), 1)), ("band_gap",))
    return Templates.build(data, np.random.default_rng(seed).normal(size=(len(structures), 3)))


def _decoded(counts: list[dict[int, int]], lattices) -> DecodedCrystals:
    table = np.zeros((len(counts), N_ELEMENTS), dtype=np.int32)
    for row, c in zip(table, counts):
        for z, n in c.items():
            row[z] = n
    return DecodedCrystals(table.sum(1), table, np.asarray(lattices, dtype=float))


def test_species_assignment_keeps_site_groups_and_puts_anions_on_anion_sites():
    batio3 = np.array([56, 22, 8, 8, 8])
    np.testing.assert_array_equal(assign_species(batio3, {38: 1, 40: 1, 8: 3}), [38, 40, 8, 8, 8])  # SrZrO3
    np.testing.assert_array_equal(assign_species(batio3, {3: 1, 41: 1, 9: 3}), [3, 41, 9, 9, 9])  # LiNbF3 pattern
    # Another pattern: the most electronegative atoms take the template's anion sites.
    mixed = assign_species(batio3, {11: 2, 17: 3})
    np.testing.assert_array_equal(sorted(mixed[2:]), [17, 17, 17])
    with pytest.raises(ValueError, match="sites"):
        assign_species(batio3, {11: 1, 17: 1})


def test_decoded_structures_have_the_decoded_composition_and_lattice():
    templates = _templates([_perovskite(56, 22, 8), _perovskite(38, 22, 8), Structure(Lattice.cubic(3.0), [26, 26], [[0, 0, 0], [0.5, 0.5, 0.5]])])
    lattices = [[4.1, 4.2, 4.3, 88.0, 91.0, 92.0], [2.9, 2.9, 2.9, 90.0, 90.0, 90.0]]
    decoded = _decoded([{20: 1, 50: 1, 8: 3}, {28: 1, 27: 1}], lattices)
    result = realise(decoded, np.zeros((2, 3)), templates)
    assert not result.skipped and result.match == ["pattern", "size"]  # bcc Fe2 has the size, not the 1:1 pattern
    for structure, counts, lattice in zip(result.structures, [{20: 1, 50: 1, 8: 3}, {28: 1, 27: 1}], lattices):
        assert structure.composition == Composition({Element.from_Z(z).symbol: n for z, n in counts.items()})
        np.testing.assert_allclose(structure.lattice.parameters, lattice, rtol=1e-6)
    # Positions are the template's: the Ca site of CaSnO3 is the Ba/Sr site at the origin.
    np.testing.assert_allclose(result.structures[0].frac_coords, templates.dataset.graphs.graph(int(result.template[0])).frac)
    assert result.structures[0][0].specie.symbol == "Ca" and result.structures[0][1].specie.symbol == "Sn"


def test_unrealisable_latents_are_reported_and_skipped():
    templates = _templates([_perovskite(56, 22, 8)])
    decoded = _decoded(
        [{11: 1, 17: 1}, {56: 1, 22: 1, 8: 3}, {56: 1, 22: 1, 8: 3}],
        [[4.0, 4.0, 4.0, 90, 90, 90], [4.0, 4.0, 4.0, 150, 150, 150], [4.0, 4.1, 4.0, 90, 90, 90]],
    )
    result = realise(decoded, np.zeros((3, 3)), templates)
    assert [s is None for s in result.structures] == [True, True, False]
    np.testing.assert_array_equal(result.realised, [False, False, True])
    (i0, f0, why0), (i1, _, why1) = result.skipped
    assert (i0, f0) == (0, "Na1Cl1") and "no training crystal has 2 atoms" in why0
    assert i1 == 1 and "do not close a cell" in why1
    assert lattice_problem([4, 4, 4, 90, 90, 90]) is None and "non-positive" in lattice_problem([0, 4, 4, 90, 90, 90])
    assert hit_rate(np.array([1.4, np.nan, 2.0, 1.79]), 1.5, 0.3) == 0.5  # the unrealised (NaN) one is a miss


def test_charge_balance_agrees_with_pymatgen_oxi_state_guesses():
    rng = np.random.default_rng(0)
    symbols = ["Li", "Na", "Ba", "Fe", "Mn", "Cu", "Ti", "V", "Al", "Sn", "Bi", "O", "S", "N", "P", "F", "Cl", "C", "Si", "H", "Sb", "Pt"]
    for _ in range(150):
        amounts = {str(e): int(n) for e, n in zip(rng.choice(symbols, rng.integers(2, 5), replace=False), rng.integers(1, 5, 4))}
        assert charge_balanced(amounts) == bool(Composition(amounts).oxi_state_guesses()), amounts
    assert charge_balanced({"Fe": 3, "O": 4})  # mixed valence, Fe2+ Fe3+_2 O4
    many = {"Li": 3, "Fe": 2, "Mn": 1, "Co": 1, "Ni": 1, "O": 5, "S": 2, "F": 2, "Ba": 1, "Ti": 2, "Sr": 1, "N": 1}
    assert charge_balanced(many)  # twelve elements: pymatgen's enumeration would take minutes


def _smact_by_enumeration(amounts: dict[str, int]) -> bool:
    """CDVAE's loop: every product of one state per element; neutral, and no cation at least as electronegative as an anion."""
    from pymatgen.core import Element

    elements = [Element(el) for el in amounts]
    if len(elements) == 1 or all(e.is_metal for e in elements):
        return True
    for states in itertools.product(*(e.oxidation_states for e in elements)):
        if sum(s * n for s, n in zip(states, amounts.values())) == 0 and not any(
            s1 * s2 < 0 and (e1.X >= e2.X if s1 > 0 else e1.X <= e2.X)
            for (s1, e1), (s2, e2) in itertools.combinations(zip(states, elements), 2)
        ):
            return True
    return False


def test_smact_style_check_is_cdvaes_enumeration():
    rng = np.random.default_rng(1)
    symbols = ["Li", "Na", "Ba", "Fe", "Mn", "Cu", "Ti", "Al", "Sn", "Bi", "O", "S", "N", "P", "F", "Cl", "C", "Si", "H", "Se", "Te", "I"]
    for _ in range(200):
        amounts = {str(e): int(n) for e, n in zip(rng.choice(symbols, rng.integers(2, 4), replace=False), rng.integers(1, 5, 3))}
        reduced = Composition(amounts).reduced_composition.get_el_amt_dict()
        assert smact_style_valid(Composition(amounts)) == _smact_by_enumeration({k: int(v) for k, v in reduced.items()}), amounts
    assert not smact_style_valid(Composition("Fe3O4")) and composition_valid(Composition("Fe3O4"))  # mixed valence only
    assert smact_style_valid(Composition("NaO")) and not composition_valid(Composition("NaO"))  # O- is in the full list
    assert not smact_style_valid(Composition("H2Cl"))  # neutral only as 2 H- + Cl2+, the anion less electronegative
    assert smact_style_valid(Composition("Fe3Ni")) and smact_style_valid(Composition("Si"))


def test_validity_checks():
    assert composition_valid(Composition("NaCl")) and composition_valid(Composition("BaTiO3"))
    assert not composition_valid(Composition("NaCl2")) and not composition_valid(Composition("CaO3"))
    assert composition_valid(Composition("Fe3Ni")) and composition_valid(Composition("Si"))  # alloys, elements
    rocksalt = Structure(Lattice.from_parameters(3.99, 3.99, 3.99, 60, 60, 60), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert structure_problem(rocksalt) is None
    assert structure_problem(Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.1, 0.0, 0.0]])).startswith("short distance")
    assert structure_problem(Structure(Lattice.cubic(0.45), ["Na"], [[0, 0, 0]])).startswith("volume")  # 0.09 A^3
    assert structure_problem(Structure(Lattice.tetragonal(0.45, 300.0), ["Na"], [[0, 0, 0]])).startswith("short distance")  # images
    assert structure_problem(Structure(Lattice.cubic(9.0), ["Na"], [[0, 0, 0]])).startswith("volume")  # 729 A^3
    supercell = rocksalt * (2, 1, 1)
    strained = rocksalt.copy()
    strained.apply_strain(0.02)
    cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(unique_mask([rocksalt, supercell, strained, cscl]), [True, False, False, True])
    fcc_nacl = Structure(Lattice.cubic(5.64), ["Na"] * 4 + ["Cl"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                                                                         [0.5, 0.5, 0.5], [0, 0, 0.5], [0, 0.5, 0], [0.5, 0, 0]])
    reference = [fcc_nacl, cscl.copy()]
    reference[1].replace_species({"Cs": "K"})
    novel = novel_mask([rocksalt, cscl, Structure(Lattice.cubic(4.1), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])],
                       reference.__getitem__, ["NaCl", "KCl"])
    np.testing.assert_array_equal(novel, [False, True, True])  # rock salt is known; CsCl and CsCl-type NaCl are new


@pytest.mark.skipif(shared_data_dir() is None, reason="needs the shared MP-20 pilot data")
def test_experiment_test_config_writes_metrics_plots_and_cifs(tmp_path):
    run_experiment("crystal_vae.py", tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("composition_validity", "structure_validity", "uniqueness", "novelty", "composition_accuracy", "lattice_mae",
                "inverse_hit_rate_1p5", "random_hit_rate_1p5", "inverse_hit_rate_3p0", "random_hit_rate_3p0", "dataset", "n_atoms_accuracy",
                "stoichiometry_accuracy", "design_kept_1p5", "design_unchecked_hit_rate_3p0"):
        assert key in metrics, key
    assert 0 <= metrics["composition_validity"] <= 1 and metrics["n_samples"] == 48
    assert metrics["composition_validity"] <= metrics["composition_validity_charge_constrained"] <= 1
    for name in ("latent.png", "design.png"):
        assert (tmp_path / name).stat().st_size > 10000
    assert len(list((tmp_path / "cifs").rglob("*.cif"))) >= 0.9 * (48 + 2 * 16)


def test_aggregate_posterior_samples_are_the_mixture_of_the_posteriors():
    mu = np.array([[-3.0, 0.0], [3.0, 1.0]])
    logvar = np.log(np.array([[0.25, 1.0], [0.25, 4.0]]))
    z = aggregate_posterior_latents(mu, logvar, 40000, seed=0)
    assert z.shape == (40000, 2)
    np.testing.assert_array_equal(z, aggregate_posterior_latents(mu, logvar, 40000, seed=0))  # seeded
    left = z[:, 0] < 0  # the two components barely overlap along the first axis (sigma 0.5, 6 apart)
    np.testing.assert_allclose(left.mean(), 0.5, atol=0.01)
    np.testing.assert_allclose(z[left].mean(0), mu[0], atol=0.03)
    np.testing.assert_allclose(z[~left].std(0), [0.5, 2.0], rtol=0.03)
    # Nothing between the components: the hole a prior sample N(0, I) would land in.
    assert np.mean(np.abs(z[:, 0]) < 1.0) < 1e-3
