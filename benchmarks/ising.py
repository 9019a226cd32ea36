"""Spin-flip throughput of the Ising samplers against a seed-style numpy Metropolis loop.

    python benchmarks/ising.py [--quick]

One JSON line per figure: metric "flips_per_ns" (spin-flip attempts per ns, all chains) for the
checkerboard and multispin samplers at L in {32, 128, 1024}, with many chains, and of the
baseline measured in the same run; ``ratio`` = sampler / baseline. The chains are split over
the CPU cores as XLA host devices (one thread per device). Warm-up and compilation are timed
separately; ``value`` uses the median of the repeats, ``min_s`` / ``median_s`` are per call.
"""

from __future__ import annotations

import os

_CORES = os.cpu_count() or 1
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_CORES}")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from common import emit, median_seconds  # noqa: E402
from matjax.physics import ising  # noqa: E402


def seed_metropolis(config: np.ndarray, beta: float, n_attempts: int) -> np.ndarray:
    """The single-spin Metropolis of the seed notebook: random site, numpy scalars, one at a time."""
    N = config.shape[0]
    for _ in range(n_attempts):
        a = np.random.randint(0, N)
        b = np.random.randint(0, N)
        s = config[a, b]
        nb = config[(a + 1) % N, b] + config[a, (b + 1) % N] + config[(a - 1) % N, b] + config[a, (b - 1) % N]
        cost = 2 * s * nb
        if cost < 0:
            s *= -1
        elif np.random.rand() < np.exp(-cost * beta):
            s *= -1
        config[a, b] = s
    return config


def time_baseline(L: int, n_attempts: int, repeats: int) -> dict:
    config = np.where(np.random.default_rng(0).random((L, L)) < 0.5, 1, -1)
    median, best = median_seconds(lambda: seed_metropolis(config, 1 / ising.T_C, n_attempts), repeats)
    return {"median_s": median, "min_s": best, "flips": n_attempts}


def time_sampler(algorithm: str, L: int, chains: int, sweeps: int, repeats: int) -> dict:
    init_fn, sweep_fn = ising.create_sampler(algorithm, L)
    devices = jax.devices()
    state = ising.init_chains(init_fn, jax.random.key(0), np.full(chains, ising.T_C, np.float32), 1)
    state = jax.tree.map(lambda x: x[:, 0], state)  # [chains]: one batch axis, split over devices
    shard = NamedSharding(Mesh(np.array(devices), ("chains",)), PartitionSpec("chains"))
    state = jax.device_put(state, shard)
    step = jax.jit(lambda s: sweep_fn(s, sweeps), in_shardings=(shard,), out_shardings=shard)
    start = time.perf_counter()
    compiled = step.lower(state).compile()
    compile_s = time.perf_counter() - start
    state = jax.block_until_ready(compiled(state))  # warm-up
    median, best = median_seconds(lambda: jax.block_until_ready(compiled(state)), repeats)
    replicas = 32 if algorithm == "multispin" else 1
    return {"median_s": median, "min_s": best, "compile_s": compile_s, "flips": L * L * chains * replicas * sweeps, "chains": chains * replicas}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="checkerboard only, fewer repeats; under 60 s on a 2-core CPU")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    n_dev = len(jax.devices())
    # total spins per sweep ~4M (plain) / ~8-32M (multispin) per size: many chains on small lattices
    cases = {32: (4096, 128), 128: (256, 16), 1024: (4, 2)}
    rows = []
    for L, (chains, packed) in cases.items():
        base = time_baseline(L, 20_000 if args.quick else 100_000, repeats)
        base_rate = base["flips"] / base["median_s"] / 1e9
        emit("ising", "flips_per_ns", base_rate, "flips/ns", impl="numpy_seed_loop", L=L, **base)
        impls = (("checkerboard", "metropolis", chains), ("multispin", "multispin", packed))
        if args.quick:  # the multispin sampler alone compiles for ~15 s per size
            impls = impls[:1]
        for impl, algorithm, n in impls:
            n = max(n, n_dev) // n_dev * n_dev
            res = time_sampler(algorithm, L, n, 10 if L < 1024 else 4, repeats)
            rate = res["flips"] / res["median_s"] / 1e9
            rows.append((impl, L, res["chains"], rate, rate / base_rate, res["compile_s"]))
            emit("ising", "flips_per_ns", rate, "flips/ns", base_rate, impl=impl, L=L, xla_devices=n_dev, **res)
    print(f"{'impl':>13} {'L':>5} {'chains':>7} {'flips/ns':>9} {'x baseline':>11} {'compile s':>10}", file=sys.stderr)
    for impl, L, c, rate, ratio, comp in rows:
        print(f"{impl:>13} {L:>5} {c:>7} {rate:>9.3f} {ratio:>11.0f} {comp:>10.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
