"""Molecular-dynamics speed of the seed-size force field on periodic fcc Cu.

    python benchmarks/md.py [--quick]        # --quick: ~64 and ~500 atoms, < 60 s
    python benchmarks/md.py --sizes 4000 32000 108000 --edge-chunk 1048576   # a GPU

The model is the seed's invariant architecture at the seed's size (128 features, 6
interaction blocks, 50 RBF, 5 A cutoff; random weights: speed does not depend on them).
NVE velocity Verlet, 1 fs, from 300 K. Implementations (field "impl"):

- matjax: matjax's scanned integrator (lax.scan over fori_loop, neighbour list under jit);
- ase_loop: the same matjax model through ``MatjaxCalculator``, stepped one step at a time
  from Python by ASE's VelocityVerlet (the way the seed drives MD);
- torch_seed: a seed-style PyTorch version of the same architecture (a dense layer over
  concat([h_src, rbf]) per edge, autograd forces, ASE neighbour list every step) as an ASE
  calculator under ASE's VelocityVerlet; skipped when torch is not importable;
- emt: ASE's EMT classical potential under ASE's VelocityVerlet.

torch_seed and emt are skipped above 32,000 atoms, where their host-side neighbour lists and
energies take seconds a step. torch_seed runs on CUDA where torch sees a GPU.

Metrics: md_atom_steps_per_s per size and impl (ratio on matjax lines = vs torch_seed),
force_evals_atoms_per_s (matjax energy + forces + stress, jitted), cost_exponent (slope of
log time per step against log atoms, matjax, over the three largest sizes run: small cells on
a GPU measure launch overhead, not cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.md.verlet import VelocityVerlet
from ase.neighborlist import neighbor_list as ase_neighbor_list

from common import emit, median_seconds
from matjax.calculators import MatjaxCalculator
from matjax.config import MLFFConfig
from matjax.geometry.neighbors import neighbor_list
from matjax.models.mlff import create_model
from matjax.physics import md

SEED_MODEL = MLFFConfig(model="invariant", cutoff=5.0, features=128, num_interactions=6, num_rbf=50, avg_neighbors=42.0)
SIZES = {64: (2, 2, 4), 500: (5, 5, 5), 4000: (10, 10, 10), 32000: (20, 20, 20), 108000: (30, 30, 30)}
IMPLS = ("matjax", "ase_loop", "torch_seed", "emt")
# Steps per timed repeat, in IMPLS order; None: not run at that size.
STEPS = {64: (200, 40, 20, 200), 500: (40, 10, 4, 40), 4000: (10, 3, 2, 10), 32000: (20, 2, 1, 2),
         108000: (20, 2, None, None)}
DT_FS, SKIN = 1.0, 0.5


def copper(n_atoms: int):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(SIZES[n_atoms])
    atoms.rattle(0.02, seed=0)
    # matjax's velocities are in ASE's units (A per ASE time unit), so they carry over as is.
    atoms.set_velocities(np.asarray(md.maxwell_boltzmann(jax.random.PRNGKey(0), atoms.get_masses(), 300.0)))
    return atoms


def seed_variables(model, atoms):
    """Random weights; a small energy scale keeps 300 K dynamics gentle."""
    n = len(atoms)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.asarray(atoms.numbers), np.ones((8, 3), np.float32),
                           np.zeros(8, np.int32), np.arange(8, dtype=np.int32) % n)
    variables["constants"]["_Constants_0"]["scale"] = np.float32(0.05)
    return variables


def torch_seed_calculator(cfg: MLFFConfig):
    """The seed's architecture in PyTorch, seed-style (None if torch is absent)."""
    try:
        import torch
    except ImportError:
        return None
    nn, F_ = torch.nn, cfg.features

    class Interaction(nn.Module):
        def __init__(self):
            super().__init__()
            self.message = nn.Linear(F_ + cfg.num_rbf, F_)
            self.update = nn.Sequential(nn.Linear(F_, F_), nn.SiLU(), nn.Linear(F_, F_))

        def forward(self, h, rbf, envelope, senders, receivers):
            m = torch.nn.functional.silu(self.message(torch.cat([h[senders], rbf], dim=-1))) * envelope[:, None]
            return h + self.update(torch.zeros_like(h).index_add_(0, receivers, m))

    class Seed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(119, F_)
            self.blocks = nn.ModuleList([Interaction() for _ in range(cfg.num_interactions)])
            self.readout = nn.Sequential(nn.Linear(F_, F_ // 2), nn.SiLU(), nn.Linear(F_ // 2, 1))
            self.register_buffer("centres", torch.linspace(0, cfg.cutoff, cfg.num_rbf))

        def forward(self, numbers, positions, cell, senders, receivers, shifts):
            vectors = positions[senders] + shifts @ cell - positions[receivers]
            r = vectors.norm(dim=-1)
            x, p = r / cfg.cutoff, cfg.envelope_p
            envelope = (1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)) / cfg.avg_neighbors
            width = cfg.cutoff / (cfg.num_rbf - 1)
            rbf = torch.exp(-(((r[:, None] - self.centres) / width) ** 2))
            h = self.embed(numbers)
            for block in self.blocks:
                h = block(h, rbf, envelope, senders, receivers)
            return 0.05 * self.readout(h).sum()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Seed().to(device)
    tensor = lambda x, **kw: torch.tensor(x, device=device, **kw)

    class TorchSeedCalculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            i, j, shifts = ase_neighbor_list("ijS", self.atoms, cfg.cutoff)
            positions = tensor(self.atoms.positions, dtype=torch.float32, requires_grad=True)
            energy = model(tensor(self.atoms.numbers), positions, tensor(self.atoms.cell.array, dtype=torch.float32),
                           tensor(j), tensor(i), tensor(shifts, dtype=torch.float32))
            (grad,) = torch.autograd.grad(energy, positions)
            self.results = {"energy": float(energy.detach()), "forces": -grad.cpu().numpy().astype(np.float64)}

    return TorchSeedCalculator()


def ase_steps_per_s(atoms, calc, n_steps: int, repeats: int) -> tuple[float, float]:
    """(median, best) MD steps per second of ASE's VelocityVerlet with ``calc``, after a warm-up."""
    atoms = atoms.copy()
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, DT_FS * units.fs)
    dyn.run(1)
    med, best = median_seconds(lambda: dyn.run(n_steps), repeats)
    return n_steps / med, n_steps / best


def run_size(n_atoms: int, repeats: int, model, torch_calc, impls) -> dict:
    atoms = copper(n_atoms)
    n = len(atoms)
    variables = seed_variables(model, atoms)
    fns = neighbor_list(SEED_MODEL.cutoff, SKIN)
    nbrs = fns.allocate(atoms.positions, atoms.cell.array)
    potential = md.model_potential(model, variables, atoms.numbers)
    steps = {impl: n for impl, n in zip(IMPLS, STEPS[n_atoms]) if n is not None and impl in impls}

    # (a) matjax scanned integrator.
    init_fn, step_fn = md.nve(potential, DT_FS)
    state = init_fn(atoms.positions.astype(np.float32), atoms.cell.array.astype(np.float32), atoms.get_masses(),
                    atoms.get_velocities(), nbrs)
    run = lambda: md.simulate(step_fn, state, steps["matjax"], 10, DT_FS, neighbor_fns=fns, progress=False)
    start = time.perf_counter()
    jax.block_until_ready(run()[0].positions)
    first_s = time.perf_counter() - start
    med, best = median_seconds(lambda: jax.block_until_ready(run()[0].positions), repeats)
    compile_s = first_s - med
    rates = {"matjax": (steps["matjax"] / med, steps["matjax"] / best)}

    # Force evaluations alone (energy + forces + stress), the calculator's jitted function.
    evaluate = jax.jit(potential)
    args = (state.positions, state.lattice, state.nbrs)
    jax.block_until_ready(evaluate(*args)[1])
    f_med, f_best = median_seconds(lambda: jax.block_until_ready(evaluate(*args)[1]), repeats)

    calculators = {  # (b) the same model, one step at a time from Python; (c); (d)
        "ase_loop": lambda: MatjaxCalculator(members=[(model, variables)], cutoff=SEED_MODEL.cutoff, skin=SKIN),
        "torch_seed": lambda: torch_calc, "emt": EMT,
    }
    for impl, make in calculators.items():
        if impl in steps and (calc := make()) is not None:
            rates[impl] = ase_steps_per_s(atoms, calc, steps[impl], repeats)

    torch_rate = rates.get("torch_seed", (None,))[0]
    setting = {"edge_chunk": model.cfg.edge_chunk, "matmul_precision": jax.config.jax_default_matmul_precision or "default"}
    for impl, (rate, best_rate) in rates.items():
        extra = {"impl": impl, "n_atoms": n, "best": best_rate * n, "steps": steps[impl]}
        if impl == "matjax":
            extra |= {"compile_s": round(compile_s, 2), **setting}
            if "ase_loop" in rates:
                extra["vs_ase_loop"] = rate / rates["ase_loop"][0]
        emit("md", "md_atom_steps_per_s", rate * n, "atom-steps/s",
             baseline=torch_rate * n if impl == "matjax" and torch_rate else None, **extra)
    emit("md", "force_evals_atoms_per_s", n / f_med, "atoms/s", impl="matjax", n_atoms=n, best=n / f_best, **setting)
    return {"n_atoms": n, "seconds_per_step": 1.0 / rates["matjax"][0], "rates": {k: v[0] * n for k, v in rates.items()}}


def table(results) -> str:
    """Atom-steps/s per implementation and size, for people."""
    baselines = ("torch_seed", "ase_loop")
    lines = ["atoms  " + "".join(f"{name:>12s}" for name in IMPLS) + "".join(f"{'matjax/' + b:>18s}" for b in baselines)]
    for r in results:
        rates = r["rates"]
        cells = "".join(f"{rates[k]:12,.0f}" if k in rates else f"{'-':>12s}" for k in IMPLS)
        ratios = "".join(f"{rates['matjax'] / rates[b]:17.2f}x" if b in rates else f"{'-':>18s}" for b in baselines)
        lines.append(f"{r['n_atoms']:5d}  {cells}{ratios}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~64 and ~500 atoms only (< 60 s)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", choices=sorted(SIZES), help="atoms per cell (default 64 500 4000)")
    parser.add_argument("--impls", nargs="*", choices=IMPLS[1:], default=IMPLS[1:], help="baselines to run beside matjax")
    parser.add_argument("--edge-chunk", type=int, default=SEED_MODEL.edge_chunk,
                        help="edges per step of the model's message scan (a speed setting; larger suits a GPU)")
    args = parser.parse_args()
    sizes = sorted(args.sizes or ([64, 500] if args.quick else [64, 500, 4000]))
    repeats = args.repeats or (2 if args.quick else 3)
    model = create_model(dataclasses.replace(SEED_MODEL, edge_chunk=args.edge_chunk))
    torch_calc = torch_seed_calculator(SEED_MODEL) if "torch_seed" in args.impls else None
    results = [run_size(n, repeats, model, torch_calc, {"matjax", *args.impls}) for n in sizes]
    fitted = results[-3:]
    if len(fitted) >= 2:
        exponent = np.polyfit(np.log([r["n_atoms"] for r in fitted]), np.log([r["seconds_per_step"] for r in fitted]), 1)[0]
        emit("md", "cost_exponent", exponent, "d log(time per step) / d log(atoms)", impl="matjax",
             sizes=[r["n_atoms"] for r in fitted])
    print(table(results), file=sys.stderr)


if __name__ == "__main__":
    main()
