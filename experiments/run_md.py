"""Molecular dynamics with a trained force field: NVE energy drift, or NVT sampling.

    python experiments/run_md.py                     # NVE, Cu-Au alloy, the default EMT-trained model
    python experiments/run_md.py --config test       # seconds, CPU
    python experiments/run_md.py --ensemble langevin --temperature 600
    python experiments/run_md.py --config si_nve --model-dir runs/mlff-mlearn-mlearn-Si-painn --record benchmarks/results/mlff_nve.json
    python experiments/run_md.py --config mo_nve --model-dir runs/mo-a runs/mo-b    # an ensemble of runs

Trains the default model first if ``--model-dir`` holds none. Writes <out>/trajectory.extxyz
(readable by ASE), observables.csv, md.png and summary.json (energy drift per atom and
picosecond from a least-squares line through the conserved energy). Several runs of one
dataset make an ensemble: MD on their mean energy, and per recorded frame the largest
atomic force deviation between the members (``max_force_std``, eV/A), which flags the
frames the members disagree on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from ase.build import bulk

from matjax.config import MDConfig
from matjax.geometry.neighbors import neighbor_list
from matjax.physics import md
from matjax.train.forcefield import load_ensemble

CONFIGS = {
    "default": MDConfig(ensemble="nve", system="cu_au", repeat=3, temperature_K=600.0, dt_fs=2.0, steps=10000, record_every=20),
    "test": MDConfig(ensemble="nve", system="cu_au", repeat=2, temperature_K=300.0, dt_fs=2.0, steps=100, record_every=10),
    # NVE of 64-atom diamond Si with the mlearn-Si model: 10 ps at 1 fs from 600 K.
    "si_nve": MDConfig(ensemble="nve", system="si", repeat=2, temperature_K=600.0, dt_fs=1.0, steps=10000, record_every=20),
    # NVE of 54-atom bcc Mo with an mlearn-Mo model or ensemble: 10 ps at 1 fs from 600 K.
    "mo_nve": MDConfig(ensemble="nve", system="mo", repeat=3, temperature_K=600.0, dt_fs=1.0, steps=10000, record_every=20),
}
DEFAULT_RUN = Path("runs/mlff-default-emt-invariant")


def build_system(cfg: MDConfig):
    """ASE Atoms of the named system (periodic crystals, repeated ``cfg.repeat`` times)."""
    if cfg.system == "cu_au":  # the EMT training set's alloy
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(cfg.repeat)
        atoms.numbers[np.random.default_rng(cfg.seed).random(len(atoms)) < 0.25] = 79
    elif cfg.system == "si":
        atoms = bulk("Si", "diamond", a=5.47, cubic=True).repeat(cfg.repeat)
    elif cfg.system == "mo":
        atoms = bulk("Mo", "bcc", a=3.16, cubic=True).repeat(cfg.repeat)
    else:
        raise ValueError(f"unknown system {cfg.system!r}; choose cu_au, si or mo")
    return atoms


def integrator(cfg: MDConfig, potential):
    """(init_fn, step_fn, conserved or None) for ``cfg.ensemble``."""
    if cfg.ensemble == "nve":
        return (*md.nve(potential, cfg.dt_fs), None)
    if cfg.ensemble == "langevin":
        return (*md.langevin(potential, cfg.dt_fs, cfg.temperature_K, cfg.friction_per_fs), None)
    if cfg.ensemble == "nhc":
        return md.nose_hoover_chain(potential, cfg.dt_fs, cfg.temperature_K, cfg.tau_fs)
    raise ValueError(f"unknown ensemble {cfg.ensemble!r}; choose nve, langevin or nhc")


def plot(traj: md.Trajectory, n_atoms: int, path: Path, max_force_std: np.ndarray | None = None) -> None:
    """Energies and temperature against time; an ensemble's member force deviation below them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if max_force_std is None else 3
    fig, axes = plt.subplots(rows, 1, figsize=(7, 3 * rows), sharex=True)
    t = traj.time_fs / 1000
    for y, label in [(traj.conserved, "conserved"), (traj.potential, "potential"), (traj.kinetic + traj.potential, "kinetic + potential")]:
        axes[0].plot(t, 1000 * (y - y[0]) / n_atoms, label=label)
    axes[0].set(ylabel="energy change (meV/atom)")
    axes[0].legend()
    axes[1].plot(t, traj.temperature)
    axes[1].set(ylabel="temperature (K)")
    if max_force_std is not None:
        axes[2].plot(t, max_force_std)
        axes[2].set(ylabel="largest member force\ndeviation (eV/A)")
    axes[-1].set(xlabel="time (ps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--model-dir", type=Path, nargs="+", default=[DEFAULT_RUN],
                        help="a train_mlff.py run folder, or several of one dataset (an ensemble)")
    parser.add_argument("--system", help="cu_au, si or mo")
    parser.add_argument("--ensemble", choices=["nve", "langevin", "nhc"])
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--max-force-std", type=float,
                        help="an ensemble: stop when the members' force spread on an atom passes this (eV/A)")
    parser.add_argument("--out", type=Path, default=Path("runs/md"))
    parser.add_argument("--record", type=Path, help="write the NVE drift into this results JSON")
    args = parser.parse_args()
    overrides = {"system": args.system, "ensemble": args.ensemble, "temperature_K": args.temperature, "steps": args.steps,
                 "max_force_std": args.max_force_std}
    cfg = dataclasses.replace(CONFIGS[args.config], **{k: v for k, v in overrides.items() if v is not None})
    if len(args.model_dir) == 1 and not (args.model_dir[0] / "checkpoints").exists():
        train = [sys.executable, str(Path(__file__).with_name("train_mlff.py")), "--out", str(args.model_dir[0])]
        subprocess.run(train + (["--config", "test"] if args.config == "test" else []), check=True)

    members, model_cfgs = load_ensemble(args.model_dir)
    atoms = build_system(cfg)
    cutoff = max(c.cutoff for c in model_cfgs)
    fns = neighbor_list(cutoff, cfg.skin)
    nbrs = fns.allocate(atoms.positions, atoms.cell.array)
    init_fn, step_fn, conserved = integrator(cfg, md.ensemble_potential(members, atoms.numbers))
    masses = atoms.get_masses()
    velocities = md.maxwell_boltzmann(jax.random.PRNGKey(cfg.seed), masses, cfg.temperature_K)
    state = init_fn(atoms.positions, atoms.cell.array, masses, velocities, nbrs, key=jax.random.PRNGKey(cfg.seed + 1))
    start = time.perf_counter()
    state, traj = md.simulate(step_fn, state, cfg.steps, cfg.record_every, cfg.dt_fs, neighbor_fns=fns, conserved=conserved,
                              max_force_std=cfg.max_force_std)
    wall = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    traj.write_extxyz(args.out / "trajectory.extxyz", atoms.numbers, atoms.cell.array)
    columns = ["time_fs", "kinetic", "potential", "conserved", "temperature", "pressure_GPa", "max_force"]
    observables = {c: getattr(traj, c) for c in columns}
    if len(members) > 1:
        observables["max_force_std"] = traj.max_force_std
    np.savetxt(args.out / "observables.csv", np.stack(list(observables.values()), 1), delimiter=",",
               header=",".join(observables), comments="")
    if len(traj.time_fs):  # a run stopped at its first record has nothing to plot
        plot(traj, len(atoms), args.out / "md.png", observables.get("max_force_std"))
    summary = {
        "drift_meV_per_atom_per_ps": traj.drift_meV_per_atom_per_ps(), "system": f"{cfg.system} ({len(atoms)} atoms)",
        "steps": int(len(traj.time_fs) * cfg.record_every), "dt_fs": cfg.dt_fs, "ensemble": cfg.ensemble,
        "temperature_K": cfg.temperature_K, "mean_temperature_K": float(np.mean(traj.temperature)),
        "model": ", ".join(f"{c.model} ({run})" for c, run in zip(model_cfgs, args.model_dir)), "wall_time_s": round(wall, 1),
        "atom_steps_per_s": len(atoms) * len(traj.time_fs) * cfg.record_every / wall,
        "neighbor_reallocations": traj.reallocations, "stopped": traj.stopped,
    }
    if "max_force_std" in observables and len(traj.time_fs):
        summary["max_force_std_eV_per_A"] = float(observables["max_force_std"].max())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
