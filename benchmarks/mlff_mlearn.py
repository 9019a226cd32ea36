"""Reproduce a recorded mlearn force field: train every member of the element's recorded
ensemble with its recipe, then test their ensemble on the mlearn test set as shipped.

    python benchmarks/mlff_mlearn.py --element Si --dry-run    # print the commands only
    python benchmarks/mlff_mlearn.py --element Mo              # needs ../shared; minutes (Si: hours on a 2-core CPU)
    python benchmarks/mlff_mlearn.py --element Ge --record benchmarks/results/mlff_mlearn.json

Each member is one ``experiments/train_mlff.py`` run in <runs>/<member>. Training checkpoints
as it goes and a finished run is only tested again, so the command can be stopped and started
again. A member that fails is reported and the others still train; the ensemble is tested only
when every member finished, since a subset is not the recorded force field.

Prints JSON lines (metric names as in ``mlff_mlearn.json``): energy_mae_meV_per_atom and
force_mae_eV_per_A of each member (impl "member") and of the ensemble (impl "ensemble"), the
ensemble's with the best published figure (GAP/MTP, Zuo et al., J. Phys. Chem. A 124, 731,
2020) as baseline: ratio < 1 is better than published. The children's own output goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from common import emit

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "experiments" / "train_mlff.py"

COMMON = "--config mlearn --no-holdout"  # the mlearn config's model is the moment network
# Mo: linear moment models, fitted by least squares in minutes (the same coefficients on any machine). Basis,
# weights, ridge and the second member's cutoff were chosen by 10-fold cross-validation on the training set,
# each fold holding one training surface (benchmarks/results/mlff_mlearn.md, fifty-first session).
MO_LINEAR = "--model linear --num-rbf 10 --product-rbf 4 --min-distance 1.5"
GE_ATOM = "--isolated-atoms Ge=-0.77067288"  # the free atom at its VASP PBE energy (eV) as a training structure
GE_L2 = f"--interactions 2 --epochs 150 {GE_ATOM}"
LI = "--epochs 200 --learning-rate 2e-3 --cutoff 6"

# Each recorded ensemble's members, in its recorded order: run name -> flags beyond COMMON and
# --dataset (benchmarks/results/mlff_mlearn.md has each run's history and figures).
RECIPES = {
    "Si": {
        "si_l2": "--interactions 2 --epochs 150 --seed 0",
        "si_l2_s1": "--interactions 2 --epochs 150 --seed 1",
    },
    "Mo": {
        "mo_lin_r10_p4": f"{MO_LINEAR} --energy-weight 1000 --ridge 1e-11",
        "mo_lin_r10_p4_c55": f"{MO_LINEAR} --cutoff 5.5 --energy-weight 300 --ridge 1e-10",
    },
    "Ge": {
        "ge_l2_iso_s0": f"{GE_L2} --seed 0",
        "ge_l2_iso_s1": f"{GE_L2} --seed 1",
        "ge_l2_iso_s2": f"{GE_L2} --seed 2",
        "ge_L3_sq8_iso_s0": f"--epochs 150 --max-l 3 --sqrt-embedding 8 {GE_ATOM} --seed 0",
    },
    "Li": {
        "li_l3_c6_s0": f"{LI} --seed 0",
        "li_l3_c6_s1": f"{LI} --seed 1",
    },
}

# Best published test MAEs (GAP or MTP): energy meV/atom, force eV/A.
PUBLISHED = {"Si": (2.21, 0.06), "Mo": (2.24, 0.09), "Ge": (1.79, 0.05), "Li": (0.49, 0.01)}


def member_args(element: str, member: str) -> list[str]:
    """train_mlff.py's arguments for one member of the element's recorded ensemble."""
    return shlex.split(f"{COMMON} --dataset mlearn-{element} {RECIPES[element][member]}")


def command_line(args: list[str]) -> str:
    """The train_mlff.py command with ``args``, as a user would type it in the repository."""
    return shlex.join(["python", str(TRAIN.relative_to(ROOT)), *args])


def run(args: list[str]) -> int:
    """Run train_mlff.py with ``args``, its output to stderr; its exit code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print("$", command_line(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, str(TRAIN), *args], env=env, stdout=sys.stderr).returncode


def emit_figures(figures: dict, impl: str, published: tuple[float, float] | None = None, **extra) -> None:
    """One JSON line per figure of a run's test_metrics.json."""
    for metric, unit, baseline in zip(("energy_mae_meV_per_atom", "force_mae_eV_per_A"), ("meV/atom", "eV/A"),
                                      published or (None, None)):
        emit("mlff_mlearn", metric, figures[metric], unit, baseline=baseline, impl=impl, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--element", choices=sorted(RECIPES), required=True)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of the member and ensemble runs")
    parser.add_argument("--record", type=Path, help="merge the ensemble's figures into this results JSON")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args()

    members = {m: [*member_args(args.element, m), "--out", str(args.runs / m)] for m in RECIPES[args.element]}
    ensemble_dir = args.runs / f"{args.element.lower()}_ensemble"
    ensemble_args = ["--ensemble", *(str(args.runs / m) for m in members), "--out", str(ensemble_dir)]
    ensemble_args += ["--record", str(args.record)] if args.record else []
    if args.dry_run:
        for command in [*members.values(), ensemble_args]:
            print(command_line(command))
        return

    failed = []
    for member, command in members.items():
        if run(command) != 0:
            print(f"member {member} failed; the other members go on", file=sys.stderr)
            failed.append(member)
            continue
        figures = json.loads((args.runs / member / "test_metrics.json").read_text())
        emit_figures(figures, "member", element=args.element, run=member, train_s=figures["train_s"])
    if failed:
        sys.exit(f"not tested as an ensemble: members {', '.join(failed)} failed (their output is above)")
    if run(ensemble_args) != 0:
        sys.exit("the ensemble's test failed (its output is above)")
    figures = json.loads((ensemble_dir / "test_metrics.json").read_text())["ensemble"]
    emit_figures(figures, "ensemble", PUBLISHED[args.element], element=args.element, members=len(members))


if __name__ == "__main__":
    main()
