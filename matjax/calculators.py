"""ASE calculator over a trained matjax force field: relax structures, run ASE's own MD.

    from matjax.calculators import MatjaxCalculator
    atoms.calc = MatjaxCalculator("runs/mlff-default-emt-invariant")
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

Energy, forces and stress come from one jitted function (the energy and its gradients,
``matjax.physics.md.model_potential``) over a neighbour list that is allocated when the
atoms' numbers, cell or periodicity change and otherwise updated under ``jit``; an
overflowing list is re-allocated and the call repeated.
"""

from __future__ import annotations

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from matjax.geometry.neighbors import neighbor_list
from matjax.geometry.periodic import MOLECULE_BOX
from matjax.physics.md import model_potential


class MatjaxCalculator(Calculator):
    """ASE Calculator (energy, forces, stress) of a trained matjax force field.

    run_dir: a run of ``experiments/train_mlff.py`` (its ``which`` checkpoint is loaded),
    or pass ``model``, ``variables`` and ``cutoff`` directly. skin: neighbour-list skin (A).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, run_dir=None, *, model=None, variables=None, cutoff: float | None = None,
                 skin: float = 0.5, which: str = "best", **kwargs):
        super().__init__(**kwargs)
        if run_dir is not None:
            from matjax.train.forcefield import load_force_field

            model, variables, model_cfg = load_force_field(run_dir, which)
            cutoff = model_cfg.cutoff
        if model is None or variables is None or cutoff is None:
            raise ValueError("give a run_dir, or model, variables and cutoff")
        self.model, self.variables, self.cutoff, self.skin = model, variables, cutoff, skin
        self._key = None
        self._nbrs = None

    def _prepare(self, atoms, lattice):
        key = (tuple(atoms.numbers), tuple(atoms.pbc), tuple(np.round(lattice, 10).ravel()))
        if key == self._key:
            return
        self._fns = neighbor_list(self.cutoff, self.skin, pbc=tuple(atoms.pbc))
        self._nbrs = self._fns.allocate(atoms.positions, lattice)
        potential = model_potential(self.model, self.variables, atoms.numbers, stress=all(atoms.pbc))
        self._potential = jax.jit(potential)
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
        energy, forces, stress, nbrs = self._potential(positions, np.asarray(lattice, dtype), self._nbrs)
        if bool(nbrs.overflow):
            self._nbrs = self._fns.allocate(atoms.positions, lattice, previous=nbrs)
            energy, forces, stress, nbrs = self._potential(positions, np.asarray(lattice, dtype), self._nbrs)
        self._nbrs = nbrs
        self.results["energy"] = self.results["free_energy"] = float(energy)
        self.results["forces"] = np.asarray(forces, np.float64)
        if all(atoms.pbc):
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(stress, np.float64))
