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
