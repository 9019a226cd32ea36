"""Building blocks shared by the matjax models."""

from __future__ import annotations

import jax.numpy as jnp


def gaussian_rbf(distances: jnp.ndarray, cutoff: float = 6.0, num: int = 40, width: float | None = None) -> jnp.ndarray:
    """[..., num] Gaussian expansion exp(-((d - mu_k) / width)^2), mu_k evenly on [0, cutoff].

    The default width is the centre spacing, as in CGCNN.
    """
    centres, width = _rbf_grid(cutoff, num, width)
    return jnp.exp(-(((distances[..., None] - centres) / width) ** 2))


def gaussian_rbf_slope(distances: jnp.ndarray, rbf: jnp.ndarray, cutoff: float = 6.0, num: int = 40,
                       width: float | None = None) -> jnp.ndarray:
    """[..., num] d rbf / d distance, given rbf = gaussian_rbf(distances, cutoff, num, width)."""
    centres, width = _rbf_grid(cutoff, num, width)
    return -2.0 * (distances[..., None] - centres) / width**2 * rbf


def _rbf_grid(cutoff: float, num: int, width: float | None):
    """(centres [num], width) of the Gaussian expansion."""
    return jnp.linspace(0.0, cutoff, num), cutoff / (num - 1) if width is None else width


def polynomial_envelope(distances: jnp.ndarray, cutoff: float, p: int = 6) -> jnp.ndarray:
    """[...] smooth cutoff u(r) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2), x = r/cutoff.

    u(0) = 1 and u, u', u'' vanish at the cutoff, so energies, forces and their first
    derivatives are continuous when a neighbour crosses it (DimeNet, Gasteiger et al. 2020).
    Zero beyond the cutoff.
    """
    x = distances / cutoff
    u = 1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    return jnp.where(x < 1.0, u, 0.0)
