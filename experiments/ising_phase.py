"""2D Ising phase transition: Binder crossings, CNN and PCA phase detection, finite-size scaling.

    python experiments/ising_phase.py --config test                  # seconds
    python experiments/ising_phase.py --results benchmarks/results/ising_tc.json
    python experiments/ising_phase.py --config budget ...           # what fits ~1 h on a busy 2-core CPU

Writes to --out: estimates.json (everything), p_ordered.png, binder.png, pca_pc1.png,
pca_scatter.png; --results gets the flat summary with the fixed keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from matjax.config import IsingConfig, PhaseCNNConfig
from matjax.models import phase_cnn
from matjax.physics import critical, ising, mcstats
from matjax.physics.ising_plots import plot_study

CONFIGS = {
    "default": IsingConfig(),
    # The default with fewer CNN seeds/epochs and shorter Binder series: fits ~1 h at nice 19 on a shared 2-core CPU.
    "budget": IsingConfig(binder_samples=1200, n_seeds=3, cnn=PhaseCNNConfig(epochs=6)),
    "test": IsingConfig(
        n_temperatures=8, n_configs=40, n_chains=8, pilot_sweeps=200, sizes=(4, 8), n_fine=8, fine_configs=40,
        fine_t_min=1.9, fine_t_max=2.8, binder_window=(1.9, 2.8), binder_chains=8, binder_samples=200,
        cnn=PhaseCNNConfig(channels=4, hidden=8, epochs=10, batch_size=40, learning_rate=1e-2), n_seeds=2,
    ),
}


def cnn_crossings(cfg, train_x, train_t, fine_x, fine_t, key, far: bool) -> dict:
    """Train n_seeds CNNs (labels T < T_c); P(ordered) on the fine grid and where it crosses 1/2."""
    tc = ising.critical_temperature(cfg.J)
    keep = (train_t < cfg.far_window[0]) | (train_t > cfg.far_window[1]) if far else np.ones(len(train_t), bool)
    curves, roots = [], []
    for seed_key in jax.random.split(key, cfg.n_seeds):
        model, params, _ = phase_cnn.train_classifier(cfg.cnn, train_x[keep], train_t[keep] < tc, seed_key)
        p = phase_cnn.predict_ordered(model, params, fine_x.reshape(-1, *fine_x.shape[2:])).reshape(fine_x.shape[:2])
        curves.append(p.mean(1))
        roots.append(critical.fit_root(fine_t, p.mean(1) - 0.5, p.std(1) / np.sqrt(p.shape[1]) + 1e-3, points=8)[0])
    return {"p_ordered": np.mean(curves, 0).tolist(), "tc": float(np.nanmean(roots)), "tc_err": float(np.nanstd(roots)), "tc_seeds": roots}


def pca_study(configs, temps, fine_x, fine_t) -> dict:
    """PCA of the seed dataset; PC1 per T; T of the peak of the PC1 'susceptibility' on the fine grid."""
    n_spins = configs.shape[-1] ** 2
    pc = critical.pca(configs.reshape(-1, n_spins))
    project = lambda x: (x.reshape(-1, n_spins) - pc["mean"]) @ pc["components"].T / np.sqrt(n_spins)  # noqa: E731
    p = project(configs).reshape(*configs.shape[:2], -1)
    q = np.abs(project(fine_x)[:, 0].reshape(fine_x.shape[:2]))
    chi = [mcstats.jackknife(lambda a, a2, T=T: n_spins * (a2 - a * a) / T, row, row**2) for row, T in zip(q, fine_t)]
    t_peak, t_peak_err = critical.peak(fine_t, *np.array(chi).T)
    return {"explained": pc["explained"].tolist(), "pc1_abs_mean": np.abs(p[..., 0]).mean(1).tolist(), "chi_pc1": chi,
            "t_peak": t_peak, "t_peak_err": t_peak_err, "scatter": p[:, :50].tolist()}


def study_size(cfg: IsingConfig, L: int, key) -> dict:
    keys = jax.random.split(key, 5)
    sampler = ising.create_sampler(cfg.algorithm, L, cfg.J, cfg.h)
    temps = np.linspace(cfg.t_min, cfg.t_max, cfg.n_temperatures)
    fine_t = np.linspace(cfg.fine_t_min, cfg.fine_t_max, cfg.n_fine)
    start = time.perf_counter()
    configs, info = ising.equilibrium_configurations(sampler, keys[0], temps, cfg.n_configs, cfg.n_chains,
                                                     cfg.pilot_sweeps, cfg.burn_in_factor, cfg.thin_factor)
    info["generation_s"] = time.perf_counter() - start
    fine_x, _ = ising.equilibrium_configurations(sampler, keys[1], fine_t, cfg.fine_configs, cfg.n_chains,
                                                 cfg.pilot_sweeps, cfg.burn_in_factor, cfg.thin_factor)
    binder_t = fine_t[(fine_t >= cfg.binder_window[0] - 1e-9) & (fine_t <= cfg.binder_window[1] + 1e-9)]
    series = ising.sample_series(sampler, keys[2], binder_t, cfg.binder_chains, cfg.binder_samples, 1, info["burn_in"])
    thermo = [mcstats.thermodynamics(series["e"][k], series["m"][k], T, L * L) for k, T in enumerate(binder_t)]
    train_t = np.repeat(temps, cfg.n_configs)
    train_x = configs.reshape(-1, L, L)
    return {"L": L, "dataset": info, "temperatures": temps.tolist(), "fine_t": fine_t.tolist(), "binder_t": binder_t.tolist(),
            "thermo": thermo, "pca": pca_study(configs, temps, fine_x, fine_t),
            "cnn": cnn_crossings(cfg, train_x, train_t, fine_x, fine_t, keys[3], far=False),
            "cnn_far": cnn_crossings(cfg, train_x, train_t, fine_x, fine_t, keys[4], far=True)}


def decorrelation(sizes, sweeps: int, key) -> list[dict]:
    """tau_int of |m| and e at T_c: Metropolis (multispin, 64 replicas, ``sweeps`` sweeps each)
    against Swendsen-Wang (16 chains, sweeps / 10 each: its tau is short)."""
    rows = []
    for L in sizes:
        for algorithm, chains, n in (("multispin", 2, sweeps), ("swendsen_wang", 16, sweeps // 10)):
            start = time.perf_counter()
            s = ising.sample_series(ising.create_sampler(algorithm, L), key, [ising.T_C], chains, n, 1, 1000)
            th = mcstats.thermodynamics(s["e"][0], s["m"][0], ising.T_C, L * L)
            rows.append({"L": L, "algorithm": algorithm, "tau_abs_m": th["tau_abs_m"], "tau_e": th["tau_e"],
                         "series_per_chain": n, "wall_s": time.perf_counter() - start})
    return rows


def finite_size_scaling(studies: list[dict]) -> dict:
    """Binder crossings of (L, 2L) extrapolated as L^-3; CNN and PCA T*(L) as L^-1 (nu = 1)."""
    by_L = {s["L"]: s for s in studies}
    pairs = [(L, 2 * L) for L in sorted(by_L) if 2 * L in by_L]
    cross = []
    for a, b in pairs:
        u = [[by_L[L]["thermo"][k][f] for k in range(len(by_L[L]["binder_t"]))] for L in (a, b) for f in ("binder", "binder_err")]
        cross.append(critical.crossing(by_L[a]["binder_t"], u[0], u[1], u[2], u[3], points=8))
    sizes = sorted(by_L)
    out = {"binder_pairs": pairs, "binder_crossings": cross}
    def fit(sizes, values, errors, exponent):  # sizes whose estimate failed (nan) are left out
        ok = np.isfinite(values) & np.isfinite(errors)
        if not ok.any():
            return {"tc": np.nan, "tc_err": np.nan, "sizes": []}
        return {**critical.extrapolate(np.asarray(sizes)[ok], np.asarray(values)[ok], np.asarray(errors)[ok], exponent), "sizes": np.asarray(sizes)[ok].tolist()}

    out["binder"] = fit([a for a, _ in pairs], *np.array(cross).T, exponent=3.0)
    out["binder_w2"] = fit([a for a, _ in pairs], *np.array(cross).T, exponent=2.0)
    for name, (key, value, error) in (("cnn", ("cnn", "tc", "tc_err")), ("cnn_far", ("cnn_far", "tc", "tc_err")), ("pca", ("pca", "t_peak", "t_peak_err"))):
        vals = np.array([[by_L[L][key][value], by_L[L][key][error]] for L in sizes], np.float64)
        out[name] = fit(sizes, vals[:, 0], np.maximum(vals[:, 1], 1e-3), exponent=1.0)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", choices=sorted(CONFIGS))
    parser.add_argument("--out", default="runs/ising_phase")
    parser.add_argument("--results", default=None, help="write the flat summary JSON here")
    args = parser.parse_args()
    cfg = CONFIGS[args.config]
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    keys = jax.random.split(jax.random.key(cfg.seed), len(cfg.sizes))
    studies = [study_size(cfg, L, k) for L, k in zip(tqdm(cfg.sizes, desc="lattice sizes"), keys)]
    fss = finite_size_scaling(studies)
    taus = decorrelation([L for L in cfg.sizes if L <= 32], 500 if args.config == "test" else 30000, keys[0])
    seed_L = 32 if 32 in cfg.sizes else cfg.sizes[-1]
    summary = {
        "tc_binder": fss["binder"]["tc"], "tc_binder_err": fss["binder"]["tc_err"],
        "tc_cnn": fss["cnn"]["tc"], "tc_cnn_err": fss["cnn"]["tc_err"], "tc_pca": fss["pca"]["tc"],
        "dataset_generation_s": next(s["dataset"]["generation_s"] for s in studies if s["L"] == seed_L),
    }
    report = {"config": dataclasses.asdict(cfg), "summary": summary, "fss": fss, "decorrelation": taus, "studies": studies,
              "tc_exact": ising.T_C, "wall_s": time.perf_counter() - start}
    with open(os.path.join(args.out, "estimates.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    plot_study(report, args.out)
    if args.results:  # strict JSON: an estimate that could not be made is null
        with open(args.results, "w") as f:
            json.dump({k: v if np.isfinite(v) else None for k, v in summary.items()}, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
