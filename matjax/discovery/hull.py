"""Thermodynamic stability: energy above the convex hull of formation energies.

Formation energies are per atom and relative to the elements, so each element's terminal
entry sits at zero and pymatgen's PhaseDiagram gives the lower convex hull directly. One
diagram is built per chemical system and reused for every query in it.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element


class Hull:
    """Convex hull of known crystals (formulas, formation energy per atom in eV)."""

    def __init__(self, formulas: Sequence[str], formation_energy_per_atom: Sequence[float]):
        energies = np.asarray(formation_energy_per_atom, dtype=np.float64)
        if len(formulas) != len(energies) or not np.isfinite(energies).all():
            raise ValueError("hull needs one finite formation energy per formula")
        self._entries = [
            PDEntry(c, e * c.num_atoms) for c, e in zip(map(Composition, formulas), energies)
        ]

    @functools.lru_cache(maxsize=None)
    def _diagram(self, chemsys: tuple[str, ...]) -> PhaseDiagram:
        elements = set(chemsys)
        inside = [e for e in self._entries if {el.symbol for el in e.composition.elements} <= elements]
        terminals = [PDEntry(Composition(el), 0.0) for el in chemsys]
        return PhaseDiagram(inside + terminals, elements=[Element(el) for el in chemsys])

    def e_above_hull(self, formulas: Sequence[str], formation_energy_per_atom: Sequence[float]) -> np.ndarray:
        """[Q] E_form - E_hull(composition) in eV/atom; negative below the known hull."""
        out = np.empty(len(formulas))
        for i, (formula, e) in enumerate(zip(formulas, formation_energy_per_atom)):
            comp = Composition(formula)
            chemsys = tuple(sorted(el.symbol for el in comp.elements))
            out[i] = e - self._diagram(chemsys).get_hull_energy_per_atom(comp)
        return out
