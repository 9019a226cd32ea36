"""Ensembles of K models: mean and spread of their predictions, and how well the spread ranks the error.

Members are trained together (``matjax.train.loop.fit`` with ``ensemble_size=K``: the
state is vmapped over K PRNG keys), so their variables are one pytree with a leading [K]
axis. Prediction is ``vmap`` over that axis inside ``jit``:

    mean, std = ensemble_predict(model, variables, graphs, scaler)   # [G, T] each

and, for large candidate sets, ``EnsemblePredictor.predict`` streams a PackedGraphs
through static-shape batches, sharded over the devices of a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import scipy.stats

from matjax.config import CGCNNConfig
from matjax.data.batching import Budget, budget_for
from matjax.data.graphs import PackedGraphs
from matjax.models.cgcnn import create_model
from matjax.train.checkpoint import config_from_dict, restore_best
from matjax.train.losses import TargetScaler
from matjax.train.sharding import DeviceBatcher, data_mesh


MEMBER_BATCHING = ("auto", "vmap", "map")


def map_members(fn, members, how: str = "auto"):
    """``fn`` applied to every member (the leading [K] axis of the pytree ``members``), stacked.

    how: "vmap" vectorises over the members, one wide computation (the choice on GPU/TPU);
    "map" runs them one after another inside the same compiled program (``lax.map``).
    On CPU, XLA runs the reductions that a vmapped model's backward pass makes over edges
    (BatchNorm gradients) on a slow path, 3-7x slower per member, so "auto" is "map" on
    CPU and "vmap" elsewhere. Both give the same numbers (``tests/test_train.py``).
    """
    if how not in MEMBER_BATCHING:
        raise ValueError(f"unknown member_batching {how!r}; choose from {MEMBER_BATCHING}")
    if how == "auto":
        how = "map" if jax.default_backend() == "cpu" else "vmap"
    return jax.vmap(fn)(members) if how == "vmap" else jax.lax.map(fn, members)


@functools.partial(jax.jit, static_argnums=(0, 3))
def ensemble_apply(model, variables, graphs: jraph.GraphsTuple, how: str = "auto") -> jnp.ndarray:
    """[K, G, T] eval-mode outputs of every member (model units, i.e. standardised)."""
    return map_members(lambda v: model.apply(v, graphs, train=False), variables, how)


def ensemble_predict(model, variables, graphs: jraph.GraphsTuple, scaler: TargetScaler) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(mean [G, T], std [G, T]) over the K members, in physical units.

    std is the population standard deviation of the members' predictions (0 for K = 1).
    Rows of padding graphs are meaningless; mask them with jraph.get_graph_padding_mask.
    """
    pred = scaler.inverse(ensemble_apply(model, variables, graphs))
    return pred.mean(axis=0), pred.std(axis=0)


def uncertainty_report(mean: np.ndarray, std: np.ndarray, target: np.ndarray, confident: float = 0.1) -> dict:
    """How well the ensemble spread ranks the error, for one target ([M] arrays).

    spearman: rank correlation of |error| with std (> 0: larger spread, larger error);
    mae_confident: MAE of the ``confident`` fraction with the smallest std, to compare
    with mae; mae_unconfident: the same for the largest std.
    """
    error = np.abs(np.asarray(mean) - np.asarray(target))
    order = np.argsort(std, kind="stable")
    n = max(1, int(round(confident * len(order))))
    rho = scipy.stats.spearmanr(error, std).statistic if np.ptp(std) > 0 else float("nan")
    return {
        "mae": float(error.mean()),
        "spearman_abs_error_vs_std": float(rho),
        f"mae_top{round(100 * confident)}pct_confident": float(error[order[:n]].mean()),
        f"mae_top{round(100 * confident)}pct_unconfident": float(error[order[-n:]].mean()),
        "mean_std": float(np.mean(std)),
    }


@dataclasses.dataclass(frozen=True)
class EnsemblePredictor:
    """A trained ensemble ready for prediction: model, [K]-stacked variables, target scaling."""

    model: object
    variables: dict
    scaler: TargetScaler
    target_names: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(jax.tree.leaves(self.variables)[0].shape[0])

    def __call__(self, graphs: jraph.GraphsTuple) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(mean [G, T], std [G, T]) for one padded batch."""
        return ensemble_predict(self.model, self.variables, graphs, self.scaler)

    def predict_members(
        self, graphs: PackedGraphs, batch_size: int = 256, budget: Budget | None = None, n_devices: int | None = 1,
        progress: bool = False,
    ) -> np.ndarray:
        """[K, M, T] every member's prediction for every graph, in order, physical units.

        Static batches (one budget, default fitting ``batch_size`` average graphs) are built
        on a host thread and sharded over ``n_devices`` devices (None: all).
        """
        from matjax.train.loop import make_predict_step, predict_plan

        mesh = data_mesh(n_devices)
        budget = budget or budget_for(graphs, batch_size)
        batcher = DeviceBatcher(graphs, budget, mesh)
        return self.scaler.inverse(predict_plan(make_predict_step(self.model, mesh), self.variables, batcher, len(graphs), progress))

    def predict(self, graphs: PackedGraphs, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """(mean [M, T], std [M, T]) over the members; options as ``predict_members``."""
        pred = self.predict_members(graphs, **kwargs)
        return pred.mean(axis=0), pred.std(axis=0)


def load_predictor(workdir: str | Path) -> EnsemblePredictor:
    """The best-validation ensemble of a training run directory (``fit(..., workdir)``)."""

    def abstract(configs: dict):
        model = create_model(config_from_dict(CGCNNConfig, configs["model"]))
        keys = jax.random.split(jax.random.PRNGKey(0), configs["train"]["ensemble_size"])
        return jax.eval_shape(jax.vmap(lambda k: model.init(k, example_batch(), train=False)), keys)

    variables, configs = restore_best(workdir, abstract, "ensemble")
    model_config = config_from_dict(CGCNNConfig, configs["model"])
    scaler = TargetScaler(np.asarray(configs["data"]["target_mean"]), np.asarray(configs["data"]["target_std"]))
    return EnsemblePredictor(create_model(model_config), variables, scaler, model_config.targets)


def example_batch() -> jraph.GraphsTuple:
    """A minimal padded batch (one atom bonded to its own image) to initialise models."""
    from matjax.data.batching import graphs_tuple
    from matjax.data.graphs import build_graph, pack

    graph = build_graph([1], [[0.0, 0.0, 0.0]], np.eye(3) * 2.0, cutoff=2.5)
    return jax.tree.map(jnp.asarray, graphs_tuple(pack([graph]), Budget(8, 64, 2)))
