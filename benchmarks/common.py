"""Shared benchmark plumbing: one JSON object per figure, device naming, median timing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
import warnings


def device_name() -> str:
    """Accelerator kind if JAX sees one, else the CPU model and core count."""
    try:
        import jax

        dev = jax.devices()[0]
        if dev.platform != "cpu":
            return f"{dev.platform}: {dev.device_kind}"
    except ImportError:
        pass
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model} ({os.cpu_count()} cores)"


def emit(benchmark: str, metric: str, value: float, unit: str, baseline: float | None = None, **extra) -> dict:
    """Print one result line; ratio = value / baseline where a baseline was measured."""
    record = {
        "benchmark": benchmark, "metric": metric, "value": float(value), "unit": unit, "device": device_name(),
        "baseline": None if baseline is None else float(baseline),
        "ratio": None if not baseline else float(value) / float(baseline), **extra,
    }
    print(json.dumps(record), flush=True)
    return record


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def parse_args(parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Command line with ``--quick``; warnings and library logs are silenced so stdout
    carries only the JSON lines."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="finish in < 60 s")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.ERROR)
    return args
