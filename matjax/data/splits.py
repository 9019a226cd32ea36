"""Deterministic splits by hashed material id.

bucket = int(sha256(material_id).hexdigest(), 16) % 10; buckets 0-7 train, 8 val, 9 test.
The split of an item depends only on its id, so adding or removing other rows never
moves it, and every matjax benchmark on the same rows uses the same split.
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLIT_BUCKETS = {"train": tuple(range(8)), "val": (8,), "test": (9,)}


def hash_bucket(material_id: str, n_buckets: int = 10) -> int:
    return int(hashlib.sha256(str(material_id).encode()).hexdigest(), 16) % n_buckets


def split_indices(ids) -> dict[str, np.ndarray]:
    """{"train", "val", "test"} -> indices into ``ids``."""
    buckets = np.array([hash_bucket(i) for i in ids], dtype=np.int64)
    return {name: np.flatnonzero(np.isin(buckets, b)) for name, b in SPLIT_BUCKETS.items()}


def split_dataset(dataset) -> dict:
    """{"train", "val", "test"} -> Dataset, by hashed id; raises if a split is empty."""
    splits = {name: dataset.subset(idx) for name, idx in split_indices(dataset.ids).items()}
    empty = [name for name, d in splits.items() if len(d) == 0]
    if empty:
        raise ValueError(f"split(s) {empty} are empty: {len(dataset)} items are too few to split")
    return splits
