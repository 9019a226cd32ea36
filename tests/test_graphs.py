"""Crystal graphs: exact agreement with pymatgen and with an independent brute force."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymatgen.core import Lattice, Structure

from matjax.data.graphs import (
    IsolatedAtomError,
    build_graph,
    graph_to_structure,
    pack,
    structure_to_graph,
    take,
)
from matjax.data.sources import mp20_lite_paths, read_cdvae_csv, shared_data_dir


def brute_force_edges(frac, lattice, cutoff):
    """Every (i, j, shift) with 1e-8 < |r_ij| <= cutoff + 1e-8, by enumerating a generous image box."""
    inv = np.linalg.inv(lattice)
    reach = np.ceil(cutoff * np.linalg.norm(inv, axis=0)).astype(int) + 1
    span = np.ceil(frac.max(0) - frac.min(0)).astype(int)
    axes = [np.arange(-r - s, r + s + 1) for r, s in zip(reach, span)]
    shifts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    cart = frac @ lattice
    edges = {}
    for i in range(len(frac)):
        for j in range(len(frac)):
            d = np.linalg.norm(cart[j] + shifts @ lattice - cart[i], axis=1)
            for s in np.flatnonzero((d <= cutoff + 1e-8) & (d > 1e-8)):
                edges[(i, j, tuple(shifts[s]))] = d[s]
    return edges


def graph_edges(g):
    return {(int(i), int(j), tuple(int(x) for x in s)): d for i, j, s, d in zip(g.receivers, g.senders, g.shifts, g.distances)}


def pymatgen_edges(structure, cutoff):
    c, p, o, d = structure.get_neighbor_list(cutoff)
    return {(int(i), int(j), tuple(int(round(x)) for x in s)): dist for i, j, s, dist in zip(c, p, o, d)}


def assert_same_edges(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for key, d in expected.items():
        assert abs(actual[key] - d) < 1e-6, key


def check_against_references(structure, cutoff):
    g = structure_to_graph(structure, cutoff)
    edges = graph_edges(g)
    assert len(edges) == g.n_edge  # no duplicate (i, j, shift)
    assert_same_edges(edges, pymatgen_edges(structure, cutoff))
    assert_same_edges(edges, brute_force_edges(structure.frac_coords, structure.lattice.matrix, cutoff))
    return g


EDGE_CASES = {
    "one-atom simple cubic, cell < cutoff": (Lattice.cubic(2.5), ["Po"], [[0, 0, 0]], 6.0),
    "one-atom fcc primitive": (Lattice([[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]]), ["Cu"], [[0, 0, 0]], 5.0),
    "very skewed cell (angles 9-19 degrees)": (
        Lattice([[3.0, 0, 0], [2.9, 0.8, 0], [2.7, 0.6, 0.9]]), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.4, 0.6]], 6.0),
    "thin slab-like cell": (Lattice.from_parameters(2.0, 2.2, 20.0, 90, 90, 120), ["C", "C"], [[0, 0, 0], [1 / 3, 2 / 3, 0.03]], 4.0),
    "unwrapped fractional coordinates": (Lattice.cubic(3.6), ["Cu", "Au"], [[1.3, -0.2, 0.0], [0.5, 2.5, -1.5]], 5.0),
    "tiny cutoff with self-images only": (Lattice.cubic(2.0), ["Fe"], [[0, 0, 0]], 2.0),
}


@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_cases_match_pymatgen_and_brute_force(name):
    lattice, species, coords, cutoff = EDGE_CASES[name]
    check_against_references(Structure(lattice, species, coords), cutoff)


def test_one_atom_cell_lists_self_images_as_neighbours():
    g = structure_to_graph(Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]]), 6.0)
    assert (g.senders == 0).all() and (g.receivers == 0).all()
    # Shells of a simple cubic lattice within 2a: 6 + 12 + 8 + 6 = 32 images.
    assert g.n_edge == 32
    np.testing.assert_allclose(sorted(set(np.round(g.distances, 6))), [3.0, 3 * 2**0.5, 3 * 3**0.5, 6.0])


def test_isolated_atom_is_an_error_naming_the_atom():
    structure = Structure(Lattice.cubic(12.0), ["Na", "Cl"], [[0, 0, 0], [0.1, 0, 0]])
    assert structure_to_graph(structure, 2.0).n_edge == 2
    with pytest.raises(IsolatedAtomError, match=r"atom 0 \(Na\)"):
        structure_to_graph(Structure(Lattice.cubic(12.0), ["Na"], [[0, 0, 0]]), 6.0)


@pytest.mark.parametrize(
    "structure, message",
    [
        (Structure(Lattice.cubic(3.0), [], []), "empty structure"),
        (Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]]), "disordered"),
        (Structure(Lattice.cubic(3.0), [{"Fe": 0.5}], [[0, 0, 0]]), "disordered"),
    ],
)
def test_bad_structures_are_rejected(structure, message):
    with pytest.raises(ValueError, match=message):
        structure_to_graph(structure)


def test_bad_arrays_are_rejected():
    with pytest.raises(ValueError, match="degenerate lattice"):
        build_graph([1, 1], [[0, 0, 0], [0.5, 0.5, 0]], [[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    with pytest.raises(ValueError, match="non-finite"):
        build_graph([1], [[np.nan, 0, 0]], np.eye(3))
    with pytest.raises(ValueError, match="atoms 0 and 1 coincide"):
        build_graph([1, 1], [[0.2, 0, 0], [1.2, 0, 0]], 3 * np.eye(3))
    with pytest.raises(ValueError, match="cutoff must be positive"):
        build_graph([1], [[0, 0, 0]], np.eye(3), cutoff=0.0)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.tuples(*[st.floats(2.0, 7.0)] * 3),
    angles=st.tuples(*[st.floats(50.0, 130.0)] * 3),
    n_atoms=st.integers(1, 4),
    cutoff=st.floats(2.5, 6.5),
    seed=st.integers(0, 2**16),
)
def test_random_cells_match_brute_force(lengths, angles, n_atoms, cutoff, seed):
    try:
        lattice = Lattice.from_parameters(*lengths, *angles)
    except ValueError:
        return  # the three angles do not form a cell
    if lattice.volume < 1.0:
        return
    frac = np.random.default_rng(seed).uniform(-0.5, 1.5, size=(n_atoms, 3))
    try:
        g = build_graph(np.full(n_atoms, 14), frac, lattice.matrix, cutoff)
    except IsolatedAtomError:
        centres = {i for i, _, _ in brute_force_edges(frac, lattice.matrix, cutoff)}
        assert centres != set(range(n_atoms))
        return
    assert_same_edges(graph_edges(g), brute_force_edges(frac, lattice.matrix, cutoff))


def test_distances_follow_the_edge_convention():
    structure = Structure(Lattice.from_parameters(3.1, 4.2, 5.3, 80, 95, 110), ["Li", "O", "O"],
                          [[0, 0, 0], [0.3, 0.2, 0.9], [0.7, 0.6, 0.1]])
    g = structure_to_graph(structure, 5.0)
    r = (g.frac[g.senders] + g.shifts - g.frac[g.receivers]) @ g.lattice
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), g.distances, atol=1e-10)
    # Sorted by receiver, then distance.
    assert np.all(np.diff(g.receivers) >= 0)
    same = np.diff(g.receivers) == 0
    assert np.all(np.diff(g.distances)[same] >= 0)


def test_max_neighbors_keeps_the_nearest():
    structure = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    full = structure_to_graph(structure, 8.0)
    kept = structure_to_graph(structure, 8.0, max_neighbors=12)
    assert np.bincount(kept.receivers).tolist() == [12, 12]
    for i in range(2):
        assert kept.distances[kept.receivers == i].max() <= np.sort(full.distances[full.receivers == i])[12] + 1e-12


def test_graph_round_trips_to_structure():
    structure = Structure(Lattice.hexagonal(3.0, 5.0), ["Ga", "N"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.38]])
    back = graph_to_structure(structure_to_graph(structure))
    assert back == structure


def test_packed_graphs_take_and_graph_round_trip():
    cells = [Structure(Lattice.cubic(a), ["Cu"] * n, np.random.default_rng(n).random((n, 3))) for a, n in [(3.0, 1), (5.0, 3), (4.0, 2)]]
    graphs = [structure_to_graph(s, 5.0) for s in cells]
    packed = pack(graphs)
    chosen = take(packed, [2, 0, 2])
    for k, i in enumerate([2, 0, 2]):
        for a, b in zip(chosen.graph(k), graphs[i]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(shared_data_dir() is None, reason="shared data absent")
def test_agrees_with_pymatgen_on_250_mp20_structures():
    from matjax.data.sources import _parse_cif

    rows = read_cdvae_csv(mp20_lite_paths()).sample(250, random_state=0)
    counts = Counter()
    for cif in rows["cif"]:
        g = check_against_references(_parse_cif(cif), 6.0) if counts["checked"] < 25 else None
        if g is None:  # the brute force is slow: pymatgen alone for the rest
            structure = _parse_cif(cif)
            assert_same_edges(graph_edges(structure_to_graph(structure, 6.0)), pymatgen_edges(structure, 6.0))
        counts["checked"] += 1
    assert counts["checked"] == 250
