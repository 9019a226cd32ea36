"""Candidate generation and K=5 ensemble screening throughput.

    python benchmarks/screening.py [--quick] [--parents N]

Metrics: generate_candidates_per_s (Hautier substitution into mp20-lite parents, with
fingerprint de-duplication) and screen_candidates_per_s (end to end: candidate graphs from
the parents' topology, padded batches, a K=5 CGCNN ensemble of the reference size, mean and
std). Baseline, measured in the same run on a sample: the naive route, rebuilding each
candidate's graph from its structure and running the K members one after another.
Without the shared data the parents are the built-in EMT alloys.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from common import emit, median_seconds, parse_args
from matjax.config import CGCNNConfig
from matjax.data.graphs import build_graph, pack, take
from matjax.discovery.fingerprint import first_occurrences, graph_fingerprints
from matjax.discovery.substitution import candidate_graphs, generate_candidates
from matjax.models.cgcnn import create_model
from matjax.train.ensemble import EnsemblePredictor, example_batch
from matjax.train.losses import TargetScaler

K = 5
MODEL = CGCNNConfig()  # reference size: 64 features, 3 convolutions, 12 neighbours within 8 A


def load_parents(n: int):
    graph = dict(cutoff=MODEL.graph.cutoff, max_neighbors=MODEL.graph.max_neighbors)
    from matjax.data.sources import dataset_from_frame, mp20_lite_paths, read_cdvae_csv, shared_data_dir

    if shared_data_dir() is not None:
        rows = read_cdvae_csv(mp20_lite_paths()).sample(n, random_state=0)
        return dataset_from_frame(rows, ["formation_energy_per_atom"], **graph).graphs, "mp20-lite"
    from matjax.data.emt import emt_alloy_dataset

    return emt_alloy_dataset(n=min(n, 400), **graph).graphs, "emt"


def random_ensemble() -> EnsemblePredictor:
    """K members at their initialisation: throughput does not depend on the weights."""
    model = create_model(MODEL)
    keys = jax.random.split(jax.random.PRNGKey(0), K)
    variables = jax.jit(jax.vmap(lambda k: model.init(k, example_batch(), train=False)))(keys)
    return EnsemblePredictor(model, variables, TargetScaler(np.zeros(1), np.ones(1)), MODEL.targets)


def generate(parents):
    candidates = generate_candidates(parents)
    keep = first_occurrences(graph_fingerprints(candidate_graphs(parents, candidates)))
    return candidates.subset(np.flatnonzero(keep))


def screen_all(predictor, parents, candidates, chunk: int):
    out = []
    for start in range(0, len(candidates), chunk):
        idx = np.arange(start, min(start + chunk, len(candidates)))
        out.append(predictor.predict(candidate_graphs(parents, candidates, idx), batch_size=512)[0])
    return np.concatenate(out)


def naive_screen(predictor, parents, candidates):
    """Graphs rebuilt from structures, members run one at a time."""
    graphs = candidate_graphs(parents, candidates)
    rebuilt = pack([build_graph(g.species, g.frac, g.lattice, MODEL.graph.cutoff, MODEL.graph.max_neighbors)
                    for g in (graphs.graph(i) for i in range(len(graphs)))])
    members = [jax.tree.map(lambda v, k=k: v[k: k + 1], predictor.variables) for k in range(K)]
    return [EnsemblePredictor(predictor.model, m, predictor.scaler, MODEL.targets).predict(rebuilt, batch_size=256)
            for m in members]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parents", type=int, help="parent crystals (default 100 quick, 3000 full)")
    args = parse_args(parser)
    parents, source = load_parents(args.parents or (100 if args.quick else 3000))
    generate(take(parents, np.arange(20)))  # warm-up: substitution tables, element data
    start = time.perf_counter()
    candidates = generate(parents)
    gen_s = time.perf_counter() - start
    emit("screening", "generate_candidates_per_s", len(candidates) / gen_s, "candidates/s",
         n_candidates=len(candidates), n_parents=len(parents), source=source)

    predictor = random_ensemble()
    n_screen = min(len(candidates), 8_000 if args.quick else 200_000)
    subset = candidates.subset(np.arange(n_screen))
    warm = subset.subset(np.arange(min(2048, n_screen)))
    screen_all(predictor, parents, warm, 8192)  # compile the one static shape
    ours, ours_min = median_seconds(lambda: screen_all(predictor, parents, subset, 8192), 1 if not args.quick else 2)
    sample = subset.subset(np.arange(min(800 if args.quick else 5000, n_screen)))
    naive_screen(predictor, parents, sample.subset(np.arange(256)))  # compile
    naive, _ = median_seconds(lambda: naive_screen(predictor, parents, sample), 1)
    emit("screening", "screen_candidates_per_s", n_screen / ours, "candidates/s", baseline=len(sample) / naive,
         best=n_screen / ours_min, ensemble_size=K, n_candidates=n_screen, source=source,
         reference_note="issue's reference: one PyTorch CGCNN infers ~3,300 crystals/s with cached graphs, ~650/s for K=5")


if __name__ == "__main__":
    main()
