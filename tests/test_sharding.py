"""Data parallelism on 4 fake CPU devices equals one device running the same crystals.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts, so the check
runs in a child Python process with the flag set; the test asserts on what it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

N_DEVICES = 4


def _child() -> dict:
    import dataclasses

    import jax

    from crystal_fixtures import toy_crystals
    from matjax.data.batching import Budget, budget_for
    from matjax.train.ensemble import load_predictor
    from matjax.train.loop import EpochSums, create_optimizer, create_plateau, fit, init_state, make_train_step
    from matjax.train.losses import TargetScaler
    from matjax.train.sharding import DeviceBatcher, data_mesh, replicated
    from matjax.models.cgcnn import create_model
    from test_train import MODEL, TRAIN

    assert len(jax.devices()) == N_DEVICES
    train, val = toy_crystals(192, seed=0), toy_crystals(64, seed=1)
    y = np.stack([train.target(t) for t in MODEL.targets], axis=1)
    y = TargetScaler.fit(y).transform(y)
    per_device = budget_for(train.graphs, 8)
    merged = Budget(N_DEVICES * per_device.n_node, N_DEVICES * per_device.n_edge, N_DEVICES * (per_device.n_graph - 1) + 1)
    meshes = {"1": data_mesh(1), str(N_DEVICES): data_mesh(N_DEVICES)}
    batchers = {"1": DeviceBatcher(train.graphs, merged, meshes["1"], y),
                str(N_DEVICES): DeviceBatcher(train.graphs, per_device, meshes[str(N_DEVICES)], y)}
    plan = batchers[str(N_DEVICES)].plan(np.random.default_rng(0).permutation(len(train)))[:6]
    model = create_model(MODEL, axis_name="data")
    tx, plateau = create_optimizer(TRAIN, 10), create_plateau(TRAIN)
    example = jax.tree.map(jax.numpy.asarray, batchers["1"].sub_batch(np.arange(1)))
    curves, params = {}, {}
    for name, mesh in meshes.items():
        state = jax.device_put(init_state(model, tx, plateau, jax.random.split(jax.random.PRNGKey(0), 2), example), replicated(mesh))
        step = make_train_step(model, tx, mesh)
        curve = []
        for sub_batches in plan:
            # One device gets the same crystals as one batch; 4 devices one sub-batch each.
            batch = batchers[name].batch([np.concatenate(sub_batches)] if name == "1" else sub_batches)
            state, sums = step(state, jax.device_put(EpochSums.zeros(2, 2), replicated(mesh)), batch)
            curve.append((np.asarray(sums.abs_error).sum(1) / np.asarray(sums.count)).tolist())
        curves[name], params[name] = curve, jax.device_get(state.params)
    param_diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params["1"], params[str(N_DEVICES)])))

    # The whole loop on 4 devices, and sharded prediction equal to one-device prediction.
    workdir = Path(sys.argv[2])
    config = dataclasses.replace(TRAIN, max_epochs=2, n_devices=N_DEVICES)
    result = fit(MODEL, config, train, val, workdir, progress=False, max_traces=1)
    predictor = load_predictor(workdir)
    mean4, std4 = predictor.predict(val.graphs, batch_size=16, n_devices=N_DEVICES)
    mean1, std1 = predictor.predict(val.graphs, batch_size=16, n_devices=1)
    return {
        "curves": curves, "param_diff": param_diff, "steps": len(plan),
        "history": [h["val_mae"] for h in result.history],
        "predict_diff": float(max(np.abs(mean4 - mean1).max(), np.abs(std4 - std1).max())),
    }


def test_four_devices_give_the_one_device_loss_curve(tmp_path):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES}", "JAX_PLATFORMS": "cpu"}
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = np.array(report["curves"]["1"]), np.array(report["curves"][str(N_DEVICES)])
    assert report["steps"] == 6 and one.shape == (6, 2)
    assert one[-1].mean() < one[0].mean()  # the curve moves, so agreement is not trivial
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-5)
    assert report["param_diff"] < 1e-4
    assert len(report["history"]) == 2
    assert report["predict_diff"] < 1e-5


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(json.dumps(_child()))
