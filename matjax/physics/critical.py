"""Locating a critical point from finite-size data (host side, numpy).

* :func:`fit_root` / :func:`crossing`: where a measured curve crosses a level, or two curves
  cross (Binder cumulants of L and 2L; a classifier's P(ordered) = 1/2), from a weighted
  polynomial fit, with a parametric-bootstrap error.
* :func:`peak`: location of the maximum of a measured curve (a susceptibility-like peak).
* :func:`extrapolate`: finite-size scaling T*(L) = T_c + a L^-w, weighted least squares.
* :func:`pca`: principal components of configurations by SVD (jnp), for unsupervised detection.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _poly_root(t, y, err, degree: int, near: float) -> float:
    scale = np.ptp(t) / 2 or 1.0  # fit in a centred, scaled variable: well conditioned
    x = (t - near) / scale
    coef = np.polynomial.polynomial.polyfit(x, y, min(degree, len(t) - 2), w=1.0 / np.asarray(err))
    roots = np.polynomial.polynomial.polyroots(coef)
    real = roots[(np.abs(roots.imag) < 1e-9) & (roots.real >= x.min()) & (roots.real <= x.max())].real
    return float(near + scale * real[np.argmin(np.abs(real))]) if len(real) else np.nan


def fit_root(t, y, err, degree: int = 3, points: int | None = None, n_boot: int = 500, seed: int = 0) -> tuple[float, float]:
    """t where y(t) = 0 from a weighted polynomial fit; returns (root, bootstrap std).

    t, y, err: [n] (err > 0, independent). The fit uses the ``points`` grid points nearest to
    the sign change of the data (all points if None); the root taken is the one closest to the
    linearly interpolated sign change. Returns (nan, nan) when y does not change sign.
    """
    t, y, err = (np.asarray(a, np.float64) for a in (t, y, err))
    order = np.argsort(t)
    t, y, err = t[order], y[order], np.maximum(err[order], 1e-12)
    change = np.nonzero(np.sign(y[:-1]) * np.sign(y[1:]) <= 0)[0]
    if len(change) == 0:
        return np.nan, np.nan
    i = change[np.argmin(np.abs(y[change]) + np.abs(y[change + 1]))]
    near = t[i] - y[i] * (t[i + 1] - t[i]) / (y[i + 1] - y[i]) if y[i + 1] != y[i] else t[i]
    if points is not None and points < len(t):
        keep = np.sort(np.argsort(np.abs(t - near))[:points])
        t, y, err = t[keep], y[keep], err[keep]
    root = _poly_root(t, y, err, degree, near)
    rng = np.random.default_rng(seed)
    boot = [_poly_root(t, y + err * rng.standard_normal(len(y)), err, degree, root) for _ in range(n_boot)]
    return root, float(np.nanstd(boot))


def crossing(t, y1, err1, y2, err2, degree: int = 3, points: int | None = None, n_boot: int = 500, seed: int = 0) -> tuple[float, float]:
    """Crossing of two independently measured curves y1(t), y2(t): fit_root of their difference."""
    return fit_root(t, np.subtract(y2, y1), np.hypot(err1, err2), degree, points, n_boot, seed)


def peak(t, y, err, half_width: int = 3, n_boot: int = 500, seed: int = 0) -> tuple[float, float]:
    """Location of the maximum of y(t): vertex of a weighted parabola through the top points.

    Uses the 2 * half_width + 1 grid points around the largest y; bootstrap error.
    """
    t, y, err = (np.asarray(a, np.float64) for a in (t, y, err))
    order = np.argsort(t)
    t, y, err = t[order], y[order], err[order]
    half_width = min(half_width, (len(t) - 1) // 2)
    k = int(np.clip(np.argmax(y), half_width, len(t) - half_width - 1))
    sl = slice(k - half_width, k + half_width + 1)

    centre, scale = t[k], np.ptp(t[sl]) / 2 or 1.0

    def vertex(yy):
        c = np.polynomial.polynomial.polyfit((t[sl] - centre) / scale, yy[sl], 2, w=1.0 / err[sl])
        return centre - scale * c[1] / (2 * c[2]) if c[2] < 0 else np.nan

    rng = np.random.default_rng(seed)
    boot = [vertex(y + err * rng.standard_normal(len(y))) for _ in range(n_boot)]
    return float(vertex(y)), float(np.nanstd(boot))


def extrapolate(sizes, values, errors, exponent: float) -> dict[str, float]:
    """Fit values(L) = T_c + a L^-exponent by weighted least squares.

    Returns {"tc", "tc_err", "slope", "chi2_dof"}; with more points than parameters the error
    is scaled up by sqrt(chi2/dof) when that exceeds 1 (the scatter is then larger than the
    error bars claim). A single size is returned as it is (no extrapolation possible).
    """
    x = np.asarray(sizes, np.float64) ** -exponent
    y, err = np.asarray(values, np.float64), np.asarray(errors, np.float64)
    if len(y) == 1:
        return {"tc": float(y[0]), "tc_err": float(err[0]), "slope": np.nan, "chi2_dof": np.nan}
    A = np.stack([np.ones_like(x), x], axis=1) / err[:, None]
    cov = np.linalg.inv(A.T @ A)
    coef = cov @ A.T @ (y / err)
    dof = len(y) - 2
    chi2 = float(np.sum(((A @ coef) - y / err) ** 2))
    scale = max(1.0, chi2 / dof) if dof > 0 else 1.0
    return {"tc": float(coef[0]), "tc_err": float(np.sqrt(cov[0, 0] * scale)), "slope": float(coef[1]), "chi2_dof": chi2 / dof if dof > 0 else np.nan}


def pca(x, n_components: int = 2) -> dict[str, np.ndarray]:
    """Principal components of samples x [n, d] (centred) via jnp SVD.

    Returns {"components": [k, d] unit vectors, "explained": [k] variance ratios,
    "mean": [d]}. Project with (x - mean) @ components.T.
    """
    x = jnp.asarray(x, jnp.float32)
    mean = x.mean(0)
    _, s, vt = jnp.linalg.svd(x - mean, full_matrices=False)
    var = s**2
    return {"components": np.asarray(vt[:n_components]), "explained": np.asarray(var[:n_components] / var.sum()), "mean": np.asarray(mean)}
