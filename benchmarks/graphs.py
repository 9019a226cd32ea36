"""Crystal-graph construction: matjax vs a seed-style pymatgen loop; mp20-lite cache times.

    python benchmarks/graphs.py [--quick]

Metrics: graph_build_structures_per_s (ratio = vs the seed-style baseline, same structures,
same run), mp20lite_cold_build_s (CSV -> graphs into an empty cache), mp20lite_warm_load_s.
Uses mp20-lite from the shared data folder, or the built-in EMT alloys when it is absent.
"""

from __future__ import annotations

import tempfile

import numpy as np
from pymatgen.core import Element

from common import emit, median_seconds, parse_args
from matjax.data.graphs import structure_to_graph
from matjax.data.sources import _parse_cif, load_csv, mp20_lite_paths, read_cdvae_csv, shared_data_dir

CUTOFF = 6.0


def seed_style_graph(structure, cutoff=CUTOFF, n_rbf=40):
    """How the seed notebook builds a graph: per-site element lookups, pymatgen's
    get_all_neighbors, per-atom neighbour sorting, and a numpy RBF expansion."""
    features = []
    for site in structure:
        e = Element(site.specie.symbol)
        features.append([e.Z, e.X, e.atomic_radius, e.ionization_energy, e.electron_affinity])
    senders, receivers, distances = [], [], []
    for i, neighbors in enumerate(structure.get_all_neighbors(cutoff)):
        for n in sorted(neighbors, key=lambda n: n.nn_distance):
            senders.append(n.index)
            receivers.append(i)
            distances.append(n.nn_distance)
    d = np.array(distances)
    rbf = np.exp(-(((d[:, None] - np.linspace(0, cutoff, n_rbf)) / (cutoff / (n_rbf - 1))) ** 2))
    return np.array(features, dtype=float), np.array(senders), np.array(receivers), rbf


def sample_structures(n: int):
    if shared_data_dir() is not None:
        rows = read_cdvae_csv(mp20_lite_paths()).sample(n, random_state=0)
        return [_parse_cif(c) for c in rows.cif]
    from matjax.data.emt import emt_alloy_dataset

    data = emt_alloy_dataset(n=min(n, 200))
    return [data.structure(i) for i in range(len(data))]


def main():
    args = parse_args()
    structures = sample_structures(300 if args.quick else 2000)
    repeats = 3 if args.quick else 5
    for s in structures[:20]:  # warm-up: imports, element tables, allocator
        structure_to_graph(s, CUTOFF), seed_style_graph(s)
    ours, ours_min = median_seconds(lambda: [structure_to_graph(s, CUTOFF) for s in structures], repeats)
    seed, _ = median_seconds(lambda: [seed_style_graph(s) for s in structures], repeats)
    emit("graphs", "graph_build_structures_per_s", len(structures) / ours, "structures/s",
         baseline=len(structures) / seed, best=len(structures) / ours_min, n_structures=len(structures), cutoff=CUTOFF)
    if shared_data_dir() is None:
        print("mp20-lite absent: cache timings skipped")
        return
    paths = mp20_lite_paths()
    targets = ["formation_energy_per_atom", "band_gap"]
    with tempfile.TemporaryDirectory() as tmp:
        cold, _ = median_seconds(lambda: load_csv(paths, targets, cutoff=CUTOFF, cache_dir=tmp), 1)
        warm, warm_min = median_seconds(lambda: load_csv(paths, targets, cutoff=CUTOFF, cache_dir=tmp), repeats)
    emit("graphs", "mp20lite_cold_build_s", cold, "s", n_structures=15686, cutoff=CUTOFF)
    emit("graphs", "mp20lite_warm_load_s", warm, "s", best=warm_min, n_structures=15686, cutoff=CUTOFF)


if __name__ == "__main__":
    main()
