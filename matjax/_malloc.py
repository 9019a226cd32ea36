"""glibc malloc settings that keep XLA's per-call scratch memory mapped between calls.

XLA:CPU takes every call's temporaries from malloc: 40 MB for a 64-atom force evaluation of
the seed-size model, 124 MB for an aspirin training step of the moment model. glibc serves
blocks that large with mmap (its per-thread arenas stop at 64 MB) and unmaps them on free, so
every call page-faults its whole scratch in again: 10k-30k faults per call, half the time of a
64-atom force evaluation and a third of an aspirin training step (benchmarks/results/md.md).
One arena, no mmap and no trimming keep freed memory in the heap for the next call, at the
price of a resident size that stays at its peak. A thread keeps the arena it first allocated
from, so this must run before XLA starts its threads: at ``import matjax``.
MATJAX_SYSTEM_MALLOC=1 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` with mallopt; False where that is off, not Linux or not glibc."""
    if os.environ.get("MATJAX_SYSTEM_MALLOC") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
