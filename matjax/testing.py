"""Test helpers: thin wrappers over chex and finite differences."""

from __future__ import annotations

import chex
import numpy as np


def assert_finite_tree(tree) -> None:
    """Every leaf of ``tree`` is finite (no NaN or inf)."""
    chex.assert_tree_all_finite(tree)


def central_difference(f, x: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """d f / d x by central differences, float64, same shape as ``x``.

    f maps an array shaped like x to a scalar.
    """
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        grad[idx] = (float(f(x + step)) - float(f(x - step))) / (2 * eps)
    return grad
