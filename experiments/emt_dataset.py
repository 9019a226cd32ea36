"""Build the built-in EMT alloy dataset and its crystal graphs; summarise and plot them.

    python experiments/emt_dataset.py [--config default|test] [--out runs/emt_dataset]

Offline: needs no network, API key or shared data. Writes summary.json and
formation_energy.png (histogram of E_form and of neighbours per atom) to --out.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from matjax.config import GraphConfig
from matjax.data.emt import emt_alloy_dataset
from matjax.data.splits import split_indices

CONFIGS = {"default": {"n": 400, "seed": 0}, "test": {"n": 8, "seed": 0}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="default")
    parser.add_argument("--out", type=Path, default=Path("runs/emt_dataset"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, graph_cfg = CONFIGS[args.config], GraphConfig()
    start = time.perf_counter()
    data = emt_alloy_dataset(cfg["n"], cfg["seed"], graph_cfg.cutoff, graph_cfg.max_neighbors)
    wall = time.perf_counter() - start
    e_form = data.target("formation_energy_per_atom")
    neighbors = data.graphs.n_edge / data.graphs.n_node
    summary = {
        "n_crystals": len(data), "n_skipped": len(data.skipped), "wall_s": round(wall, 2),
        "splits": {k: len(v) for k, v in split_indices(data.ids).items()},
        "formation_energy_per_atom": {"mean": e_form.mean(), "std": e_form.std(), "min": e_form.min(), "max": e_form.max()},
        "fraction_below_zero": float((e_form < 0).mean()),
        "atoms_per_crystal": float(data.graphs.n_node.mean()), "neighbors_per_atom": float(neighbors.mean()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].hist(e_form, bins=40)
    axes[0].set(xlabel="EMT formation energy (eV/atom)", ylabel="crystals", title=f"{len(data)} EMT alloys")
    axes[1].hist(neighbors, bins=40)
    axes[1].set(xlabel=f"neighbours per atom within {graph_cfg.cutoff} A", ylabel="crystals")
    fig.tight_layout()
    fig.savefig(args.out / "formation_energy.png", dpi=120)
    print(json.dumps(summary, indent=2, default=float))
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'formation_energy.png'}")


if __name__ == "__main__":
    main()
