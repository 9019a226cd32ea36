"""Structure relaxation with any ASE calculator, and formation energies from its references.

Used for the built-in EMT labels and by the discovery oracles, so an oracle backed by a
real DFT code (any ASE calculator: VASP, Quantum ESPRESSO, GPAW, ...) relaxes and scores
exactly as the EMT one does.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

FMAX = 0.02  # eV/A, on atoms and (via the cell filter) on the stress
MAX_STEPS = 100


@dataclasses.dataclass(frozen=True)
class Relaxed:
    """Outcome of a relaxation; energies in eV per atom."""

    atoms: object  # ase.Atoms, relaxed
    energy_per_atom: float
    formation_energy_per_atom: float
    steps: int
    converged: bool


def relax_atoms(atoms, calculator: Callable[[], object], fmax: float = FMAX, steps: int = MAX_STEPS):
    """(relaxed copy of atoms, steps taken, converged): positions and cell, BFGS."""
    from ase.filters import UnitCellFilter
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = calculator()
    # UnitCellFilter: FrechetCellFilter's matrix logarithms cost 6x more on small cells.
    optimizer = BFGS(UnitCellFilter(atoms), logfile=None)
    converged = bool(optimizer.run(fmax=fmax, steps=steps))
    return atoms, optimizer.nsteps, converged


def relax_and_score(
    atoms,
    calculator: Callable[[], object],
    references: dict[str, float],
    fmax: float = FMAX,
    steps: int = MAX_STEPS,
) -> Relaxed:
    """Relax, then E_form = (E - sum_i mu_i) / N with mu from ``references`` (eV/atom).

    Raises ValueError naming elements without a reference, or a non-finite energy.
    """
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(references))
    if missing:
        raise ValueError(f"no reference energy for element(s) {missing}; known: {sorted(references)}")
    relaxed, n_steps, converged = relax_atoms(atoms, calculator, fmax, steps)
    energy = relaxed.get_potential_energy()
    if not np.isfinite(energy):
        raise ValueError(f"energy of {relaxed.get_chemical_formula()} is not finite")
    n = len(symbols)
    return Relaxed(relaxed, energy / n, (energy - sum(references[s] for s in symbols)) / n, n_steps, converged)
