"""Crystal VAE: reparameterisation, KL, lattice parameters, padding invariance, decoders, training, checkpoints, design."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Lattice

from crystal_fixtures import toy_crystals
from matjax.config import CGCNNConfig, DecoderRefineConfig, GraphConfig, LatentDesignConfig, TrainConfig, VAEConfig
from matjax.data.batching import Budget, budget_for, graphs_tuple
from matjax.data.graphs import build_graph, pack
from matjax.models.vae import (MASKED_LOGIT, N_ELEMENTS, LatticeScaler, VAEOutput, composition_fractions, create_vae, decode_composition,
                               element_slots, kl_divergence, kl_weight, lattice_parameters, reparameterize, stoichiometries,
                               stoichiometry_index, vae_loss)
from matjax.train.checkpoint import Checkpointer
from matjax.train.loop import NonFiniteLossError
from matjax.discovery.latent_design import check_target, compositions, design_latents, prior_latents, reencoded_properties
from matjax.discovery.validity import composition_valid
from matjax.train.vae import balance_last_slot, fit_vae, graph_counts, load_vae, reconstruction_metrics, refine_decoder

CONFIG = VAEConfig(
    CGCNNConfig(GraphConfig(5.0, 8, 16), atom_features=32, n_conv=2, hidden_features=64), latent_dim=16,
    decoder_features=64, decoder_layers=1, property_features=32, max_atoms=4, beta=0.01, kl_warmup_epochs=3,
    targets=("formation_energy_per_atom", "band_gap"),
)
TRAIN = TrainConfig(batch_size=32, learning_rate=3e-3, max_epochs=20, early_stopping=100)


@pytest.fixture(scope="module")
def splits():
    return {"train": toy_crystals(192, seed=0), "val": toy_crystals(48, seed=1), "test": toy_crystals(64, seed=2)}


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vae")
    return fit_vae(CONFIG, TRAIN, splits["train"], splits["val"], workdir, progress=False), workdir


def _batch(dataset, budget=None, targets=True):
    graphs = dataset.graphs
    y = dataset.targets if targets else None
    return jax.tree.map(jnp.asarray, graphs_tuple(graphs, budget or budget_for(graphs, len(graphs)), y))


def _init(model, batch):
    """Variables for ``batch`` (jitted: flax's eager init of a CGCNN takes seconds)."""
    return jax.jit(lambda b: model.init(jax.random.PRNGKey(0), b, jax.random.PRNGKey(1)))(batch)


def test_reparameterisation_is_a_function_of_the_key():
    mu, logvar = jnp.array([[0.5, -1.0, 2.0]]), jnp.array([[0.0, -2.0, 1.0]])
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(reparameterize(key, mu, logvar), reparameterize(key, mu, logvar))
    assert not np.allclose(reparameterize(key, mu, logvar), reparameterize(jax.random.PRNGKey(4), mu, logvar))
    # Many keys: the samples have mean mu and standard deviation exp(logvar / 2).
    samples = jax.vmap(lambda k: reparameterize(k, mu, logvar))(jax.random.split(key, 20000))[:, 0]
    np.testing.assert_allclose(samples.mean(0), mu[0], atol=0.05)
    np.testing.assert_allclose(samples.std(0), np.exp(0.5 * logvar[0]), rtol=0.03)


def test_kl_matches_the_closed_form_and_a_monte_carlo_estimate():
    mu = jnp.array([[0.3, -1.2, 0.0, 2.0]])
    logvar = jnp.array([[-0.5, 0.7, 0.0, -2.0]])
    sigma2 = np.exp(np.asarray(logvar[0], np.float64))
    exact = 0.5 * np.sum(sigma2 + np.asarray(mu[0], np.float64) ** 2 - 1 - np.log(sigma2))
    np.testing.assert_allclose(kl_divergence(mu, logvar)[0], exact, rtol=1e-6)
    z = reparameterize(jax.random.PRNGKey(0), jnp.repeat(mu, 400000, 0), jnp.repeat(logvar, 400000, 0))
    log_q = jax.scipy.stats.norm.logpdf(z, mu, jnp.exp(0.5 * logvar)).sum(-1)
    log_p = jax.scipy.stats.norm.logpdf(z).sum(-1)
    np.testing.assert_allclose(float(jnp.mean(log_q - log_p)), exact, atol=0.03)
    np.testing.assert_allclose(kl_divergence(jnp.zeros((2, 5)), jnp.zeros((2, 5))), 0.0, atol=1e-7)
    np.testing.assert_allclose(jax.grad(lambda m: kl_divergence(m, logvar)[0])(mu), mu, rtol=1e-6)  # dKL/dmu = mu


def test_kl_weight_warms_up_linearly():
    assert kl_weight(0, 0.2, 100) == 0.0
    np.testing.assert_allclose(kl_weight(50, 0.2, 100), 0.1)
    np.testing.assert_allclose(kl_weight(400, 0.2, 100), 0.2)
    assert kl_weight(0, 0.2, 0) == 0.2


def test_lattice_parameters_match_pymatgen_and_the_scaler_inverts():
    rng = np.random.default_rng(0)
    matrices = np.eye(3) * rng.uniform(3, 8, (20, 1, 1)) + rng.normal(0, 1.0, (20, 3, 3))
    ours = np.asarray(lattice_parameters(jnp.asarray(matrices, jnp.float32)))
    np.testing.assert_allclose(ours, [Lattice(m).parameters for m in matrices], rtol=1e-4, atol=1e-3)
    n_atoms = rng.integers(1, 20, 20)
    scaler = LatticeScaler.fit(ours, n_atoms)
    x = scaler.transform(ours, n_atoms)
    np.testing.assert_allclose(np.mean(x, 0), 0.0, atol=1e-9)  # standardised on its own data
    np.testing.assert_allclose(scaler.inverse(x, n_atoms), ours, rtol=1e-9)
    # Per-atom lengths: doubling the cell (2n atoms, lengths 2^(1/3) longer) keeps x.
    scaled = ours * np.r_[[2 ** (1 / 3)] * 3, [1.0] * 3]
    np.testing.assert_allclose(scaler.transform(scaled, 2 * n_atoms), x, atol=1e-9)


def test_stoichiometries_are_every_partition_once():
    table = stoichiometries(20, 8)
    # The partitions of 1..20 into at most 8 parts (sum of p(n, k), OEIS A008284): 2,098, none twice.
    assert table.shape == (2098, 8) and len({tuple(row) for row in table}) == 2098
    assert np.all(np.diff(table, axis=1) <= 0) and np.all(table[:, 0] >= 1)  # descending, zero-padded
    assert np.all((table.sum(1) >= 1) & (table.sum(1) <= 20))
    np.testing.assert_array_equal(stoichiometries(4, 8)[:, :4], [[1, 0, 0, 0], [2, 0, 0, 0], [1, 1, 0, 0], [3, 0, 0, 0], [2, 1, 0, 0],
                                                             [1, 1, 1, 0], [4, 0, 0, 0], [3, 1, 0, 0], [2, 2, 0, 0], [2, 1, 1, 0], [1, 1, 1, 1]])
    assert len(stoichiometries(5, 2)) == 1 + 2 + 2 + 3 + 3  # at most two elements: n // 2 + 1 ways for n atoms
    counts = np.zeros((3, 30), np.int32)
    counts[0, [8, 3]], counts[1, [20, 28, 8]], counts[2, 5] = [12, 4], [4, 4, 12], 7  # O12 Li4, Ca4 Ni4 O12, B7
    index = np.asarray(stoichiometry_index(jnp.asarray(counts), jnp.asarray(table)))
    np.testing.assert_array_equal(table[index][:, :3], [[12, 4, 0], [12, 4, 4], [7, 0, 0]])


def test_element_slots_list_elements_by_count_and_decode_back_to_the_counts(splits):
    data = splits["train"].subset(np.arange(40))
    batch = _batch(data)
    label, elements = map(np.asarray, element_slots(batch, CONFIG))
    table, counts = stoichiometries(CONFIG.max_atoms, CONFIG.max_species), graph_counts(data.graphs)
    np.testing.assert_array_equal(np.asarray(decode_composition(jnp.asarray(elements[:40]), jnp.asarray(table[label[:40]]))), counts)
    for row, slots in zip(counts, elements):  # largest count first, ties by Z; empty slots 0
        present = np.flatnonzero(row)
        expected = sorted(present, key=lambda z: (-row[z], z))
        np.testing.assert_array_equal(slots, np.r_[expected, np.zeros(CONFIG.max_species - len(expected))])
    # Ca4 Ni4 O12: O (12) first, then Ca before Ni (equal counts, Z 20 < 28).
    cell = build_graph(np.array([20] * 4 + [28] * 4 + [8] * 12), np.random.default_rng(0).random((20, 3)), 9.0 * np.eye(3), 5.0, 8)
    config = dataclasses.replace(CONFIG, max_atoms=20)
    one = jax.tree.map(jnp.asarray, graphs_tuple(pack([cell]), budget_for(pack([cell]), 1)))
    label, elements = element_slots(one, config)
    np.testing.assert_array_equal(elements[0, :4], [8, 20, 28, 0])
    np.testing.assert_array_equal(stoichiometries(20, CONFIG.max_species)[label[0], :4], [12, 4, 4, 0])


def test_loss_terms_vanish_for_a_perfect_reconstruction(splits):
    data = splits["train"].subset(np.arange(6))
    batch = _batch(data)
    n_graph = batch.n_node.shape[0]
    fractions = composition_fractions(batch)
    np.testing.assert_allclose(np.asarray(fractions)[:6] * data.graphs.n_node[:, None], graph_counts(data.graphs), atol=1e-5)
    scaler = LatticeScaler.fit(np.asarray(lattice_parameters(batch.globals["lattice"][:6])), data.graphs.n_node)
    target_lattice = scaler.transform(lattice_parameters(batch.globals["lattice"]), jnp.maximum(batch.n_node, 1))
    label, elements = element_slots(batch, CONFIG)
    stoichiometry_logits = 50.0 * jax.nn.one_hot(label, len(stoichiometries(CONFIG.max_atoms, CONFIG.max_species)))
    zeros = jnp.zeros((n_graph, 3))
    perfect = VAEOutput(zeros, zeros, zeros, 50.0 * jax.nn.one_hot(elements, N_ELEMENTS), stoichiometry_logits, target_lattice,
                        batch.globals["targets"])
    loss_fn = jax.jit(lambda out: vae_loss(out, batch, scaler, CONFIG, 1.0)[1])
    terms = loss_fn(perfect)
    for name in ("composition", "stoichiometry", "lattice", "property"):
        assert abs(float(terms[name])) < 1e-5, name
    np.testing.assert_allclose(terms["kl"], 0.0, atol=1e-6)  # mu = 0, logvar = 0 is the prior
    uniform = perfect._replace(element_logits=jnp.zeros_like(perfect.element_logits))
    assert float(loss_fn(uniform)["composition"]) > 1.0


def test_padding_and_batch_order_do_not_change_encodings(splits):
    data = splits["train"].subset(np.arange(10))
    model = create_vae(CONFIG)
    tight = _batch(data, targets=False)
    variables = _init(model, tight)
    budget = budget_for(data.graphs, len(data))
    loose = _batch(data, Budget(budget.n_node + 64, budget.n_edge + 256, budget.n_graph + 5), targets=False)
    reversed_ = _batch(data.subset(np.arange(10)[::-1]), targets=False)
    for train in (False, True):
        encode = jax.jit(lambda b: model.apply(variables, b, train, method=model.encode, mutable=["batch_stats"])[0])  # noqa: B023
        (mu_a, lv_a), (mu_b, lv_b), (mu_r, _) = encode(tight), encode(loose), encode(reversed_)
        np.testing.assert_allclose(mu_a[:10], mu_b[:10], atol=1e-5)
        np.testing.assert_allclose(lv_a[:10], lv_b[:10], atol=1e-5)
        np.testing.assert_allclose(mu_a[:10], mu_r[:10][::-1], atol=1e-5)


def test_decoders_give_valid_distributions_and_crystals(trained):
    vae = trained[0].trained
    z = jnp.asarray(jax.random.normal(jax.random.PRNGKey(7), (64, CONFIG.latent_dim))) * 2.0
    decode = jax.jit(lambda z, *given: vae.model.apply(vae.variables, z, *given, method=vae.model.decode))
    logits, elements, s_logits, lattice = decode(z)
    n_classes = len(stoichiometries(CONFIG.max_atoms, CONFIG.max_species))
    chex.assert_shape([logits, elements, s_logits, lattice],
                      [(64, CONFIG.max_species, N_ELEMENTS), (64, CONFIG.max_species), (64, n_classes), (64, 6)])
    chex.assert_tree_all_finite((s_logits, lattice))
    for distribution in (jax.nn.softmax(logits), jax.nn.softmax(s_logits)):
        np.testing.assert_allclose(distribution.sum(-1), 1.0, atol=1e-5)
    counts = stoichiometries(CONFIG.max_atoms, CONFIG.max_species)[np.argmax(s_logits, -1)]
    np.testing.assert_array_equal(np.asarray(elements) > 0, counts > 0)  # one element per non-empty slot
    for row in np.asarray(elements):
        assert len(set(row[row > 0])) == (row > 0).sum()  # never twice
    # Greedy decoding scores each slot exactly as teacher forcing with the decoded elements does.
    forced, _, _, _ = decode(z, jnp.argmax(s_logits, -1), elements)
    filled = counts > 0
    np.testing.assert_allclose(np.asarray(forced)[filled], np.asarray(logits)[filled], rtol=1e-4, atol=1e-4)
    decoded = vae.decode(np.asarray(z))
    assert np.all((decoded.n_atoms >= 1) & (decoded.n_atoms <= CONFIG.max_atoms))
    np.testing.assert_array_equal(decoded.counts.sum(1), decoded.n_atoms)
    assert np.all(decoded.counts >= 0) and np.all(decoded.counts[:, 0] == 0)
    assert np.all(decoded.lattice[:, :3] > 0)
    balanced = vae.decode(np.asarray(z), charge_balanced=True)  # same stoichiometry and lattice, valid as often or more
    np.testing.assert_array_equal(balanced.n_atoms, decoded.n_atoms)
    np.testing.assert_array_equal(np.sort(balanced.counts, 1), np.sort(decoded.counts, 1))
    share = [np.mean([composition_valid(c) for c in compositions(d.counts)]) for d in (decoded, balanced)]
    assert share[1] >= share[0]


def test_charge_balanced_decoding_re_decodes_only_the_last_element():
    """The last slot prefers O for NaO (Na+ O2-: unbalanced); the best-scored balancing element is Cl."""
    Na, O, F, Cl = 11, 8, 9, 17
    logits = np.full((4, 2, N_ELEMENTS), MASKED_LOGIT)  # padding, or the element of slot 0
    logits[:, 1, [O, Cl, F]] = [5.0, 4.0, 3.0]
    logits[3, 1, [Cl, F]] = MASKED_LOGIT  # only the unbalanced choice is allowed: kept, reported invalid downstream
    elements = np.array([[Na, O], [Na, F], [Na, O], [Na, O]])
    counts = np.array([[1, 1], [1, 1], [2, 1], [1, 1]])  # NaO, NaF (valid), Na2O (valid), NaO
    balanced = balance_last_slot(elements, counts, logits)
    np.testing.assert_array_equal(balanced, [[Na, Cl], [Na, F], [Na, O], [Na, O]])
    np.testing.assert_array_equal(elements, [[Na, O], [Na, F], [Na, O], [Na, O]])  # the input is not modified


def test_refining_the_decoder_raises_prior_validity_and_changes_nothing_else(trained, splits, tmp_path):
    before = trained[0].trained
    refine = DecoderRefineConfig(rounds=3, n_prior=512, steps=40, batch_size=64, learning_rate=1e-3)
    refined, history = refine_decoder(before, splits["train"], refine, tmp_path, progress=False)
    z = prior_latents(512, CONFIG.latent_dim, 7)  # not the refinement's own draws (numpy's, from seed 0)
    validity = [np.mean([composition_valid(c) for c in compositions(vae.decode(z).counts)]) for vae in (before, refined)]
    assert validity[1] >= validity[0] + 0.15, validity  # measured 0.39 -> 0.74
    assert len(history) == 3 and all(0 < h["kept"] <= 1 and np.isfinite(h["loss"]) for h in history)
    old, new = before.variables["params"], refined.variables["params"]
    chex.assert_trees_all_equal({k: v for k, v in old.items() if k != "decoder"}, {k: v for k, v in new.items() if k != "decoder"})
    assert not np.allclose(old["decoder"]["element"]["kernel"], new["decoder"]["element"]["kernel"])
    np.testing.assert_array_equal(refined.encode(splits["test"].graphs)[0], before.encode(splits["test"].graphs)[0])
    chex.assert_trees_all_equal(load_vae(tmp_path).variables, jax.device_get(refined.variables))


def test_training_beats_the_baselines(trained, splits):
    result = trained[0]  # every batch ends in a zero-lattice padding graph: a NaN there would have stopped fit
    assert result.history[-1]["val"]["loss"] < 0.7 * result.history[0]["val"]["loss"]
    metrics = reconstruction_metrics(result.trained, splits["test"], splits["train"])
    # Unseen random compositions of 1-4 atoms from 19 elements: no training composition recurs (baseline 0).
    assert metrics["composition_accuracy"] >= metrics["baseline_composition_accuracy"] + 0.05
    assert metrics["n_atoms_accuracy"] > metrics["baseline_n_atoms_accuracy"] + 0.25
    assert metrics["lattice_mae"] < 0.9 * metrics["baseline_lattice_mae"]


def test_checkpoint_round_trip_is_bit_exact(trained, splits):
    result, workdir = trained
    restored = load_vae(workdir)
    chex.assert_trees_all_equal(restored.variables, jax.device_get(result.trained.variables))
    np.testing.assert_array_equal(restored.lattice_scaler.mean, result.trained.lattice_scaler.mean)
    np.testing.assert_array_equal(restored.encode(splits["test"].graphs)[0], result.trained.encode(splits["test"].graphs)[0])
    # Started again on a finished run directory, fit resumes at its end and returns the same VAE.
    again = fit_vae(CONFIG, TRAIN, splits["train"], splits["val"], workdir, progress=False)
    chex.assert_trees_all_equal(again.trained.variables, restored.variables)
    assert again.best_epoch == result.best_epoch


class Killed(Exception):
    """Stands in for the process being killed."""


def test_a_killed_run_resumes_to_the_same_vae(trained, splits, tmp_path):
    def kill(epoch, step):
        if epoch == 6 and step == 1:
            raise Killed

    with pytest.raises(Killed):
        fit_vae(CONFIG, TRAIN, splits["train"], splits["val"], tmp_path, progress=False, hooks=[kill])
    resumed = fit_vae(CONFIG, TRAIN, splits["train"], splits["val"], tmp_path, progress=False)
    uninterrupted = trained[0]
    chex.assert_trees_all_equal(resumed.trained.variables, jax.device_get(uninterrupted.trained.variables))
    assert [h["val"] for h in resumed.history] == [h["val"] for h in uninterrupted.history]


def test_bad_inputs_are_named(splits):
    with pytest.raises(ValueError, match="exceed max_atoms = 2: toy-0-"):
        fit_vae(dataclasses.replace(CONFIG, max_atoms=2), TRAIN, splits["train"], splits["val"], progress=False)
    with pytest.raises(ValueError, match=r"exceed max_species = 1: toy-0-\d+ \(\d elements\)"):
        fit_vae(dataclasses.replace(CONFIG, max_species=1), TRAIN, splits["train"], splits["val"], progress=False)
    with pytest.raises(ValueError, match="latent_dim"):
        create_vae(dataclasses.replace(CONFIG, latent_dim=0))


def test_a_diverging_run_stops_with_non_finite_error(splits, tmp_path):
    tiny = dataclasses.replace(CONFIG, encoder=dataclasses.replace(CONFIG.encoder, n_conv=1, atom_features=8), latent_dim=4)
    small = {k: v.subset(np.arange(24)) for k, v in splits.items()}
    # One step per epoch: epoch 0's step is finite and throws the parameters to ~1e30, epoch 1's loss is not.
    with pytest.raises(NonFiniteLossError, match=f"epoch 1 .*{tmp_path}"):
        fit_vae(tiny, dataclasses.replace(TRAIN, learning_rate=1e30, max_epochs=3), small["train"], small["val"], tmp_path, progress=False)
    with Checkpointer(tmp_path, {}) as ckpt:
        assert ckpt.latest_step("latest") == 1  # the last checkpoint before the failure is kept


def test_a_time_budget_stops_after_the_epoch_that_spends_it(splits, tmp_path):
    tiny = dataclasses.replace(CONFIG, encoder=dataclasses.replace(CONFIG.encoder, n_conv=1, atom_features=8), latent_dim=4)
    small = {k: v.subset(np.arange(24)) for k, v in splits.items()}
    budgeted = dataclasses.replace(TRAIN, time_budget_s=1e-9)
    result = fit_vae(tiny, budgeted, small["train"], small["val"], tmp_path, progress=False)
    assert (len(result.history), result.stop_reason) == (1, "time_budget")
    # The spent budget is part of the checkpoint: started again, the run stays stopped.
    again = fit_vae(tiny, budgeted, small["train"], small["val"], tmp_path, progress=False)
    assert (len(again.history), again.stop_reason) == (1, "time_budget")
    assert again.train_s == result.train_s > 0


def test_design_moves_the_vae_property_toward_the_target(trained, splits):
    vae = trained[0].trained
    values = splits["train"].target("band_gap")
    target = float(np.percentile(values, 90))
    config = LatentDesignConfig(n_starts=24, steps=150, learning_rate=0.05, prior_weight=0.1)
    z0, z, trajectory = design_latents(vae, config, target, values)
    start, end = np.abs(trajectory[0] - target), np.abs(trajectory[-1] - target)
    assert np.median(end) < 0.3 * np.median(start)
    np.testing.assert_allclose(trajectory[-1], vae.predict_properties(z)[:, 1], rtol=1e-4, atol=1e-4)
    # Same seed, same designs; another seed, other starts.
    np.testing.assert_array_equal(design_latents(vae, config, target, values)[1], z)
    assert not np.allclose(design_latents(vae, LatentDesignConfig(n_starts=24, steps=1, seed=5), target, values)[0], z0)
    with pytest.warns(UserWarning, match="outside the training data's range"):
        check_target(values.max() + 5.0, values, "band_gap")
    with pytest.raises(ValueError, match="not predicted"):
        design_latents(vae, LatentDesignConfig(property="bulk_modulus"), target, values)


def test_the_self_check_reads_the_head_at_a_structures_own_encoding(trained, splits):
    vae, data = trained[0].trained, splits["test"]
    structures = [data.structure(0), None, data.structure(1)]
    values = reencoded_properties(vae, structures, column=1)
    direct = vae.predict_properties(vae.encode(data.subset(np.arange(2)).graphs)[0])[:, 1]
    np.testing.assert_allclose(values[[0, 2]], direct, rtol=1e-5, atol=1e-6)  # structure -> graph -> mu -> head, as from the graphs
    assert np.isnan(values[1])  # no structure (a skipped design): no value, counted as a miss
