"""The discovery loop's mechanics with a cheap stand-in surrogate and the real EMT oracle."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from matjax.config import DiscoveryConfig
from matjax.data.emt import ELEMENTS, emt_alloy_rows
from matjax.data.sources import dataset_from_frame
from matjax.discovery import active
from matjax.discovery.oracles import emt_oracle
from matjax.discovery.report import write_report
from matjax.discovery.screening import candidate_formulas, rank_candidates
from matjax.discovery.simulated import simulated_discovery, stable_labels


class CompositionSurrogate:
    """Bootstrap ensemble of least-squares fits of E_form on element fractions."""

    def __init__(self):
        self.fits = 0

    @staticmethod
    def fractions(graphs):
        node_graph = np.repeat(np.arange(len(graphs)), graphs.n_node)
        x = np.zeros((len(graphs), 104))
        np.add.at(x, (node_graph, graphs.species), 1.0)
        return x / graphs.n_node[:, None]

    def fit(self, train, val, workdir, warm_start):
        self.fits += 1
        x, y = self.fractions(train.graphs), train.target(active.TARGET)
        rng = np.random.default_rng(0)
        boots = [rng.integers(len(y), size=len(y)) for _ in range(5)]
        return [np.linalg.lstsq(x[b], y[b], rcond=None)[0] for b in boots]

    def predict(self, state, graphs):
        preds = np.stack([self.fractions(graphs) @ w for w in state])
        return preds.mean(0), preds.std(0)


class CountingOracle:
    def __init__(self):
        self.inner, self.name, self.calls = emt_oracle(), "EMT", 0

    def evaluate(self, ids, structures):
        self.calls += len(ids)
        return self.inner.evaluate(ids, structures)


def load(rows):
    return dataset_from_frame(rows, [active.TARGET], cutoff=8.0, max_neighbors=12)


CFG = DiscoveryConfig(rounds=2, n_select=4, n_random=4, parent_max_e_above_hull=0.05, allowed_elements=ELEMENTS)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    return emt_alloy_rows(n=30, seed=5, cache_dir=tmp_path_factory.mktemp("emt"))


@pytest.fixture(scope="module")
def finished(initial, tmp_path_factory):
    """(summaries, run_dir, oracle calls) of one complete two-round campaign."""
    run_dir = tmp_path_factory.mktemp("campaign") / "run"
    oracle = CountingOracle()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATJAX_CACHE", str(run_dir.parent / "cache"))
        summaries = active.run(initial, load, CompositionSurrogate(), oracle, CFG, run_dir)
    return summaries, run_dir, oracle.calls


def test_rounds_grow_the_known_set_and_report(finished, cache_dir):
    summaries, run_dir, _ = finished
    assert [s.round for s in summaries] == [1, 2]
    for s in summaries:
        # Only candidates predicted to form (E_form < 0) may be selected.
        assert s.n_candidates > 0 and s.n_selected == min(4, s.n_predicted_negative) and s.n_random == 4
        assert 0 <= s.hit_rate <= 1 and 0 <= s.random_hit_rate <= 1
    known = [pd.read_csv(run_dir / f"known-{r}.csv") for r in range(3)]
    assert len(known[0]) < len(known[1]) < len(known[2])
    oracle = pd.read_csv(run_dir / "round-1" / "oracle.csv")
    ok = oracle[oracle.error.isna()]
    # Hits are exactly the validated crystals on or below the round's known hull.
    hull = active.known_hull(load(known[0]))
    e_hull = hull.e_above_hull(ok.formula.tolist(), ok.validated_e_form.tolist())
    np.testing.assert_allclose(e_hull, ok.validated_e_above_hull, atol=1e-9)
    assert (ok.hit == ((e_hull <= 0) & ~ok.rediscovery)).all()
    # New ids are unique: a candidate picked twice is validated and added once.
    assert known[2].material_id.is_unique


def test_a_killed_run_resumes_without_redoing_finished_stages(finished, initial, tmp_path, cache_dir):
    _, done_dir, first_calls = finished
    run_dir = tmp_path / "run"
    shutil.copytree(done_dir, run_dir)
    expected = pd.read_csv(run_dir / "round-2" / "oracle.csv")
    # Killed in round 2 after screening: its picks and oracle results were never written.
    for lost in ["round-2/oracle.csv", "round-2/picks.csv", "known-2.csv"]:
        (run_dir / lost).unlink()
    oracle = CountingOracle()
    active.run(initial, load, CompositionSurrogate(), oracle, CFG, run_dir)
    redone = pd.read_csv(run_dir / "round-2" / "oracle.csv")
    assert oracle.calls == len(redone.drop_duplicates("candidate")) < first_calls
    pd.testing.assert_frame_equal(redone[["id", "kind", "hit"]], expected[["id", "kind", "hit"]])


def test_empty_chemical_space_is_a_clear_error(initial, tmp_path, cache_dir):
    cfg = DiscoveryConfig(rounds=1, parent_max_e_above_hull=-10.0)
    with pytest.raises(ValueError, match="no known crystal within"):
        active.run(initial, load, CompositionSurrogate(), CountingOracle(), cfg, tmp_path / "run")


def test_report_files_and_numbers(finished, tmp_path):
    summaries, done_dir, _ = finished
    run_dir = tmp_path / "run"
    shutil.copytree(done_dir, run_dir)
    summary = write_report(summaries, run_dir, wall_s=1.0, oracle="EMT", title="test campaign")
    for name in ["report.md", "rounds.csv", "discoveries.csv", "summary.json", "hit_rates.png", "validation.png"]:
        assert (run_dir / name).stat().st_size > 0, name
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["hit_rate_by_round"] == [s.hit_rate for s in summaries]
    found = pd.read_csv(run_dir / "discoveries.csv")
    assert len(found) == summary["n_new_stable"] and (found.validated_e_above_hull <= 0).all()


def test_unrelaxed_structures_train_with_their_relaxed_energy(finished, cache_dir):
    _, run_dir, _ = finished
    known = pd.read_csv(run_dir / "known-2.csv")
    assert known.cif_initial.notna().all()  # the EMT inputs and every validated proposal
    data = load(active.training_rows(known))
    assert len(data) == 2 * len(known)
    energy = dict(zip(data.ids, data.target(active.TARGET)))
    assert all(energy[i + active.INITIAL] == energy[i] for i in known.material_id)
    train, val = active.train_val_split(data)
    base = lambda ids: {i.removesuffix(active.INITIAL) for i in ids}  # noqa: E731
    assert len(val) > 0 and not base(train.ids) & base(val.ids)


def test_validated_candidates_leave_the_pool(initial, cache_dir):
    """A candidate the oracle has relaxed (its unrelaxed CIF is in the known rows) is not
    proposed again; every other candidate stays."""
    from pymatgen.io.cif import CifWriter

    from matjax.data.graphs import graph_to_structure
    from matjax.discovery.fingerprint import graph_fingerprints
    from matjax.discovery.substitution import candidate_graphs

    known = load(initial)
    hull = active.known_hull(known)
    parents, candidates = active.build_pool(known, hull, CFG)
    picked = np.arange(0, len(candidates), 7)
    graphs = candidate_graphs(parents, candidates, picked)
    # The loop's path: an unrelaxed candidate travels as a CIF and is rebuilt from it.
    rows = pd.DataFrame({"material_id": [f"v{i}" for i in picked], active.TARGET: 0.0,
                         "cif": [str(CifWriter(graph_to_structure(graphs.graph(k)))) for k in range(len(picked))]})
    _, remaining = active.build_pool(known, hull, CFG, seen=load(rows).graphs)
    assert len(remaining) == len(candidates) - len(picked)
    left = graph_fingerprints(candidate_graphs(parents, remaining))
    assert not np.isin(graph_fingerprints(graphs), left).any()


def test_a_distorted_copy_of_a_known_crystal_is_not_a_candidate(initial, cache_dir):
    """The fingerprint misses a rattled, strained copy of a known crystal; the shortlist's
    StructureMatcher test catches it, and passes other structures of the same composition."""
    from matjax.data.graphs import graph_to_structure
    from matjax.discovery.fingerprint import graph_fingerprints
    from matjax.discovery.substitution import candidate_graphs

    known = load(initial)
    parents, candidates = active.build_pool(known, active.known_hull(known), CFG)
    formulas = candidate_formulas(candidates, parents, np.arange(len(candidates)))
    first = next(i for i, f in enumerate(formulas) if formulas.count(f) > 1)  # a composition with polymorphs
    same = [i for i, f in enumerate(formulas) if f == formulas[first] and i != first]
    copy = graph_to_structure(candidate_graphs(parents, candidates, [first]).graph(0))
    copy.perturb(0.05, min_distance=0.02)
    copy.apply_strain(0.02)
    seen = load(pd.DataFrame({"material_id": ["copy"], "cif": [copy.to(fmt="cif")], active.TARGET: 0.0}))
    assert graph_fingerprints(seen.graphs)[0] != graph_fingerprints(candidate_graphs(parents, candidates, [first]))[0]
    novel = active.novel_candidates(parents, candidates, seen)
    assert list(novel(iter([first]))) == []
    assert list(novel(iter(same)))


def test_a_crystal_is_picked_once_per_stream(initial, cache_dir):
    """Within one stream of picks a repeat of an earlier pick (here: strained copies of one
    candidate as separate parents) is skipped; each stream starts afresh."""
    from matjax.data.graphs import graph_to_structure, pack, structure_to_graph
    from matjax.discovery.substitution import Candidates, candidate_graphs

    known = load(initial)
    parents, candidates = active.build_pool(known, active.known_hull(known), CFG)
    base = graph_to_structure(candidate_graphs(parents, candidates, [0]).graph(0))
    copies = [base.copy() for _ in range(3)]
    for copy, strain in zip(copies, (0.0, 0.03, -0.03)):
        copy.apply_strain([strain, 0.0, -strain])
    three = pack([structure_to_graph(copy, 6.0, 12) for copy in copies])
    species = np.zeros((3, candidates.old.shape[1]), dtype=np.int32)
    z = sorted({site.specie.Z for site in base})
    species[:, : len(z)] = z
    unchanged = Candidates(np.arange(3), species, species, np.ones(3), np.ones(3), np.full(3, -1), np.zeros(3, int))
    novel = active.novel_candidates(three, unchanged, known)
    assert list(novel(iter([0, 1, 2]))) == [0]
    assert list(novel(iter([2, 1, 0]))) == [2]


def test_choose_skips_known_candidates_in_both_picks():
    mean = np.array([-0.10, -0.20, 0.10, -0.30, -0.05, -0.01])
    e_hull = np.array([-0.01, -0.03, -0.50, -0.02, 0.00, 0.02])
    formulas = ["CuPd", "CuPd", "AlNi", "CuPd", "AgAu", "AlAu"]
    cfg = DiscoveryConfig(n_select=3, n_random=4, max_per_formula=1)
    known = {1, 2}
    selected, random = active.choose(mean, np.zeros(6), e_hull, formulas, cfg, np.random.default_rng(0),
                                     lambda order: (i for i in order if i not in known))
    # Ranked 1, 3, 0, 4, 5: 1 is known, so CuPd's one slot goes to 3, the next CuPd (0) is capped.
    assert selected.tolist() == [3, 4, 5]
    assert len(random) == 4 and not known & set(random.tolist()) and len(set(random.tolist())) == 4
    unfiltered = active.choose(mean, np.zeros(6), e_hull, formulas, cfg, np.random.default_rng(0))[0]
    assert unfiltered.tolist() == [1, 4, 5]


def test_ranking_keeps_formers_and_caps_polymorphs():
    mean = np.array([-0.10, -0.20, 0.10, -0.30, -0.05])
    e_hull = np.array([-0.01, -0.03, -0.50, -0.02, 0.00])
    formulas = ["CuPd", "CuPd", "AlNi", "CuPd", "AgAu"]
    args = (mean, np.zeros(5), e_hull, formulas, 0.01)
    assert rank_candidates(*args, None).tolist() == [1, 3, 0, 4]  # index 2 is predicted not to form
    assert rank_candidates(*args, 2).tolist() == [1, 3, 4]
    assert rank_candidates(*args, 1).tolist() == [1, 4]


def test_simulated_discovery_reports_daf_against_held_out_labels(initial, tmp_path, cache_dir):
    data = load(initial)
    known, pool = data.subset(np.arange(0, len(data), 2)), data.subset(np.arange(1, len(data), 2))
    stable, rule = stable_labels(initial.set_index("material_id").loc[pool.ids].reset_index())
    assert "lowest decile" in rule and stable.any()
    result = simulated_discovery(known, pool, stable, CompositionSurrogate(), tmp_path, n_select=5)
    assert result["n_pool"] == len(pool) and result["n_known"] == len(known)
    assert 0 < result["n_selected"] <= 5
    assert result["daf"] == pytest.approx(result["precision"] / stable.mean())
