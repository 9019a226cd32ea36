"""Discovery building blocks: substitution candidates, fingerprints, hull, oracles."""

import math
import warnings

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from matjax.data.elements import symbols
from matjax.data.emt import ELEMENTS, relax
from matjax.data.graphs import build_graph, pack, structure_to_graph
from matjax.discovery.fingerprint import first_occurrences, graph_fingerprints
from matjax.discovery.hull import Hull
from matjax.discovery.oracles import LabelOracle, emt_oracle
from matjax.discovery.screening import candidate_formulas
from matjax.discovery.substitution import candidate_graphs, generate_candidates, topology_reusable

FCC = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
CU3AU = Structure(Lattice.cubic(3.75), ["Cu", "Cu", "Cu", "Au"], FCC)
CUAU = Structure(Lattice.tetragonal(2.85, 3.7), ["Cu", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]])
NACL = Structure(Lattice.cubic(5.64), ["Na"] * 4 + ["Cl"] * 4, FCC + [[x + 0.5, y, z] for x, y, z in FCC])


def formula(graph_species):
    return Composition({symbols()[z]: int(n) for z, n in zip(*np.unique(graph_species, return_counts=True))})


def test_metallic_substitutions_are_scored_distinct_and_filtered():
    parents = pack([structure_to_graph(CUAU, 8.0, 12)])
    cands = generate_candidates(parents, allowed_elements=ELEMENTS)
    assert len(cands) > 3
    assert np.all(np.diff(cands.probability) <= 0) and cands.probability.min() >= 1e-3
    for old, new in zip(cands.old[:, :2], cands.new[:, :2]):
        assert len(set(new)) == 2 and (new != old).any()
        assert {symbols()[z] for z in new} <= set(ELEMENTS)
    # Group-11 chemistry: Ag for Cu (or Au) is among the likeliest swaps.
    top = {frozenset(symbols()[z] for z in row[:2]) for row in cands.new[:5]}
    assert frozenset({"Ag", "Au"}) in top or frozenset({"Cu", "Ag"}) in top
    stricter = generate_candidates(parents, allowed_elements=ELEMENTS, threshold=1e-2)
    assert 0 < len(stricter) < len(cands)
    with pytest.raises(ValueError, match="unknown element.*Xx"):
        generate_candidates(parents, allowed_elements=["Cu", "Xx"])


def test_ionic_substitutions_are_charge_balanced():
    parents = pack([structure_to_graph(NACL, 8.0, 12)])
    cands = generate_candidates(parents)
    assert len(cands) > 5
    graphs = candidate_graphs(parents, cands)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(cands)):
            comp = formula(graphs.graph(i).species)
            assert comp.oxi_state_guesses(), f"{comp.reduced_formula} is not charge balanced"
    formulas = {formula(graphs.graph(i).species).reduced_formula for i in range(len(cands))}
    assert "KCl" in formulas and "NaBr" in formulas


@pytest.mark.parametrize("parent", [CU3AU, NACL], ids=["metallic", "ionic"])
def test_single_site_substitutions_change_one_atom(parent):
    """Each single-site candidate differs from its parent in exactly one atom, never leaves a
    pure element, stays charge balanced where the parent is ionic, and its formula (from
    counts alone, as screening computes it) is its graph's."""
    parents = pack([structure_to_graph(parent, 8.0, 12)])
    whole = generate_candidates(parents, allowed_elements=None if parent is NACL else ELEMENTS)
    both = generate_candidates(parents, allowed_elements=None if parent is NACL else ELEMENTS, single_site=True)
    one = np.flatnonzero(both.site >= 0)
    assert len(both) - len(one) == len(whole) and len(one) > 5
    graphs = candidate_graphs(parents, both, one)
    formulas = candidate_formulas(both, parents, one)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, i in enumerate(one):
            species = graphs.graph(k).species
            assert (species != parents.species).sum() == 1 and species[both.site[i]] == both.site_z[i]
            comp = formula(species)
            assert len(comp) >= 2 and comp.reduced_formula == formulas[k]
            assert parent is not NACL or comp.oxi_state_guesses(), comp.reduced_formula
    if parent is CU3AU:  # the lone Au cannot become Cu; a Cu can become Pt
        assert "Cu" not in formulas and "Cu2PtAu" in formulas


def test_volume_follows_atomic_size():
    parents = pack([structure_to_graph(CU3AU, 8.0, 12)])
    cands = generate_candidates(parents, allowed_elements=ELEMENTS)
    graphs = candidate_graphs(parents, cands)
    for i in range(len(cands)):
        comp = formula(graphs.graph(i).species)
        if comp == Composition("Ag3Au"):
            assert cands.volume_scale[i] > 1.1  # Ag is much larger than Cu
            np.testing.assert_allclose(np.linalg.det(graphs.graph(i).lattice), CU3AU.volume * cands.volume_scale[i])
            return
    pytest.fail("Ag3Au not generated from Cu3Au")


@pytest.mark.parametrize("parent", [CU3AU, CUAU, NACL], ids=["Cu3Au", "CuAu", "NaCl"])
def test_reused_topology_equals_the_candidates_own_graph(parent):
    parents = pack([structure_to_graph(parent, 8.0, 12)])
    cands = generate_candidates(parents, allowed_elements=None if parent is NACL else ELEMENTS)
    assert topology_reusable(parents, cands, 8.0, 12).all()
    graphs = candidate_graphs(parents, cands)
    for i in range(0, len(cands), max(1, len(cands) // 10)):
        reused = graphs.graph(i)
        fresh = build_graph(reused.species, reused.frac, reused.lattice, 8.0, 12)
        np.testing.assert_array_equal(fresh.receivers, reused.receivers)
        np.testing.assert_allclose(fresh.distances, reused.distances, rtol=1e-10)
        assert sorted(zip(fresh.receivers, fresh.species[fresh.senders])) == sorted(
            zip(reused.receivers, reused.species[reused.senders]))


def test_topology_reuse_is_refused_when_it_could_be_wrong():
    sparse = Structure(Lattice.cubic(6.0), ["Cu", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    parents = pack([structure_to_graph(sparse, 5.5, 12)])  # 8 neighbours within 5.5 A, not 12
    cands = generate_candidates(parents, allowed_elements=ELEMENTS)
    assert not topology_reusable(parents, cands, 5.5, 12).any()
    dense = pack([structure_to_graph(CU3AU, 8.0, 12)])
    cands = generate_candidates(dense, allowed_elements=ELEMENTS)
    shrunk_cutoff = dense.distances.max() * 1.0001  # any expansion pushes an edge out
    grows = cands.volume_scale > 1.0
    assert not topology_reusable(dense, cands, shrunk_cutoff, 12)[grows].any()


def test_fingerprints_identify_the_same_crystal_and_separate_others():
    relabelled = Structure(Lattice.cubic(4.1), ["Au", "Cu", "Cu", "Cu"], FCC)  # other order and volume
    supercell = CU3AU * (2, 1, 1)
    other_species = CU3AU.copy().replace_species({"Au": "Ag"})
    other_order = Structure(Lattice.cubic(3.75), ["Cu", "Cu", "Au", "Au"], FCC)  # L1_0 CuAu
    graphs = pack([structure_to_graph(s, 8.0, 12) for s in [CU3AU, relabelled, supercell, other_species, other_order]])
    fp = graph_fingerprints(graphs)
    assert fp[0] == fp[1] == fp[2]
    assert len({fp[0], fp[3], fp[4]}) == 3
    assert first_occurrences(fp).tolist() == [True, False, False, True, True]
    assert first_occurrences(fp, exclude=fp[3:4]).tolist() == [True, False, False, False, True]


def test_hull_energies():
    hull = Hull(["CuAu", "Cu3Au"], [-0.05, -0.06])
    above = hull.e_above_hull(["CuAu", "Cu3Au", "CuAu3", "Cu", "Ag2Au"], [-0.05, -0.07, 0.0, 0.0, -0.01])
    np.testing.assert_allclose(above, [0.0, -0.01, 0.025, 0.0, -0.01], atol=1e-12)
    with pytest.raises(ValueError, match="finite"):
        Hull(["CuAu"], [math.nan])


def test_emt_oracle_relaxes_and_isolates_failures():
    oracle = emt_oracle()
    good, bad = oracle.evaluate(["cu3au", "iron"], [CU3AU, Structure(Lattice.cubic(2.87), ["Fe"], [[0, 0, 0]])])
    from pymatgen.io.ase import AseAtomsAdaptor

    assert good.ok and good.formation_energy_per_atom == pytest.approx(
        relax(AseAtomsAdaptor.get_atoms(CU3AU)).formation_energy_per_atom)
    assert good.structure.composition == CU3AU.composition
    assert not bad.ok and "Fe" in bad.error and math.isnan(bad.formation_energy_per_atom)


def test_label_oracle_reveals_only_held_out_labels():
    a, b = LabelOracle({"mp-1": -1.5}).evaluate(["mp-1", "mp-2"], [CU3AU, CU3AU])
    assert a.ok and a.formation_energy_per_atom == -1.5
    assert not b.ok and "mp-2" in b.error
