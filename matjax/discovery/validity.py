"""Is a generated crystal plausible, new and distinct? The usual generative-model checks.

- composition validity: charge-balanced under pymatgen's oxidation states (the feasibility
  ``Composition.oxi_state_guesses`` tests: ICSD states, else ``common_oxidation_states``).
  Single elements and all-metal compositions (alloys, which have no ionic balance) count as
  valid, as in the SMACT check of CDVAE's evaluation; pymatgen's common states are
  stricter than SMACT's full list, so measure the training data with the same function
  to calibrate (``composition_validity`` of real crystals is below 1).
- the same check as CDVAE's evaluation (SMACT's test, ``smact_style_valid``) for comparison
  with published figures: one oxidation state per element from the full list, neutral,
  cations less electronegative than anions.
- structure validity: every interatomic distance, periodic images included, > 0.5 A,
  and a volume per atom in [5, 250] A^3 (diamond has 5.7 A^3; the loosest MP-20 crystals
  ~200 A^3: outside that range it is not a solid).
- uniqueness and novelty: pymatgen ``StructureMatcher`` (default tolerances), compared
  only within equal reduced formulas, so the cost stays linear in the number of formulas.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter, defaultdict
from typing import Callable, Sequence

import numpy as np

MIN_DISTANCE = 0.5  # Angstrom
VOLUME_PER_ATOM = (5.0, 250.0)  # Angstrom^3


def composition_valid(composition) -> bool:
    """True if a pymatgen Composition is an element, an alloy, or charge-balanced (``charge_balanced``)."""
    return _reduced_valid(composition.reduced_formula)


@functools.lru_cache(maxsize=65536)
def _reduced_valid(reduced_formula: str) -> bool:
    from pymatgen.core import Composition

    amounts = Composition(reduced_formula).get_el_amt_dict()
    if len(amounts) == 1 or all(_element(el).is_metal for el in amounts):
        return True
    return charge_balanced({el: int(n) for el, n in amounts.items()})


def charge_balanced(amounts: dict[str, int]) -> bool:
    """Can every atom take one of its element's oxidation states so that the total charge is 0?

    amounts: element symbol -> atoms. The states are pymatgen's defaults for
    ``Composition.oxi_state_guesses`` (``icsd_oxidation_states``, else
    ``common_oxidation_states``), and the answer is the same as ``bool(oxi_state_guesses())``;
    but where pymatgen enumerates the product of every element's possible sums
    (exponential in the number of elements, minutes for the ten-element compositions a
    poorly trained decoder proposes), this keeps the set of reachable total charges.
    """
    reachable = {0}
    for el, n in amounts.items():
        states = _oxidation_states(el)
        sums = {sum(combo) for combo in itertools.combinations_with_replacement(states, n)}
        reachable = {r + s for r in reachable for s in sums}
    return 0 in reachable


@functools.cache
def _element(symbol: str):
    from pymatgen.core import Element

    return Element(symbol)


@functools.cache
def _oxidation_states(symbol: str) -> tuple[int, ...]:
    element = _element(symbol)
    return tuple(element.icsd_oxidation_states or element.common_oxidation_states)


def smact_style_valid(composition) -> bool:
    """The composition check of CDVAE's and DiffCSP's evaluation (SMACT's ``smact_validity``), on pymatgen's data.

    An element or an all-metal composition is valid; otherwise one oxidation state per element,
    from the full list (pymatgen's ``Element.oxidation_states``, SMACT's list up to a few rare
    states), must make the reduced formula neutral with every cation less electronegative
    (Pauling ``Element.X``) than every anion. Looser than ``composition_valid`` where rare
    states balance (NaO with O-), stricter where only mixed valence does (Fe3O4).
    """
    return _reduced_smact_style_valid(composition.reduced_formula)


@functools.lru_cache(maxsize=65536)
def _reduced_smact_style_valid(reduced_formula: str) -> bool:
    from pymatgen.core import Composition

    amounts = {el: int(n) for el, n in Composition(reduced_formula).get_el_amt_dict().items()}
    if len(amounts) == 1 or all(_element(el).is_metal for el in amounts):
        return True
    eneg = {el: _element(el).X for el in amounts}  # NaN where unknown: such an element may take either sign
    # The Pauling test holds iff the cations are the elements below some electronegativity cut.
    for cut in sorted({x for x in eneg.values() if not np.isnan(x)} | {np.inf}):
        reachable = {0}
        for el, n in amounts.items():
            sign = 0 if np.isnan(eneg[el]) else (1 if eneg[el] < cut else -1)
            sums = {n * ox for ox in _element(el).oxidation_states if ox * sign >= 0}
            reachable = {r + s for r in reachable for s in sums}
        if 0 in reachable:
            return True
    return False


def structure_problem(structure, min_distance: float = MIN_DISTANCE, volume_per_atom=VOLUME_PER_ATOM) -> str | None:
    """Why a pymatgen Structure is not a plausible crystal ("<kind>: <details>"), or None if it is."""
    per_atom = structure.volume / len(structure)
    if not volume_per_atom[0] <= per_atom <= volume_per_atom[1]:
        return f"volume per atom: {per_atom:.3g} A^3 outside [{volume_per_atom[0]}, {volume_per_atom[1]}]"
    centres, _, _, distances = structure.get_neighbor_list(min_distance, exclude_self=True)
    if len(centres):
        return f"short distance: atoms {distances.min():.3g} A apart (< {min_distance} A)"
    return None


def _groups(structures: Sequence) -> dict[str, list[int]]:
    groups = defaultdict(list)
    for i, s in enumerate(structures):
        groups[s.composition.reduced_formula].append(i)
    return groups


def unique_mask(structures: Sequence) -> np.ndarray:
    """[S] bool: True for the first structure of each group of matching structures."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    keep = np.zeros(len(structures), dtype=bool)
    for members in _groups(structures).values():
        firsts: list[int] = []
        for i in members:
            if not any(matcher.fit(structures[j], structures[i]) for j in firsts):
                firsts.append(i)
        keep[firsts] = True
    return keep


def novel_mask(structures: Sequence, reference: Callable[[int], object], reference_formulas: Sequence[str]) -> np.ndarray:
    """[S] bool: True where no reference crystal (e.g. the training set) matches.

    reference(j) builds reference structure j, called only for the members whose reduced
    formula (``reference_formulas`` [R]) equals a generated one's.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    by_formula = defaultdict(list)
    for j, name in enumerate(reference_formulas):
        by_formula[name].append(j)
    novel = np.ones(len(structures), dtype=bool)
    for name, members in _groups(structures).items():
        candidates = [reference(j) for j in by_formula.get(name, ())]
        for i in members:
            novel[i] = not any(matcher.fit(ref, structures[i]) for ref in candidates)
    return novel


def generation_metrics(compositions: Sequence, structures: Sequence, reference: Callable[[int], object], reference_formulas: Sequence[str]) -> dict:
    """Validity, uniqueness and novelty of S generated crystals.

    compositions [S]: the decoded pymatgen Compositions (all samples); structures [S]:
    their realised Structures, None where none could be built (counted as structurally
    invalid). Uniqueness and novelty (against ``reference``, see ``novel_mask``) are shares
    of the realised structures.
    """
    problems = [structure_problem(s) if s is not None else "not realised" for s in structures]
    realised = [s for s in structures if s is not None]
    unique = unique_mask(realised) if realised else np.zeros(0, dtype=bool)
    novel = novel_mask(realised, reference, reference_formulas) if realised else np.zeros(0, dtype=bool)
    return {
        "composition_validity": float(np.mean([composition_valid(c) for c in compositions])),
        "composition_validity_smact": float(np.mean([smact_style_valid(c) for c in compositions])),
        "structure_validity": float(np.mean([p is None for p in problems])),
        "uniqueness": float(unique.mean()) if realised else 0.0,
        "novelty": float(novel.mean()) if realised else 0.0,
        "n_samples": len(structures),
        "n_realised": len(realised),
        "structure_problems": dict(Counter(p.split(":")[0] for p in problems if p)),
    }
