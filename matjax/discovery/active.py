"""Active-learning discovery: train -> generate -> screen -> select -> validate -> grow.

Round r = 1, 2, ... works in ``<run_dir>/round-<r>/`` and saves every stage's output atomically::

    model/        the surrogate's checkpoints (it resumes from them)
    pool.npz      substitution candidates (whole elements and single atoms) into near-hull known
                  crystals, de-duplicated by
                  fingerprint against each other and every structure known or already validated
    screen.npz    ensemble mean and std of the formation energy of every candidate
    picks.csv     candidates chosen by the acquisition and at random (the baseline), both
                  skipping any that StructureMatcher finds among the known structures or
                  among the picks before it
    oracle.csv    their validated formation energies, relaxed structures and hit flags

``<run_dir>/known-0.csv`` is the initial labelled set (CDVAE rows); round r starts from
``known-<r-1>.csv`` and appends its validated crystals to make ``known-<r>.csv``. A stage whose
file exists is not redone, so a killed run resumes in the stage it was in.

A *hit* is a validated crystal whose formation energy lies on or below the convex hull of
the crystals known at the start of its round (within ``hit_tolerance``) and that is not a
known crystal relaxed back into itself (pymatgen StructureMatcher). Enrichment is the hit
rate of the acquisition's picks over that of random picks from the same pool. Known
structures are kept out of that pool twice: cheaply by fingerprint for every candidate, then
by StructureMatcher for the candidates actually picked. Without the second check a later
round fills with distorted copies of crystals it has just found: the model correctly predicts
them on the hull (a coin flip for the acquisition) and each relaxes back into a known crystal.
The same check keeps one crystal from being picked twice in a round (the same prototype
substituted into differently distorted parents): on the old loop's seed-2 campaign 7, 8 and
12 of the 24 picks of rounds 1-3 repeated an earlier pick, counting one discovery several
times in round 1 and wasting half of round 3.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pandas as pd

from matjax.config import DiscoveryConfig
from matjax.data.dataset import Dataset
from matjax.data.elements import symbols
from matjax.data.graphs import PackedGraphs, graph_to_structure, take
from matjax.data.splits import split_indices
from matjax.discovery.fingerprint import first_occurrences, graph_fingerprints
from matjax.discovery.hull import Hull
from matjax.discovery.screening import candidate_formulas, cap_per_formula, rank_candidates, screen
from matjax.discovery.substitution import Candidates, candidate_graphs, generate_candidates

log = logging.getLogger("matjax")
TARGET = "formation_energy_per_atom"
INITIAL = "~initial"  # id suffix of a crystal's unrelaxed structure in the training set


class Surrogate(Protocol):
    """What the loop needs of a model: fit on the known set, predict mean and std."""

    def fit(self, train: Dataset, val: Dataset, workdir: Path, warm_start: Any | None) -> Any: ...

    def predict(self, state: Any, graphs: PackedGraphs) -> tuple[np.ndarray, np.ndarray]: ...


class Oracle(Protocol):
    name: str

    def evaluate(self, ids, structures) -> list: ...


def graph_formulas(graphs: PackedGraphs) -> list[str]:
    """Reduced formula of every graph."""
    from pymatgen.core import Composition

    starts = np.cumsum(graphs.n_node) - graphs.n_node
    out = []
    for s, n in zip(starts, graphs.n_node):
        z, counts = np.unique(graphs.species[s: s + n], return_counts=True)
        out.append(Composition({symbols()[a]: int(c) for a, c in zip(z, counts)}).reduced_formula)
    return out


def known_hull(known: Dataset) -> Hull:
    return Hull(graph_formulas(known.graphs), known.target(TARGET))


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _save_csv(path: Path, frame: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def build_pool(known: Dataset, hull: Hull, cfg: DiscoveryConfig,
               seen: PackedGraphs | None = None) -> tuple[PackedGraphs, Candidates]:
    """(parent graphs, candidates): substitutions into known crystals near the hull, with
    duplicates, known crystals and ``seen`` structures removed by fingerprint.

    seen: structures the oracle has already answered for, e.g. the unrelaxed candidates
    validated in earlier rounds (the training set holds them). Regenerated from a parent, such a
    candidate relaxes into its own known crystal again: it cannot be a hit and teaches nothing,
    yet its prediction sits on the hull it helped to make, which ranks it high.
    """
    e_hull = hull.e_above_hull(graph_formulas(known.graphs), known.target(TARGET))
    parents = take(known.graphs, np.flatnonzero(e_hull <= cfg.parent_max_e_above_hull))
    if len(parents) == 0:
        raise ValueError(f"no known crystal within {cfg.parent_max_e_above_hull} eV/atom of the hull to substitute into")
    candidates = generate_candidates(parents, cfg.allowed_elements, cfg.substitution_threshold,
                                     single_site=cfg.single_site)
    exclude = [graph_fingerprints(g) for g in (known.graphs, seen) if g is not None]
    keep = first_occurrences(graph_fingerprints(candidate_graphs(parents, candidates)), exclude=np.concatenate(exclude))
    return parents, candidates.subset(np.flatnonzero(keep))


def _pool(path: Path, known: Dataset, hull: Hull, cfg: DiscoveryConfig,
          seen: PackedGraphs | None) -> tuple[PackedGraphs, Candidates]:
    """build_pool, saved to (and later read from) ``path``."""
    if not path.exists():
        parents, candidates = build_pool(known, hull, cfg, seen)
        _save_npz(path, **{f"parent_{k}": v for k, v in parents.arrays().items()},
                  **{f"cand_{f.name}": getattr(candidates, f.name) for f in dataclasses.fields(candidates)})
    saved = np.load(path)
    parents = PackedGraphs(**{k: saved[f"parent_{k}"] for k in PackedGraphs.fields()})
    return parents, Candidates(**{f.name: saved[f"cand_{f.name}"] for f in dataclasses.fields(Candidates)})


def choose(mean: np.ndarray, std: np.ndarray, e_hull_pred: np.ndarray, formulas: list[str], cfg: DiscoveryConfig,
           rng: np.random.Generator, novel: Callable[[Iterator[int]], Iterator[int]] = iter) -> tuple[np.ndarray, np.ndarray]:
    """(selected, random) candidate indices: the n_select most probable hits among candidates
    predicted to form (``rank_candidates``), and n_random uniform picks of the pool; ``novel``
    filters each stream (e.g. ``novel_candidates``: nothing known, nothing picked twice) and is
    lazy, so it only tests as far down as needed."""
    ranked = rank_candidates(mean, std, e_hull_pred, formulas, cfg.noise_floor, None)
    selected = itertools.islice(cap_per_formula(novel(iter(ranked)), formulas, cfg.max_per_formula), cfg.n_select)
    random = itertools.islice(novel(iter(rng.permutation(len(mean)))), cfg.n_random)
    return np.fromiter(selected, dtype=np.int64), np.fromiter(random, dtype=np.int64)


def structures_by_formula(data: Dataset) -> dict[str, list]:
    """Reduced formula -> pymatgen Structures of that composition in ``data``."""
    out: dict[str, list] = {}
    for i, f in enumerate(graph_formulas(data.graphs)):
        out.setdefault(f, []).append(data.structure(i))
    return out


def matches_known(structure, known_by_formula: dict) -> bool:
    """Whether pymatgen's StructureMatcher (volume rescaled) finds ``structure`` among the
    known structures of its composition."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    same = known_by_formula.get(structure.composition.reduced_formula, [])
    return any(StructureMatcher().fit(structure, other) for other in same)


def novel_candidates(parents: PackedGraphs, candidates: Candidates, seen: Dataset) -> Callable[[Iterator[int]], Iterator[int]]:
    """novel(order): the candidates of ``order`` whose unrelaxed structure StructureMatcher finds
    neither among ``seen`` (e.g. the training set: known crystals relaxed and as first proposed)
    nor among the candidates ``novel`` already yielded from this ``order``.

    The fingerprint that built the pool only removes near-exact copies. A distorted copy of a
    known prototype relaxes back into it, a rediscovery; and one prototype substituted into
    two parents that relaxed to different shapes (an L1_0 cell of two c/a ratios) is one
    crystal proposed twice. Either way the oracle would be asked again for nothing."""
    known = structures_by_formula(seen)

    def novel(order: Iterator[int]) -> Iterator[int]:
        found = {formula: list(structures) for formula, structures in known.items()}
        for i in order:
            structure = graph_to_structure(candidate_graphs(parents, candidates, [i]).graph(0))
            if not matches_known(structure, found):
                found.setdefault(structure.composition.reduced_formula, []).append(structure)
                yield i

    return novel


def validate(oracle: Oracle, parents: PackedGraphs, candidates: Candidates, picks: pd.DataFrame,
             hull: Hull, known: Dataset, tolerance: float) -> pd.DataFrame:
    """Oracle results for ``picks`` with hit flags (see the module docstring)."""
    from pymatgen.io.cif import CifWriter

    unique = picks.drop_duplicates("candidate")
    graphs = candidate_graphs(parents, candidates, unique["candidate"].to_numpy())
    proposals = [graph_to_structure(graphs.graph(i)) for i in range(len(graphs))]
    results = oracle.evaluate(unique["id"].tolist(), proposals)
    by_formula = structures_by_formula(known)
    rows = []
    for r, proposal in zip(results, proposals):
        row = {"id": r.id, "validated_e_form": r.formation_energy_per_atom, "error": r.error, "cif": None,
               "cif_initial": str(CifWriter(proposal)),
               "validated_e_above_hull": np.nan, "rediscovery": False, "hit": False}
        if r.ok:
            formula = r.structure.composition.reduced_formula
            e_hull = float(hull.e_above_hull([formula], [r.formation_energy_per_atom])[0])
            rediscovery = matches_known(r.structure, by_formula)
            row.update(cif=str(CifWriter(r.structure)), validated_e_above_hull=e_hull, rediscovery=rediscovery,
                       hit=bool(e_hull <= tolerance and not rediscovery))
        rows.append(row)
    return picks.merge(pd.DataFrame(rows), on="id", how="left")


@dataclasses.dataclass(frozen=True)
class RoundSummary:
    round: int
    n_known: int
    n_parents: int
    n_candidates: int
    n_predicted_negative: int
    n_selected: int
    n_random: int
    hit_rate: float
    random_hit_rate: float
    enrichment: float | None
    n_new_stable: int
    validated_mae: float
    spearman_error_std: float | None
    oracle_failures: int


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def summarize(r: int, known: Dataset, n_parents: int, screened_mean: np.ndarray, validated: pd.DataFrame) -> RoundSummary:
    ok = validated[validated.error.isna()]
    sel, rnd = ok[ok.kind == "selected"], ok[ok.kind == "random"]
    hit_rate = float(sel.hit.mean()) if len(sel) else 0.0
    random_rate = float(rnd.hit.mean()) if len(rnd) else 0.0
    err = np.abs(ok.pred_mean - ok.validated_e_form).to_numpy()
    return RoundSummary(
        round=r, n_known=len(known), n_parents=n_parents, n_candidates=len(screened_mean),
        n_predicted_negative=int((screened_mean < 0).sum()), n_selected=len(sel), n_random=len(rnd),
        hit_rate=hit_rate, random_hit_rate=random_rate,
        enrichment=hit_rate / random_rate if random_rate > 0 else None,
        n_new_stable=int(ok.drop_duplicates("candidate").hit.sum()),
        validated_mae=float(err.mean()) if len(err) else float("nan"),
        spearman_error_std=_spearman(err, ok.pred_std.to_numpy()),
        oracle_failures=int(validated.error.notna().sum()),
    )


def training_rows(known_rows: pd.DataFrame) -> pd.DataFrame:
    """Known rows plus, where ``cif_initial`` is given, the unrelaxed structure with the same
    relaxed energy (id + INITIAL): screening predicts relaxed energies of unrelaxed
    candidates, so the surrogate learns that map (as in OC20's IS2RE task)."""
    if "cif_initial" not in known_rows:
        return known_rows
    initial = known_rows[known_rows.cif_initial.notna()]
    initial = initial.assign(material_id=initial.material_id + INITIAL, cif=initial.cif_initial)
    return pd.concat([known_rows, initial], ignore_index=True)


def train_val_split(data: Dataset) -> tuple[Dataset, Dataset]:
    """90/10 split by hashed base id (a crystal and its unrelaxed structure stay together);
    the test bucket joins training, since the loop is its own test."""
    parts = split_indices([i.removesuffix(INITIAL) for i in data.ids])
    return data.subset(np.sort(np.concatenate([parts["train"], parts["test"]]))), data.subset(parts["val"])


def run_round(r: int, known_rows: pd.DataFrame, load: Any, surrogate: Surrogate, oracle: Oracle,
              cfg: DiscoveryConfig, run_dir: Path, warm_start: Any | None):
    """One round; returns (summary, validated rows, the fitted surrogate state)."""
    rdir = run_dir / f"round-{r}"
    rdir.mkdir(parents=True, exist_ok=True)
    known = load(known_rows)
    hull = known_hull(known)
    training = load(training_rows(known_rows))
    state = surrogate.fit(*train_val_split(training), rdir / "model", warm_start)
    parents, candidates = _pool(rdir / "pool.npz", known, hull, cfg, training.graphs)
    if not (rdir / "screen.npz").exists():
        screened = screen(lambda g: surrogate.predict(state, g), parents, candidates)
        _save_npz(rdir / "screen.npz", mean=screened.mean, std=screened.std)
    saved = np.load(rdir / "screen.npz")
    mean, std = saved["mean"], saved["std"]
    if not (rdir / "picks.csv").exists():
        formulas = candidate_formulas(candidates, parents, np.arange(len(candidates)))
        e_hull_pred = hull.e_above_hull(formulas, mean)
        selected, random = choose(mean, std, e_hull_pred, formulas, cfg, np.random.default_rng([cfg.seed, r]),
                                  novel_candidates(parents, candidates, training))
        picks = pd.concat([
            pd.DataFrame({"candidate": idx, "kind": kind}) for idx, kind in ((selected, "selected"), (random, "random"))
        ])
        idx = picks.candidate.to_numpy()
        picks = picks.assign(
            id=[f"r{r}-c{i}" for i in idx], formula=[formulas[i] for i in idx], pred_mean=mean[idx],
            pred_std=std[idx], pred_e_above_hull=e_hull_pred[idx], probability=candidates.probability[idx],
        )
        _save_csv(rdir / "picks.csv", picks)
    if not (rdir / "oracle.csv").exists():
        validated = validate(oracle, parents, candidates, pd.read_csv(rdir / "picks.csv"), hull, known, cfg.hit_tolerance)
        _save_csv(rdir / "oracle.csv", validated)
    validated = pd.read_csv(rdir / "oracle.csv")
    return summarize(r, known, len(parents), mean, validated), validated, state


def grow(known_rows: pd.DataFrame, validated: pd.DataFrame) -> pd.DataFrame:
    """Known rows plus every successfully validated crystal (once each)."""
    new = validated[validated.error.isna()].drop_duplicates("candidate")
    return pd.concat([known_rows, pd.DataFrame({
        "material_id": new.id, "cif": new.cif, "cif_initial": new.cif_initial, TARGET: new.validated_e_form,
    })], ignore_index=True)


def run(initial_rows: pd.DataFrame, load, surrogate: Surrogate, oracle: Oracle, cfg: DiscoveryConfig,
        run_dir: Path) -> list[RoundSummary]:
    """All rounds, resuming from whatever ``run_dir`` already holds.

    initial_rows: CDVAE rows (material_id, cif, formation_energy_per_atom, optionally
    cif_initial: the unrelaxed structure) known at the start; load: rows -> Dataset with
    target formation_energy_per_atom (graphs cached).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    known_path = run_dir / "known-0.csv"
    if not known_path.exists():
        columns = ["material_id", "cif", *(["cif_initial"] if "cif_initial" in initial_rows else []), TARGET]
        _save_csv(known_path, initial_rows[columns])
    summaries, state = [], None
    for r in range(1, cfg.rounds + 1):
        known_rows = pd.read_csv(run_dir / f"known-{r - 1}.csv")
        summary, validated, state = run_round(r, known_rows, load, surrogate, oracle, cfg, run_dir, state)
        if not (run_dir / f"known-{r}.csv").exists():
            _save_csv(run_dir / f"known-{r}.csv", grow(known_rows, validated))
        summaries.append(summary)
        log.info("round %d: %s", r, json.dumps(dataclasses.asdict(summary), default=float))
    return summaries
