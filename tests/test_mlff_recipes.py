"""benchmarks/mlff_mlearn.py's recipes rebuild the members of the recorded mlearn ensembles."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "benchmarks" / "results" / "mlff_mlearn.json").read_text())


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark imports its sibling ``common``
    try:
        yield load_script(ROOT / "benchmarks" / "mlff_mlearn.py"), load_script(ROOT / "experiments" / "train_mlff.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def run_benchmark(*args: str, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "mlff_mlearn.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("element", sorted(RECORDED))
def test_recipes_give_the_recorded_members_settings(scripts, element):
    bench, train = scripts
    recorded = RECORDED[element]
    assert list(bench.RECIPES[element]) == [Path(m).name for m in recorded["members"]]
    for i, member in enumerate(bench.RECIPES[element]):
        model_cfg, cfg = train.configs(train.build_parser().parse_args(bench.member_args(element, member)))
        settings = train.model_settings(model_cfg)
        assert cfg.dataset == f"mlearn-{element}" and not cfg.holdout and model_cfg.model in recorded["model"]
        # every setting the record kept for this member (older records kept fewer)
        assert {k: recorded[k][i] for k in train.MODEL_KEYS if k in recorded} == {
            k: settings[k] for k in train.MODEL_KEYS if k in recorded}, member
        if "training" in recorded:  # records made since the ensemble kept each member's training settings
            kept, rebuilt = recorded["training"][i], dataclasses.asdict(cfg)
            assert kept == {k: rebuilt.get(k) for k in kept}, member


def test_dry_run_prints_every_member_then_the_ensemble(tmp_path):
    done = run_benchmark("--element", "Mo", "--dry-run", "--runs", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(RECORDED["Mo"]["members"]) + 1
    assert all("--dataset mlearn-Mo" in line and "--no-holdout" in line for line in lines[:-1])
    first = Path(RECORDED["Mo"]["members"][0]).name
    assert "--ensemble" in lines[-1] and str(tmp_path / first) in lines[-1]
    assert not tmp_path.joinpath(first).exists()


def test_failed_members_are_reported_and_no_ensemble_is_tested(tmp_path):
    empty = tmp_path / "no_data"
    empty.mkdir()
    done = run_benchmark("--element", "Si", "--runs", str(tmp_path / "runs"), env={"MATJAX_DATA": str(empty)})
    assert done.returncode != 0 and done.stdout == ""
    assert "members si_l2, si_l2_s1 failed" in done.stderr
    assert "set MATJAX_DATA" in done.stderr  # the loader's own message names the missing file
    assert not (tmp_path / "runs" / "si_ensemble").exists()
