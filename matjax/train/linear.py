"""Least-squares fit of the linear moment model (``matjax.models.mlff.LinearMomentMLFF``).

Its energy, E = sum_i (W[Z_i] . B_i + e[Z_i]), is linear in the coefficients W and e, and so
are its forces, -dE/dR = -sum_i W[Z_i] . dB_i/dR. The loss the networks minimise with Adam
(``matjax.train.forcefield.loss_fn``: energy_weight x per-atom energy MSE + force_weight x
force-component MSE) is then a quadratic form with a single minimum, found by one linear
solve: no epochs, learning rate or seed, and the same coefficients on every machine.

Rows of one structure: its per-atom energy, whose columns are the invariants summed over the
atoms of each element and the element counts, over n_atoms; and its 3N force components,
minus the derivatives of those sums by the positions (forward mode, 3N tangents, float64).
The normal equations are accumulated structure by structure (memory K^2, not rows x K), and
solved with a ridge penalty on the columns standardised to unit RMS (``ridge_solve``).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from matjax.config import MLFFConfig, MLFFTrainConfig
from matjax.data.batching import budget_for
from matjax.data.forcefield import ForceFieldData, structure_groups
from matjax.models.mlff import MAX_Z, create_model, moment_invariants
from matjax.train.forcefield import (
    create_optimizer, energy_weights, evaluate, init_state, make_batch, make_eval_step, prepare_run, run_checkpointer,
    scalar_metrics, validation_loss,
)


@functools.lru_cache(maxsize=4)
def _sums_and_derivatives(model_cfg: MLFFConfig, n_node: int):
    """Jitted (positions [n_node, 3], lattice, senders, receivers, shifts, edge mask, one-hot
    elements [n_node, S]) -> (invariant sums [S, K], their derivatives [S, K, n_node, 3])."""
    def sums(positions, lattice, senders, receivers, shifts, edge_mask, elements):
        vectors = positions[senders] + shifts @ lattice - positions[receivers]
        return elements.T @ moment_invariants(vectors, edge_mask, receivers, n_node, model_cfg)

    def with_derivatives(positions, *rest):
        return sums(positions, *rest), jax.jacfwd(sums)(positions, *rest)

    return jax.jit(with_derivatives)


def _padded(data: ForceFieldData, s: int, elements: np.ndarray, n_node: int, n_edge: int) -> tuple:
    """Structure ``s`` as ``_sums_and_derivatives``' float64 arguments, padded to n_node atoms and
    n_edge edges (padding edges are masked; padding atoms have no edges and no element)."""
    graph = data.graphs.graph(s)
    n, e = graph.n_node, graph.n_edge
    positions, shifts = np.zeros((n_node, 3)), np.zeros((n_edge, 3))
    senders, receivers = np.zeros(n_edge, np.int32), np.zeros(n_edge, np.int32)
    positions[:n], shifts[:e], senders[:e], receivers[:e] = graph.positions, graph.shifts, graph.senders, graph.receivers
    onehot = np.zeros((n_node, len(elements)))
    onehot[np.arange(n), np.searchsorted(elements, graph.species)] = 1.0
    return positions, graph.lattice, senders, receivers, shifts, np.arange(n_edge) < e, onehot


def normal_equations(model_cfg: MLFFConfig, data: ForceFieldData, elements: np.ndarray, energy_weight: float,
                     force_weight: float, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [P, P], b [P], rms [P]) with c^T A c - 2 b^T c + const the loss of coefficients c [P]:
    P = S K invariant coefficients (element-major) then S element energies, for ``elements``
    [S] (sorted atomic numbers); rms: each column's RMS over all rows, energy and force rows
    alike, unweighted. weights: [M] multipliers of each structure's energy term."""
    n_node, n_edge = int(data.n_atoms.max()), max(int(data.graphs.n_edge.max()), 1)
    fn = _sums_and_derivatives(model_cfg, n_node)
    starts = np.cumsum(data.n_atoms) - data.n_atoms
    wf = force_weight / (3 * data.n_atoms.sum())
    a = b = squares = 0.0
    with jax.enable_x64(True):
        for s in tqdm(range(len(data)), desc="least-squares rows", leave=False):
            args = _padded(data, s, elements, n_node, n_edge)
            sums, derivatives = jax.device_get(fn(*args))
            n = int(data.n_atoms[s])
            counts = args[-1].sum(axis=0)
            energy_row = np.concatenate([sums.ravel(), counts]) / n
            force_rows = np.concatenate([-derivatives[:, :, :n].reshape(sums.size, 3 * n).T,
                                         np.zeros((3 * n, len(elements)))], axis=1)
            forces = data.forces[starts[s]: starts[s] + n].ravel()
            w = energy_weight * (1.0 if weights is None else weights[s]) / len(data)
            a = a + w * np.outer(energy_row, energy_row) + wf * force_rows.T @ force_rows
            b = b + w * energy_row * data.energy[s] / n + wf * force_rows.T @ forces
            squares = squares + energy_row**2 + np.sum(force_rows**2, axis=0)
    return a, b, np.sqrt(squares / (len(data) + 3 * data.n_atoms.sum()))


def ridge_solve(a: np.ndarray, b: np.ndarray, rms: np.ndarray, ridge: float, n_free: int = 0) -> np.ndarray:
    """argmin c^T A c - 2 b^T c + ridge mean(diag A') |c'|^2 over the columns standardised to unit
    RMS (c' = rms * c, A' = A / rms rms^T), so one relative penalty suits invariants of any
    magnitude. The last ``n_free`` coefficients (the element energies) are not penalised."""
    scale = np.where(rms > 0, rms, 1.0)
    scaled = a / np.outer(scale, scale)
    penalty = np.full(len(a), ridge * np.mean(np.diag(scaled)))
    penalty[len(a) - n_free:] = 0.0
    return np.linalg.solve(scaled + np.diag(penalty), b / scale) / scale


def fit_linear(model_cfg: MLFFConfig, cfg: MLFFTrainConfig, splits: dict[str, ForceFieldData], run_dir: str | Path):
    """Fit the linear model on splits["train"]; (model, state, history) as ``train`` returns them.

    The coefficients are stored as a one-epoch ``TrainState`` (params = ema = W [MAX_Z, K]),
    so every loader of trained force fields (calculator, MD, ensembles) reads them unchanged.
    """
    if cfg.stress_weight > 0:
        raise ValueError("the linear model is fitted to energies and forces; set stress_weight to 0")
    run_dir = Path(run_dir)
    start = time.perf_counter()
    train_data, model_cfg, _ = prepare_run(model_cfg, cfg, splits, run_dir)
    model = create_model(model_cfg)
    elements = np.unique(train_data.graphs.species)
    weights = energy_weights(cfg.group_energy_weights, structure_groups(train_data.ids)) if cfg.group_energy_weights else None
    a, b, rms = normal_equations(model_cfg, train_data, elements, cfg.energy_weight, cfg.force_weight, weights)
    solution = ridge_solve(a, b, rms, cfg.ridge, n_free=len(elements))
    coefficients, reference = np.zeros((MAX_Z, (len(solution) - len(elements)) // len(elements))), np.zeros(MAX_Z)
    coefficients[elements] = solution[: -len(elements)].reshape(len(elements), -1)
    reference[elements] = solution[-len(elements):]

    budget = budget_for(train_data.graphs, cfg.batch_size)
    constants = {"_Constants_0": {"reference": jnp.asarray(reference, jnp.float32), "scale": jnp.ones((), jnp.float32)}}
    state = init_state(model, create_optimizer(cfg, 1), jax.random.PRNGKey(cfg.seed), constants,
                       make_batch(train_data, [0], budget, reference))
    fitted = {"coefficients": jnp.asarray(coefficients, jnp.float32)}
    state = state.replace(step=jnp.array(1), epoch=jnp.array(1), params=fitted, ema=fitted)
    val = scalar_metrics(evaluate(make_eval_step(model_cfg, False), state.variables(), splits["val"], budget))
    train_s = time.perf_counter() - start
    record = {"epoch": 1, "stage": 0, "energy_weight": cfg.energy_weight, "ridge": cfg.ridge, "train_s": round(train_s, 1),
              **{f"val_{k}": v for k, v in val.items()}}
    val_loss = validation_loss(cfg, val)
    with run_checkpointer(run_dir, model_cfg, cfg) as checkpointer:
        checkpointer.save("latest", 1, state, {"train_s": train_s})
        checkpointer.save("best", 1, state, {"val_loss": val_loss, "epoch": 1, "stage": 0})
    (run_dir / "history.jsonl").write_text(json.dumps(record) + "\n")
    return model, state, [record]
