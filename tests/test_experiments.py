"""Every experiment's tiny ``test`` config runs end to end and writes its outputs."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_experiment(script: str, out: Path, *extra: str, returncode: int = 0) -> str:
    """Run the experiment's ``test`` config; its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--config", "test", "--out", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done.stderr


def test_emt_dataset(tmp_path, cache_dir):
    run_experiment("emt_dataset.py", tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_crystals"] >= 7 and summary["neighbors_per_atom"] > 10
    assert (tmp_path / "formation_energy.png").stat().st_size > 1000


def test_train_cgcnn(tmp_path, cache_dir):
    run_experiment("train_cgcnn.py", tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    fe = metrics["formation_energy_per_atom"]
    assert metrics["epochs"] >= 10 and metrics["ensemble_size"] == 2
    assert fe["test_mae"] < 0.7 * fe["mean_baseline_test_mae"]  # visibly better than predicting the mean
    assert fe["uncertainty"]["mean_std"] > 0
    assert (tmp_path / "parity.png").stat().st_size > 1000
    assert (tmp_path / "ckpt" / "best").is_dir()


def test_discover(tmp_path, cache_dir):
    run_experiment("discover.py", tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["hit_rate_by_round"]) == 2 and summary["wall_s"] > 0
    for name in ["report.md", "discoveries.csv", "rounds.csv", "hit_rates.png", "validation.png", "known-2.csv"]:
        assert (tmp_path / name).exists(), name
    # Resuming a finished campaign redoes nothing and reports the same numbers.
    run_experiment("discover.py", tmp_path)
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["hit_rate_by_round"] == summary["hit_rate_by_round"]


def test_ising_phase(tmp_path):
    run_experiment("ising_phase.py", tmp_path, "--results", str(tmp_path / "ising_tc.json"))
    summary = json.loads((tmp_path / "ising_tc.json").read_text())
    assert set(summary) == {"tc_binder", "tc_binder_err", "tc_cnn", "tc_cnn_err", "tc_pca", "dataset_generation_s"}
    assert abs(summary["tc_binder"] - 2.269185) < 0.15  # crossing of U4 for L = 4 and 8 only
    for name in ("p_ordered", "binder", "pca_pc1", "pca_scatter"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def read_test_energies(run_dir):
    """{column: array} of a run's test_energies.csv."""
    with open(run_dir / "test_energies.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: np.array([float(row[key]) for row in rows]) for key in rows[0] if key.startswith("error")}


def test_train_mlff_an_ensemble_then_run_md(tmp_path):
    run_experiment("train_mlff.py", tmp_path / "ff")
    metrics = json.loads((tmp_path / "ff" / "test_metrics.json").read_text())
    assert metrics["force_mae_eV_per_A"] > 0 and (tmp_path / "ff" / "parity.png").stat().st_size > 1000
    assert 0 < metrics["train_s"] < metrics["wall_time_s"] and metrics["interactions"] == 1
    energies = read_test_energies(tmp_path / "ff")
    assert np.mean(np.abs(energies["error_meV_per_atom"])) == pytest.approx(metrics["energy_mae_meV_per_atom"], rel=1e-5)
    run_experiment("train_mlff.py", tmp_path / "ff1", "--seed", "1", "--energy-weight", "2", "--force-weight", "20",
                   "--learning-rate", "0.002", "--no-holdout", "--interactions", "2", "--features", "8", "--force-huber-delta", "0.05")
    overridden = {"seed": 1, "energy_weight": 2.0, "force_weight": 20.0, "learning_rate": 0.002, "holdout": False,
                  "force_huber_delta": 0.05}
    config = json.loads((tmp_path / "ff1" / "config.json").read_text())
    assert {k: config["train"][k] for k in overridden} == overridden
    assert config["model"]["num_interactions"] == 2 and config["model"]["features"] == 8
    run_experiment("train_mlff.py", tmp_path / "ff2", "--cutoff", "4.5", "--envelope-p", "9", "--max-l", "3", "--epochs", "1")
    model = json.loads((tmp_path / "ff2" / "config.json").read_text())["model"]
    assert model["cutoff"] == 4.5 and model["envelope_p"] == 9 and model["max_l"] == 3
    other = tmp_path / "other"  # the same run, relabelled as trained on another dataset
    shutil.copytree(tmp_path / "ff2", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"train": config["train"] | {"dataset": "aspirin"}}))
    stderr = run_experiment("train_mlff.py", tmp_path / "bad", "--ensemble", str(tmp_path / "ff"), str(other), returncode=1)
    assert "must share a dataset" in stderr
    runs = [str(tmp_path / name) for name in ("ff", "ff1", "ff2")]
    run_experiment("train_mlff.py", tmp_path / "ens", "--ensemble", *runs, "--record", str(tmp_path / "results.json"))
    tested = json.loads((tmp_path / "ens" / "test_metrics.json").read_text())
    members = list(tested["members"].values())
    # The test graphs are built at the largest cutoff (5 A); ff2's neighbours beyond 4.5 A change nothing.
    for run, alone in ((runs[0], metrics), (runs[2], json.loads((tmp_path / "ff2" / "test_metrics.json").read_text()))):
        assert tested["members"][run]["force_mae_eV_per_A"] == pytest.approx(alone["force_mae_eV_per_A"], rel=1e-4)
    for key in ("energy_mae_meV_per_atom", "force_mae_eV_per_A"):  # |mean error| <= mean |error|
        assert tested["ensemble"][key] <= np.mean([m[key] for m in members]) * (1 + 1e-6)  # float32 rounding
    # Per structure: each member's column is its own run's error; the ensemble's is their mean.
    per_structure = read_test_energies(tmp_path / "ens")
    member_errors = [per_structure[f"error_meV_per_atom_{run}"] for run in runs]
    np.testing.assert_allclose(member_errors[0], energies["error_meV_per_atom"], atol=1e-3)
    np.testing.assert_allclose(per_structure["error_meV_per_atom"], np.mean(member_errors, axis=0), atol=1e-3)
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert recorded["model"] == "invariant ensemble of 3" and recorded["interactions"] == [1, 2, 1]
    assert recorded["cutoff"] == [5.0, 5.0, 4.5] and recorded["features"] == [16, 8, 16]
    assert recorded["envelope_p"] == [6, 6, 9] and recorded["max_l"] == [2, 2, 3]
    assert [t["seed"] for t in recorded["training"]] == [0, 1, 0] and recorded["training"][1]["force_huber_delta"] == 0.05
    run_experiment("run_md.py", tmp_path / "md", "--model-dir", str(tmp_path / "ff"))
    summary = json.loads((tmp_path / "md" / "summary.json").read_text())
    assert summary["stopped"] is None and abs(summary["drift_meV_per_atom_per_ps"]) < 10
    # MD on the ensemble's mean energy, with the members' force spread per recorded frame.
    run_experiment("run_md.py", tmp_path / "md3", "--model-dir", *runs)
    summary = json.loads((tmp_path / "md3" / "summary.json").read_text())
    assert summary["stopped"] is None and abs(summary["drift_meV_per_atom_per_ps"]) < 10
    observables = np.genfromtxt(tmp_path / "md3" / "observables.csv", delimiter=",", names=True)
    assert len(observables) == 10 and np.all(observables["max_force_std"] > 0)
    assert (tmp_path / "md3" / "md.png").stat().st_size > 1000
    assert summary["max_force_std_eV_per_A"] == pytest.approx(observables["max_force_std"].max(), rel=1e-6)
    # The same run with a bound on the spread stops where the spread first passes it.
    bound = float(np.median(observables["max_force_std"]))
    run_experiment("run_md.py", tmp_path / "md3_bound", "--model-dir", *runs, "--max-force-std", str(bound))
    summary = json.loads((tmp_path / "md3_bound" / "summary.json").read_text())
    assert "extrapolating" in summary["stopped"]
    rows = (tmp_path / "md3_bound" / "observables.csv").read_text().splitlines()[1:]
    assert len(rows) == np.argmax(observables["max_force_std"] > bound)
    stderr = run_experiment("run_md.py", tmp_path / "bad_md", "--model-dir", str(tmp_path / "ff"), str(other), returncode=1)
    assert "must share a dataset" in stderr
    from ase.io import read

    assert len(read(tmp_path / "md" / "trajectory.extxyz", index=":")) == 10
