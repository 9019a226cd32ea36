"""XLA's per-call scratch memory stays mapped after ``import matjax`` (glibc only)."""

import json
import os
import subprocess
import sys

import pytest

CHILD = """
import functools, json, resource, statistics, matjax, jax, jax.numpy as jnp
# A training-step-like gradient whose activations (16384 x 256 float32, 16 MB each) need ~100 MB of scratch.
f = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w.T) ** 2)))
x, w = jnp.linspace(0.0, 1.0, 16384 * 256).reshape(16384, 256), jnp.eye(256) * 0.5
f = functools.partial(f, w)
for _ in range(3):  # compile, and let the heap reach its working size
    f(x).block_until_ready()
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call: even tuned, a call now and then lands on fresh heap and faults its scratch in.
print(json.dumps({"tuned": matjax.MALLOC_TUNED, "faults": statistics.median(faults)}))
"""


def _faults_per_call(**env) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_repeated_calls_reuse_their_scratch_memory_unless_switched_off():
    tuned, system = _faults_per_call(), _faults_per_call(MATJAX_SYSTEM_MALLOC="1")
    if not tuned["tuned"]:
        pytest.skip("mallopt not available (not glibc)")
    pages = 64 * 2**20 // 4096  # 64 MB as 4 KB pages
    assert system["faults"] > pages / 2  # the system default maps the scratch in again on every call
    assert tuned["faults"] < system["faults"] / 4
