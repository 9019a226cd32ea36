"""Periodic geometry inside ``jit``: edge vectors from positions, lattice and image shifts.

Displacements are recomputed from (positions, lattice, shifts) rather than stored, so
``jax.grad`` reaches both the positions (forces) and the cell (stress).
"""

from __future__ import annotations

import jax.numpy as jnp
import jraph

# A molecule sits in this cubic box (no periodic images are used).
MOLECULE_BOX = 100.0


def _graph_index(counts: jnp.ndarray, total: int) -> jnp.ndarray:
    """[total] index of the graph each of ``total`` items belongs to, given [G] counts."""
    if counts.shape[0] == 1:
        # One graph (MD, a calculator): its counts are often trace-time constants, and XLA
        # would constant-fold the repeat's cumulative sum over every edge, which took
        # minutes of GPU compilation at 32,000 atoms.
        return jnp.zeros(total, jnp.int32)
    return jnp.repeat(jnp.arange(counts.shape[0]), counts, total_repeat_length=total)


def edge_graph_index(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """[E] index of the graph each edge belongs to."""
    return _graph_index(graph.n_edge, graph.senders.shape[0])


def node_graph_index(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """[N] index of the graph each node belongs to."""
    return _graph_index(graph.n_node, graph.nodes["species"].shape[0])


def edge_vectors(positions: jnp.ndarray, lattice: jnp.ndarray, graph: jraph.GraphsTuple) -> jnp.ndarray:
    """[E, 3] r_ij = x_j + shift @ lattice - x_i, pointing from receiver i to sender j.

    positions: [N, 3] Cartesian; lattice: [G, 3, 3] rows; shifts come from graph.edges.
    """
    offsets = jnp.einsum("ei,eij->ej", graph.edges["shifts"], lattice[edge_graph_index(graph)])
    return positions[graph.senders] + offsets - positions[graph.receivers]


def safe_norm(vectors: jnp.ndarray) -> jnp.ndarray:
    """[...] Euclidean norm with a finite gradient at zero (padding edges have r = 0)."""
    sq = jnp.sum(vectors * vectors, axis=-1)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
