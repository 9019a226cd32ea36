"""Error analysis for Markov-chain Monte Carlo time series (host side, numpy float64).

Samples of one chain are correlated; an error bar that ignores this is too small by a factor
sqrt(2 tau_int). The recipe here (Sokal, "Monte Carlo methods in statistical mechanics", 1996;
Janke, NIC series 10, 2002):

1. estimate the integrated autocorrelation time tau_int with Sokal's automatic window;
2. cut every chain into blocks of >= ``block_factor`` * tau_int samples, so that block means are
   nearly independent;
3. propagate errors of means, and of non-linear functions of means (heat capacity,
   susceptibility, Binder cumulant), by the jackknife over all blocks of all chains.

Series are arrays [n_chains, n_samples] (a 1D array is one chain).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def _chains(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[None] if x.ndim == 1 else x


def autocorrelation(x) -> np.ndarray:
    """Normalised autocorrelation rho(t), t = 0..n-1, averaged over chains; x [n_chains, n].

    Uses the chain-pooled mean and variance (FFT with zero padding, so no wrap-around).
    """
    x = _chains(x)
    n = x.shape[1]
    dx = x - x.mean()
    f = np.fft.rfft(dx, n=2 * n, axis=1)
    acov = np.fft.irfft(f * np.conj(f), axis=1)[:, :n].sum(0) / (x.shape[0] * np.arange(n, 0, -1))
    return acov / acov[0] if acov[0] > 0 else np.zeros(n)


def integrated_autocorrelation_time(x, window_factor: float = 6.0) -> float:
    """tau_int = 1/2 + sum_{t=1}^{W} rho(t), W the first window with W >= window_factor * tau(W).

    x: [n_chains, n_samples] in units of the sample spacing. 0.5 for uncorrelated samples; the
    variance of a mean of n samples is 2 tau_int sigma^2 / n. A constant series gives 0.5.
    """
    rho = autocorrelation(x)
    tau = 0.5 + np.cumsum(rho[1:])
    windows = np.arange(1, len(rho))
    ok = windows >= window_factor * tau
    return float(tau[np.argmax(ok)] if ok.any() else tau[-1])


def block_means(x, block: int) -> np.ndarray:
    """[n_chains, n] -> [n_chains * (n // block)] means of consecutive blocks (tail dropped)."""
    x = _chains(x)
    n_blocks = x.shape[1] // block
    if n_blocks < 1:
        raise ValueError(f"block length {block} exceeds the series length {x.shape[1]}")
    return x[:, : n_blocks * block].reshape(x.shape[0], n_blocks, block).mean(-1).reshape(-1)


def jackknife(fn: Callable[..., float], *blocks: np.ndarray) -> tuple[float, float]:
    """Estimate and jackknife error of fn(mean of blocks[0], mean of blocks[1], ...).

    Each blocks[k] is [K] block means of one primary quantity (K >= 2, same K for all); fn
    must work elementwise on arrays (it is evaluated on all K leave-one-out means at once).
    """
    blocks = [np.asarray(b, np.float64) for b in blocks]
    K = len(blocks[0])
    if K < 2:
        raise ValueError("the jackknife needs at least two blocks")
    total = [b.sum() for b in blocks]
    full = fn(*(t / K for t in total))
    leave_one = np.asarray(fn(*((t - b) / (K - 1) for t, b in zip(total, blocks))))
    err = math.sqrt((K - 1) / K * np.sum((leave_one - leave_one.mean()) ** 2))
    return float(full), float(err)


def thermodynamics(e, m, temperature: float, n_spins: int, block: int | None = None, block_factor: float = 10.0) -> dict:
    """Thermodynamic estimates with autocorrelation-aware errors from per-sample e = E/N and m.

    e, m: [n_chains, n_samples] (equilibrated). Returns a dict of floats:
    energy, abs_m, m2, heat_capacity C = N (<e^2> - <e>^2) / T^2, susceptibility
    chi = N (<m^2> - <|m|>^2) / T, binder U4 = 1 - <m^4> / (3 <m^2>^2), each with ``<name>_err``;
    tau_e, tau_abs_m, tau_m2 (in samples) and the block length used. ``block`` defaults to
    ceil(block_factor * max tau_int), capped so that every chain yields at least one block.
    """
    e, m = _chains(e), _chains(m)
    taus = {"tau_e": e, "tau_abs_m": np.abs(m), "tau_m2": m**2}
    taus = {k: integrated_autocorrelation_time(v) for k, v in taus.items()}
    if block is None:
        block = min(e.shape[1], max(1, math.ceil(block_factor * max(taus.values()))))
    prim = [block_means(v, block) for v in (e, e**2, np.abs(m), m**2, m**4)]
    N, T = n_spins, temperature
    out = {"block": block, "n_blocks": len(prim[0]), **taus}
    estimators = {
        "energy": (lambda e, e2, a, m2, m4: e),
        "abs_m": (lambda e, e2, a, m2, m4: a),
        "m2": (lambda e, e2, a, m2, m4: m2),
        "heat_capacity": (lambda e, e2, a, m2, m4: N * (e2 - e * e) / T**2),
        "susceptibility": (lambda e, e2, a, m2, m4: N * (m2 - a * a) / T),
        "binder": (lambda e, e2, a, m2, m4: 1.0 - m4 / (3.0 * m2 * m2)),
    }
    for name, fn in estimators.items():
        out[name], out[name + "_err"] = jackknife(fn, *prim)
    return out
