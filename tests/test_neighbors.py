"""Neighbour lists under jit agree with the host graphs, keep every pair within the skin
and never lose a pair without raising the overflow flag."""

import jax
import numpy as np
import pytest
from ase.build import bulk

from matjax.data.graphs import build_graph
from matjax.geometry.neighbors import needs_rebuild, neighbor_list


def _pairs(nbrs, cutoff=None, positions=None, lattice=None):
    """Sorted (i, j, shift) of the filled slots, optionally only those within ``cutoff``."""
    m = np.asarray(nbrs.mask)
    r, s, sh = np.asarray(nbrs.receivers)[m], np.asarray(nbrs.senders)[m], np.asarray(nbrs.shifts)[m]
    if cutoff is not None:
        d = np.linalg.norm(positions[s] + sh @ lattice - positions[r], axis=1)
        r, s, sh = r[d < cutoff], s[d < cutoff], sh[d < cutoff]
    return sorted(zip(r.tolist(), s.tolist(), map(tuple, sh.tolist())))


def _graph_pairs(positions, lattice, cutoff, pbc=(True, True, True)):
    g = build_graph(np.ones(len(positions), int), np.linalg.solve(lattice.T, positions.T).T, lattice, cutoff=cutoff, pbc=pbc)
    return sorted(zip(g.receivers.tolist(), g.senders.tolist(), map(tuple, g.shifts.tolist())))


def _crystal(repeat, skew=True, seed=0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    if skew:
        atoms.set_cell(atoms.cell.array @ np.array([[1, 0.3, 0], [0, 1, 0.2], [0.1, 0, 1]]), scale_atoms=True)
    atoms.rattle(0.1, seed=seed)
    # Unwrapped positions: atoms may sit outside the cell, as they do in MD.
    atoms.positions += 3.0 * np.random.default_rng(seed).normal(size=atoms.positions.shape)
    return atoms.positions.copy(), atoms.cell.array.copy()


@pytest.mark.parametrize(
    "repeat, cutoff, use_bins",
    [((1, 1, 1), 4.0, False),  # 4 atoms, cell far smaller than twice the cutoff: many images, self-images
     ((2, 2, 2), 3.0, False),
     ((4, 4, 4), 3.0, True)],  # O(N) bins
)
def test_pairs_equal_host_graph(repeat, cutoff, use_bins):
    positions, lattice = _crystal(repeat)
    skin = 0.5
    nbrs = neighbor_list(cutoff, skin, use_bins=use_bins).allocate(positions, lattice)
    assert (nbrs.grid is not None) == use_bins
    assert not bool(nbrs.overflow)
    assert _pairs(nbrs) == _graph_pairs(positions, lattice, cutoff + skin)


def test_molecule_has_no_images():
    rng = np.random.default_rng(0)
    positions = rng.uniform(0, 6, size=(12, 3))
    lattice = np.eye(3) * 8.0  # atoms near opposite faces must not see each other through it
    nbrs = neighbor_list(3.0, 0.3, pbc=(False, False, False)).allocate(positions, lattice)
    assert nbrs.images == ((0, 0, 0),)
    assert _pairs(nbrs) == _graph_pairs(positions, lattice, 3.3, pbc=(False, False, False))


def test_updates_keep_every_pair_within_the_cutoff_and_rebuild_when_needed():
    positions, lattice = _crystal((4, 4, 4), seed=1)
    cutoff, skin = 3.0, 0.6
    fns = neighbor_list(cutoff, skin)
    nbrs = fns.allocate(positions, lattice)
    update = jax.jit(fns.update)
    rng = np.random.default_rng(2)
    moved = positions
    for k in range(6):  # random walk; each move < skin / 4 per atom, rebuilds happen along the way
        moved = moved + rng.uniform(-1, 1, size=moved.shape) * skin / (4 * np.sqrt(3))
        before = int(nbrs.n_builds)
        rebuild = bool(needs_rebuild(moved, lattice, nbrs))
        nbrs = update(moved, lattice, nbrs)
        assert int(nbrs.n_builds) == before + rebuild
        assert _pairs(nbrs, cutoff, moved, lattice) == _graph_pairs(moved, lattice, cutoff)
    assert int(nbrs.n_builds) > 1  # the walk did trigger rebuilds


def test_overflow_is_flagged_never_silent():
    positions, lattice = _crystal((3, 3, 3), skew=False, seed=3)
    fns = neighbor_list(3.0, 0.3, capacity_multiplier=1.0)
    nbrs = fns.allocate(positions, lattice)
    assert nbrs.capacity == int(nbrs.count)  # exactly full
    # Compress the crystal by 5%: more pairs than slots.
    squeezed = fns.update(positions * 0.95, lattice * 0.95, nbrs)
    assert bool(squeezed.overflow) and int(squeezed.count) > squeezed.capacity
    # The flag stays set even after a later build that fits.
    assert bool(fns.update(positions, lattice, squeezed).overflow)
    # Re-allocation from the compressed state holds every pair.
    bigger = fns.allocate(positions * 0.95, lattice * 0.95)
    assert not bool(bigger.overflow)
    assert _pairs(bigger) == _graph_pairs(positions * 0.95, lattice * 0.95, 3.3)


def test_bins_require_a_large_enough_cell():
    positions, lattice = _crystal((2, 2, 2))
    with pytest.raises(ValueError, match="bins need a periodic cell"):
        neighbor_list(3.0, 0.5, use_bins=True).allocate(positions, lattice)
