"""Every experiment's tiny ``test`` config runs end to end and writes its outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_experiment(script: str, out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--config", "test", "--out", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_emt_dataset(tmp_path, cache_dir):
    run_experiment("emt_dataset.py", tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_crystals"] >= 7 and summary["neighbors_per_atom"] > 10
    assert (tmp_path / "formation_energy.png").stat().st_size > 1000
