"""Padded batches: every graph lands in exactly one batch, and padding or batch composition
never changes a per-graph result."""

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymatgen.core import Lattice, Structure

from matjax.data.batching import Budget, batch_indices, budget_for, graphs_tuple, iterate_batches, round_up
from matjax.data.graphs import pack, structure_to_graph, take
from matjax.geometry.periodic import edge_vectors, safe_norm
from matjax.models.layers import gaussian_rbf


def small_crystals(n=9, seed=0):
    rng = np.random.default_rng(seed)
    graphs = []
    for k in range(n):
        n_atoms = int(rng.integers(1, 6))
        lattice = Lattice.from_parameters(*rng.uniform(3.0, 5.0, 3), *rng.uniform(70, 110, 3))
        species = rng.choice([3, 8, 14, 26, 79], n_atoms).tolist()
        graphs.append(structure_to_graph(Structure(lattice, species, rng.random((n_atoms, 3))), 4.5))
    return pack(graphs)


@jax.jit
def per_graph_features(batch: jraph.GraphsTuple) -> jnp.ndarray:
    """[G, 40 + 1] per-graph sums of the RBF of recomputed edge lengths and of species."""
    r = safe_norm(edge_vectors(batch.nodes["positions"], batch.globals["lattice"], batch))
    rbf = gaussian_rbf(r, cutoff=4.5) * jraph.get_edge_padding_mask(batch)[:, None]
    n_graph = batch.n_node.shape[0]
    edge_graph = jnp.repeat(jnp.arange(n_graph), batch.n_edge, total_repeat_length=r.shape[0])
    node_graph = jnp.repeat(jnp.arange(n_graph), batch.n_node, total_repeat_length=batch.nodes["species"].shape[0])
    species = jax.ops.segment_sum(batch.nodes["species"].astype(jnp.float32), node_graph, n_graph)
    return jnp.concatenate([jax.ops.segment_sum(rbf, edge_graph, n_graph), species[:, None]], axis=1)


@given(st.integers(1, 10**7))
def test_round_up_buckets_with_bounded_waste(n):
    b = round_up(n)
    assert n <= b
    assert b - n < 64 if n <= 512 else b < 1.25 * n
    assert round_up(b) == b


def test_batches_cover_every_graph_once_within_budget():
    graphs = small_crystals(40)
    budget = budget_for(graphs, batch_size=6)
    order = np.random.default_rng(1).permutation(len(graphs))
    batches = batch_indices(graphs, budget, order)
    np.testing.assert_array_equal(np.concatenate(batches), order)
    for idx in batches:
        assert graphs.n_node[idx].sum() < budget.n_node and graphs.n_edge[idx].sum() < budget.n_edge
        assert len(idx) < budget.n_graph


def test_padding_and_batch_composition_do_not_change_per_graph_results():
    graphs = small_crystals(9)
    alone = [per_graph_features(graphs_tuple(take(graphs, [i]), budget_for(take(graphs, [i]), 1)))[0] for i in range(9)]
    for budget, order in [
        (budget_for(graphs, 3), np.arange(9)),
        (budget_for(graphs, 5), np.arange(9)[::-1]),
        (Budget(round_up(graphs.n_node.sum() + 1) * 2, round_up(graphs.n_edge.sum()) * 2, 12), np.arange(9)),
    ]:
        for idx, batch in iterate_batches(graphs, budget, order=order):
            out = per_graph_features(batch)
            for k, i in enumerate(idx):
                np.testing.assert_allclose(out[k], alone[i], rtol=1e-5, atol=1e-5)
            assert jraph.get_graph_padding_mask(batch).sum() == len(idx)


def test_batch_distances_match_recomputed_edge_vectors():
    graphs = small_crystals(5)
    batch = graphs_tuple(graphs, budget_for(graphs, 5), targets=np.arange(5.0))
    chex.assert_shape(batch.globals["targets"], (6, 1))
    r = safe_norm(edge_vectors(batch.nodes["positions"], batch.globals["lattice"], batch))
    mask = np.asarray(jraph.get_edge_padding_mask(batch))
    np.testing.assert_allclose(np.asarray(r)[mask], batch.edges["distances"][mask], rtol=1e-5, atol=1e-5)


def test_graph_larger_than_budget_is_named():
    graphs = small_crystals(4)
    with pytest.raises(ValueError, match="graph 0 .* exceeds the batch budget"):
        batch_indices(graphs, Budget(2, 10**6, 4))


def test_one_compilation_for_all_batches_of_a_budget():
    graphs = small_crystals(20)
    budget = budget_for(graphs, 4)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def total(batch):
        return jnp.sum(batch.edges["distances"])

    for _, batch in iterate_batches(graphs, budget):
        total(batch)


def test_safe_norm_has_finite_gradient_at_zero():
    grad = jax.grad(lambda v: safe_norm(v).sum())(jnp.zeros((2, 3)))
    assert np.isfinite(np.asarray(grad)).all()


def test_gaussian_rbf_peaks_at_its_centres():
    centres = np.linspace(0, 6.0, 40)
    rbf = np.asarray(gaussian_rbf(jnp.asarray(centres), cutoff=6.0, num=40))
    chex.assert_shape(rbf, (40, 40))
    np.testing.assert_array_equal(rbf.argmax(1), np.arange(40))
    np.testing.assert_allclose(np.diag(rbf), 1.0)
