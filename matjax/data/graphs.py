"""Periodic crystal graphs: pymatgen Structure -> numpy ``CrystalGraph``.

Edge convention (used everywhere in matjax): edge ``e`` carries a message from atom
``senders[e] = j`` in image ``shifts[e]`` to atom ``receivers[e] = i``, and

    r_ij = (frac[j] + shifts[e] - frac[i]) @ lattice,    distances[e] = |r_ij|.

All neighbours with distance <= cutoff + 1e-8 A (pymatgen's tolerance, so a neighbour exactly
at the cutoff is kept despite rounding) are listed, periodic images included, so an atom can be
its own neighbour (a self-image) and the same pair can appear with several shifts in
cells smaller than the cutoff. Edges are sorted by receiver, then distance.

The neighbour search is pymatgen's Cython cell list (``find_points_in_spheres``, the
engine of ``Structure.get_neighbor_list``), so the edge multiset equals pymatgen's by
construction; ``tests/test_graphs.py`` also checks it against an independent numpy
brute force on awkward cells.

An atom with no neighbour inside the cutoff raises ``IsolatedAtomError``: such a node
receives no message, so a graph network would predict from its species alone. Raise the
cutoff, or drop the structure (the dataset builders do so and report it).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from pymatgen.optimization.neighbors import find_points_in_spheres

from matjax.data.elements import symbols

# Coincident points closer than this are the atom itself; the cutoff is widened by it, as in pymatgen.
SELF_TOLERANCE = 1e-8


class IsolatedAtomError(ValueError):
    """An atom has no neighbour within the cutoff."""


class CrystalGraph(NamedTuple):
    """One crystal as a periodic graph (numpy, host side).

    species:   [N] int32 atomic numbers
    frac:      [N, 3] float64 fractional coordinates (as given, not wrapped)
    lattice:   [3, 3] float64 lattice vectors as rows (Angstrom)
    senders:   [E] int32 neighbour atom j
    receivers: [E] int32 centre atom i
    shifts:    [E, 3] int32 lattice image of j
    distances: [E] float64 |r_ij| (Angstrom)
    """

    species: np.ndarray
    frac: np.ndarray
    lattice: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    shifts: np.ndarray
    distances: np.ndarray

    @property
    def n_node(self) -> int:
        return len(self.species)

    @property
    def n_edge(self) -> int:
        return len(self.senders)

    @property
    def positions(self) -> np.ndarray:
        """[N, 3] Cartesian positions (Angstrom)."""
        return self.frac @ self.lattice


def _validated_cart(species: np.ndarray, frac: np.ndarray, lattice: np.ndarray, cutoff: float) -> np.ndarray:
    """[N, 3] Cartesian positions, after checking the inputs describe a real crystal."""
    if len(species) == 0:
        raise ValueError("empty structure: no atoms")
    if frac.shape != (len(species), 3) or lattice.shape != (3, 3):
        raise ValueError(f"bad shapes: species {species.shape}, frac {frac.shape}, lattice {lattice.shape}")
    cart = np.ascontiguousarray(frac @ lattice)
    if not np.isfinite(cart).all():
        raise ValueError("non-finite coordinates or lattice")
    (a, b, c) = lattice.tolist()  # scalar triple product: 5x cheaper than np.linalg.det here
    volume = a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0]) + a[2] * (b[0] * c[1] - b[1] * c[0])
    if abs(volume) < 1e-6:
        raise ValueError(f"degenerate lattice (volume {volume:.3g} A^3)")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    return cart


def _raise_coincident(centres: np.ndarray, points: np.ndarray, distances: np.ndarray) -> None:
    pairs = np.flatnonzero((distances <= SELF_TOLERANCE) & (centres != points))
    i, j = int(centres[pairs[0]]), int(points[pairs[0]])
    raise ValueError(f"atoms {i} and {j} coincide (or are periodic images of each other)")


def _symbol(z: int) -> str:
    table = symbols()
    return table[z] if 0 < z < len(table) else f"Z={z}"


def _keep_nearest(receivers: np.ndarray, max_neighbors: int) -> np.ndarray:
    """Mask of the first ``max_neighbors`` edges of each receiver (edges sorted by receiver)."""
    first = np.searchsorted(receivers, receivers, side="left")
    return np.arange(len(receivers)) - first < max_neighbors


def build_graph(
    species,
    frac,
    lattice,
    cutoff: float = 6.0,
    max_neighbors: int | None = None,
    pbc: tuple[bool, bool, bool] = (True, True, True),
) -> CrystalGraph:
    """Crystal graph from arrays: species [N] (Z), frac [N, 3], lattice [3, 3] (rows).

    max_neighbors: keep only the nearest ``max_neighbors`` edges of each receiver (ties
    broken by pymatgen's order), as the reference CGCNN does; None keeps all.
    pbc: periodic directions; a molecule uses a box lattice with pbc = (False,) * 3.
    """
    species = np.asarray(species, dtype=np.int32)
    frac = np.asarray(frac, dtype=np.float64)
    lattice = np.asarray(lattice, dtype=np.float64)
    cart = _validated_cart(species, frac, lattice, cutoff)
    centres, points, images, distances = find_points_in_spheres(
        cart, cart, r=float(cutoff), pbc=np.asarray(pbc, dtype=np.int64),
        lattice=np.ascontiguousarray(lattice), tol=SELF_TOLERANCE,
    )
    keep = np.flatnonzero(distances > SELF_TOLERANCE)
    if len(distances) - len(keep) != len(species):  # more zero-length pairs than atoms' own
        _raise_coincident(centres, points, distances)
    # One float key sorts by centre, then distance (all distances < 2 * cutoff + 1).
    edges = keep[np.argsort(centres[keep] * (2.0 * cutoff + 1.0) + distances[keep])]
    receivers = centres[edges].astype(np.int32)
    n_neighbors = np.bincount(receivers, minlength=len(species))
    if not n_neighbors.all():
        lonely = np.flatnonzero(n_neighbors == 0)
        raise IsolatedAtomError(
            f"{len(lonely)} atom(s) have no neighbour within {cutoff} A, e.g. atom {lonely[0]} "
            f"({_symbol(species[lonely[0]])}); raise the cutoff or drop this structure"
        )
    senders = points[edges].astype(np.int32)
    shifts = images[edges].astype(np.int32)  # integral floats from the lattice loop
    distances = distances[edges]
    if max_neighbors is not None:
        keep = _keep_nearest(receivers, max_neighbors)
        senders, receivers, shifts, distances = senders[keep], receivers[keep], shifts[keep], distances[keep]
    return CrystalGraph(species, frac, lattice, senders, receivers, shifts, distances)


def structure_arrays(structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(species [N] Z, frac [N, 3], lattice [3, 3]) of an ordered pymatgen Structure."""
    if len(structure) == 0:
        raise ValueError("empty structure: no atoms")
    # One pass over the sites' compositions; pymatgen's atomic_numbers is ~4x slower.
    occupancy = [item for site in structure for item in site.species.items()]
    if len(occupancy) != len(structure) or any(occ != 1 for _, occ in occupancy):
        raise ValueError(f"disordered structure ({structure.composition.reduced_formula}): order it first")
    species = np.array([element.Z for element, _ in occupancy], dtype=np.int32)
    if not species.all():
        raise ValueError(f"dummy species in {structure.composition.reduced_formula}: no atomic number")
    return species, structure.frac_coords, structure.lattice.matrix


def structure_to_graph(structure, cutoff: float = 6.0, max_neighbors: int | None = None) -> CrystalGraph:
    """Periodic crystal graph of a pymatgen Structure; see ``build_graph``."""
    return build_graph(*structure_arrays(structure), cutoff=cutoff, max_neighbors=max_neighbors)


def graph_to_structure(graph: CrystalGraph):
    """pymatgen Structure with the graph's species, lattice and fractional coordinates."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(graph.lattice), graph.species.tolist(), graph.frac)


@dataclasses.dataclass(frozen=True)
class PackedGraphs:
    """Many crystal graphs in concatenated arrays (CSR style), host side.

    Per graph: n_node [M], n_edge [M], lattice [M, 3, 3]. Per node (sum N): species, frac.
    Per edge (sum E): senders, receivers (local to their graph), shifts, distances.
    Subsetting, batching and caching are vectorised gathers over this layout.
    ``len()`` is the number of graphs M.
    """

    n_node: np.ndarray
    n_edge: np.ndarray
    lattice: np.ndarray
    species: np.ndarray
    frac: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    shifts: np.ndarray
    distances: np.ndarray

    def __len__(self) -> int:
        return len(self.n_node)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def arrays(self) -> dict[str, np.ndarray]:
        """Field name -> array, in field order."""
        return {name: getattr(self, name) for name in self.fields()}

    def replace(self, **arrays) -> "PackedGraphs":
        return dataclasses.replace(self, **arrays)

    def graph(self, i: int) -> CrystalGraph:
        n0, e0 = self.n_node[:i].sum(), self.n_edge[:i].sum()
        nodes, edges = slice(n0, n0 + self.n_node[i]), slice(e0, e0 + self.n_edge[i])
        return CrystalGraph(
            self.species[nodes], self.frac[nodes], self.lattice[i], self.senders[edges],
            self.receivers[edges], self.shifts[edges], self.distances[edges],
        )


def pack(graphs) -> PackedGraphs:
    """Concatenate a sequence of CrystalGraphs (at least one)."""
    graphs = list(graphs)
    if not graphs:
        raise ValueError("cannot pack an empty sequence of graphs")
    cat = lambda name: np.concatenate([getattr(g, name) for g in graphs])
    return PackedGraphs(
        n_node=np.array([g.n_node for g in graphs], dtype=np.int64),
        n_edge=np.array([g.n_edge for g in graphs], dtype=np.int64),
        lattice=np.stack([g.lattice for g in graphs]),
        species=cat("species"), frac=cat("frac"), senders=cat("senders"),
        receivers=cat("receivers"), shifts=cat("shifts"), distances=cat("distances"),
    )


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate([arange(s, s + n) for s, n in zip(starts, lengths)]), vectorised."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def take(packed: PackedGraphs, indices) -> PackedGraphs:
    """The graphs ``indices`` (any order, repeats allowed) as a new PackedGraphs."""
    indices = np.asarray(indices, dtype=np.int64)
    node_start = np.cumsum(packed.n_node) - packed.n_node
    edge_start = np.cumsum(packed.n_edge) - packed.n_edge
    nodes = ragged_arange(node_start[indices], packed.n_node[indices])
    edges = ragged_arange(edge_start[indices], packed.n_edge[indices])
    return PackedGraphs(
        packed.n_node[indices], packed.n_edge[indices], packed.lattice[indices],
        packed.species[nodes], packed.frac[nodes], packed.senders[edges],
        packed.receivers[edges], packed.shifts[edges], packed.distances[edges],
    )


def concat(parts) -> PackedGraphs:
    """Concatenate PackedGraphs along the graph axis."""
    return PackedGraphs(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in PackedGraphs.fields()})
