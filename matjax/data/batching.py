"""Padded, statically shaped batches of crystal graphs for ``jit``.

A batch is a ``jraph.GraphsTuple`` padded with ``jraph.pad_with_graphs`` to a fixed
``Budget`` (nodes, edges, graphs), so every batch of a run has one shape and the jitted
step compiles once. Batches are filled greedily in the given order until the next
graph would overflow the budget (dynamic batching), so no graph is ever dropped.

Layout (G = budget.n_graph, N = budget.n_node, E = budget.n_edge)::

    nodes    = {"species": int32 [N], "positions": float32 [N, 3] Cartesian, Angstrom}
    edges    = {"shifts": float32 [E, 3] lattice image of the sender,
                "distances": float32 [E] Angstrom}
    globals  = {"lattice": float32 [G, 3, 3] rows, "targets": float32 [G, T] if given}
    senders, receivers: int32 [E] indices into the batch's nodes

The last graph(s) of every batch are padding; mask them with
``jraph.get_graph_padding_mask`` / ``get_node_padding_mask`` / ``get_edge_padding_mask``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jraph
import numpy as np

from matjax.data.graphs import PackedGraphs, take


class Budget(NamedTuple):
    """Static padded sizes of a batch, including the padding graph's share."""

    n_node: int
    n_edge: int
    n_graph: int


def round_up(n: int) -> int:
    """Bucket a size: a multiple of 64 up to 512, then 1, 1.25, 1.5 or 1.75 x 2^k.

    Few distinct buckets (few compilations); padding adds < 64 elements up to 512 and
    < 25% above.
    """
    if n <= 512:
        return 64 * max(1, math.ceil(n / 64))
    step = 2 ** (math.floor(math.log2(n)) - 2)
    return step * math.ceil(n / step)


def budget_for(graphs: PackedGraphs, batch_size: int) -> Budget:
    """A budget that fits ``batch_size`` average graphs and always the largest one.

    One node and one edge of room are kept for the padding graph.
    """
    if len(graphs) == 0:
        raise ValueError("cannot size batches for an empty set of graphs")
    n_node = max(batch_size * graphs.n_node.mean(), graphs.n_node.max())
    n_edge = max(batch_size * graphs.n_edge.mean(), graphs.n_edge.max())
    return Budget(round_up(math.ceil(n_node) + 1), round_up(math.ceil(n_edge) + 1), batch_size + 1)


def batch_indices(graphs: PackedGraphs, budget: Budget, order=None) -> list[np.ndarray]:
    """Split ``order`` (default 0..M-1) into consecutive batches that fit ``budget``.

    Raises ValueError naming the graph if a single graph is larger than the budget.
    """
    order = np.arange(len(graphs)) if order is None else np.asarray(order)
    nodes, edges = graphs.n_node[order], graphs.n_edge[order]
    too_big = np.flatnonzero((nodes >= budget.n_node) | (edges >= budget.n_edge))
    if len(too_big):
        i = int(order[too_big[0]])
        raise ValueError(
            f"graph {i} ({graphs.n_node[i]} nodes, {graphs.n_edge[i]} edges) exceeds the batch budget {budget}"
        )
    cum_nodes, cum_edges = np.cumsum(nodes), np.cumsum(edges)
    batches, start = [], 0
    while start < len(order):
        base_n = cum_nodes[start - 1] if start else 0
        base_e = cum_edges[start - 1] if start else 0
        end = min(
            np.searchsorted(cum_nodes, base_n + budget.n_node - 1, side="right"),
            np.searchsorted(cum_edges, base_e + budget.n_edge - 1, side="right"),
            start + budget.n_graph - 1,
        )
        batches.append(order[start:end])
        start = end
    return batches


def graphs_tuple(graphs: PackedGraphs, budget: Budget, targets=None) -> jraph.GraphsTuple:
    """Batch all of ``graphs`` into one GraphsTuple padded to ``budget``.

    targets: optional [M, T] per-graph targets, carried (and padded) in globals.
    """
    node_offset = np.cumsum(graphs.n_node) - graphs.n_node
    edge_offset = np.repeat(node_offset, graphs.n_edge).astype(np.int32)
    positions = np.einsum("ni,nij->nj", graphs.frac, np.repeat(graphs.lattice, graphs.n_node, axis=0))
    globals_ = {"lattice": graphs.lattice.astype(np.float32)}
    if targets is not None:
        globals_["targets"] = np.asarray(targets, dtype=np.float32).reshape(len(graphs), -1)
    batch = jraph.GraphsTuple(
        nodes={"species": graphs.species.astype(np.int32), "positions": positions.astype(np.float32)},
        edges={"shifts": graphs.shifts.astype(np.float32), "distances": graphs.distances.astype(np.float32)},
        senders=graphs.senders + edge_offset,
        receivers=graphs.receivers + edge_offset,
        n_node=graphs.n_node.astype(np.int32),
        n_edge=graphs.n_edge.astype(np.int32),
        globals=globals_,
    )
    return jraph.pad_with_graphs(batch, *budget)


def iterate_batches(graphs: PackedGraphs, budget: Budget, targets=None, order=None):
    """Yield (indices, padded GraphsTuple) over ``graphs`` in ``order``."""
    for idx in batch_indices(graphs, budget, order):
        yield idx, graphs_tuple(take(graphs, idx), budget, None if targets is None else targets[idx])
