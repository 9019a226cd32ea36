"""Simulated discovery on held-out DFT data: does the ensemble find the stable crystals?

The surrogate is trained on the known rows only; the hidden pool is ranked by the same
acquisition as the active loop (probability of lying on or below the known hull, among
crystals predicted to form, optionally at most ``max_per_formula`` per composition); the oracle reveals the held-out labels of the top
``n_select``. The discovery acceleration factor (DAF, as in Matbench Discovery) is

    DAF = (stable fraction among the selected) / (stable fraction of the whole pool),

so random selection scores 1. "Stable" is the pool's own label: energy above the
Materials Project hull <= ``stable_tolerance`` where the data carries it, else a
formation energy in the pool's lowest decile.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from matjax.data.dataset import Dataset
from matjax.discovery.active import TARGET, Surrogate, train_val_split, graph_formulas, known_hull
from matjax.discovery.screening import rank_candidates

HULL_COLUMNS = ("energy_above_hull", "e_above_hull")


def stable_labels(rows: pd.DataFrame, stable_tolerance: float = 1e-3) -> tuple[np.ndarray, str]:
    """([P] bool stable, how it was decided) for the pool's rows."""
    for column in HULL_COLUMNS:
        if column in rows.columns:
            return rows[column].to_numpy() <= stable_tolerance, f"{column} <= {stable_tolerance} eV/atom"
    e_form = rows[TARGET].to_numpy()
    return e_form <= np.quantile(e_form, 0.1), f"{TARGET} in the lowest decile of the pool"


def simulated_discovery(known: Dataset, pool: Dataset, stable: np.ndarray, surrogate: Surrogate, workdir,
                        n_select: int, noise_floor: float = 0.01, max_per_formula: int | None = None,
                        seed: int = 0) -> dict:
    """Rank the hidden pool with a surrogate trained on ``known``; DAF of the top n_select."""
    state = surrogate.fit(*train_val_split(known), workdir, None)
    mean, std = surrogate.predict(state, pool.graphs)
    formulas = graph_formulas(pool.graphs)
    e_hull_pred = known_hull(known).e_above_hull(formulas, mean)
    ranked = rank_candidates(mean, std, e_hull_pred, formulas, noise_floor, max_per_formula)
    selected = ranked[:n_select]
    random = np.random.default_rng(seed).choice(len(pool), size=min(n_select, len(pool)), replace=False)
    prevalence = float(stable.mean())
    precision = float(stable[selected].mean()) if len(selected) else 0.0
    true_e_form = pool.target(TARGET)
    return {
        "daf": precision / prevalence if prevalence > 0 else None,
        "daf_max": 1 / prevalence if prevalence > 0 else None,  # every selected crystal stable
        "precision": precision,
        "prevalence": prevalence,
        "random_precision": float(stable[random].mean()),
        "n_selected": int(len(selected)),
        "n_pool": int(len(pool)),
        "n_known": int(len(known)),
        "daf_by_n": {int(n): float(stable[ranked[:n]].mean()) / prevalence
                     for n in (10, 50, 100, 500, 1000) if n <= len(ranked) and prevalence > 0},
        "pool_mae_formation_energy": float(np.abs(mean - true_e_form).mean()),
        "selected_mae_formation_energy": float(np.abs(mean[selected] - true_e_form[selected]).mean()) if len(selected) else None,
    }
