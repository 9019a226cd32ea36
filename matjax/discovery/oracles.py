"""Validation oracles behind one interface: ``oracle.evaluate(ids, structures)``.

- ``emt_oracle()``: relaxes each candidate with ASE's EMT and returns its formation energy
  (the built-in set's own physics, so discoveries are real calculations).
- ``LabelOracle``: reveals held-out DFT labels by id (simulated discovery on CSV data).
- ``CalculatorOracle``: the hook for a real DFT code. Give it any ASE calculator factory
  and the same code's per-atom energies of the elemental ground states::

      from ase.calculators.vasp import Vasp
      oracle = CalculatorOracle(lambda: Vasp(xc="PBE", encut=520, kpts=(6, 6, 6)),
                                references={"Li": -1.909, "O": -4.948}, name="VASP")

  then pass it to the discovery loop; relaxation and scoring match the EMT oracle's.

A failure on one candidate is returned as that candidate's ``error`` and the batch goes on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from tqdm.auto import tqdm

from matjax.data.relax import FMAX, MAX_STEPS, relax_and_score


@dataclasses.dataclass(frozen=True)
class OracleResult:
    """Validated formation energy (eV/atom, NaN on failure) and relaxed structure."""

    id: str
    formation_energy_per_atom: float
    structure: object | None  # pymatgen Structure
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class CalculatorOracle:
    """Relax with an ASE calculator and score against elemental reference energies."""

    def __init__(self, calculator: Callable[[], object], references: dict[str, float], name: str = "calculator",
                 fmax: float = FMAX, steps: int = MAX_STEPS):
        self.calculator, self.references, self.name = calculator, dict(references), name
        self.fmax, self.steps = fmax, steps

    def evaluate(self, ids: Sequence[str], structures: Sequence) -> list[OracleResult]:
        from pymatgen.io.ase import AseAtomsAdaptor

        results = []
        for id_, structure in tqdm(list(zip(ids, structures)), desc=f"{self.name} oracle", mininterval=1.0):
            try:
                relaxed = relax_and_score(AseAtomsAdaptor.get_atoms(structure), self.calculator,
                                          self.references, self.fmax, self.steps)
                results.append(OracleResult(str(id_), relaxed.formation_energy_per_atom,
                                            AseAtomsAdaptor.get_structure(relaxed.atoms)))
            except Exception as err:  # one failed calculation must not stop the batch
                results.append(OracleResult(str(id_), math.nan, None, f"{type(err).__name__}: {err}"))
        return results


def emt_oracle() -> CalculatorOracle:
    """EMT relaxation scored against EMT's fcc elements (Al, Cu, Ag, Au, Ni, Pd, Pt)."""
    from matjax.data.emt import emt_calculator, references

    return CalculatorOracle(emt_calculator, references(), name="EMT")


class LabelOracle:
    """Held-out labels by id: the 'calculation' reveals a DFT value hidden from training."""

    name = "held-out DFT"

    def __init__(self, labels: dict[str, float]):
        self.labels = dict(labels)

    def evaluate(self, ids: Sequence[str], structures: Sequence) -> list[OracleResult]:
        return [
            OracleResult(str(i), float(self.labels[i]), s) if i in self.labels
            else OracleResult(str(i), math.nan, None, f"no held-out label for {i}")
            for i, s in zip(ids, structures)
        ]
