"""CGCNN training and inference throughput at the reference model size, vs PyTorch CGCNN.

    python benchmarks/cgcnn.py [--quick]

Model and batches as the reference implementation (Xie's cgcnn defaults): 64 atom
features, 3 convolutions, 12 nearest neighbours within 8 A, 41 Gaussians, batch 256.
Graphs: the mp20-lite training crystals (shared data), else random crystals of the same
sizes (4-20 atoms). Both figures are end to end over the data of a whole epoch: padded
batches are built on a host thread (``DeviceBatcher``) while the device runs the jitted
step, so host work that the device does not hide counts.

Metrics: train_crystals_per_s (AdamW step: forward, backward, update), infer_crystals_per_s
(eval-mode forward), compile_s (the train step; the predict step's is an extra field).
The PyTorch baselines are constants: they were measured on this 2-core CPU by the issue
author (torch CGCNN is not part of this repository), so ratio = value / constant.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from common import emit, median_seconds, parse_args
from matjax.config import CGCNNConfig, TrainConfig
from matjax.data.batching import budget_for
from matjax.data.dataset import Dataset
from matjax.data.graphs import build_graph, pack
from matjax.data.sources import mp20_lite, shared_data_dir
from matjax.models.cgcnn import create_model
from matjax.train.loop import EpochSums, create_optimizer, create_plateau, init_state, make_predict_step, make_train_step
from matjax.train.losses import TargetScaler
from matjax.train.sharding import DeviceBatcher, data_mesh, replicated

# PyTorch CGCNN (txie-93/cgcnn, default hyperparameters, graphs cached) on this 2-core CPU,
# measured by the issue author: training 1,200 crystals/s, inference about 3,300 crystals/s.
TORCH_TRAIN_PER_S = 1200.0
TORCH_INFER_PER_S = 3300.0
BATCH = 256


def crystals(n: int) -> tuple[Dataset, str]:
    """mp20-lite training crystals, else random ones with mp20-like sizes."""
    model = CGCNNConfig()
    if shared_data_dir() is not None:
        data = mp20_lite(("formation_energy_per_atom",), cutoff=model.graph.cutoff, max_neighbors=model.graph.max_neighbors)
        return data["train"].subset(np.arange(min(n, len(data["train"])))), "mp20-lite train"
    rng = np.random.default_rng(0)
    graphs = []
    for _ in range(n):
        n_atoms = int(rng.integers(4, 21))
        lattice = (n_atoms * 18.0) ** (1 / 3) * (np.eye(3) + 0.1 * rng.normal(size=(3, 3)))
        graphs.append(build_graph(rng.integers(1, 84, n_atoms), rng.random((n_atoms, 3)), lattice, 8.0, 12))
    ids = np.array([f"random-{i}" for i in range(n)])
    return Dataset(ids, pack(graphs), rng.normal(size=(n, 1)), ("formation_energy_per_atom",)), "random crystals"


def main():
    args = parse_args()
    data, source = crystals(2560 if args.quick else 12595)
    repeats = 3 if args.quick else 5
    model_config, train_config = CGCNNConfig(), TrainConfig(batch_size=BATCH)
    mesh = data_mesh(1)
    budget = budget_for(data.graphs, BATCH)
    batcher = DeviceBatcher(data.graphs, budget, mesh, TargetScaler.fit(data.targets).transform(data.targets))
    plan = batcher.plan(np.random.default_rng(0).permutation(len(data)))
    model = create_model(model_config, axis_name="data")
    tx, plateau = create_optimizer(train_config, len(plan)), create_plateau(train_config)
    example = jax.tree.map(jnp.asarray, batcher.sub_batch(np.arange(1)))
    state = jax.device_put(init_state(model, tx, plateau, jax.random.PRNGKey(0)[None], example), replicated(mesh))
    sums = jax.device_put(EpochSums.zeros(1, 1), replicated(mesh))
    train_step = make_train_step(model, tx, mesh)

    first = batcher.batch(plan[0])
    start = time.perf_counter()
    state, sums = jax.block_until_ready(train_step(state, sums, first))
    compile_train = time.perf_counter() - start
    carry = [state, sums]

    def train_epoch():
        for batch in batcher.batches(plan):
            carry[:] = train_step(*carry, batch)
        jax.block_until_ready(carry)

    train_s, train_min = median_seconds(train_epoch, repeats)
    predict_step = make_predict_step(model, mesh)
    variables = carry[0].variables
    start = time.perf_counter()
    jax.block_until_ready(predict_step(variables, first))
    compile_infer = time.perf_counter() - start

    def infer_epoch():
        jax.block_until_ready([predict_step(variables, batch) for batch in batcher.batches(plan)])

    infer_s, infer_min = median_seconds(infer_epoch, repeats)
    shape = dict(batch=BATCH, budget=list(budget), n_crystals=len(data), graphs=source, atom_features=64, n_conv=3)
    emit("cgcnn", "train_crystals_per_s", len(data) / train_s, "crystals/s", baseline=TORCH_TRAIN_PER_S,
         best=len(data) / train_min, baseline_impl="PyTorch CGCNN (issue author, same CPU)", **shape)
    emit("cgcnn", "infer_crystals_per_s", len(data) / infer_s, "crystals/s", baseline=TORCH_INFER_PER_S,
         best=len(data) / infer_min, baseline_impl="PyTorch CGCNN (issue author, same CPU)", **shape)
    emit("cgcnn", "compile_s", compile_train, "s", infer_compile_s=round(compile_infer, 3), **shape)
    print(f"{'metric':<24}{'value':>12}{'torch':>10}{'ratio':>8}")
    print(f"{'train crystals/s':<24}{len(data) / train_s:>12.0f}{TORCH_TRAIN_PER_S:>10.0f}{len(data) / train_s / TORCH_TRAIN_PER_S:>8.2f}")
    print(f"{'infer crystals/s':<24}{len(data) / infer_s:>12.0f}{TORCH_INFER_PER_S:>10.0f}{len(data) / infer_s / TORCH_INFER_PER_S:>8.2f}")
    print(f"{'compile s (train/infer)':<24}{compile_train:>12.2f}{compile_infer:>10.2f}")


if __name__ == "__main__":
    main()
