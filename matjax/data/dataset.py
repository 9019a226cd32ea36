"""``Dataset``: crystal graphs with ids and targets, and a cache-aware builder."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from matjax.data.cache import GraphCache
from matjax.data.graphs import CrystalGraph, PackedGraphs, concat, graph_to_structure, pack, take

log = logging.getLogger("matjax")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """M crystals as graphs with per-crystal targets (host side, numpy).

    ids: [M] str; targets: [M, T] float64 named by target_names;
    skipped: (id, reason) of every input item that was left out, for reports.
    """

    ids: np.ndarray
    graphs: PackedGraphs
    targets: np.ndarray
    target_names: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices) -> "Dataset":
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self, ids=self.ids[indices], graphs=take(self.graphs, indices), targets=self.targets[indices]
        )

    def target(self, name: str) -> np.ndarray:
        """[M] values of one target column."""
        if name not in self.target_names:
            raise KeyError(f"unknown target {name!r}; this dataset has {self.target_names}")
        return self.targets[:, self.target_names.index(name)]

    def structure(self, i: int):
        """pymatgen Structure of crystal i."""
        return graph_to_structure(self.graphs.graph(i))


def report_skipped(skipped: Sequence[tuple[str, str]], total: int, what: str) -> None:
    """Log how many items were skipped and why (the first few by name)."""
    if skipped:
        shown = "; ".join(f"{i}: {why}" for i, why in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("skipped %d of %d %s: %s%s", len(skipped), total, what, shown, more)


def build_graphs(
    ids: Sequence[str],
    keys: Sequence[bytes],
    make_graph: Callable[[int], CrystalGraph],
    cache: GraphCache | None,
    desc: str = "building graphs",
) -> tuple[PackedGraphs | None, np.ndarray, list[tuple[str, str]]]:
    """Graphs for items 0..M-1: from the cache where present, else ``make_graph(i)``.

    A failing item is skipped with its id and reason; the others go on. New graphs are
    saved to the cache. Returns (graphs of the kept items in order, kept mask [M], skipped).
    """
    found_graphs, found = cache.load(keys) if cache is not None else (None, np.zeros(len(ids), dtype=bool))
    built, built_idx, skipped = [], [], []
    for i in tqdm(np.flatnonzero(~found), desc=desc, disable=found.all(), mininterval=1.0):
        try:
            built.append(make_graph(int(i)))
            built_idx.append(int(i))
        except Exception as err:  # one bad item must not stop the batch; it is reported
            skipped.append((str(ids[i]), f"{type(err).__name__}: {err}"))
    parts, positions = [], []
    if found_graphs is not None:
        parts.append(found_graphs)
        positions.append(np.flatnonzero(found))
    if built:
        new = pack(built)
        if cache is not None:
            cache.save([keys[i] for i in built_idx], new)
        parts.append(new)
        positions.append(np.array(built_idx))
    kept = np.zeros(len(ids), dtype=bool)
    if not parts:
        return None, kept, skipped
    order = np.argsort(np.concatenate(positions))
    kept[np.concatenate(positions)] = True
    return take(concat(parts), order), kept, skipped
