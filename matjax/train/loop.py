"""Training loop for graph property regression: one model or an ensemble, 1..D devices.

The whole training state of K models (params, BatchNorm statistics, AdamW state,
reduce-on-plateau state) is one pytree whose every leaf has a leading [K] axis, made by
``vmap``-ping the initialiser over K PRNG keys. The train step maps over that axis
(``vmap``, or ``lax.map`` on CPU: see ``ensemble.map_members``), so an ensemble is trained
in one compiled program, on the same batches. The step is ``shard_map``-ped over the
devices of a 1-D mesh (``matjax.train.sharding``); one device is D = 1.

Every batch has the same padded shape (one ``Budget`` per run), so the step compiles once
(asserted with ``chex.assert_max_traces``). Targets are standardised with the training
set's mean and std; the loss is the L1 error in those units averaged over targets.

Each epoch visits the training set in a permutation drawn from (seed, epoch), so the
batches of any step are a function of the seed alone: a run resumed from a "latest"
checkpoint (written every ``checkpoint_every`` steps and at each epoch end) replays the
same steps and reaches the same parameters as an uninterrupted run.

A step whose loss or gradient is not finite leaves the state unchanged and stops the run
with ``NonFiniteLossError``; the checkpoints written before it are kept.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Sequence

import chex
import flax
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from tqdm.auto import tqdm

from matjax.config import CGCNNConfig, TrainConfig
from matjax.data.batching import Budget, budget_for
from matjax.data.dataset import Dataset
from matjax.data.graphs import concat
from matjax.models.cgcnn import create_model
from matjax.train.checkpoint import Checkpointer, abstract_like, config_to_dict
from matjax.train.ensemble import map_members
from matjax.train.losses import TargetScaler, masked_abs_error
from matjax.train.sharding import AXIS, DeviceBatcher, data_mesh, replicated, shard_step

log = logging.getLogger("matjax")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient."""


@flax.struct.dataclass
class TrainState:
    """Training state of one model (or K models, every leaf with a leading [K] axis)."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    plateau: optax.contrib.ReduceLROnPlateauState

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class EpochSums:
    """Running sums over an epoch's steps, per ensemble member."""

    abs_error: jnp.ndarray  # [K, T] sum of |error| over real graphs, standardised units
    count: jnp.ndarray  # [K] real graphs seen
    nonfinite: jnp.ndarray  # [K] steps skipped for a non-finite loss or gradient

    @classmethod
    def zeros(cls, n_models: int, n_targets: int) -> "EpochSums":
        return cls(jnp.zeros((n_models, n_targets)), jnp.zeros(n_models), jnp.zeros(n_models, jnp.int32))


def create_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay), optional linear warm-up, optional cosine decay to
    ``final_lr_fraction`` of the peak at the end of ``max_epochs``, and global-norm clipping.

    The reduce-on-plateau factor (``create_plateau``) multiplies its updates.
    """
    lr: Any = config.learning_rate
    warmup = config.warmup_epochs * steps_per_epoch
    if config.cosine_decay:
        lr = warmup_cosine(config.learning_rate, warmup, config.max_epochs * steps_per_epoch, config.final_lr_fraction)
    elif warmup:
        lr = optax.linear_schedule(0.0, config.learning_rate, warmup)
    clip = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    return optax.chain(*clip, optax.adamw(lr, weight_decay=config.weight_decay))


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, final_fraction: float) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak``, then a cosine to ``final_fraction * peak`` at ``total_steps``.

    A warm-up as long as the run is cut to leave one step of decay, so the schedule always ends at its floor.
    """
    total = max(total_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, peak, min(warmup_steps, total - 1), total, end_value=peak * final_fraction)


def create_plateau(config: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """Learning-rate factor cut by ``plateau_factor`` after ``plateau_patience`` epochs without a better val MAE."""
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau_factor, patience=config.plateau_patience, min_scale=config.min_lr_scale
    )


def init_state(model, tx, plateau, keys: jnp.ndarray, example: jraph.GraphsTuple) -> TrainState:
    """[K]-stacked TrainState, member k initialised from keys[k]; example: one padded batch."""

    def one(key):
        variables = model.init(key, example, train=False)
        params = variables["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], tx.init(params), plateau.init(params))

    return jax.jit(jax.vmap(one))(keys)


def guarded_update(state: TrainState, tx, loss: jnp.ndarray, grads, **replace) -> tuple[TrainState, jnp.ndarray]:
    """(state after one optimizer step scaled by the plateau factor, finite). A non-finite
    loss or gradient keeps the old state, so one bad batch cannot poison the parameters."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: state.plateau.scale * u, updates)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state, **replace)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state), finite


def _member_step(model, tx, state: TrainState, batch: jraph.GraphsTuple):
    """One optimiser step of one model on this device's sub-batch (inside shard_map)."""
    mask = jraph.get_graph_padding_mask(batch)
    targets = batch.globals["targets"]
    n_real = jax.lax.psum(jnp.sum(mask), AXIS).astype(jnp.float32)
    norm = jnp.maximum(n_real, 1.0) * targets.shape[-1]

    def loss_fn(params):
        pred, updated = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch, train=True, mutable=["batch_stats"]
        )
        error = masked_abs_error(pred, targets, mask)
        return jnp.sum(error) / norm, (updated["batch_stats"], jnp.sum(error, axis=0))

    # The gradient of the replicated params is summed over devices by shard_map's transpose.
    (loss, (batch_stats, abs_error)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    loss, abs_error = jax.lax.psum((loss, abs_error), AXIS)
    new, finite = guarded_update(state, tx, loss, grads, batch_stats=batch_stats)
    return new, (abs_error, n_real, ~finite)


def make_train_step(model, tx, mesh, max_traces: int | None = None, member_batching: str = "auto") -> Callable:
    """jit(shard_map(map over members)): (state [K], sums, batch [D, ...]) -> (state, sums).

    member_batching: how the K members share the step (``ensemble.map_members``). max_traces: fail if the step is traced more often than this (a changed shape or
    dtype would recompile it); chex counts traces per process, see chex.clear_trace_counter.
    """

    def local(carry, batch):
        state, sums = carry
        state, (abs_error, count, nonfinite) = map_members(lambda s: _member_step(model, tx, s, batch), state, member_batching)
        sums = EpochSums(sums.abs_error + abs_error, sums.count + count, sums.nonfinite + nonfinite)
        return state, sums

    if max_traces is not None:
        local = chex.assert_max_traces(local, n=max_traces)
    step = shard_step(local, mesh)
    return jax.jit(lambda state, sums, batch: step((state, sums), batch), donate_argnums=(0, 1))


def make_predict_step(model, mesh, member_batching: str = "auto") -> Callable:
    """jit(shard_map): (variables [K], batch [D, ...]) -> [D, K, G, T] standardised predictions."""

    def local(variables, batch):
        return map_members(lambda v: model.apply(v, batch, train=False), variables, member_batching)

    return jax.jit(shard_step(local, mesh, out_stacked=True))


def predict_plan(predict_step, variables, batcher: DeviceBatcher, n_graphs: int, progress: bool = False, desc: str = "predicting") -> np.ndarray:
    """[K, M, T] predictions for all ``n_graphs`` graphs of ``batcher``, in index order."""
    plan = batcher.plan()
    out = None
    pending = []
    for step, batch in zip(plan, tqdm(batcher.batches(plan), total=len(plan), desc=desc, disable=not progress, leave=False)):
        pending.append((step, predict_step(variables, batch)))
    for step, pred in pending:
        pred = np.asarray(pred)
        if out is None:
            out = np.zeros((pred.shape[1], n_graphs, pred.shape[-1]), dtype=np.float32)
        for device, indices in enumerate(step):
            out[:, indices] = pred[device, :, : len(indices)]
    return out


def check_split(name: str, dataset: Dataset, targets: Sequence[str]) -> np.ndarray:
    """[M, T] float64 targets of a split, or ValueError naming the problem (and the items)."""
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"the {name} split is empty: nothing to train or evaluate on")
    values = np.stack([dataset.target(t) for t in targets], axis=1).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        shown = ", ".join(f"{dataset.ids[i]} {values[i].tolist()}" for i in bad[:5])
        raise ValueError(f"{len(bad)} non-finite target(s) {list(targets)} in the {name} split: {shown}")
    return values


@dataclasses.dataclass
class FitResult:
    """Outcome of ``fit``: the best-validation variables ([K]-stacked) and the log."""

    model: Any
    variables: dict
    scaler: TargetScaler
    budget: Budget
    history: list[dict]
    best_epoch: int
    stop_reason: str
    wall_s: float


def _member_scores(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[K] standardised MAE averaged over targets; pred [K, M, T], target [M, T]."""
    return np.mean(np.abs(pred - target[None]), axis=(1, 2))


def fit(
    model_config: CGCNNConfig,
    train_config: TrainConfig,
    train: Dataset,
    val: Dataset,
    workdir=None,
    budget: Budget | None = None,
    progress: bool = True,
    log_every: int = 20,
    hooks: Sequence[Callable[[int, int], None]] = (),
    max_traces: int | None = None,
    init_variables: dict | None = None,
) -> FitResult:
    """Train ``train_config.ensemble_size`` CGCNNs on ``train``, early-stopped on ``val``.

    workdir: checkpoint directory (None: no checkpoints); an existing "latest" checkpoint
    there is resumed. budget: padded batch size per device (default: fits
    batch_size / n_devices average graphs of train + val). hooks: ``hook(epoch, step)``
    after every step (e.g. to stop a run). max_traces: see ``make_train_step``.
    init_variables: [K]-stacked variables of an earlier fit to start from (warm start, as
    active learning retrains on a grown set); the optimiser state starts afresh. Returns
    the variables of the epoch with the lowest validation MAE (of the ensemble mean,
    standardised, averaged over targets).
    """
    cfg = train_config
    start = time.perf_counter()
    names = model_config.targets
    y_train, y_val = check_split("train", train, names), check_split("val", val, names)
    scaler = TargetScaler.fit(y_train)
    mesh = data_mesh(cfg.n_devices)
    per_device = -(-cfg.batch_size // mesh.size)
    budget = budget or budget_for(concat([train.graphs, val.graphs]), per_device)
    train_batcher = DeviceBatcher(train.graphs, budget, mesh, scaler.transform(y_train))
    val_batcher = DeviceBatcher(val.graphs, budget, mesh)
    y_val_std = scaler.transform(y_val)
    order = lambda epoch: np.random.default_rng([cfg.seed, epoch]).permutation(len(train))  # noqa: E731

    model = create_model(model_config, axis_name=AXIS)
    tx = create_optimizer(cfg, len(train_batcher.plan(order(0))))
    plateau = create_plateau(cfg)
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.ensemble_size)
    example = jax.tree.map(jnp.asarray, train_batcher.sub_batch(np.arange(1)))
    state = init_state(model, tx, plateau, keys, example)
    if init_variables is not None:
        chex.assert_trees_all_equal_shapes(init_variables, state.variables)
        state = state.replace(params=init_variables["params"], batch_stats=init_variables["batch_stats"])
    state = jax.device_put(state, replicated(mesh))
    n_models, n_targets = cfg.ensemble_size, len(names)
    new_sums = lambda: jax.device_put(EpochSums.zeros(n_models, n_targets), replicated(mesh))  # noqa: E731
    sums = new_sums()
    progress_record = {
        "epoch": 0, "step_in_epoch": 0, "history": [], "best_score": None, "best_epoch": -1, "global_step": 0, "train_s": 0.0,
    }
    best_variables = jax.device_get(state.variables)

    configs = {
        "model": config_to_dict(model_config),
        "train": config_to_dict(dataclasses.replace(cfg, n_devices=mesh.size)),
        "data": {"n_train": len(train), "n_val": len(val), "target_mean": scaler.mean.tolist(), "target_std": scaler.std.tolist()},
    }
    ckpt = Checkpointer(workdir, configs) if workdir is not None else None
    if ckpt is not None:
        restored = ckpt.restore("latest", abstract_like({"state": state, "sums": sums}, replicated(mesh)))
        if restored is not None:
            (carry, progress_record) = restored
            state, sums = carry["state"], carry["sums"]
            best = ckpt.restore("best", abstract_like(best_variables))
            if best is not None:
                best_variables = best[0]
            log.info("resumed %s at epoch %d step %d", workdir, progress_record["epoch"], progress_record["step_in_epoch"])

    train_step = make_train_step(model, tx, mesh, max_traces, cfg.member_batching)
    predict_step = make_predict_step(model, mesh, cfg.member_batching)
    update_plateau = jax.jit(
        jax.vmap(lambda s, v: plateau.update({}, s, value=v)[1]), out_shardings=replicated(mesh)
    )
    rec = progress_record
    stop_reason = "max_epochs"
    total = cfg.max_epochs * len(train_batcher.plan(order(0)))
    bar = tqdm(total=total, initial=rec["global_step"], desc="training", disable=not progress, dynamic_ncols=True)

    session_start, session_base = time.perf_counter(), rec["train_s"]

    def save_latest(epoch: int, step_in_epoch: int) -> None:
        _raise_if_nonfinite(sums, epoch, step_in_epoch, ckpt)
        if ckpt is not None:
            rec.update(epoch=epoch, step_in_epoch=step_in_epoch, train_s=session_base + time.perf_counter() - session_start)
            # Host copies: the next step donates the device buffers while orbax writes.
            ckpt.save("latest", rec["global_step"], jax.device_get({"state": state, "sums": sums}), copy.deepcopy(rec))

    try:
        for epoch in range(rec["epoch"], cfg.max_epochs):
            if reason := _stop_reason(cfg, rec):
                stop_reason = reason
                break
            plan = train_batcher.plan(order(epoch))
            first = rec["step_in_epoch"] if epoch == rec["epoch"] else 0
            for i, batch in enumerate(train_batcher.batches(plan[first:]), start=first):
                state, sums = train_step(state, sums, batch)
                rec["global_step"] += 1
                bar.update()
                for hook in hooks:
                    hook(epoch, i)
                if rec["global_step"] % log_every == 0:
                    _raise_if_nonfinite(sums, epoch, i, ckpt)
                    bar.set_postfix(_postfix(epoch, sums, scaler, rec["history"]), refresh=False)
                if rec["global_step"] % cfg.checkpoint_every == 0 and i + 1 < len(plan):  # epoch ends save anyway
                    save_latest(epoch, i + 1)

            _raise_if_nonfinite(sums, epoch, len(plan), ckpt)
            train_mae = np.asarray(sums.abs_error) / np.maximum(np.asarray(sums.count), 1)[:, None] * scaler.std
            pred = predict_plan(predict_step, state.variables, val_batcher, len(val))
            member_scores = _member_scores(pred, y_val_std)
            score = float(_member_scores(pred.mean(0, keepdims=True), y_val_std)[0])
            state = state.replace(plateau=update_plateau(state.plateau, jnp.asarray(member_scores, jnp.float32)))
            val_mae = np.abs(scaler.inverse(pred.mean(0)) - y_val).mean(0)
            entry = {
                "epoch": epoch, "train_mae": dict(zip(names, train_mae.mean(0).tolist())),
                "val_mae": dict(zip(names, val_mae.tolist())), "val_score": score,
                "member_val_score": member_scores.tolist(), "lr_scale": np.asarray(state.plateau.scale).tolist(),
                "wall_s": time.perf_counter() - start,
            }
            rec["history"].append(entry)
            improved = rec["best_score"] is None or score < rec["best_score"]
            if improved:
                rec["best_score"], rec["best_epoch"] = score, epoch
                best_variables = jax.device_get(state.variables)
                if ckpt is not None:
                    ckpt.save("best", epoch, best_variables, {"epoch": epoch, "val_mae": entry["val_mae"]})
            sums = new_sums()
            rec["train_s"] = session_base + time.perf_counter() - session_start
            save_latest(epoch + 1, 0)
            bar.set_postfix(_postfix(epoch, None, scaler, rec["history"]), refresh=True)
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.wait()
            ckpt.close()
    return FitResult(
        model=create_model(model_config), variables=best_variables, scaler=scaler, budget=budget,
        history=rec["history"], best_epoch=rec["best_epoch"], stop_reason=stop_reason, wall_s=time.perf_counter() - start,
    )


def _stop_reason(cfg: TrainConfig, rec: dict) -> str | None:
    """Why training stops before the next epoch (checked on resume too), or None."""
    if not rec["history"]:
        return None
    if rec["history"][-1]["epoch"] - rec["best_epoch"] >= cfg.early_stopping:
        return "early_stopping"
    if cfg.time_budget_s is not None and rec["train_s"] >= cfg.time_budget_s:
        return "time_budget"
    return None


def _raise_if_nonfinite(sums: EpochSums, epoch: int, step: int, ckpt: Checkpointer | None) -> None:
    bad = np.asarray(sums.nonfinite)
    if bad.any():
        where = f"the last good checkpoint is {ckpt.directory} (latest step {ckpt.latest_step('latest')})" if ckpt else "no checkpoints were written (workdir=None)"
        raise NonFiniteLossError(
            f"non-finite loss or gradient in epoch {epoch} before step {step} (ensemble member(s) "
            f"{np.flatnonzero(bad).tolist()}); the run is stopped and {where}"
        )


def _postfix(epoch: int, sums: EpochSums | None, scaler: TargetScaler, history: list[dict]) -> dict:
    post = {"epoch": epoch}
    if sums is not None:
        mae = np.asarray(sums.abs_error).mean(0) / max(float(np.asarray(sums.count).mean()), 1.0) * scaler.std
        post["train_mae"] = " ".join(f"{m:.4f}" for m in mae)
    elif history:
        post["train_mae"] = " ".join(f"{m:.4f}" for m in history[-1]["train_mae"].values())
    if history:
        post["val_mae"] = " ".join(f"{m:.4f}" for m in history[-1]["val_mae"].values())
    return post
