"""Train a force field on energies and forces (and stresses) and evaluate it on the test set.

    python experiments/train_mlff.py                      # offline EMT Cu-Au default
    python experiments/train_mlff.py --config test        # seconds, CPU
    python experiments/train_mlff.py --config mlearn --dataset mlearn-Si --record benchmarks/results/mlff_mlearn.json
    python experiments/train_mlff.py --config aspirin --record benchmarks/results/mlff_aspirin.json
    python experiments/train_mlff.py --config mlearn --dataset mlearn-Mo --model linear   # least squares, minutes

    python experiments/train_mlff.py --ensemble runs/a runs/b runs/c --out runs/abc --record ...

Writes <run>/config.json, checkpoints (best + latest; rerunning resumes), history.jsonl,
test_metrics.json, test_energies.csv (each test structure's signed energy error) and parity.png.
--record merges the test figures into a results JSON. --ensemble trains nothing: it tests the
mean energy of trained runs of one dataset (members may differ in --seed, --interactions and
--cutoff) and writes <out>/test_metrics.json (members and ensemble), test_energies.csv (with
each member's error beside the ensemble's) and parity.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

from matjax.config import MLFFConfig, MLFFTrainConfig
from matjax.data.batching import budget_for
from matjax.data.forcefield import load_forcefield, structure_groups
from matjax.models.mlff import MAX_L_CHOICES, MODELS
from matjax.train.forcefield import (
    ensemble_configs, ensemble_metrics, errors_by_group, evaluate, load_force_field, make_eval_step, plot_parity,
    scalar_metrics, train,
)
from matjax.train.linear import fit_linear

CONFIGS = {
    "default": (MLFFConfig(model="invariant", features=64, num_interactions=3), MLFFTrainConfig(dataset="emt", epochs=60)),
    "test": (
        MLFFConfig(model="invariant", features=16, num_interactions=1, num_rbf=8),
        MLFFTrainConfig(dataset="emt", n_frames=30, epochs=2, batch_size=4),
    ),
    "mlearn": (
        MLFFConfig(model="moment", features=128, num_interactions=3, num_rbf=20),
        MLFFTrainConfig(dataset="mlearn-Si", batch_size=2, epochs=400, learning_rate=3e-3, energy_weight=30.0,
                        force_weight=1.0, ema_decay=0.995, warmup_epochs=5, eval_every=10),
    ),
    "aspirin": (
        MLFFConfig(model="tensor", features=128, num_interactions=3, num_rbf=20),
        MLFFTrainConfig(dataset="aspirin", batch_size=5, epochs=200, learning_rate=3e-3, energy_weight=1.0,
                        force_weight=100.0, ema_decay=0.999, warmup_epochs=5, eval_every=10),
    ),
}


def tests_stress(cfg: MLFFTrainConfig) -> bool:
    """Whether the test reports a stress error: mlearn has stress labels, trained on or not."""
    return cfg.stress_weight > 0 or cfg.dataset.startswith("mlearn")


def group_figures(cfg: MLFFTrainConfig, metrics: dict, data, groups) -> dict:
    """{"by_group": errors per structure group} for mlearn test sets, else {}; groups: [M]
    ``structure_groups`` of ``data``."""
    if not cfg.dataset.startswith("mlearn-"):
        return {}
    return {"by_group": errors_by_group(metrics, groups, data.n_atoms)}


def write_test_energies(path: Path, data, groups, metrics: dict, members: dict[str, dict] | None = None) -> None:
    """CSV, one row per test structure: id, mlearn group (groups: [M] ``structure_groups`` of
    ``data``), atoms, DFT and model energy (eV/atom) and the signed error (meV/atom); for an
    ensemble, each member's signed error too (column named by its run).

    A mean error can hide one structure that carries most of it (an unseen surface facet) or a
    bias every member shares; the signed rows show both.
    """
    def error(m):
        return 1e3 * (m["energy_pred"] - m["energy_true"])

    columns = {"id": data.ids, "group": groups, "n_atoms": data.n_atoms,
               "energy_dft_eV_per_atom": metrics["energy_true"], "energy_model_eV_per_atom": metrics["energy_pred"],
               "error_meV_per_atom": error(metrics)}
    columns |= {f"error_meV_per_atom_{name}": error(m) for name, m in (members or {}).items()}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))


# Model settings reported for a run (a list of them for an ensemble): report key -> MLFFConfig field.
MODEL_KEYS = {"interactions": "num_interactions", "cutoff": "cutoff", "features": "features", "envelope_p": "envelope_p",
              "max_l": "max_l", "sqrt_embedding": "sqrt_embedding", "num_rbf": "num_rbf",
              "min_distance": "min_distance", "product_rbf": "product_rbf"}
# wall_time_s: this invocation; train_s: training time summed over the resumed sessions of the run.
RUN_KEYS = (*MODEL_KEYS, "epochs_run", "epochs_planned", "best_epoch", "wall_time_s", "train_s")


def model_settings(model_cfg: MLFFConfig) -> dict:
    """{report key: value} for MODEL_KEYS."""
    return {key: getattr(model_cfg, field) for key, field in MODEL_KEYS.items()}


def record(path: Path, cfg: MLFFTrainConfig, model: str, figures: dict, run_keys=RUN_KEYS) -> None:
    """Merge the test figures into a results JSON (mlearn: one entry per element)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    # holdout False: trained on the validation structures too (the last evaluation kept)
    run = {k: figures[k] for k in run_keys} | {"model": model, "holdout": cfg.holdout}
    if cfg.dataset.startswith("mlearn-"):
        results[cfg.dataset.split("-", 1)[1]] = {
            k: figures[k] for k in ("energy_mae_meV_per_atom", "force_mae_eV_per_A", "stress_mae_GPa")
        } | run
    else:
        results.update(force_mae_meV_per_A=1e3 * figures["force_mae_eV_per_A"], energy_mae_meV=figures["energy_mae_meV"],
                       dataset=cfg.dataset, **run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def with_overrides(config, overrides: dict):
    """``config`` with the fields that the command line set (not None) replaced."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--dataset", help="emt, mlearn-<Si|Ge|Li|Mo>, aspirin, 3bpa or water")
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--interactions", type=int, help="interaction blocks (message-passing depth) of the model")
    parser.add_argument("--cutoff", type=float, help="neighbour radius (Angstrom) of the model")
    parser.add_argument("--features", type=int, help="feature channels per atom (width) of the model")
    parser.add_argument("--envelope-p", type=int,
                        help="order of the cutoff envelope polynomial: higher keeps more weight on pairs near the cutoff")
    parser.add_argument("--max-l", type=int, choices=MAX_L_CHOICES,
                        help="moment model: highest angular order of its neighbourhood moments (4 sees cubic bond angles)")
    parser.add_argument("--sqrt-embedding", type=int, metavar="K",
                        help="channels of the moment model's Finnis-Sinclair -a sqrt(density) term (0 = none)")
    parser.add_argument("--num-rbf", type=int, help="radial basis functions of the model")
    parser.add_argument("--min-distance", type=float,
                        help="linear model: where its Chebyshev radial basis starts (Angstrom; the cutoff ends it)")
    parser.add_argument("--product-rbf", type=int,
                        help="linear model: radial functions entering its 4- and 5-body products")
    parser.add_argument("--ridge", type=float, help="linear model: relative ridge penalty of its least-squares fit")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--time-budget", type=float, help="seconds of training after which the run stops")
    parser.add_argument("--learning-rate", type=float, help="peak learning rate of the warm-up + cosine schedule")
    parser.add_argument("--energy-weight", type=float, help="weight of the per-atom energy MSE (eV) in the loss")
    parser.add_argument("--force-weight", type=float, help="weight of the force MSE (eV/A) in the loss")
    parser.add_argument("--force-huber-delta", type=float,
                        help="Huber force loss: squared error inside this |error| (eV/A), linear beyond (0: MSE)")
    parser.add_argument("--stress-weight", type=float, help="weight of the stress MSE (eV/A^3) in the loss")
    parser.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay")
    parser.add_argument("--ema-decay", type=float, help="decay of the parameter average that is evaluated")
    parser.add_argument("--final-stage-epochs", type=int, help="last epochs trained with --final-energy-weight")
    parser.add_argument("--final-energy-weight", type=float, help="energy weight of the final stage")
    parser.add_argument("--group-energy-weights", metavar="GROUP=W,...",
                        help="multiply the energy loss of these mlearn structure groups, e.g. Surface=10,Vacancy=3")
    parser.add_argument("--isolated-atoms", metavar="SYMBOL=EV,...",
                        help="DFT energies of free atoms, trained on as one-atom structures without neighbours")
    parser.add_argument("--no-holdout", action="store_true",
                        help="train on the validation structures too; the last evaluated model is kept")
    parser.add_argument("--seed", type=int, help="initialisation and shuffling seed (ensemble members differ in it)")
    parser.add_argument("--out", type=Path, help="run folder; default runs/mlff-<config>-<dataset>-<model>")
    parser.add_argument("--record", type=Path, help="merge the test figures into this results JSON")
    parser.add_argument("--ensemble", type=Path, nargs="+", metavar="RUN", help="test the ensemble of these trained runs")
    return parser


def configs(args: argparse.Namespace) -> tuple[MLFFConfig, MLFFTrainConfig]:
    """The model and training configs a command line asks for: its --config with the flags it set."""
    model_cfg, cfg = CONFIGS[args.config]
    overrides = {"dataset": args.dataset, "epochs": args.epochs, "time_budget_s": args.time_budget,
                 "learning_rate": args.learning_rate, "energy_weight": args.energy_weight, "force_weight": args.force_weight,
                 "force_huber_delta": args.force_huber_delta,
                 "stress_weight": args.stress_weight, "weight_decay": args.weight_decay, "ema_decay": args.ema_decay,
                 "final_stage_epochs": args.final_stage_epochs, "final_energy_weight": args.final_energy_weight,
                 "group_energy_weights": args.group_energy_weights,
                 "isolated_atom_energies": args.isolated_atoms, "seed": args.seed, "ridge": args.ridge,
                 "holdout": False if args.no_holdout else None}
    cfg = with_overrides(cfg, overrides)
    model_cfg = with_overrides(model_cfg, {"model": args.model, "num_interactions": args.interactions, "cutoff": args.cutoff,
                                            "features": args.features, "envelope_p": args.envelope_p,
                                            "max_l": args.max_l, "sqrt_embedding": args.sqrt_embedding,
                                            "num_rbf": args.num_rbf, "min_distance": args.min_distance,
                                            "product_rbf": args.product_rbf})
    return model_cfg, cfg


def main() -> None:
    args = build_parser().parse_args()
    if args.ensemble:
        evaluate_ensemble(args.ensemble, args.out or Path("runs") / "mlff-ensemble", args.record)
        return
    model_cfg, cfg = configs(args)
    run_dir = args.out or Path("runs") / f"mlff-{args.config}-{cfg.dataset}-{model_cfg.model}"

    start = time.perf_counter()
    splits = load_forcefield(cfg.dataset, model_cfg.cutoff, n_frames=cfg.n_frames, holdout=cfg.holdout)
    print({k: len(v) for k, v in splits.items()}, "structures")
    fit = fit_linear if model_cfg.model == "linear" else train  # least squares, or epochs of Adam
    model, best, history = fit(model_cfg, cfg, splits, run_dir)
    budget = budget_for(splits["train"].graphs, cfg.batch_size)
    test = evaluate(make_eval_step(model.cfg, tests_stress(cfg)),
                    best.variables(), splits["test"], budget)
    groups = structure_groups(splits["test"].ids)
    figures = scalar_metrics(test) | {
        "wall_time_s": round(time.perf_counter() - start, 1), "train_s": history[-1]["train_s"] if history else 0.0,
        "epochs_planned": cfg.epochs, **model_settings(model_cfg),
        "epochs_run": history[-1]["epoch"] if history else 0, "best_epoch": int(best.epoch),
    } | group_figures(cfg, test, splits["test"], groups)
    (run_dir / "test_metrics.json").write_text(json.dumps(figures, indent=2) + "\n")
    write_test_energies(run_dir / "test_energies.csv", splits["test"], groups, test)
    plot_parity(test, run_dir / "parity.png", f"{cfg.dataset} test, {model_cfg.model}")
    print(json.dumps(figures))
    if args.record:
        record(args.record, cfg, model_cfg.model, figures)


def evaluate_ensemble(runs: list[Path], out: Path, record_path: Path | None) -> None:
    """Test each run's best checkpoint and the ensemble of their mean energy on their dataset."""
    member_configs = ensemble_configs(runs)
    cfg, models = member_configs[0][1], {m.model for m, _ in member_configs}
    cutoffs = [m.cutoff for m, _ in member_configs]
    start = time.perf_counter()
    # Each model's envelope is zero beyond its own cutoff: graphs built at the largest serve every member.
    splits = load_forcefield(cfg.dataset, max(cutoffs), n_frames=cfg.n_frames)
    budget = budget_for(splits["train"].graphs, cfg.batch_size)
    members = []
    for run in runs:
        _, variables, member_cfg = load_force_field(run)
        members.append(evaluate(make_eval_step(member_cfg, tests_stress(cfg)), variables, splits["test"], budget))
        print(run, json.dumps(scalar_metrics(members[-1])))
    ensemble = ensemble_metrics(members, splits["test"])
    groups = structure_groups(splits["test"].ids)
    settings = [model_settings(m) for m, _ in member_configs]
    figures = scalar_metrics(ensemble) | group_figures(cfg, ensemble, splits["test"], groups) | {
        "members": [str(r) for r in runs], **{k: [s[k] for s in settings] for k in MODEL_KEYS},
        # each member's training settings too (free-atom anchors, loss stages, seed): a recipe must rebuild all of it
        "training": [dataclasses.asdict(c) for _, c in member_configs],
        "wall_time_s": round(time.perf_counter() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_metrics.json").write_text(json.dumps(
        {"ensemble": figures, "members": {str(r): scalar_metrics(m) for r, m in zip(runs, members)}}, indent=2) + "\n")
    write_test_energies(out / "test_energies.csv", splits["test"], groups, ensemble,
                        {str(r): m for r, m in zip(runs, members)})
    name = f"{'+'.join(sorted(models))} ensemble of {len(runs)}"
    plot_parity(ensemble, out / "parity.png", f"{cfg.dataset} test, {name}")
    print(json.dumps(figures))
    if record_path:
        record(record_path, cfg, name, figures, run_keys=("members", *MODEL_KEYS, "training", "wall_time_s"))


if __name__ == "__main__":
    main()
