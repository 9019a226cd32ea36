"""Small synthetic crystal sets for tests that must not need downloaded data."""

from __future__ import annotations

import numpy as np
import pytest

from matjax.data.dataset import Dataset
from matjax.data.graphs import build_graph, pack


def toy_crystals(n: int, seed: int = 0, cutoff: float = 5.0, max_neighbors: int | None = 8) -> Dataset:
    """n random periodic crystals (1-4 atoms, Z 1-19, ~3-4.5 A cells) with two learnable targets.

    "formation_energy_per_atom": mean of a fixed random per-element value plus a term in
    the cell size; "band_gap": a nonlinear function of the composition. The per-element
    table is the same for every seed, so splits drawn with different seeds share the law.
    """
    rng = np.random.default_rng(seed)
    element_value = np.random.default_rng(1234).normal(size=20)
    graphs, targets = [], []
    for _ in range(n):
        n_atoms = int(rng.integers(1, 5))
        a = rng.uniform(3.0, 4.5)
        lattice = a * (np.eye(3) + 0.05 * rng.normal(size=(3, 3)))
        species = rng.integers(1, 20, size=n_atoms)
        graphs.append(build_graph(species, rng.random((n_atoms, 3)), lattice, cutoff, max_neighbors))
        energy = element_value[species].mean() + 0.5 * (a - 3.75)
        targets.append([energy, np.abs(element_value[species]).max()])
    ids = np.array([f"toy-{seed}-{i}" for i in range(n)])
    return Dataset(ids, pack(graphs), np.array(targets), ("formation_energy_per_atom", "band_gap"))


@pytest.fixture(scope="session")
def toy_splits() -> dict[str, Dataset]:
    return {"train": toy_crystals(192, seed=0), "val": toy_crystals(64, seed=1), "test": toy_crystals(64, seed=2)}
