"""End-to-end materials discovery: data -> graphs -> CGCNN ensemble -> candidates -> screening
-> hull -> oracle -> active learning -> report.

    python experiments/discover.py [--config default|test] [--out runs/discover]
    python experiments/discover.py --source csv --config dft --csv KNOWN.csv ... --pool HIDDEN.csv ...
    python experiments/discover.py --source mp --mp-elements Li O   (needs MP_API_KEY)

emt (default, offline): substitution candidates into the built-in EMT alloys, validated
by EMT relaxations, for several active-learning rounds; writes report.md, summary.json,
discoveries.csv and plots. csv / mp: simulated discovery; the hidden rows (--pool, or the
hashed test split of the data) are ranked by the ensemble and their held-out DFT labels
reveal the discovery acceleration factor (summary.json). A killed run started again with
the same arguments resumes where it stopped.
"""

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from matjax.config import CGCNNConfig, DiscoveryConfig, GraphConfig, TrainConfig
from matjax.data.emt import ELEMENTS, emt_alloy_rows
from matjax.data.sources import dataset_from_frame, read_cdvae_csv
from matjax.data.splits import split_indices
from matjax.discovery import active
from matjax.discovery.oracles import emt_oracle
from matjax.discovery.report import write_report
from matjax.discovery.simulated import simulated_discovery, stable_labels
from matjax.discovery.surrogate import TARGET, CGCNNSurrogate

CONFIGS = {
    "default": dict(
        emt_n=400,
        model=CGCNNConfig(GraphConfig(6.0, 12, 31), atom_features=64, n_conv=3, hidden_features=64,
                          use_descriptors=True),
        train=TrainConfig(batch_size=32, learning_rate=2e-3, max_epochs=60, early_stopping=30, plateau_patience=10,
                          ensemble_size=5),
        warm_start_epochs=20,
        discovery=DiscoveryConfig(rounds=3, n_select=24, n_random=128, allowed_elements=ELEMENTS),
    ),
    "test": dict(
        emt_n=30,
        model=CGCNNConfig(GraphConfig(6.0, 12, 21), atom_features=16, n_conv=2, hidden_features=16,
                          use_descriptors=True),
        train=TrainConfig(batch_size=16, learning_rate=3e-3, max_epochs=8, early_stopping=8, ensemble_size=2),
        warm_start_epochs=4,
        discovery=DiscoveryConfig(rounds=2, n_select=4, n_random=4, parent_max_e_above_hull=0.05,
                                  allowed_elements=ELEMENTS),
    ),
    "dft": dict(  # held-out DFT data (--source csv / mp); training stops after 30 minutes
        model=CGCNNConfig(targets=(TARGET,)),
        train=TrainConfig(batch_size=64, learning_rate=1e-3, max_epochs=150, early_stopping=40, plateau_patience=15,
                          warmup_epochs=2, ensemble_size=3, checkpoint_every=2000, time_budget_s=1800),
        discovery=DiscoveryConfig(n_select=500, max_per_formula=1),
    ),
}


def loader(model: CGCNNConfig):
    graph = dict(cutoff=model.graph.cutoff, max_neighbors=model.graph.max_neighbors)
    return lambda rows: dataset_from_frame(rows, [TARGET], **graph)


def run_emt(cfg: dict, args) -> dict:
    surrogate = CGCNNSurrogate(cfg["model"], dataclasses.replace(cfg["train"], seed=args.seed), cfg["warm_start_epochs"])
    discovery = dataclasses.replace(cfg["discovery"], seed=args.seed, **({"rounds": args.rounds} if args.rounds else {}))
    start = time.perf_counter()
    initial = emt_alloy_rows(cfg["emt_n"], args.seed)
    summaries = active.run(initial, loader(cfg["model"]), surrogate, emt_oracle(), discovery, args.out)
    return write_report(summaries, args.out, time.perf_counter() - start, "EMT relaxation",
                        "matjax discovery campaign: EMT alloys (Al, Cu, Ag, Au, Ni, Pd, Pt)")


def run_held_out(cfg: dict, args) -> dict:
    if args.source == "csv":
        rows = read_cdvae_csv(args.csv)
        pool_rows = read_cdvae_csv(args.pool) if args.pool else None
    else:
        from matjax.data.materials_project import query_materials_project

        rows, pool_rows = query_materials_project(elements=args.mp_elements), None
    if pool_rows is None:  # hide the hashed test split
        hidden = np.isin(np.arange(len(rows)), split_indices(rows.material_id)["test"])
        rows, pool_rows = rows[~hidden], rows[hidden]
    pool_rows = pool_rows[~pool_rows.material_id.isin(rows.material_id)].reset_index(drop=True)
    load = loader(cfg["model"])
    known, pool = load(rows), load(pool_rows)
    stable, rule = stable_labels(pool_rows.set_index("material_id").loc[pool.ids].reset_index())
    surrogate = CGCNNSurrogate(cfg["model"], dataclasses.replace(cfg["train"], seed=args.seed))
    start = time.perf_counter()
    discovery = cfg["discovery"]
    result = simulated_discovery(known, pool, stable, surrogate, args.out / "model", discovery.n_select,
                                 discovery.noise_floor, discovery.max_per_formula, args.seed)
    result.update(stable_rule=rule, dataset=args.dataset or args.source, wall_s=round(time.perf_counter() - start, 1))
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="default")
    parser.add_argument("--out", type=Path, default=Path("runs/discover"))
    parser.add_argument("--source", choices=("emt", "csv", "mp"), default="emt")
    parser.add_argument("--csv", nargs="+", help="known CDVAE-format CSV file(s), for --source csv")
    parser.add_argument("--pool", nargs="+", help="hidden CSV file(s) to discover in (default: hashed test split)")
    parser.add_argument("--mp-elements", nargs="+", help="chemical space for --source mp, e.g. Li O")
    parser.add_argument("--dataset", help="name recorded in summary.json")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = (run_emt if args.source == "emt" else run_held_out)(CONFIGS[args.config], args)
    print(json.dumps(summary, indent=2, default=str))
    print(f"wrote {args.out}/summary.json" + (f" and {args.out}/report.md" if args.source == "emt" else ""))


if __name__ == "__main__":
    main()
