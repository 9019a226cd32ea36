"""On-disk cache of crystal graphs, keyed by structure content and graph parameters.

Layout: ``<root>/graphs-v<FORMAT>-c<cutoff>-k<max_neighbors>/<shard>.npz``. The directory
name carries the graph parameters (and the format version, bumped whenever graph
construction changes), and each shard holds PackedGraphs plus one content key per graph:
the sha256 of the structure's source text (a CIF) or of its arrays. A changed structure
gets a new key, so a stale graph is never served for it.

Each shard stores a CRC-32 of all its arrays. A shard that fails to read or to verify is
reported with a warning, deleted and its graphs rebuilt; it is never used. Shards are
written to a temporary file and renamed, so a killed run leaves no half-written shard.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from matjax.data.graphs import PackedGraphs, concat, take

FORMAT_VERSION = 1
KEY_DTYPE = "S32"


def default_cache_dir() -> Path:
    """``$MATJAX_CACHE`` or ``~/.cache/matjax``."""
    return Path(os.environ.get("MATJAX_CACHE", Path.home() / ".cache" / "matjax"))


def cached_frame(path: Path, make: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """Table at ``path`` (CSV, gzip by suffix) if present; else ``make()``, saved atomically."""
    if path.exists():
        return pd.read_csv(path)
    frame = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    frame.to_csv(tmp, index=False, compression="gzip" if path.suffix == ".gz" else None)
    os.replace(tmp, path)
    return frame


def content_key(content: str | bytes | tuple[np.ndarray, ...]) -> bytes:
    """32-hex-character content hash of a CIF text or of (species, frac, lattice) arrays."""
    h = hashlib.sha256()
    if isinstance(content, str):
        content = content.encode()
    if isinstance(content, bytes):
        h.update(content)
    else:
        for a in content:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:32].encode()


def _checksum(keys: np.ndarray, packed: PackedGraphs) -> int:
    crc = zlib.crc32(np.ascontiguousarray(keys).tobytes())
    for a in packed.arrays().values():
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    return crc


def _check_consistent(packed: PackedGraphs) -> None:
    n, e = packed.n_node.sum(), packed.n_edge.sum()
    if len(packed.species) != n or len(packed.frac) != n or len(packed.senders) != e or len(packed.shifts) != e:
        raise ValueError("graph arrays disagree with the node/edge counts")


class GraphCache:
    """Graphs for one (cutoff, max_neighbors) setting under ``root``."""

    def __init__(self, root: str | Path, cutoff: float, max_neighbors: int | None):
        tag = f"graphs-v{FORMAT_VERSION}-c{cutoff:g}-k{max_neighbors if max_neighbors else 'all'}"
        self.dir = Path(root) / tag

    def load(self, keys) -> tuple[PackedGraphs | None, np.ndarray]:
        """Cached graphs for ``keys``.

        Returns (graphs, found): found is a [len(keys)] bool mask, and graphs holds the
        found ones in key order (None if none was found).
        """
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        found = np.zeros(len(keys), dtype=bool)
        parts, positions = [], []
        for path in sorted(self.dir.glob("*.npz")) if self.dir.exists() else []:
            try:
                with np.load(path) as shard:
                    shard_keys = shard["keys"]
                    hit = ~found & np.isin(keys, shard_keys)
                    if not hit.any():
                        continue
                    packed = PackedGraphs(**{name: shard[name] for name in PackedGraphs.fields()})
                    if int(shard["checksum"]) != _checksum(shard_keys, packed):
                        raise ValueError("checksum mismatch")
                    _check_consistent(packed)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                warnings.warn(f"corrupt graph cache shard {path} ({err}); deleting it, its graphs will be rebuilt")
                path.unlink(missing_ok=True)
                continue
            sorter = np.argsort(shard_keys)
            rows = sorter[np.searchsorted(shard_keys, keys[hit], sorter=sorter)]
            parts.append(take(packed, rows))
            positions.append(np.flatnonzero(hit))
            found |= hit
        if not parts:
            return None, found
        return take(concat(parts), np.argsort(np.concatenate(positions))), found

    def save(self, keys, packed: PackedGraphs) -> Path | None:
        """Store graphs under their content keys as a new shard; returns its path."""
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        if len(keys) != len(packed):
            raise ValueError(f"{len(keys)} keys for {len(packed)} graphs")
        if len(keys) == 0:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{hashlib.sha256(keys.tobytes()).hexdigest()[:16]}.npz"
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # not *.npz: never loaded
        with open(tmp, "wb") as f:
            np.savez(f, keys=keys, checksum=np.uint32(_checksum(keys, packed)), **packed.arrays())
        os.replace(tmp, path)
        return path
