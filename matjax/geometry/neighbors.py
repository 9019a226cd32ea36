"""Neighbour lists under ``jit``: fixed capacity, Verlet skin, explicit images, overflow flag.

Shapes must be static under ``jit``, so the list is allocated on the host with a capacity
(the pairs found now times ``capacity_multiplier``) and updated inside ``jit``:

    fns = neighbor_list(cutoff=5.0, skin=0.5)
    nbrs = fns.allocate(positions, lattice)                  # host, numpy in
    nbrs = fns.update(positions, lattice, nbrs)              # jit; rebuilds only when needed
    active, nbrs = within_cutoff(positions, lattice, nbrs)   # jit; the pairs a model needs
    if nbrs.overflow: nbrs = fns.allocate(..., previous=nbrs)  # host: more room, replay

The list holds every pair closer than ``cutoff + skin`` and is rebuilt when an atom has
moved more than skin / 2 since the last build (or the cell changed), so between rebuilds
it still holds every pair within ``cutoff``. ``within_cutoff`` compacts those into a
second, shorter list each step, so a model does no work on the skin's pairs nor on empty
slots (about 40% of the slots for a 5 A cutoff and 0.5 A skin in a metal).
A rebuild that finds more pairs than the capacity (or more atoms in a bin than the bin
capacity), or a step with more pairs within the cutoff than the short list holds, sets
``overflow``; it stays set, so the host can always tell that pairs were lost and must
re-allocate and replay. Pairs are never dropped silently.

Each pair is (receiver i, sender j, integer image shift s) with
r_ij = x_j + s @ lattice - x_i, the convention of ``matjax.data.graphs``. Images are
explicit, so a cell smaller than twice the cutoff (where an atom meets several images of
the same neighbour, or itself) is right. Two search modes, chosen at allocation:
- bins (cell list): the cell is cut into g_a x g_b x g_c bins at least cutoff + skin
  wide; each atom looks into its 27 neighbouring bins. Cost O(N). Needs g >= 3 along
  every axis (a periodic cell at least 3 (cutoff + skin) wide).
- all pairs over the explicit list of lattice images that can reach cutoff + skin: for
  small cells and molecules (non-periodic axes get no images). Cost O(N^2 x images).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from flax import struct


@struct.dataclass
class NeighborList:
    """A fixed-capacity list of directed pairs (capacity C, N atoms).

    senders / receivers: [C] int32 (j, i); shifts: [C, 3] int32 image of j;
    mask: [C] bool, True on filled slots; count: () int32 pairs found at the last build
    (may exceed C); overflow: () bool, set once anything overflowed; peaks: [3] int32,
    the most candidate pairs, pairs within the cutoff and atoms in one bin seen since
    allocation (a re-allocation sizes itself on them); reference_positions: [N, 3] and
    reference_lattice: [3, 3] at the last build; n_builds: () int32 builds since
    allocation. Static: the search parameters and ``active_capacity``, the slots of the
    within-cutoff list.
    """

    senders: jnp.ndarray
    receivers: jnp.ndarray
    shifts: jnp.ndarray
    mask: jnp.ndarray
    count: jnp.ndarray
    overflow: jnp.ndarray
    peaks: jnp.ndarray
    reference_positions: jnp.ndarray
    reference_lattice: jnp.ndarray
    n_builds: jnp.ndarray
    cutoff: float = struct.field(pytree_node=False)
    skin: float = struct.field(pytree_node=False)
    pbc: tuple[bool, bool, bool] = struct.field(pytree_node=False)
    grid: tuple[int, int, int] | None = struct.field(pytree_node=False)
    bin_capacity: int = struct.field(pytree_node=False)
    images: tuple[tuple[int, int, int], ...] = struct.field(pytree_node=False)
    active_capacity: int = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return self.senders.shape[0]

    def graph(self, species) -> jraph.GraphsTuple:
        """One-structure GraphsTuple over the slots (edges carry "shifts" and "mask")."""
        return jraph.GraphsTuple(
            nodes={"species": species}, edges={"shifts": self.shifts, "mask": self.mask},
            senders=self.senders, receivers=self.receivers,
            n_node=jnp.array([species.shape[0]]), n_edge=jnp.array([self.capacity]), globals=None,
        )


class NeighborListFns(NamedTuple):
    """allocate(positions, lattice) on the host; update(positions, lattice, nbrs) in jit."""

    allocate: Callable[..., NeighborList]
    update: Callable[[jnp.ndarray, jnp.ndarray, NeighborList], NeighborList]


def _widths(lattice: np.ndarray) -> np.ndarray:
    """[3] distances between opposite faces of the cell."""
    volume = abs(np.linalg.det(lattice))
    return np.array([volume / np.linalg.norm(np.cross(lattice[(k + 1) % 3], lattice[(k + 2) % 3])) for k in range(3)])


def _image_list(lattice: np.ndarray, reach: float, pbc) -> tuple[tuple[int, int, int], ...]:
    """Every lattice image that can hold a point within ``reach`` of a point of the cell.

    Fractional coordinates are wrapped to [0, 1), so a pair within ``reach`` has
    |f_j - f_i + s_k| < reach / width_k along each axis, hence |s_k| <= ceil(reach / width_k).
    """
    ranges = []
    for k in range(3):
        n = math.ceil(reach / _widths(lattice)[k]) if pbc[k] else 0
        ranges.append(range(-n, n + 1))
    return tuple(itertools.product(*ranges))


def _wrap(positions, lattice, pbc):
    """(fractional coordinates wrapped to [0, 1) along periodic axes [N, 3], their integer offsets [N, 3])."""
    frac = jnp.linalg.solve(lattice.T, positions.T).T
    periodic = jnp.asarray(pbc)
    offsets = jnp.where(periodic, jnp.floor(frac), 0.0)
    return frac - offsets, offsets.astype(jnp.int32)


def _bin_candidates(wrapped, grid, bin_capacity):
    """Candidates from the 27 bins around each atom's bin.

    Returns (senders [N, M], bin-image shifts [N, M, 3], valid [N, M], most atoms in a bin).
    """
    n = wrapped.shape[0]
    g = jnp.array(grid)
    cell = jnp.clip(jnp.floor(wrapped * g).astype(jnp.int32), 0, g - 1)  # [N, 3]
    flat = (cell[:, 0] * grid[1] + cell[:, 1]) * grid[2] + cell[:, 2]
    order = jnp.argsort(flat)
    sorted_bins = flat[order]
    first = jnp.searchsorted(sorted_bins, sorted_bins, side="left")
    rank = jnp.arange(n) - first
    n_bins = grid[0] * grid[1] * grid[2]
    table = jnp.full((n_bins, bin_capacity), n, jnp.int32).at[sorted_bins, rank].set(order, mode="drop")
    deltas = jnp.array(list(itertools.product((-1, 0, 1), repeat=3)))  # [27, 3]
    neighbor = cell[:, None, :] + deltas[None]  # [N, 27, 3]
    image = jnp.floor_divide(neighbor, g)
    neighbor = neighbor - image * g
    neighbor_flat = (neighbor[..., 0] * grid[1] + neighbor[..., 1]) * grid[2] + neighbor[..., 2]
    senders = table[neighbor_flat].reshape(n, -1)  # [N, 27 * K]
    shifts = jnp.repeat(image, bin_capacity, axis=1)  # [N, 27 * K, 3]
    return senders, shifts, senders < n, jnp.max(rank) + 1


def _image_candidates(n, images):
    """All atoms in every listed image: (senders [N, M], shifts [N, M, 3], valid, 0)."""
    images = jnp.array(images, jnp.int32)
    senders = jnp.tile(jnp.arange(n, dtype=jnp.int32), images.shape[0])
    shifts = jnp.repeat(images, n, axis=0)
    m = senders.shape[0]
    return (jnp.broadcast_to(senders, (n, m)), jnp.broadcast_to(shifts, (n, m, 3)),
            jnp.ones((n, m), bool), jnp.array(0, jnp.int32))


def _pairs(positions, lattice, nbrs: NeighborList):
    """Candidate pairs and which are within cutoff + skin.

    Returns (keep [N, M] bool, senders [N, M], shifts between unwrapped positions
    [N, M, 3], most atoms in one bin ()).
    """
    n = positions.shape[0]
    wrapped, offsets = _wrap(positions, lattice, nbrs.pbc)
    if nbrs.grid is not None:
        senders, shifts, valid, bin_peak = _bin_candidates(wrapped, nbrs.grid, nbrs.bin_capacity)
    else:
        senders, shifts, valid, bin_peak = _image_candidates(n, nbrs.images)
    j = jnp.minimum(senders, n - 1)
    delta = (wrapped[j] + shifts - wrapped[:, None, :]) @ lattice  # [N, M, 3]
    d2 = jnp.sum(delta * delta, axis=-1)
    is_self = (j == jnp.arange(n)[:, None]) & jnp.all(shifts == 0, axis=-1)
    keep = valid & ~is_self & (d2 < (nbrs.cutoff + nbrs.skin) ** 2)
    # x_j + s L - x_i with x = (wrapped + offset) L gives s = s_wrapped + offset_i - offset_j.
    return keep, j, shifts + offsets[:, None, :] - offsets[j], bin_peak


@jax.jit
def _count(positions, lattice, nbrs: NeighborList):
    """(candidate pairs, pairs within the cutoff) now."""
    keep, senders, shifts, _ = _pairs(positions, lattice, nbrs)
    delta = positions[senders] + shifts.astype(positions.dtype) @ lattice - positions[:, None, :]
    return jnp.sum(keep), jnp.sum(keep & (jnp.sum(delta * delta, axis=-1) < nbrs.cutoff**2))


@jax.jit
def _build(positions, lattice, nbrs: NeighborList) -> NeighborList:
    """All pairs within cutoff + skin, compacted into the list's slots."""
    keep, senders, shifts, bin_peak = _pairs(positions, lattice, nbrs)
    count = jnp.sum(keep)
    capacity = nbrs.capacity
    flat = jnp.nonzero(keep.ravel(), size=capacity, fill_value=0)[0]
    mask = jnp.arange(capacity) < count
    return nbrs.replace(
        senders=jnp.where(mask, senders.ravel()[flat], 0),
        receivers=jnp.where(mask, flat // keep.shape[1], 0).astype(jnp.int32),
        shifts=jnp.where(mask[:, None], shifts.reshape(-1, 3)[flat], 0), mask=mask, count=count.astype(jnp.int32),
        overflow=nbrs.overflow | (count > capacity) | (bin_peak > nbrs.bin_capacity),
        peaks=jnp.maximum(nbrs.peaks, jnp.stack([count, 0, bin_peak]).astype(jnp.int32)),
        reference_positions=positions, reference_lattice=lattice, n_builds=nbrs.n_builds + 1,
    )


def needs_rebuild(positions, lattice, nbrs: NeighborList) -> jnp.ndarray:
    """() bool: an atom moved more than skin / 2 since the last build, or the cell changed."""
    moved = jnp.max(jnp.sum((positions - nbrs.reference_positions) ** 2, axis=-1))
    return (moved > (0.5 * nbrs.skin) ** 2) | jnp.any(lattice != nbrs.reference_lattice)


def update(positions, lattice, nbrs: NeighborList) -> NeighborList:
    """The list for new positions (jit-able): rebuilt only when ``needs_rebuild``."""
    return jax.lax.cond(needs_rebuild(positions, lattice, nbrs), _build, lambda p, l, nb: nb, positions, lattice, nbrs)


def neighbor_list(
    cutoff: float,
    skin: float = 0.5,
    pbc: tuple[bool, bool, bool] = (True, True, True),
    capacity_multiplier: float = 1.25,
    active_multiplier: float = 1.1,
    use_bins: bool | None = None,
) -> NeighborListFns:
    """Allocate / update functions of a neighbour list with radius ``cutoff + skin``.

    capacity_multiplier: room for more candidate pairs (and bin occupants) than found at
    allocation; active_multiplier: the same for the within-cutoff list, whose length sets
    the model's cost and varies little at fixed density.
    use_bins: force (True) or forbid (False) the O(N) bin search; None picks bins when
    the cell allows them (periodic, >= 3 bins per axis) and has more than 64 atoms.
    """
    if not cutoff > 0 or skin < 0:
        raise ValueError(f"need cutoff > 0 and skin >= 0, got {cutoff}, {skin}")
    pbc = tuple(bool(p) for p in pbc)
    reach = cutoff + skin

    def allocate(positions, lattice, previous: NeighborList | None = None) -> NeighborList:
        """A list for ``positions`` with room for capacity_multiplier x the pairs (and bin
        occupancy) found now or, if given, the peaks ``previous`` saw (after an overflow)."""
        positions = np.asarray(positions, dtype=np.float64)
        lattice = np.asarray(lattice, dtype=np.float64)
        n = len(positions)
        grid = tuple(int(g) for g in np.floor(_widths(lattice) / reach))
        bins_possible = all(pbc) and min(grid) >= 3
        if use_bins and not bins_possible:
            raise ValueError(f"bins need a periodic cell >= 3 x (cutoff + skin) = {3 * reach:.2f} A wide; "
                             f"this one is {_widths(lattice).round(2).tolist()} A")
        bins = bins_possible if use_bins is None else use_bins
        bins = bins and (use_bins or n > 64)
        bin_capacity = 0
        if bins:
            frac = np.linalg.solve(lattice.T, positions.T).T
            cells = np.clip(np.floor((frac - np.floor(frac)) * grid).astype(int), 0, np.array(grid) - 1)
            occupancy = np.bincount(np.ravel_multi_index(cells.T, grid), minlength=int(np.prod(grid)))
            peak = max(occupancy.max(), int(previous.peaks[2]) if previous is not None else 0)
            bin_capacity = math.ceil(peak * capacity_multiplier) + 1
        dtype = jnp.zeros(()).dtype
        template = NeighborList(
            senders=jnp.zeros(1, jnp.int32), receivers=jnp.zeros(1, jnp.int32), shifts=jnp.zeros((1, 3), jnp.int32),
            mask=jnp.zeros(1, bool), count=jnp.array(0, jnp.int32), overflow=jnp.array(False),
            peaks=jnp.zeros(3, jnp.int32),
            reference_positions=jnp.asarray(positions, dtype), reference_lattice=jnp.asarray(lattice, dtype),
            n_builds=jnp.array(0, jnp.int32), cutoff=float(cutoff), skin=float(skin), pbc=pbc,
            grid=grid if bins else None, bin_capacity=bin_capacity,
            images=() if bins else _image_list(lattice, reach, pbc), active_capacity=1,
        )
        found = np.array(_count(template.reference_positions, template.reference_lattice, template))
        if previous is not None:
            found = np.maximum(found, np.asarray(previous.peaks[:2]))
        capacity, active = (max(math.ceil(int(k) * m), 16) for k, m in zip(found, (capacity_multiplier, active_multiplier)))
        template = _resize(template, capacity).replace(active_capacity=active)
        nbrs = _build(template.reference_positions, template.reference_lattice, template)
        if bool(nbrs.overflow):
            raise RuntimeError(f"neighbour list overflowed at allocation ({int(nbrs.count)} pairs, capacity {capacity})")
        return nbrs

    return NeighborListFns(allocate, update)


def _resize(nbrs: NeighborList, capacity: int) -> NeighborList:
    return nbrs.replace(
        senders=jnp.zeros(capacity, jnp.int32), receivers=jnp.zeros(capacity, jnp.int32),
        shifts=jnp.zeros((capacity, 3), jnp.int32), mask=jnp.zeros(capacity, bool),
    )


def within_cutoff(positions, lattice, nbrs: NeighborList) -> tuple[NeighborList, NeighborList]:
    """(the pairs of ``nbrs`` closer than its cutoff in ``active_capacity`` slots, ``nbrs``
    with its overflow flag and peaks updated); jit-able, call it every step.

    The first is a NeighborList of the same search with shorter arrays: pass its
    ``graph(species)`` to a model. Pairs between cutoff and cutoff + skin would add
    nothing (the envelope is zero there), so leaving them out changes no result.
    """
    vectors = positions[nbrs.senders] + nbrs.shifts.astype(positions.dtype) @ lattice - positions[nbrs.receivers]
    keep = nbrs.mask & (jnp.sum(vectors * vectors, axis=-1) < nbrs.cutoff**2)
    count = jnp.sum(keep)
    capacity = nbrs.active_capacity
    index = jnp.nonzero(keep, size=capacity, fill_value=0)[0]
    mask = jnp.arange(capacity) < count
    active = nbrs.replace(
        senders=jnp.where(mask, nbrs.senders[index], 0), receivers=jnp.where(mask, nbrs.receivers[index], 0),
        shifts=jnp.where(mask[:, None], nbrs.shifts[index], 0), mask=mask,
    )
    nbrs = nbrs.replace(overflow=nbrs.overflow | (count > capacity), peaks=nbrs.peaks.at[1].max(count.astype(jnp.int32)))
    return active, nbrs
