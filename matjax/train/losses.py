"""Target scaling and masked regression losses for padded graph batches."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class TargetScaler(NamedTuple):
    """Per-target standardisation y_std = (y - mean) / std; mean, std: [T]."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, targets: np.ndarray) -> "TargetScaler":
        """Mean and standard deviation of each column of ``targets`` [M, T] (std 1 if constant)."""
        targets = np.asarray(targets, dtype=np.float64)
        std = targets.std(axis=0)
        return cls(targets.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, y):
        return (y - self.mean) / self.std

    def inverse(self, y_std):
        """Physical units from standardised values [..., T]."""
        return y_std * self.std + self.mean


def masked_abs_error(pred: jnp.ndarray, target: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[G, T] |pred - target| on real graphs (mask [G] True), 0 on padding graphs."""
    return jnp.where(mask[:, None], jnp.abs(pred - target), 0.0)


def mae(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[T] mean absolute error over the leading axis of [M, T] arrays."""
    return np.mean(np.abs(np.asarray(pred) - np.asarray(target)), axis=0)
