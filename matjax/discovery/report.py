"""Discovery report: markdown, CSVs and plots of a finished (or partial) campaign.

Written to the run directory::

    report.md         per-round table, enrichment, calibration, confirmed discoveries
    rounds.csv        one row per round (RoundSummary fields)
    discoveries.csv   every confirmed hit: id, formula, validated and predicted energies
    summary.json      enrichment_by_round, hit_rate_by_round, random_hit_rate, wall_s, ...
    hit_rates.png     hit rate of the acquisition vs random picks per round
    validation.png    predicted vs validated formation energy; |error| vs ensemble std
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from matjax.discovery.active import RoundSummary


def _validated(run_dir: Path, rounds: int) -> pd.DataFrame:
    frames = [pd.read_csv(run_dir / f"round-{r}" / "oracle.csv").assign(round=r) for r in range(1, rounds + 1)]
    return pd.concat(frames, ignore_index=True)


def campaign_summary(summaries: list[RoundSummary], validated: pd.DataFrame, wall_s: float, oracle: str) -> dict:
    ok = validated[validated.error.isna()]
    random = ok[ok.kind == "random"]
    return {
        "enrichment_by_round": [s.enrichment for s in summaries],
        "hit_rate_by_round": [s.hit_rate for s in summaries],
        "random_hit_rate_by_round": [s.random_hit_rate for s in summaries],
        "random_hit_rate": float(random.hit.mean()) if len(random) else None,
        "n_selected_by_round": [s.n_selected for s in summaries],
        "n_candidates_by_round": [s.n_candidates for s in summaries],
        "n_new_stable": int(ok[ok.hit].drop_duplicates("id").shape[0]),
        "validated_mae_by_round": [s.validated_mae for s in summaries],
        "spearman_error_std_by_round": [s.spearman_error_std for s in summaries],
        "oracle": oracle,
        "wall_s": wall_s,
    }


def _plots(summaries: list[RoundSummary], validated: pd.DataFrame, run_dir: Path) -> None:
    rounds = [s.round for s in summaries]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rounds, [s.hit_rate for s in summaries], "o-", label="acquisition (hit probability)")
    ax.plot(rounds, [s.random_hit_rate for s in summaries], "s--", label="random picks")
    ax.set(xlabel="round", ylabel="hit rate (on/below known hull)", xticks=rounds, ylim=(0, 1.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "hit_rates.png", dpi=120)
    plt.close(fig)

    ok = validated[validated.error.isna()]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for kind, marker in (("selected", "o"), ("random", "s")):
        part = ok[ok.kind == kind]
        axes[0].errorbar(part.validated_e_form, part.pred_mean, yerr=part.pred_std, fmt=marker, ms=4,
                         alpha=0.7, label=kind)
    lims = [ok[["validated_e_form", "pred_mean"]].min().min(), ok[["validated_e_form", "pred_mean"]].max().max()]
    axes[0].plot(lims, lims, "k-", lw=0.8)
    mae = np.abs(ok.pred_mean - ok.validated_e_form).mean()
    axes[0].set(xlabel="validated E_form (eV/atom)", ylabel="ensemble mean (eV/atom)",
                title=f"validated candidates, MAE {mae:.3f} eV/atom")
    axes[0].legend()
    axes[1].scatter(ok.pred_std, np.abs(ok.pred_mean - ok.validated_e_form), s=10, c=ok["round"], cmap="viridis")
    axes[1].set(xlabel="ensemble std (eV/atom)", ylabel="|error| (eV/atom)", title="calibration (colour: round)")
    fig.tight_layout()
    fig.savefig(run_dir / "validation.png", dpi=120)
    plt.close(fig)


def write_report(summaries: list[RoundSummary], run_dir: Path, wall_s: float, oracle: str, title: str) -> dict:
    """Write every report file (see module docstring); returns the summary dict."""
    validated = _validated(run_dir, len(summaries))
    summary = campaign_summary(summaries, validated, wall_s, oracle)
    rounds = pd.DataFrame([dataclasses.asdict(s) for s in summaries])
    rounds.to_csv(run_dir / "rounds.csv", index=False)
    hits = validated[validated.hit.fillna(False).astype(bool)].drop_duplicates("id")
    columns = ["id", "round", "kind", "formula", "validated_e_form", "validated_e_above_hull", "pred_mean", "pred_std",
               "probability"]
    hits[columns].to_csv(run_dir / "discoveries.csv", index=False)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plots(summaries, validated, run_dir)
    fmt = lambda x: "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3g}"  # noqa: E731
    table = "\n".join(
        f"| {s.round} | {s.n_known} | {s.n_candidates} | {s.n_selected} | {fmt(s.hit_rate)} | {fmt(s.random_hit_rate)} "
        f"| {fmt(s.enrichment)} | {s.n_new_stable} | {fmt(s.validated_mae)} | {fmt(s.spearman_error_std)} | {s.oracle_failures} |"
        for s in summaries
    )
    found = "\n".join(
        f"| {h.id} | {h.formula} | {h.validated_e_form:.4f} | {h.validated_e_above_hull:.4f} | {h.pred_mean:.4f} +- {h.pred_std:.4f} |"
        for h in hits.sort_values("validated_e_above_hull").itertuples()
    )
    skipped = validated[validated.error.notna()]
    (run_dir / "report.md").write_text(f"""# {title}

Oracle: {oracle}. Wall time: {wall_s:.0f} s. A hit is a validated crystal on or below the
convex hull of the crystals known at the start of its round, not a known crystal relaxed
back into itself. Enrichment = hit rate of the acquisition's picks / hit rate of random
picks from the same candidate pool.

| round | known | candidates | selected | hit rate | random hit rate | enrichment | new stable | MAE (eV/atom) | Spearman(|err|, std) | oracle failures |
|---|---|---|---|---|---|---|---|---|---|---|
{table}

Pooled random hit rate: {fmt(summary['random_hit_rate'])}. Confirmed discoveries: {len(hits)}
(`discoveries.csv`). Oracle failures (skipped, listed in `round-*/oracle.csv`): {len(skipped)}.

![hit rates](hit_rates.png)
![validation](validation.png)

## Confirmed discoveries

| id | formula | validated E_form | E above known hull | predicted |
|---|---|---|---|---|
{found}
""")
    return summary
