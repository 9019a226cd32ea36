"""Frozen configuration dataclasses.

Configs are hashable, so they can be static arguments of jitted functions. Each
experiment has a ``default`` and a tiny ``test`` config (see ``experiments/``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """How crystals become graphs.

    cutoff: neighbour radius (Angstrom); max_neighbors: keep the nearest k per atom
    (None keeps all); num_rbf: Gaussian centres on [0, cutoff] for the distance expansion.
    """

    cutoff: float = 6.0
    max_neighbors: int | None = None
    num_rbf: int = 40


@dataclasses.dataclass(frozen=True)
class DiscoveryConfig:
    """The active-learning discovery loop (``matjax.discovery.active``).

    rounds: train -> generate -> screen -> validate cycles; n_select: candidates chosen by
    the acquisition and validated per round; n_random: random candidates validated per
    round as the enrichment baseline; kappa: optimism of the acquisition (std units);
    parent_max_e_above_hull: known crystals within this of the hull (eV/atom) are parents
    for substitution; substitution_threshold: minimum substitution probability;
    allowed_elements: chemical-space filter (None: any); hit_tolerance: a validated crystal
    within this of the known hull (eV/atom) counts as a hit; seed.
    """

    rounds: int = 3
    n_select: int = 24
    n_random: int = 24
    kappa: float = 1.0
    parent_max_e_above_hull: float = 0.03
    substitution_threshold: float = 1e-3
    allowed_elements: tuple[str, ...] | None = None
    hit_tolerance: float = 0.0
    seed: int = 0
