"""Figures of the Ising phase-transition study (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import numpy as np


def plot_study(report: dict, out_dir: str) -> list[str]:
    """P(ordered), Binder cumulant, PC1 and PCA-scatter figures from experiments/ising_phase.py."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tc = report["tc_exact"]
    studies = report["studies"]
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s in studies:
        line = ax.plot(s["fine_t"], s["cnn"]["p_ordered"], "o-", ms=3, label=f"L={s['L']} (all T)")[0]
        ax.plot(s["fine_t"], s["cnn_far"]["p_ordered"], "--", color=line.get_color(), label=f"L={s['L']} (|T-Tc| far)")
    ax.axvline(tc, color="k", lw=0.8)
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.set(xlabel="T / J", ylabel="P(ordered)", title="CNN output (mean over configurations)")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "p_ordered.png")

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s in studies:
        u = np.array([[th["binder"], th["binder_err"]] for th in s["thermo"]])
        ax.errorbar(s["binder_t"], u[:, 0], u[:, 1], fmt="o-", ms=3, capsize=2, label=f"L={s['L']}")
    ax.axvline(tc, color="k", lw=0.8, label="exact $T_c$")
    ax.set(xlabel="T / J", ylabel="$U_4 = 1 - <m^4>/(3<m^2>^2)$", title="Binder cumulant")
    ax.legend(fontsize=8)
    save(fig, "binder.png")

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s in studies:
        ev = s["pca"]["explained"]
        ax.plot(s["temperatures"], s["pca"]["pc1_abs_mean"], "o-", ms=3, label=f"L={s['L']}: PC1 {ev[0]:.1%}, PC2 {ev[1]:.1%}")
    ax.axvline(tc, color="k", lw=0.8)
    ax.set(xlabel="T / J", ylabel="<|PC1 projection|> / sqrt(N)", title="First principal component")
    ax.legend(fontsize=8)
    save(fig, "pca_pc1.png")

    s = next((s for s in studies if s["L"] == 32), studies[-1])
    xy = np.array(s["pca"]["scatter"])  # [n_T, n, 2]
    temps = np.repeat(s["temperatures"], xy.shape[1])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sc = ax.scatter(xy[..., 0].ravel(), xy[..., 1].ravel(), c=temps, cmap="coolwarm", s=5)
    fig.colorbar(sc, label="T / J")
    ax.set(xlabel="PC1 / sqrt(N)", ylabel="PC2 / sqrt(N)", title=f"PCA of Ising configurations, L={s['L']}")
    save(fig, "pca_scatter.png")
    return paths
