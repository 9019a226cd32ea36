"""Crystal data sources: CDVAE-format CSV files and the mp20-lite reference split.

The Materials Project client is in ``materials_project.py`` and the built-in offline EMT
alloy set in ``emt.py``; both end in the same ``Dataset``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from matjax.data.cache import GraphCache, content_key, default_cache_dir
from matjax.data.dataset import Dataset, build_graphs, report_skipped
from matjax.data.graphs import structure_to_graph
from matjax.data.splits import split_dataset

MP20_LITE_GLOB = "mp_20_subsets/*/*.csv.gz"


def shared_data_dir() -> Path | None:
    """The shared DFT data folder: ``$MATJAX_DATA``, else ``../shared/data`` beside the
    repository or the working directory; None if absent (tests then skip)."""
    candidates = [Path(p) for p in [os.environ.get("MATJAX_DATA")] if p]
    candidates += [Path(__file__).resolve().parents[3] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), None)


def read_cdvae_csv(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Rows of one or more CDVAE-format CSVs (gzip or plain), in the given order.

    Requires columns ``material_id`` and ``cif``; rows repeating an earlier material_id
    are dropped (the first is kept).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no CSV files given")
    frames = []
    for path in paths:
        frame = pd.read_csv(path)
        missing = {"material_id", "cif"} - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: not a CDVAE-format CSV, missing column(s) {sorted(missing)}")
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    return rows.drop_duplicates("material_id", keep="first").reset_index(drop=True)


def _parse_cif(cif: str):
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's CIF-parsing chatter
        return Structure.from_str(cif, fmt="cif")


def dataset_from_frame(
    rows: pd.DataFrame,
    targets: Sequence[str],
    cutoff: float = 6.0,
    max_neighbors: int | None = None,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Graphs and targets for CDVAE-style rows (``material_id``, ``cif``, targets).

    Rows whose CIF does not parse, whose structure has an isolated atom, or whose targets
    are missing or not finite are skipped, logged and listed in ``Dataset.skipped``.
    """
    missing = [t for t in targets if t not in rows.columns]
    if missing:
        raise ValueError(f"target column(s) {missing} not in the data (columns: {list(rows.columns)})")
    ids = rows["material_id"].astype(str).to_numpy()
    values = rows[list(targets)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(values).all(axis=1)
    skipped = [(ids[i], f"non-finite target(s) {values[i].tolist()}") for i in np.flatnonzero(~finite)]
    rows, ids, values = rows[finite], ids[finite], values[finite]
    cifs = rows["cif"].astype(str).tolist()
    cache = GraphCache(cache_dir or default_cache_dir(), cutoff, max_neighbors)
    graphs, kept, failed = build_graphs(
        ids, [content_key(c) for c in cifs],
        lambda i: structure_to_graph(_parse_cif(cifs[i]), cutoff, max_neighbors), cache,
    )
    skipped += failed
    report_skipped(skipped, len(finite), "rows")
    if graphs is None:
        raise ValueError(f"no usable rows: all {len(finite)} were skipped (first: {skipped[0] if skipped else None})")
    return Dataset(ids[kept], graphs, values[kept], tuple(targets), tuple(skipped))


def load_csv(
    paths: str | Path | Sequence[str | Path],
    targets: Sequence[str] = ("formation_energy_per_atom",),
    **graph_kwargs,
) -> Dataset:
    """Dataset from CDVAE-format CSV file(s); see ``dataset_from_frame`` for options."""
    return dataset_from_frame(read_cdvae_csv(paths), targets, **graph_kwargs)


def mp20_lite_paths(data_dir: str | Path | None = None) -> list[Path]:
    """The mp20-lite source files in sorted path order; raises if the data is absent."""
    root = Path(data_dir) if data_dir else shared_data_dir()
    paths = sorted(root.glob(MP20_LITE_GLOB)) if root else []
    if not paths:
        raise FileNotFoundError(
            f"mp20-lite needs {MP20_LITE_GLOB} under the shared data folder ({root}); set MATJAX_DATA"
        )
    return paths


def mp20_lite(
    targets: Sequence[str] = ("formation_energy_per_atom", "band_gap"),
    data_dir: str | Path | None = None,
    **graph_kwargs,
) -> dict[str, Dataset]:
    """The mp20-lite reference split: all MP-20 subset rows (duplicate ids dropped, first
    kept), split by hashed id into train (12595) / val (1600) / test (1491)."""
    return split_dataset(load_csv(mp20_lite_paths(data_dir), targets, **graph_kwargs))
