"""CGCNN model: the paper's equations, padding and symmetry invariances, eval-mode folding."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from crystal_fixtures import toy_splits  # noqa: F401 (fixture)
from matjax.config import CGCNNConfig, GraphConfig
from matjax.data.batching import Budget, budget_for, graphs_tuple
from matjax.data.graphs import build_graph, pack, take
from matjax.models.cgcnn import CGCNNConv, create_model, sigmoid, softplus
from matjax.models.layers import gaussian_rbf

CONFIG = CGCNNConfig(
    graph=GraphConfig(cutoff=5.0, max_neighbors=8, num_rbf=20), atom_features=16, n_conv=2, hidden_features=24,
    targets=("formation_energy_per_atom", "band_gap"),
)


def _batch(packed, budget, targets=None):
    return jax.tree.map(jnp.asarray, graphs_tuple(packed, budget, targets))


def _scramble_padding(batch: jraph.GraphsTuple, seed: int = 0) -> jraph.GraphsTuple:
    """Put garbage (random species, distances, edge endpoints) into the padding entries."""
    rng = np.random.default_rng(seed)
    nodes = np.asarray(jraph.get_node_padding_mask(batch))
    edges = np.asarray(jraph.get_edge_padding_mask(batch))
    pad_node = np.flatnonzero(~nodes)[0]  # padding edges must stay inside the padding graph
    species = np.where(nodes, batch.nodes["species"], rng.integers(1, 90, nodes.shape))
    distances = np.where(edges, batch.edges["distances"], rng.uniform(0.5, 5.0, edges.shape))
    senders = np.where(edges, batch.senders, pad_node + rng.integers(0, (~nodes).sum(), edges.shape))
    return batch._replace(
        nodes={**batch.nodes, "species": jnp.asarray(species, jnp.int32)},
        edges={**batch.edges, "distances": jnp.asarray(distances, jnp.float32)},
        senders=jnp.asarray(senders, jnp.int32),
    )


class _Jitted:
    """A model whose apply is jitted (tests call it on a few shapes only)."""

    def __init__(self, model):
        self.apply = jax.jit(model.apply, static_argnames=("train", "mutable"))


@pytest.fixture(scope="module")
def model_and_variables(toy_splits):
    model = create_model(CONFIG)
    ds = toy_splits["train"]
    batch = _batch(take(ds.graphs, np.arange(16)), budget_for(ds.graphs, 16))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    model = _Jitted(model)
    # Give BatchNorm non-trivial running statistics, as after training.
    _, updates = model.apply(variables, batch, train=True, mutable=("batch_stats",))
    return model, {"params": variables["params"], **updates}


def test_padding_changes_nothing_in_train_or_eval_mode(toy_splits, model_and_variables):
    model, variables = model_and_variables
    ds = toy_splits["train"]
    packed = take(ds.graphs, np.arange(12))
    tight = budget_for(packed, 12)
    loose = Budget(2 * tight.n_node + 37, 2 * tight.n_edge + 64, tight.n_graph + 9)
    a, b = _batch(packed, tight), _scramble_padding(_batch(packed, loose))
    assert np.asarray(b.nodes["species"])[~np.asarray(jraph.get_node_padding_mask(b))].any()
    mask_a, mask_b = jraph.get_graph_padding_mask(a), jraph.get_graph_padding_mask(b)
    chex.assert_equal(int(mask_a.sum()), 12)
    chex.assert_equal(int(mask_b.sum()), 12)
    np.testing.assert_allclose(model.apply(variables, a)[:12], model.apply(variables, b)[:12], rtol=1e-5, atol=1e-5)
    out_a, stats_a = model.apply(variables, a, train=True, mutable=("batch_stats",))
    out_b, stats_b = model.apply(variables, b, train=True, mutable=("batch_stats",))
    np.testing.assert_allclose(out_a[:12], out_b[:12], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stats_a, stats_b, rtol=1e-5, atol=1e-6)


def _reference_conv(params, stats, h, e, senders, receivers, node_mask, edge_mask, train):
    """CGCNN eq. 5 written as in the paper: one dense layer over [h_i, h_j, e_ij]."""
    width = params["w_receiver"].shape[1]
    w = jnp.concatenate([params["w_receiver"], params["w_sender"], params["w_edge"]])
    z = jnp.concatenate([h[receivers], h[senders], e], axis=1) @ w

    def bn(x, name, mask):
        if train:
            rows = x[np.asarray(mask)]
            mean, var = rows.mean(0), rows.var(0)
        else:
            mean, var = stats[name]["mean"], stats[name]["var"]
        return (x - mean) / jnp.sqrt(var + 1e-5) * params[name]["scale"] + params[name]["bias"]

    gate = bn(z[:, : width // 2], "bn_gate", edge_mask)
    core = bn(z[:, width // 2 :], "bn_core", edge_mask)
    summed = jax.ops.segment_sum(jax.nn.sigmoid(gate) * jax.nn.softplus(core), receivers, h.shape[0])
    return jax.nn.softplus(h + bn(summed, "bn_node", node_mask))


@pytest.mark.parametrize("train", [False, True])
def test_split_projection_matches_the_dense_layer_of_the_paper(toy_splits, train):
    ds = toy_splits["train"]
    packed = take(ds.graphs, np.arange(40))
    batch = _batch(packed, budget_for(packed, 40))
    n_edge = batch.senders.shape[0]
    assert n_edge > 64 and n_edge % 64 == 0
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(batch.nodes["species"].shape[0], 8)), jnp.float32)
    e = gaussian_rbf(batch.edges["distances"], 5.0, 10)
    node_mask, edge_mask = jraph.get_node_padding_mask(batch), jraph.get_edge_padding_mask(batch)
    conv = CGCNNConv(train=train, edge_block=64)  # several edge blocks in eval mode
    args = (h, e, batch.senders, batch.receivers, node_mask, edge_mask)
    variables = jax.jit(conv.init)(jax.random.PRNGKey(1), *args)
    stats = jax.tree.map(lambda x: x + jnp.asarray(rng.uniform(0.2, 0.9, x.shape), jnp.float32), variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    out = jax.jit(conv.apply, static_argnames="mutable")(variables, *args, mutable=("batch_stats",) if train else False)
    out = out[0] if train else out
    expected = _reference_conv(variables["params"], stats, *args, train)
    real = np.asarray(node_mask)
    np.testing.assert_allclose(out[real], expected[real], rtol=2e-5, atol=2e-5)


def test_activations_match_jax_nn_with_gradients():
    x = jnp.linspace(-60.0, 60.0, 2001)
    np.testing.assert_allclose(softplus(x), jax.nn.softplus(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigmoid(x), jax.nn.sigmoid(x), rtol=1e-6, atol=1e-6)
    grad = lambda f: jax.vmap(jax.grad(f))(x)  # noqa: E731
    np.testing.assert_allclose(grad(softplus), grad(jax.nn.softplus), atol=1e-6)
    np.testing.assert_allclose(grad(sigmoid), grad(jax.nn.sigmoid), atol=1e-6)


def _crystal(species, frac, lattice, max_neighbors=8):
    return build_graph(species, frac, lattice, CONFIG.graph.cutoff, max_neighbors)


def _predict(model, variables, graphs):
    packed = pack(graphs)
    out = model.apply(variables, _batch(packed, budget_for(packed, len(graphs))))
    return np.asarray(out[: len(graphs)])


def test_prediction_is_invariant_to_symmetry_operations(model_and_variables):
    model, variables = model_and_variables
    rng = np.random.default_rng(3)
    species = np.array([3, 8, 8, 12])
    frac = rng.random((4, 3))
    lattice = 3.7 * (np.eye(3) + 0.1 * rng.normal(size=(3, 3)))
    perm = rng.permutation(4)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    variants = [
        _crystal(species, frac, lattice),
        _crystal(species[perm], frac[perm], lattice),  # relabelled atoms
        _crystal(species, frac, lattice @ q.T),  # rigid rotation (rows are vectors)
        _crystal(species, (frac + rng.random(3)) % 1.0, lattice),  # translation
    ]
    out = _predict(model, variables, variants)
    np.testing.assert_allclose(out[1:], np.repeat(out[:1], 3, axis=0), rtol=1e-4, atol=1e-5)


def test_intensive_prediction_is_unchanged_by_a_supercell(model_and_variables):
    """Mean pooling makes the output intensive: a 2x1x1 supercell has the same environments.

    All neighbours are kept here (max_neighbors=None): the k-nearest cut may break
    distance ties differently in the supercell.
    """
    model, variables = model_and_variables
    rng = np.random.default_rng(4)
    species, frac = np.array([11, 17, 17]), rng.random((3, 3))
    lattice = 3.4 * (np.eye(3) + 0.05 * rng.normal(size=(3, 3)))
    super_frac = np.concatenate([(frac + [i, 0, 0]) * [0.5, 1, 1] for i in range(2)])
    super_lattice = lattice * np.array([[2.0], [1.0], [1.0]])
    unit = _crystal(species, frac, lattice, None)
    supercell = _crystal(np.tile(species, 2), super_frac, super_lattice, None)
    assert supercell.n_edge == 2 * unit.n_edge
    out = _predict(model, variables, [unit, supercell])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4, atol=1e-5)


def test_element_descriptors_feed_the_embedding(toy_splits):
    config = CGCNNConfig(graph=CONFIG.graph, atom_features=8, n_conv=1, hidden_features=8, use_descriptors=True)
    packed = take(toy_splits["train"].graphs, np.arange(4))
    batch = _batch(packed, budget_for(packed, 4))
    model = create_model(config)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    assert variables["params"]["embed_descriptors"]["kernel"].shape == (8 + 4, 8)
    out = jax.jit(model.apply)(variables, batch)
    chex.assert_shape(out, (batch.n_node.shape[0], 1))
    chex.assert_tree_all_finite(out)


def test_unknown_config_is_rejected():
    with pytest.raises(ValueError, match="n_conv"):
        create_model(CGCNNConfig(n_conv=0))
