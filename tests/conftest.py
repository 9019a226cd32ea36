"""Shared fixtures: small CDVAE-format CSVs written from pymatgen structures."""

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter


def crystal(seed: int) -> Structure:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    lattice = Lattice.from_parameters(*rng.uniform(3.0, 4.5, 3), *rng.uniform(75, 105, 3))
    return Structure(lattice, rng.choice(["Li", "O", "Si", "Fe", "Au"], n).tolist(), rng.random((n, 3)))


def cdvae_rows(n: int, seed: int = 0) -> pd.DataFrame:
    structures = [crystal(seed * 1000 + i) for i in range(n)]
    return pd.DataFrame({
        "material_id": [f"test-{seed}-{i}" for i in range(n)],
        "cif": [str(CifWriter(s)) for s in structures],
        "formation_energy_per_atom": np.linspace(-1.0, 0.5, n),
        "band_gap": np.linspace(0.0, 3.0, n),
    })


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty graph cache, also used as the default through MATJAX_CACHE."""
    monkeypatch.setenv("MATJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
