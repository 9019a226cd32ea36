"""Training: learning, determinism, kill-and-resume, NaN stop, ensembles, checkpoints, bad input."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from crystal_fixtures import toy_splits  # noqa: F401 (fixture)
from matjax.config import CGCNNConfig, GraphConfig, TrainConfig
from matjax.data.sources import dataset_from_frame
from matjax.train.checkpoint import CheckpointMismatchError, Checkpointer, config_from_dict, config_to_dict
from matjax.train.ensemble import ensemble_apply, ensemble_predict, load_predictor, uncertainty_report
from matjax.train.losses import TargetScaler
from matjax.train.loop import NonFiniteLossError, create_optimizer, fit
from matjax.train.sharding import DeviceBatcher, data_mesh

MODEL = CGCNNConfig(
    graph=GraphConfig(cutoff=5.0, max_neighbors=8, num_rbf=20), atom_features=16, n_conv=2, hidden_features=32,
    targets=("formation_energy_per_atom", "band_gap"),
)
TRAIN = TrainConfig(batch_size=32, learning_rate=3e-3, max_epochs=3, ensemble_size=2, checkpoint_every=5, plateau_patience=1)


class Killed(Exception):
    """Stands in for the process being killed."""


def _targets(ds):
    return np.stack([ds.target(t) for t in MODEL.targets], axis=1)


def _max_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def test_ensemble_learns_better_than_the_mean_and_never_retraces(toy_splits, tmp_path):
    chex.clear_trace_counter()
    config = dataclasses.replace(TRAIN, max_epochs=12, ensemble_size=3, plateau_patience=3)
    result = fit(MODEL, config, toy_splits["train"], toy_splits["val"], tmp_path, progress=False, max_traces=1)
    assert len(result.history) == 12 and result.stop_reason == "max_epochs"
    predictor = load_predictor(tmp_path)
    assert predictor.size == 3
    test = toy_splits["test"]
    mean, std = predictor.predict(test.graphs, batch_size=16)
    chex.assert_shape([mean, std], (len(test), 2))
    y = _targets(test)
    baseline = np.abs(y - _targets(toy_splits["train"]).mean(0)).mean(0)
    assert np.all(np.abs(mean - y).mean(0) < 0.6 * baseline)
    assert np.all(std > 0)  # members start from different keys
    # The predictor restored from "best" holds exactly the variables fit returned.
    assert _max_difference(predictor.variables, result.variables) == 0.0


def test_killed_run_resumes_to_the_same_parameters(toy_splits, tmp_path):
    train, val = toy_splits["train"], toy_splits["val"]
    config = dataclasses.replace(TRAIN, checkpoint_every=3)
    full = fit(MODEL, config, train, val, tmp_path / "full", progress=False)

    def kill(epoch, step):
        if (epoch, step) == (1, 4):  # after 5 steps of epoch 1, at least one of them checkpointed
            raise Killed

    with pytest.raises(Killed):
        fit(MODEL, config, train, val, tmp_path / "resumed", progress=False, hooks=[kill])
    with Checkpointer(tmp_path / "resumed", {}) as ckpt:
        record = ckpt.record("latest")
    assert record["epoch"] == 1 and 1 <= record["step_in_epoch"] <= 4  # resumes mid-epoch
    chex.clear_trace_counter()
    resumed = fit(MODEL, config, train, val, tmp_path / "resumed", progress=False, max_traces=1)
    assert _max_difference(full.variables, resumed.variables) == 0.0
    assert [h["val_mae"] for h in full.history] == [h["val_mae"] for h in resumed.history]
    other_seed = fit(MODEL, dataclasses.replace(TRAIN, seed=1, max_epochs=1), train, val, progress=False)
    assert _max_difference(full.variables, other_seed.variables) > 1e-3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(toy_splits, tmp_path):
    config = dataclasses.replace(TRAIN, learning_rate=1e30, checkpoint_every=1, ensemble_size=1)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        fit(MODEL, config, toy_splits["train"], toy_splits["val"], tmp_path, progress=False, log_every=1)
    with Checkpointer(tmp_path, {}) as ckpt:
        record = ckpt.record("latest")
        assert record is not None
    # Resuming restores that state: finite, and it fails again at the same point.
    with pytest.raises(NonFiniteLossError):
        fit(MODEL, config, toy_splits["train"], toy_splits["val"], tmp_path, progress=False, log_every=1)


def test_time_budget_and_a_checkpoint_from_another_model_config(toy_splits, tmp_path):
    config = dataclasses.replace(TRAIN, max_epochs=3, ensemble_size=1, time_budget_s=0.0)
    result = fit(MODEL, config, toy_splits["train"], toy_splits["val"], tmp_path, progress=False)
    assert result.stop_reason == "time_budget" and len(result.history) == 1
    wider = dataclasses.replace(MODEL, atom_features=24)
    with pytest.raises(CheckpointMismatchError, match=r"model\.atom_features: 16 -> 24") as err:
        fit(wider, config, toy_splits["train"], toy_splits["val"], tmp_path, progress=False)
    assert str(tmp_path) in str(err.value)


def test_bad_splits_are_named(toy_splits):
    train, val = toy_splits["train"], toy_splits["val"]
    with pytest.raises(ValueError, match="val split is empty"):
        fit(MODEL, TRAIN, train, val.subset([]), progress=False)
    targets = train.targets.copy()
    targets[5, 1] = np.nan
    targets[9, 0] = np.inf
    broken = dataclasses.replace(train, targets=targets)
    with pytest.raises(ValueError, match=r"2 non-finite target.*train split: toy-0-5 .*toy-0-9"):
        fit(MODEL, TRAIN, broken, val, progress=False)
    with pytest.raises(KeyError, match="unknown target 'bulk_modulus'"):
        fit(dataclasses.replace(MODEL, targets=("bulk_modulus",)), TRAIN, train, val, progress=False)


def test_structures_without_neighbours_are_skipped_by_id(tmp_path):
    from pymatgen.core import Lattice, Structure

    dense = Structure(Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    sparse = Structure(Lattice.cubic(12.0), ["Na"], [[0, 0, 0]])  # no neighbour within 5 A
    rows = pd.DataFrame({
        "material_id": ["ok-1", "lonely-1"], "cif": [dense.to(fmt="cif"), sparse.to(fmt="cif")],
        "formation_energy_per_atom": [-1.0, -2.0],
    })
    ds = dataset_from_frame(rows, ["formation_energy_per_atom"], cutoff=5.0, cache_dir=tmp_path)
    assert list(ds.ids) == ["ok-1"]
    assert ds.skipped[0][0] == "lonely-1" and "IsolatedAtomError" in ds.skipped[0][1]


def test_ensemble_predict_is_the_mean_and_std_of_the_members(toy_splits):
    from matjax.models.cgcnn import create_model

    test = toy_splits["test"]
    batcher = DeviceBatcher(test.graphs, _budget(test), data_mesh(1))
    batch = jax.tree.map(jnp.asarray, batcher.sub_batch(np.arange(10)))
    model = create_model(MODEL)
    variables = jax.vmap(lambda k: model.init(k, batch))(jax.random.split(jax.random.PRNGKey(0), 4))
    scaler = TargetScaler(np.array([-1.0, 0.5]), np.array([0.5, 2.0]))
    mean, std = ensemble_predict(model, variables, batch, scaler)
    members = np.stack([scaler.inverse(model.apply(jax.tree.map(lambda x: x[k], variables), batch)) for k in range(4)])
    np.testing.assert_allclose(mean, members.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, members.std(0), rtol=1e-4, atol=1e-5)
    chex.assert_shape(ensemble_apply(model, variables, batch), (4, batch.n_node.shape[0], 2))


def _budget(ds):
    from matjax.data.batching import budget_for

    return budget_for(ds.graphs, 16)


def test_uncertainty_report_ranks_errors():
    rng = np.random.default_rng(0)
    target = rng.normal(size=1000)
    std = rng.uniform(0.01, 1.0, size=1000)
    mean = target + std * rng.normal(size=1000)  # error grows with std
    report = uncertainty_report(mean, std, target)
    assert 0.3 < report["spearman_abs_error_vs_std"] < 0.9
    assert report["mae_top10pct_confident"] < 0.3 * report["mae"] < report["mae_top10pct_unconfident"]
    shuffled = uncertainty_report(mean, rng.permutation(std), target)
    assert abs(shuffled["spearman_abs_error_vs_std"]) < 0.1


def test_configs_round_trip_through_json():
    assert config_from_dict(CGCNNConfig, config_to_dict(MODEL)) == MODEL
    assert config_from_dict(TrainConfig, config_to_dict(TRAIN)) == TRAIN


def test_cosine_schedule_warms_up_peaks_and_anneals_to_its_floor():
    """With a constant gradient every Adam step moves a parameter by exactly the learning rate,
    so the steps trace the schedule: linear warm-up, the peak, a cosine down to the floor."""
    config = TrainConfig(learning_rate=1e-2, weight_decay=0.0, max_epochs=10, warmup_epochs=2, cosine_decay=True,
                         final_lr_fraction=0.1)
    tx = create_optimizer(config, steps_per_epoch=5)
    params, grads = jnp.zeros(()), jnp.ones(())
    state, sizes = tx.init(params), []
    for _ in range(config.max_epochs * 5 + 5):
        updates, state = tx.update(grads, state, params)
        sizes.append(-float(updates))
    sizes = np.array(sizes)
    np.testing.assert_allclose(sizes[:10], 1e-2 * np.arange(10) / 10, atol=1e-7)
    np.testing.assert_allclose(sizes[10], 1e-2, rtol=1e-5)
    np.testing.assert_allclose(sizes[30], 1e-3 + 0.5 * 9e-3, rtol=1e-4)  # half-way through the decay
    np.testing.assert_allclose(sizes[50:], 1e-3, rtol=1e-4)  # the floor, also past max_epochs
    assert np.all(np.diff(sizes[10:50]) < 0)


def test_target_scaler_standardises_and_inverts():
    y = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    scaler = TargetScaler.fit(y)
    z = scaler.transform(y)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[:, 0].std(), 1.0)
    np.testing.assert_allclose(scaler.inverse(z), y)


def test_vmapped_and_mapped_members_train_identically(toy_splits):
    runs = [
        fit(MODEL, dataclasses.replace(TRAIN, max_epochs=1, member_batching=how), toy_splits["train"], toy_splits["val"], progress=False)
        for how in ("vmap", "map")
    ]
    assert _max_difference(runs[0].variables, runs[1].variables) < 1e-5
    with pytest.raises(ValueError, match="unknown member_batching 'loop'"):
        fit(MODEL, dataclasses.replace(TRAIN, member_batching="loop"), toy_splits["train"], toy_splits["val"], progress=False)
