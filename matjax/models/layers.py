"""Building blocks shared by the matjax models."""

from __future__ import annotations

import jax.numpy as jnp


def gaussian_rbf(distances: jnp.ndarray, cutoff: float = 6.0, num: int = 40, width: float | None = None) -> jnp.ndarray:
    """[..., num] Gaussian expansion exp(-((d - mu_k) / width)^2), mu_k evenly on [0, cutoff].

    The default width is the centre spacing, as in CGCNN.
    """
    centres = jnp.linspace(0.0, cutoff, num)
    width = cutoff / (num - 1) if width is None else width
    return jnp.exp(-(((distances[..., None] - centres) / width) ** 2))
