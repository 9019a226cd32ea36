"""Screening: stream candidates through an ensemble, then rank them for validation.

``screen`` never holds more than one chunk of candidate graphs: each chunk is built from
the parents' topology (``candidate_graphs``) and passed to ``predict``, any function
``PackedGraphs -> (mean [M, T], std [M, T])`` such as a CGCNN ensemble.

Ranking (``hit_probability``) is the probability that a candidate lies on or below the
known hull under a Gaussian predictive distribution: mean = predicted energy above the
hull, variance = ensemble variance + noise_floor^2. The floor stands for the error an
ensemble does not see in its own spread (members share data and architecture); without it
a tiny spread would make a marginal candidate look certain. On a fully EMT-labelled pool
of 2455 round-1 candidates this ranking put 58% hits in its top 24 against 33% for the
mean or a lower confidence bound (prevalence 12%).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from matjax.data.elements import symbols
from matjax.data.graphs import PackedGraphs
from matjax.discovery.substitution import Candidates, candidate_graphs

Predictor = Callable[[PackedGraphs], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Screened:
    """Ensemble predictions for C candidates: mean and std [C, T] (target units)."""

    mean: np.ndarray
    std: np.ndarray


def screen(predict: Predictor, parents: PackedGraphs, candidates: Candidates, chunk: int = 8192,
           progress: bool = True) -> Screened:
    """Predictions for every candidate, ``chunk`` candidates' graphs at a time."""
    means, stds = [], []
    for start in tqdm(range(0, len(candidates), chunk), desc="screening", disable=not progress, mininterval=1.0):
        idx = np.arange(start, min(start + chunk, len(candidates)))
        mean, std = predict(candidate_graphs(parents, candidates, idx))
        means.append(np.asarray(mean))
        stds.append(np.asarray(std))
    if not means:
        raise ValueError("no candidates to screen")
    return Screened(np.concatenate(means), np.concatenate(stds))


def candidate_formulas(candidates: Candidates, parents: PackedGraphs, indices) -> list[str]:
    """Reduced formulas of candidates ``indices``, from the parents' species counts."""
    from pymatgen.core import Composition

    starts = np.cumsum(parents.n_node) - parents.n_node
    formulas = []
    for i in np.asarray(indices):
        p = candidates.parent[i]
        species = parents.species[starts[p]: starts[p] + parents.n_node[p]]
        old_z, counts = np.unique(species, return_counts=True)
        new_z = [candidates.new[i, np.flatnonzero(candidates.old[i] == z)[0]] for z in old_z]
        formula = Counter({symbols()[z]: int(n) for z, n in zip(new_z, counts)})
        if candidates.site[i] >= 0:
            formula[symbols()[new_z[np.searchsorted(old_z, species[candidates.site[i]])]]] -= 1
            formula[symbols()[candidates.site_z[i]]] += 1
        formulas.append(Composition(+formula).reduced_formula)
    return formulas


def hit_probability(e_above_hull: np.ndarray, std: np.ndarray, noise_floor: float = 0.01) -> np.ndarray:
    """[C] P(true energy above the hull <= 0), Gaussian with variance std^2 + noise_floor^2."""
    from scipy.special import ndtr

    return ndtr(-e_above_hull / np.sqrt(std**2 + noise_floor**2))


def rank_candidates(mean: np.ndarray, std: np.ndarray, e_above_hull: np.ndarray, formulas, noise_floor: float,
                    max_per_formula: int | None) -> np.ndarray:
    """Candidate indices predicted to form (mean E_form < 0), most probable hit first, with at
    most ``max_per_formula`` per reduced formula: polymorphs of one composition compete for a
    single point on the hull, so a batch of them spends oracle calls on one discovery."""
    eligible = np.flatnonzero(mean < 0)
    order = eligible[np.argsort(-hit_probability(e_above_hull[eligible], std[eligible], noise_floor), kind="stable")]
    if max_per_formula is None:
        return order
    return np.fromiter(cap_per_formula(order, formulas, max_per_formula), dtype=order.dtype)


def cap_per_formula(order: Iterable[int], formulas, max_per_formula: int | None) -> Iterator[int]:
    """The indices of ``order`` in turn, skipping any past the ``max_per_formula``-th of its
    reduced formula (None: no cap). Lazy, so a caller can stop after the first few."""
    taken: dict[str, int] = {}
    for i in order:
        taken[formulas[i]] = taken.get(formulas[i], 0) + 1
        if max_per_formula is None or taken[formulas[i]] <= max_per_formula:
            yield i
