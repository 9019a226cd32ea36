"""Training a force field on energies, forces and stresses.

The model predicts one energy per structure; forces and stress are its derivatives
(``matjax.physics.forces``), so the force loss is differentiated through a gradient
(second derivatives by ``jax.grad``). Batches are padded ``jraph.GraphsTuple``s of one
static ``Budget`` (one compilation); every loss term is masked to real graphs and atoms.

Per-element reference energies are fitted by least squares on the training set and the
network's per-atom output is scaled by the training set's RMS force component, so the
network learns an O(1) correction; both are stored as constants next to the parameters.
Energies are compared after subtracting the reference on the host in float64: a float32
total of -17,600 eV (aspirin) would carry ~2 meV of rounding, as much as the model's error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from matjax.config import MLFFConfig, MLFFTrainConfig
from matjax.data.batching import Budget, batch_indices, budget_for, graphs_tuple
from matjax.data.forcefield import ForceFieldData, parse_assignments, structure_groups, with_isolated_atoms
from matjax.data.graphs import take
from matjax.geometry.periodic import node_graph_index
from matjax.models.mlff import MAX_Z, create_model, graph_energy_fn
from matjax.physics.forces import energy_forces_stress
from matjax.train.checkpoint import Checkpointer, config_from_dict, config_to_dict
from matjax.train.loop import warmup_cosine


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs: parameters, their moving average, optimiser."""

    step: jnp.ndarray
    epoch: jnp.ndarray
    params: dict
    ema: dict
    opt_state: optax.OptState
    constants: dict

    def variables(self, averaged: bool = True) -> dict:
        """Flax variables for ``model.apply`` (the moving average by default)."""
        return {"params": self.ema if averaged else self.params, "constants": self.constants}


def fit_reference_energies(data: ForceFieldData) -> np.ndarray:
    """[MAX_Z] per-element energies (eV) minimising sum_m (E_m - sum_Z n_mZ e_Z)^2."""
    graph_of_node = np.repeat(np.arange(len(data)), data.n_atoms)
    counts = np.zeros((len(data), MAX_Z))
    np.add.at(counts, (graph_of_node, data.graphs.species), 1.0)
    present = np.flatnonzero(counts.any(axis=0))
    solution, *_ = np.linalg.lstsq(counts[:, present], data.energy, rcond=None)
    reference = np.zeros(MAX_Z)
    reference[present] = solution
    return reference


def data_statistics(data: ForceFieldData) -> dict[str, float]:
    """Mean neighbours per atom and RMS force component of a training set."""
    return {
        "avg_neighbors": float(data.graphs.n_edge.sum() / data.n_atoms.sum()),
        "force_rms": float(np.sqrt(np.mean(data.forces**2))),
    }


def reference_sums(data: ForceFieldData, reference: np.ndarray) -> np.ndarray:
    """[M] sum over each structure's atoms of reference[Z] (float64)."""
    return np.bincount(np.repeat(np.arange(len(data)), data.n_atoms), reference[data.graphs.species], len(data))


def energy_weights(spec: str, groups) -> np.ndarray:
    """[M] multipliers of each structure's energy loss from "Group=w,..." (1 elsewhere).

    groups: [M] the structures' group labels (``structure_groups``); a group the spec
    names that no structure has is an error, so a typo cannot silently weigh nothing.
    """
    groups = np.asarray(groups)
    weights = np.ones(len(groups), np.float32)
    for name, value in parse_assignments(spec, "group_energy_weights").items():
        if name not in groups:
            raise ValueError(f"group_energy_weights names group {name!r}, but the training structures' "
                             f"groups are {sorted(set(groups.tolist()))}")
        weights[groups == name] = value
    return weights


def make_batch(data: ForceFieldData, indices, budget: Budget, reference: np.ndarray, weights=None) -> dict:
    """Padded batch of structures ``indices``: {"graph": GraphsTuple, "forces": [n_node, 3],
    "energy_weight": [n_graph]}.

    graph.globals["targets"] is [n_graph, 10]: energy minus the reference sum (eV, taken
    in float64), then the 3x3 stress (NaN if absent). weights: [M] multipliers of each
    structure's energy loss (``energy_weights``; None: 1).
    """
    indices = np.asarray(indices)
    sub = data.subset(indices)
    energy = sub.energy - reference_sums(sub, reference)
    targets = np.concatenate([energy[:, None], sub.stress.reshape(-1, 9)], axis=1)
    graph = graphs_tuple(take(data.graphs, indices), budget, targets)
    forces = np.zeros((budget.n_node, 3), np.float32)
    forces[: len(sub.forces)] = sub.forces
    energy_weight = np.zeros(budget.n_graph, np.float32)
    energy_weight[: len(indices)] = 1.0 if weights is None else weights[indices]
    return {"graph": graph, "forces": forces, "energy_weight": energy_weight}


def predict(model: nn.Module, variables, graph: jraph.GraphsTuple, stress: bool = False):
    """(energies [G] eV, forces [N, 3] eV/A, stress [G, 3, 3] eV/A^3 or None) of a batch."""
    return energy_forces_stress(
        graph_energy_fn(model, variables, graph), graph.nodes["positions"], graph.globals["lattice"],
        node_graph_index(graph), stress=stress,
    )


def without_reference(variables: dict) -> dict:
    """``variables`` with the reference energies set to zero (see ``make_batch``)."""
    constants = jax.tree.map(lambda x: x, variables["constants"])
    constants["_Constants_0"]["reference"] = jnp.zeros_like(constants["_Constants_0"]["reference"])
    return {**variables, "constants": constants}


def batch_errors(model: nn.Module, variables, batch: dict, stress: bool):
    """Masked errors of a batch: dict of [G] per-atom energy errors, [N, 3] force errors,
    [G, 3, 3] stress errors (0 where unlabelled), masks and predictions (energies
    without the reference sum, like the targets)."""
    graph = batch["graph"]
    energies, forces, sigma = predict(model, without_reference(variables), graph, stress)
    graph_mask = jraph.get_graph_padding_mask(graph)
    node_mask = jraph.get_node_padding_mask(graph)
    n_atoms = jnp.maximum(graph.n_node, 1)
    targets = graph.globals["targets"]
    errors = {
        "energy": jnp.where(graph_mask, (energies - targets[:, 0]) / n_atoms, 0.0),
        "forces": jnp.where(node_mask[:, None], forces - batch["forces"], 0.0),
        "graph_mask": graph_mask, "node_mask": node_mask,
        "energies": energies, "pred_forces": forces,
    }
    if stress:
        true = targets[:, 1:].reshape(-1, 3, 3)
        labelled = graph_mask & jnp.all(jnp.isfinite(true), axis=(1, 2))
        errors["stress"] = jnp.where(labelled[:, None, None], sigma - jnp.nan_to_num(true), 0.0)
        errors["stress_mask"] = labelled
    return errors


def squared_or_huber(x: jnp.ndarray, delta: float) -> jnp.ndarray:
    """x^2 elementwise (delta 0), else Huber's x^2 inside |x| <= delta, delta * (2|x| - delta) outside
    (twice optax's Huber loss, so that it equals the squared error inside delta)."""
    return x**2 if delta <= 0 else 2 * optax.losses.huber_loss(x, delta=delta)


def loss_fn(params, constants, model, batch, cfg: MLFFTrainConfig):
    """Weighted MSE of per-atom energy (each structure's times its ``energy_weight``), force
    components (Huber with ``cfg.force_huber_delta``) and stress; (loss, errors)."""
    stress = cfg.stress_weight > 0
    err = batch_errors(model, {"params": params, "constants": constants}, batch, stress)
    n_graph = jnp.maximum(err["graph_mask"].sum(), 1)
    n_node = jnp.maximum(err["node_mask"].sum(), 1)
    loss = cfg.energy_weight * jnp.sum(batch["energy_weight"] * err["energy"] ** 2) / n_graph
    loss += cfg.force_weight * jnp.sum(squared_or_huber(err["forces"], cfg.force_huber_delta)) / (3 * n_node)
    if stress:
        loss += cfg.stress_weight * jnp.sum(err["stress"] ** 2) / (9 * jnp.maximum(err["stress_mask"].sum(), 1))
    return loss, err


def create_optimizer(cfg: MLFFTrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (AdamW with decoupled weight decay when set), warm-up then cosine decay, global-norm clipping."""
    schedule = warmup_cosine(cfg.learning_rate, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch, cfg.final_lr_fraction)
    # Plain Adam without decay keeps the optimizer state, and so the checkpoints, of earlier runs loadable.
    adam = optax.adamw(schedule, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(schedule)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam)


def stage_config(cfg: MLFFTrainConfig, epoch: int) -> MLFFTrainConfig:
    """The configuration in force in (0-based) ``epoch``: the final stage's energy weight, if set."""
    if epoch < cfg.epochs - cfg.final_stage_epochs:
        return cfg
    return dataclasses.replace(cfg, energy_weight=cfg.final_energy_weight)


def init_state(model: nn.Module, optimizer, key, constants: dict, example: dict) -> TrainState:
    """Fresh parameters (``constants`` replace the model's zero defaults)."""
    graph = example["graph"]
    vectors = jnp.ones((graph.senders.shape[0], 3))
    params = jax.jit(model.init)(key, graph.nodes["species"], vectors, graph.senders, graph.receivers)["params"]
    return TrainState(
        step=jnp.array(0), epoch=jnp.array(0), params=params, ema=params,
        opt_state=optimizer.init(params), constants=constants,
    )


@functools.lru_cache(maxsize=8)
def make_train_step(model_cfg: MLFFConfig, cfg: MLFFTrainConfig, steps_per_epoch: int):
    """Jitted (state, batch) -> (state, loss); cached, so runs of one configuration compile once."""
    model, optimizer = create_model(model_cfg), create_optimizer(cfg, steps_per_epoch)

    @jax.jit
    def train_step(state: TrainState, batch: dict):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, _), grads = grad_fn(state.params, state.constants, model, batch, cfg)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, state.ema, params)
        return state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state), loss

    return train_step


@functools.lru_cache(maxsize=8)
def make_eval_step(model_cfg: MLFFConfig, stress: bool):
    """Jitted (variables, batch) -> masked errors and predictions; cached like ``make_train_step``."""
    model = create_model(model_cfg)
    return jax.jit(lambda variables, batch: batch_errors(model, variables, batch, stress))


def evaluate(eval_step, variables, data: ForceFieldData, budget: Budget) -> dict:
    """MAEs over ``data`` and the per-structure / per-component values for parity plots.

    Keys: energy_mae_meV_per_atom, energy_mae_meV, force_mae_eV_per_A, stress_mae_GPa
    (NaN where no stress), and arrays energy_true / energy_pred [M] (eV per atom),
    force_true / force_pred [3 sum N] (eV/A), stress_error [labelled components] (eV/A^3).
    """
    reference = np.asarray(variables["constants"]["_Constants_0"]["reference"], np.float64)
    offset = reference_sums(data, reference)
    e_true, e_pred, f_true, f_pred, s_err = [], [], [], [], []
    for idx in batch_indices(data.graphs, budget):
        batch = make_batch(data, idx, budget, reference)
        out = jax.device_get(eval_step(variables, batch))
        m, n = out["graph_mask"], out["node_mask"]
        n_atoms = batch["graph"].n_node[m]
        e_true.append(data.energy[idx] / n_atoms)
        e_pred.append((out["energies"][m] + offset[idx]) / n_atoms)
        f_true.append(batch["forces"][n].ravel())
        f_pred.append(out["pred_forces"][n].ravel())
        if "stress" in out:
            s_err.append(out["stress"][out["stress_mask"]].ravel())
    s_err = np.concatenate(s_err) if s_err else np.array([])
    return _error_metrics(np.concatenate(e_true), np.concatenate(e_pred), np.concatenate(f_true),
                          np.concatenate(f_pred), s_err, data.n_atoms)


def _error_metrics(e_true, e_pred, f_true, f_pred, s_err, n_atoms) -> dict:
    return {
        "energy_mae_meV_per_atom": 1e3 * float(np.mean(np.abs(e_pred - e_true))),
        "energy_mae_meV": 1e3 * float(np.mean(np.abs((e_pred - e_true) * n_atoms))),
        "force_mae_eV_per_A": float(np.mean(np.abs(f_pred - f_true))),
        "stress_mae_GPa": 160.21766208 * float(np.mean(np.abs(s_err))) if len(s_err) else float("nan"),
        "energy_true": e_true, "energy_pred": e_pred, "force_true": f_true, "force_pred": f_pred, "stress_error": s_err,
    }


def ensemble_metrics(members: list[dict], data: ForceFieldData) -> dict:
    """``evaluate``'s result for the ensemble whose energy is the mean of the members' energies.

    members: ``evaluate`` results of each member on ``data``. Forces and stress are
    derivatives of the energy, so the ensemble's are the members' means too (it stays
    conservative). Adds force_std [3 sum N] (eV/A), the members' spread per component,
    and force_std_error_spearman, the rank correlation of that spread with the ensemble's
    force error (how well the spread flags the worst components; NaN for one member).
    How much averaging gained, and why: {energy,force}_mae_over_member_mean, the ensemble's
    MAE over the members' mean MAE, and {energy,force}_error_correlation, the members' mean
    pairwise correlation of signed errors (per structure per atom; per force component).
    Members that err alike (correlation near 1) gain nothing from being averaged.
    """
    def mean(key):
        return np.mean([m[key] for m in members], axis=0)

    first = members[0]
    metrics = _error_metrics(first["energy_true"], mean("energy_pred"), first["force_true"], mean("force_pred"),
                             mean("stress_error"), data.n_atoms)
    spread = np.std([m["force_pred"] for m in members], axis=0)
    error = np.abs(metrics["force_pred"] - metrics["force_true"])
    ranks = [np.argsort(np.argsort(x)) for x in (spread, error)]
    metrics["force_std"] = spread
    metrics["force_std_error_spearman"] = float(np.corrcoef(*ranks)[0, 1]) if len(members) > 1 else float("nan")
    for kind, true, pred, mae in (("energy", "energy_true", "energy_pred", "energy_mae_meV_per_atom"),
                                  ("force", "force_true", "force_pred", "force_mae_eV_per_A")):
        metrics[f"{kind}_mae_over_member_mean"] = metrics[mae] / mean(mae)
        metrics[f"{kind}_error_correlation"] = mean_pairwise_correlation([m[pred] - m[true] for m in members])
    return metrics


def mean_pairwise_correlation(errors: list[np.ndarray]) -> float:
    """Mean Pearson correlation over the pairs of K error vectors [L] (NaN for one vector)."""
    k = len(errors)
    if k < 2:
        return float("nan")
    return float((np.corrcoef(np.stack(errors)).sum() - k) / (k * (k - 1)))


def errors_by_group(metrics: dict, groups, n_atoms) -> dict:
    """{group: {n, energy_mae_meV_per_atom, force_mae_eV_per_A}} from an ``evaluate`` result.

    groups: [M] a label per structure and n_atoms: [M], both in the evaluated data's order
    (e.g. mlearn's AIMD, Elastic, Vacancy and Surface structures, ``mlearn_groups``).
    """
    groups = np.asarray(groups)
    component_groups = np.repeat(groups, 3 * np.asarray(n_atoms))
    energy_error = np.abs(metrics["energy_pred"] - metrics["energy_true"])
    force_error = np.abs(metrics["force_pred"] - metrics["force_true"])
    return {str(g): {"n": int(np.sum(groups == g)),
                     "energy_mae_meV_per_atom": 1e3 * float(np.mean(energy_error[groups == g])),
                     "force_mae_eV_per_A": float(np.mean(force_error[component_groups == g]))}
            for g in sorted(set(groups.tolist()))}


def scalar_metrics(metrics: dict) -> dict:
    """The float entries of an ``evaluate`` result (JSON-ready)."""
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def run_configs(model_cfg: MLFFConfig, train_cfg: MLFFTrainConfig) -> dict:
    """The JSON-ready configs a run's checkpoints are tagged with and a resumed run must match.

    The time budget is left out: it limits a session, not the run, so a run it stopped can
    go on with a larger one.
    """
    train = {k: v for k, v in config_to_dict(train_cfg).items() if k != "time_budget_s"}
    return {"model": config_to_dict(model_cfg), "train": train}


def upgrade_run_configs(saved: dict) -> dict:
    """A checkpoint's saved run configs with today's fields: one added since it was written
    takes its default, which keeps the behaviour from before the field existed."""
    return run_configs(config_from_dict(MLFFConfig, saved["model"]), config_from_dict(MLFFTrainConfig, saved["train"]))


def run_checkpointer(run_dir: Path, model_cfg: MLFFConfig, train_cfg: MLFFTrainConfig) -> Checkpointer:
    """The run's checkpoints, restorable when they match its configs (older ones upgraded)."""
    return Checkpointer(run_dir / "checkpoints", run_configs(model_cfg, train_cfg), upgrade_run_configs)


def save_run_config(run_dir: Path, model_cfg: MLFFConfig, train_cfg: MLFFTrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"model": config_to_dict(model_cfg), "train": config_to_dict(train_cfg)}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))


def load_run_config(run_dir: str | Path) -> tuple[MLFFConfig, MLFFTrainConfig]:
    config = json.loads((Path(run_dir) / "config.json").read_text())
    return MLFFConfig(**config["model"]), MLFFTrainConfig(**config["train"])


def _abstract_state(model, model_cfg, train_cfg, budget: Budget, steps_per_epoch: int) -> TrainState:
    optimizer = create_optimizer(train_cfg, steps_per_epoch)
    graph = jraph.GraphsTuple(
        nodes={"species": jnp.zeros(budget.n_node, jnp.int32)}, edges=None,
        senders=jnp.zeros(budget.n_edge, jnp.int32), receivers=jnp.zeros(budget.n_edge, jnp.int32),
        n_node=None, n_edge=None, globals=None,
    )
    constants = {"_Constants_0": {"reference": jnp.zeros(MAX_Z), "scale": jnp.ones(())}}
    return jax.eval_shape(lambda k: init_state(model, optimizer, k, constants, {"graph": graph}), jax.random.PRNGKey(0))


def load_force_field(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, dict, MLFFConfig]:
    """(model, variables, model config) of a trained run; variables hold the averaged
    parameters of the ``which`` ("best" or "latest") checkpoint."""
    run_dir = Path(run_dir)
    model_cfg, train_cfg = load_run_config(run_dir)
    model = create_model(model_cfg)
    target = _abstract_state(model, model_cfg, train_cfg, Budget(8, 8, 2), 1)
    with run_checkpointer(run_dir, model_cfg, train_cfg) as checkpointer:
        restored = checkpointer.restore(which, target, compare=("model",))
    if restored is None:
        raise FileNotFoundError(f"no {which} checkpoint under {run_dir / 'checkpoints'}")
    return model, restored[0].variables(), model_cfg


def ensemble_configs(run_dirs) -> list[tuple[MLFFConfig, MLFFTrainConfig]]:
    """The runs' (model, train) configs; ValueError unless there is at least one and all were
    trained on one dataset (an ensemble averages models of one system)."""
    configs = [load_run_config(run) for run in run_dirs]
    if len({(c.dataset, c.n_frames) for _, c in configs}) != 1:
        names = ", ".join(f"{run} ({c.dataset})" for run, (_, c) in zip(run_dirs, configs))
        raise ValueError(f"ensemble members must share a dataset (one run or more): {names or 'no runs given'}")
    return configs


def load_ensemble(run_dirs, which: str = "best") -> tuple[list[tuple[nn.Module, dict]], list[MLFFConfig]]:
    """([(model, variables)] of each run, their model configs), after ``ensemble_configs``
    checked the runs. A neighbour list for all members needs the largest of their cutoffs
    (each model's envelope is zero beyond its own)."""
    ensemble_configs(run_dirs)
    loaded = [load_force_field(run, which) for run in run_dirs]
    return [(model, variables) for model, variables, _ in loaded], [model_cfg for _, _, model_cfg in loaded]


def prepare_run(model_cfg: MLFFConfig, cfg: MLFFTrainConfig, splits: dict[str, ForceFieldData], run_dir: Path):
    """(training structures, with ``cfg``'s free atoms added; the model config with their mean
    neighbour count as ``avg_neighbors``; ``data_statistics``), after writing the run's config.json."""
    train_data = splits["train"]
    if cfg.isolated_atom_energies:
        train_data = with_isolated_atoms(train_data, cfg.isolated_atom_energies)
    stats = data_statistics(train_data)
    model_cfg = dataclasses.replace(model_cfg, avg_neighbors=round(stats["avg_neighbors"], 3))
    save_run_config(run_dir, model_cfg, cfg)
    return train_data, model_cfg, stats


def validation_loss(cfg: MLFFTrainConfig, val: dict) -> float:
    """The loss's energy and force terms with validation MAEs (``scalar_metrics``) in place of RMS
    errors: what selects the best checkpoint."""
    return cfg.energy_weight * (val["energy_mae_meV_per_atom"] / 1e3) ** 2 + cfg.force_weight * val["force_mae_eV_per_A"] ** 2


def train(model_cfg: MLFFConfig, cfg: MLFFTrainConfig, splits: dict[str, ForceFieldData], run_dir: str | Path):
    """Train (or resume) a force field; returns (model, best TrainState, history).

    Reference energies, the energy scale and ``avg_neighbors`` come from the training
    split. Each evaluation saves the latest state and, if the validation loss (with the
    loss weights in force) improved, the best - the first evaluation of a final stage
    (``cfg.final_stage_epochs``) always does, and without ``cfg.holdout`` every one does; a non-finite loss stops the run with FloatingPointError and the last good
    checkpoints intact. A run restarted with the same ``run_dir`` resumes at its latest
    checkpoint and reshuffles exactly as the uninterrupted run would have. With
    ``cfg.time_budget_s`` the run stops (evaluated and saved) after the first epoch that
    ends past that much training time, summed over resumed sessions.
    """
    run_dir = Path(run_dir)
    val_data = splits["val"]
    train_data, model_cfg, stats = prepare_run(model_cfg, cfg, splits, run_dir)
    model = create_model(model_cfg)
    budget = budget_for(train_data.graphs, cfg.batch_size)
    steps_per_epoch = len(batch_indices(train_data.graphs, budget))
    optimizer = create_optimizer(cfg, steps_per_epoch)
    # Round once: the stored float32 constants and the host-side residuals must agree.
    reference = fit_reference_energies(train_data).astype(np.float32).astype(np.float64)
    weights = energy_weights(cfg.group_energy_weights, structure_groups(train_data.ids)) if cfg.group_energy_weights else None
    constants = {"_Constants_0": {
        "reference": jnp.asarray(reference, jnp.float32), "scale": jnp.asarray(stats["force_rms"], jnp.float32),
    }}
    state = init_state(model, optimizer, jax.random.PRNGKey(cfg.seed), constants, make_batch(train_data, [0], budget, reference))
    checkpointer = run_checkpointer(run_dir, model_cfg, cfg)
    restored = checkpointer.restore("latest", state)
    state, progress = restored if restored is not None else (state, {"train_s": 0.0})
    best_record = checkpointer.record("best")
    # Selection key (-stage, val_loss): any evaluation of the final stage beats earlier ones.
    best_key = (-best_record.get("stage", 0), best_record["val_loss"]) if best_record is not None else (0, math.inf)
    session_start = time.perf_counter() - progress["train_s"]
    eval_step = make_eval_step(model_cfg, cfg.stress_weight > 0)
    history_path = run_dir / "history.jsonl"
    rng = np.random.default_rng(cfg.seed)
    for _ in range(int(state.epoch)):
        rng.permutation(len(train_data))  # replay the shuffles of the epochs already done
    bar = tqdm(range(int(state.epoch), cfg.epochs), desc="epochs", initial=int(state.epoch), total=cfg.epochs)
    for epoch in bar:
        stage_cfg = stage_config(cfg, epoch)
        stage = int(stage_cfg is not cfg)
        train_step = make_train_step(model_cfg, stage_cfg, steps_per_epoch)
        losses = []
        for idx in batch_indices(train_data.graphs, budget, rng.permutation(len(train_data))):
            state, loss = train_step(state, make_batch(train_data, idx, budget, reference, weights))
            losses.append(loss)
        train_loss = float(np.mean(jax.device_get(losses)))
        if not math.isfinite(train_loss):
            checkpointer.close()
            raise FloatingPointError(
                f"non-finite training loss in epoch {epoch + 1}; the last good checkpoints in "
                f"{run_dir / 'checkpoints'} are kept (lower the learning rate or check the data)"
            )
        state = state.replace(epoch=jnp.array(epoch + 1))
        train_s = time.perf_counter() - session_start
        out_of_time = cfg.time_budget_s is not None and train_s > cfg.time_budget_s
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or out_of_time:
            val = scalar_metrics(evaluate(eval_step, state.variables(), val_data, budget))
            val_loss = validation_loss(stage_cfg, val)
            record = {"epoch": epoch + 1, "stage": stage, "energy_weight": stage_cfg.energy_weight, "train_loss": train_loss, "train_s": round(train_s, 1), **{f"val_{k}": v for k, v in val.items()}}
            checkpointer.save("latest", int(state.step), state, {"train_s": train_s})
            if (-stage, val_loss) < best_key or not cfg.holdout:
                best_key = (-stage, val_loss)
                checkpointer.save("best", int(state.step), state, {"val_loss": val_loss, "epoch": epoch + 1, "stage": stage})
            with history_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{train_loss:.3g}", E=f"{val['energy_mae_meV_per_atom']:.2f}", F=f"{val['force_mae_eV_per_A']:.4f}")
        if out_of_time:
            tqdm.write(f"time budget of {cfg.time_budget_s:.0f} s reached after epoch {epoch + 1} of {cfg.epochs}")
            break
    checkpointer.wait()
    best, _ = checkpointer.restore("best", state)
    checkpointer.close()
    history = [json.loads(line) for line in history_path.read_text().splitlines()] if history_path.exists() else []
    return model, best, history


def plot_parity(metrics: dict, path: str | Path, title: str = "") -> None:
    """Energy (meV/atom) and force (eV/A) parity plots of an ``evaluate`` result, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    panels = [
        (axes[0], metrics["energy_true"], metrics["energy_pred"], "energy (eV/atom)", f"MAE {metrics['energy_mae_meV_per_atom']:.2f} meV/atom"),
        (axes[1], metrics["force_true"], metrics["force_pred"], "force component (eV/A)", f"MAE {metrics['force_mae_eV_per_A']:.4f} eV/A"),
    ]
    for ax, true, pred, label, mae in panels:
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
        ax.scatter(true, pred, s=4, alpha=0.5)
        ax.set(xlabel=f"DFT {label}", ylabel=f"model {label}", title=mae)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
