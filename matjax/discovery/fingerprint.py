"""Cheap structure fingerprints for removing duplicate candidates at scale.

A fingerprint hashes every crystal's multiset of atoms, each atom described by its species
and the multiset of (neighbour species, distance / mean edge length) over its edges: one
Weisfeiler-Lehman refinement step. It is invariant to atom order, to symmetry-equivalent
decorations, to volume and to supercells, so the same decorated prototype coming from two
parents, or from two equivalent substitutions of one parent, collides on purpose. Distinct structures
collide only by hash accident (64-bit) or when they agree to within the 1% distance bins;
the final shortlist is checked with pymatgen's StructureMatcher where that matters.
"""

from __future__ import annotations

import numpy as np

from matjax.data.graphs import PackedGraphs

DISTANCE_BIN = 0.01  # relative to the graph's mean edge length

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread uint64 hash of uint64 input."""
    x = x.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _mix(a * np.uint64(0x9E3779B97F4A7C15) + _mix(b))


def graph_fingerprints(graphs: PackedGraphs) -> np.ndarray:
    """[M] uint64 fingerprint per graph (see module docstring)."""
    with np.errstate(over="ignore"):
        node_start = np.cumsum(graphs.n_node) - graphs.n_node
        edge_graph = np.repeat(np.arange(len(graphs)), graphs.n_edge)
        receivers = graphs.receivers + node_start[edge_graph]
        senders = graphs.senders + node_start[edge_graph]
        mean_length = np.bincount(edge_graph, graphs.distances, len(graphs)) / np.maximum(graphs.n_edge, 1)
        bins = np.rint(graphs.distances / mean_length[edge_graph] / DISTANCE_BIN).astype(np.uint64)
        species = graphs.species.astype(np.uint64)
        edge_hash = _combine(species[senders], bins)
        environment = np.zeros(len(species), dtype=np.uint64)
        np.add.at(environment, receivers, edge_hash)  # order-free sum, wraps mod 2^64
        atom_hash = _combine(species, environment)
        # Multiset of atom environments per graph, counts divided by their gcd: a supercell
        # repeats every environment equally often, so it maps to the same fingerprint.
        node_graph = np.repeat(np.arange(len(graphs)), graphs.n_node).astype(np.uint64)
        rows, counts = np.unique(np.stack([node_graph, atom_hash], axis=1), axis=0, return_counts=True)
        starts = np.flatnonzero(np.r_[True, rows[1:, 0] != rows[:-1, 0]])
        gcd = np.gcd.reduceat(counts, starts)
        row_graph = rows[:, 0].astype(np.int64)
        reduced = counts // np.repeat(gcd, np.diff(np.r_[starts, len(rows)]))
        graph_hash = np.zeros(len(graphs), dtype=np.uint64)
        np.add.at(graph_hash, row_graph, _combine(rows[:, 1], reduced.astype(np.uint64)))
        return graph_hash


def first_occurrences(fingerprints: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """[M] bool: True for the first of each fingerprint, False for repeats and for any
    fingerprint in ``exclude`` (e.g. the known crystals')."""
    _, first = np.unique(fingerprints, return_index=True)
    keep = np.zeros(len(fingerprints), dtype=bool)
    keep[first] = True
    if exclude is not None:
        keep &= ~np.isin(fingerprints, exclude)
    return keep
