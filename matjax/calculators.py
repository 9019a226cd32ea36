"""ASE calculator over a trained matjax force field or ensemble: relax structures, run ASE's own MD.

    from matjax.calculators import MatjaxCalculator
    atoms.calc = MatjaxCalculator("runs/mlff-default-emt-invariant")
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc = MatjaxCalculator(["runs/mo-a", "runs/mo-b"])   # an ensemble; its spread:
    atoms.get_forces(); atoms.calc.results["forces_std"]

Energy, forces and stress come from one jitted function (each member's energy and its
gradients, ``matjax.physics.md.members_potentials``) over a neighbour list that is
allocated when the atoms' numbers, cell or periodicity change and otherwise updated under
``jit``; an overflowing list is re-allocated and the call repeated.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from matjax.geometry.neighbors import neighbor_list
from matjax.geometry.periodic import MOLECULE_BOX
from matjax.physics.md import force_deviation, members_potentials


class MatjaxCalculator(Calculator):
    """ASE Calculator (energy, forces, stress) of a trained matjax force field or ensemble.

    run_dir: a run of ``experiments/train_mlff.py`` (its ``which`` checkpoint is loaded), or a
    list of runs on one dataset: an ensemble, whose energy is the members' mean and whose
    forces and stress are that mean's derivatives. An ensemble's results also hold
    ``energy_std`` (eV, the members' standard deviation) and ``forces_std`` [N] (eV/A, each
    atom's RMS deviation of the members' forces from their mean, ``force_deviation``).
    Or pass ``members`` [(flax module, variables)] and ``cutoff`` (A, the largest member
    cutoff) directly. skin: neighbour-list skin (A).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, run_dir=None, *, members=None, cutoff: float | None = None,
                 skin: float = 0.5, which: str = "best", **kwargs):
        super().__init__(**kwargs)
        if run_dir is not None:
            from matjax.train.forcefield import load_ensemble

            runs = [run_dir] if isinstance(run_dir, (str, os.PathLike)) else list(run_dir)
            self.members, configs = load_ensemble(runs, which)
            cutoff = max(member_cfg.cutoff for member_cfg in configs)
        elif not members or cutoff is None:
            raise ValueError("give a run_dir (or a list of them), or members [(model, variables)] and cutoff")
        else:
            self.members = list(members)
        self.cutoff, self.skin = cutoff, skin
        self._key = None
        self._nbrs = None

    def _prepare(self, atoms, lattice):
        key = (tuple(atoms.numbers), tuple(atoms.pbc), tuple(np.round(lattice, 10).ravel()))
        if key == self._key:
            return
        self._fns = neighbor_list(self.cutoff, self.skin, pbc=tuple(atoms.pbc))
        self._nbrs = self._fns.allocate(atoms.positions, lattice)
        self._potential = jax.jit(members_potentials(self.members, atoms.numbers, stress=all(atoms.pbc)))
        self._key = key

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        lattice = atoms.cell.array if all(atoms.pbc) else np.eye(3) * MOLECULE_BOX
        if any(atoms.pbc) and not all(atoms.pbc):
            raise ValueError("MatjaxCalculator supports fully periodic cells or molecules (pbc all False)")
        self._prepare(atoms, lattice)
        dtype = self._nbrs.reference_positions.dtype
        positions = np.asarray(atoms.positions, dtype)
        energies, forces, stress, nbrs = self._potential(positions, np.asarray(lattice, dtype), self._nbrs)
        if bool(nbrs.overflow):
            self._nbrs = self._fns.allocate(atoms.positions, lattice, previous=nbrs)
            energies, forces, stress, nbrs = self._potential(positions, np.asarray(lattice, dtype), self._nbrs)
        self._nbrs = nbrs
        energies, forces, stress = (np.asarray(x, np.float64) for x in (energies, forces, stress))
        self.results["energy"] = self.results["free_energy"] = float(energies.mean())
        self.results["forces"] = forces.mean(0)
        if all(atoms.pbc):
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress.mean(0))
        if len(self.members) > 1:
            self.results["energy_std"] = float(energies.std())
            self.results["forces_std"] = force_deviation(forces)
