"""Ising samplers: exact results, balance, Onsager, key threading, retracing, error analysis."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
from jax.extend.random import threefry_2x32

from matjax.physics import ising, mcstats

ALGORITHMS = ["metropolis", "multispin", "swendsen_wang"]
sampler = functools.lru_cache(ising.create_sampler)  # one sampler per setting: jit caches hit


def all_states(L: int) -> np.ndarray:
    """[2^(L*L), L, L] int8: every configuration of an L x L lattice."""
    idx = np.arange(2 ** (L * L))[:, None] >> np.arange(L * L)
    return (2 * (idx & 1) - 1).astype(np.int8).reshape(-1, L, L)


def energies(s: np.ndarray, J: float, h: float) -> np.ndarray:
    """E / N in float64 of [..., L, L] spins (each bond once: right and down neighbours)."""
    s = s.astype(np.float64)
    bonds = s * (np.roll(s, -1, -1) + np.roll(s, -1, -2))
    return -J * bonds.mean((-2, -1)) - h * s.mean((-2, -1))


def exact_averages(L: int, T: float, J: float = 1.0, h: float = 0.0) -> dict[str, float]:
    """Boltzmann averages of e, |m| and m by enumerating all 2^(L*L) states."""
    s = all_states(L)
    e = energies(s, J, h)
    m = s.mean((1, 2), dtype=np.float64)
    w = np.exp(-(e - e.min()) * L * L / T)
    w /= w.sum()
    return {"e": float(w @ e), "abs_m": float(w @ np.abs(m)), "m": float(w @ m)}


def test_threefry_is_jax_threefry():
    keys = np.random.default_rng(0).integers(0, 2**32, (5, 2), dtype=np.uint32)
    counts = jnp.arange(64, dtype=jnp.uint32)
    for k in keys:
        y0, y1 = ising.threefry2x32(jnp.uint32(k[0]), jnp.uint32(k[1]), counts[:32], counts[32:])
        np.testing.assert_array_equal(np.concatenate([y0, y1]), threefry_2x32(jnp.asarray(k), counts))


def test_exact_constants():
    assert ising.T_C == pytest.approx(2.269185, abs=1e-6)
    assert np.sinh(2.0 / ising.T_C) == pytest.approx(1.0, abs=1e-12)  # Kramers-Wannier self-duality
    m = ising.onsager_magnetization([0.5, 2.0, ising.T_C - 1e-9, 2.5])
    assert m[0] == pytest.approx(1.0, abs=1e-6) and m[1] == pytest.approx(0.911319, abs=1e-6)
    assert m[2] < 0.1 and m[3] == 0.0  # vanishes continuously (beta = 1/8) at T_c


def test_energy_and_magnetization():
    J, h = 0.7, 0.3
    up = jnp.ones((6, 6), jnp.int8)
    assert ising.energy_per_spin(up, J, h) == pytest.approx(-2 * J - h)
    neel = jnp.asarray(np.indices((6, 6)).sum(0) % 2 * 2 - 1, jnp.int8)
    assert ising.energy_per_spin(neel, J, h) == pytest.approx(2 * J)
    s = np.random.default_rng(1).choice([-1, 1], (6, 6))
    bonds = sum(s[i, j] * (s[i, (j + 1) % 6] + s[(i + 1) % 6, j]) for i in range(6) for j in range(6))
    assert ising.energy_per_spin(jnp.asarray(s, jnp.int8), J, h) == pytest.approx((-J * bonds - h * s.sum()) / 36, rel=1e-6)
    assert energies(s, J, h) == pytest.approx((-J * bonds - h * s.sum()) / 36, rel=1e-12)
    assert ising.magnetization(jnp.asarray(s, jnp.int8)) == pytest.approx(s.mean())


@pytest.mark.parametrize("chains_inner", [True, False])
def test_sublattice_neighbours_are_lattice_neighbours(chains_inner):
    L = 8
    site = jnp.arange(2 * L * L).reshape(2, L, L)  # two chains of distinct labels
    layout = ising._Layout(chains_inner, 1)
    quads = ising.to_quads(site, layout)
    np.testing.assert_array_equal(ising.from_quads(quads, layout), site)
    expected = [jnp.roll(site, s, a) for s, a in ((1, -1), (-1, -1), (1, -2), (-1, -2))]
    for i, *nbr in ising._BLACK + ising._WHITE:
        lattice_nbrs = [ising.to_quads(e, layout)[i] for e in expected]
        got = ising._neighbours(quads, layout, *nbr)
        np.testing.assert_array_equal(np.sort(np.stack(got), 0), np.sort(np.stack(lattice_nbrs), 0))


def test_pack_unpack_roundtrip():
    s = ising._random_lattice(jax.random.key(0), (3, 32, 6, 6))
    np.testing.assert_array_equal(ising.unpack_spins(ising.pack_spins(s)), s)


@pytest.mark.parametrize(
    "algorithm, h",
    # the multispin field classes are checked exactly by test_detailed_balance_2x2
    [("metropolis", 0.0), ("metropolis", 0.3), ("multispin", 0.0), ("swendsen_wang", 0.0), ("swendsen_wang", 0.3)],
)
def test_4x4_matches_exact_enumeration(algorithm, h):
    temperatures = [1.8, 2.3, 3.0]
    chains = 2 if algorithm == "multispin" else 64
    series = ising.sample_series(sampler(algorithm, 4, 1.0, h), jax.random.key(1), temperatures, chains, 1000, 2, 200)
    for k, T in enumerate(temperatures):
        exact = exact_averages(4, T, 1.0, h)
        th = mcstats.thermodynamics(series["e"][k], series["m"][k], T, 16)
        assert 0 < th["energy_err"] < 0.01 and 0 < th["abs_m_err"] < 0.01
        assert abs(th["energy"] - exact["e"]) < 4.5 * th["energy_err"], (T, th["energy"], exact["e"])
        assert abs(th["abs_m"] - exact["abs_m"]) < 4.5 * th["abs_m_err"], (T, th["abs_m"], exact["abs_m"])
        if h:  # the field biases m towards h with the exact strength
            m, m_err = mcstats.jackknife(lambda x: x, mcstats.block_means(series["m"][k], th["block"]))
            assert exact["m"] > 0.05 and abs(m - exact["m"]) < 4.5 * m_err, (T, m, exact["m"])


def _exact_half_kernel(beta: float, J: float, h: float, color: int) -> np.ndarray:
    """[16, 16] transition matrix of one Metropolis half-sweep of the 2x2 lattice."""
    states = all_states(2)
    sites = [(0, 0), (1, 1)] if color == 0 else [(0, 1), (1, 0)]
    K = np.zeros((16, 16))
    for a, s in enumerate(states):
        probs = []
        for i, j in sites:  # each neighbour slot of a 2x2 torus holds the same site twice
            dE = 2.0 * s[i, j] * (J * 2 * (s[i, 1 - j] + s[1 - i, j]) + h)
            probs.append(1.0 if dE < 0 else 0.5 if dE == 0 else np.exp(-beta * dE))
        for flips in itertools.product([0, 1], repeat=2):
            t = s.copy()
            p = 1.0
            for (i, j), f, q in zip(sites, flips, probs):
                t[i, j] *= -1 if f else 1
                p *= q if f else 1 - q
            K[a, _state_index(t)] += p
    return K


def _state_index(s: np.ndarray) -> np.ndarray:
    """Index in all_states(2) of [..., 2, 2] configurations."""
    return ((s.reshape(*s.shape[:-2], 4) > 0) << np.arange(4)).sum(-1)


def _empirical_kernel(algorithm: str, T: float, h: float, n: int) -> np.ndarray:
    """[16, 16] one-sweep transition frequencies of the 2x2 lattice from every start state."""
    init_fn, sweep_fn = sampler(algorithm, 2, 1.0, h)
    starts = jnp.asarray(np.repeat(all_states(2), n, axis=0))
    if algorithm == "multispin":
        starts = jnp.broadcast_to(starts[:, None], (len(starts), 32, 2, 2))[::32]
    keys = jax.random.split(jax.random.key(7), len(starts))
    state = jax.vmap(init_fn, (0, None, 0))(keys, T, starts)
    end = np.asarray(jax.jit(sweep_fn)(state).lattice()).reshape(16, -1, 2, 2)
    K = np.stack([np.bincount(_state_index(end[a]), minlength=16) for a in range(16)]).astype(np.float64)
    return K / K.sum(1, keepdims=True)


@pytest.mark.parametrize("h", [0.0, 0.4])
def test_detailed_balance_2x2(h):
    T, J = 2.0, 1.0
    states = all_states(2)
    e = energies(states, J, h) * 4
    pi = np.exp(-e / T) / np.exp(-e / T).sum()
    black, white = (_exact_half_kernel(1 / T, J, h, c) for c in (0, 1))
    for K in (black, white):  # each half-sweep is reversible ...
        flow = pi[:, None] * K
        np.testing.assert_allclose(flow, flow.T, atol=1e-14)
    exact = black @ white  # ... so the sweep leaves pi invariant
    np.testing.assert_allclose(pi @ exact, pi, atol=1e-14)
    n = 4096
    for algorithm in ("metropolis", "multispin"):
        K = _empirical_kernel(algorithm, T, h, n)
        bound = 5 * np.sqrt(exact * (1 - exact) / n) + 1e-9
        assert np.all(np.abs(K - exact) <= bound), algorithm
    K = _empirical_kernel("swendsen_wang", T, h, n)  # no closed form here: check balance itself
    flow = pi[:, None] * K
    np.testing.assert_allclose(flow, flow.T, atol=5 * np.sqrt(pi.max() / n) * pi.max())
    np.testing.assert_allclose(pi @ K, pi, atol=5 * np.sqrt(pi.max() / n) * pi.max())


def test_onsager_magnetization_L64():
    temperatures = [1.5, 1.8, 2.0]
    series = ising.sample_series(sampler("metropolis", 64), jax.random.key(2), temperatures, 8, 200, 2, 200, spins=jnp.ones((64, 64)))
    for k, T in enumerate(temperatures):
        th = mcstats.thermodynamics(series["e"][k], series["m"][k], T, 64 * 64)
        exact = float(ising.onsager_magnetization(T))
        assert th["abs_m_err"] < 1e-3
        assert abs(th["abs_m"] - exact) < 4 * th["abs_m_err"] + 1e-3, (T, th["abs_m"], exact)


def test_batched_sweep_equals_vmap():
    for algorithm in ("metropolis", "multispin"):  # swendsen_wang batches by vmap itself
        init_fn, sweep_fn = sampler(algorithm, 8, 1.0, 0.1)
        state = ising.init_chains(init_fn, jax.random.key(3), [2.0, 2.5], 3)
        batched = jax.jit(lambda s: sweep_fn(s, 3))(state)
        mapped = jax.jit(jax.vmap(jax.vmap(lambda s: sweep_fn(s, 3))))(state)
        np.testing.assert_array_equal(batched.lattice(), mapped.lattice())
        np.testing.assert_array_equal(jax.random.key_data(batched.key), jax.random.key_data(mapped.key))


def test_keys_are_never_reused():
    init_fn, sweep_fn = sampler("metropolis", 8)
    state = ising.init_chains(init_fn, jax.random.key(4), [2.0, 3.0], 16)
    _, keys = ising.run(sweep_fn, state, 50, 1, observe=lambda s: s.key)  # [50, 2, 16]
    before = jnp.concatenate([state.key[None], keys[:-1]])
    subkeys = jax.vmap(jax.vmap(jax.vmap(lambda k: jax.random.split(k)[1])))(before)  # consumed by each sweep
    used = np.concatenate([jax.random.key_data(k).reshape(-1, 2) for k in (state.key, keys, subkeys)])
    assert len(np.unique(used, axis=0)) == len(used)
    # chains at the same temperature with different keys follow different trajectories
    final = ising.run(sweep_fn, state, 1, 5)[0].spins
    assert len(np.unique(np.asarray(final[0]).reshape(16, -1), axis=0)) == 16


def test_run_does_not_retrace():
    init_fn, sweep_fn = ising.create_sampler("metropolis", 8)
    traced = chex.assert_max_traces(sweep_fn, n=1)
    for seed, temps in ((5, [2.0, 2.5]), (6, [1.0, 4.0])):
        state = ising.init_chains(init_fn, jax.random.key(seed), temps, 4)
        ising.run(traced, state, 3, 2)
    chex.clear_trace_counter()


def test_unknown_algorithm_and_odd_size():
    with pytest.raises(ValueError, match="wolff"):
        ising.create_sampler("wolff", 8)
    with pytest.raises(ValueError, match="L=7"):
        ising.checkerboard_metropolis(7)


def test_cluster_labels_are_connected_components():
    L = 8
    rng = np.random.default_rng(8)
    right, down = rng.random((L, L)) < 0.45, rng.random((L, L)) < 0.45
    labels = np.asarray(ising.cluster_labels(jnp.asarray(right), jnp.asarray(down))).reshape(-1)
    idx = np.arange(L * L).reshape(L, L)
    rows = np.concatenate([idx[right], idx[down]])
    cols = np.concatenate([np.roll(idx, -1, 1)[right], np.roll(idx, -1, 0)[down]])
    graph = scipy.sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(L * L, L * L))
    _, comp = scipy.sparse.csgraph.connected_components(graph, directed=False)
    minimum = {c: idx.reshape(-1)[comp == c].min() for c in np.unique(comp)}
    np.testing.assert_array_equal(labels, [minimum[c] for c in comp])


def test_near_tc_binder_crossing_cluster_speedup_and_sampler_agreement():
    """Around T_c: U4(16) - U4(8) changes sign between T = 2.15 and 2.40 (bracketing T_c);
    Swendsen-Wang decorrelates |m| at T_c much faster than Metropolis; all samplers agree."""
    temperatures = [2.15, ising.T_C, 2.40]
    th = {}
    for algorithm, L, chains in (("swendsen_wang", 8, 64), ("swendsen_wang", 16, 64), ("metropolis", 16, 64), ("multispin", 16, 2)):
        s = ising.sample_series(sampler(algorithm, L), jax.random.key(L), temperatures, chains, 600, 1, 300)
        th[algorithm, L] = [mcstats.thermodynamics(s["e"][k], s["m"][k], T, L * L) for k, T in enumerate(temperatures)]
    u8, u16 = th["swendsen_wang", 8], th["swendsen_wang", 16]
    diff = [(b["binder"] - a["binder"]) / np.hypot(a["binder_err"], b["binder_err"]) for a, b in zip(u8, u16)]
    assert diff[0] > 3 and diff[2] < -3, diff
    assert th["metropolis", 16][1]["tau_abs_m"] > 4 * th["swendsen_wang", 16][1]["tau_abs_m"]
    for algorithm in ("metropolis", "multispin"):
        for a, b in zip(th[algorithm, 16], u16):
            for name in ("energy", "abs_m", "binder"):
                assert abs(a[name] - b[name]) < 4.5 * np.hypot(a[name + "_err"], b[name + "_err"]), (algorithm, name)


def test_autocorrelation_time_and_error_of_ar1():
    """AR(1) x_t = rho x_{t-1} + noise: tau_int = (1 + rho) / (2 (1 - rho)), exactly known."""
    rho, n_chains, n = 0.8, 32, 4000
    rng = np.random.default_rng(10)
    x = np.zeros((n_chains, n))
    x[:, 0] = rng.normal(size=n_chains) / np.sqrt(1 - rho**2)
    noise = rng.normal(size=(n_chains, n))
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    tau = (1 + rho) / (2 * (1 - rho))
    assert mcstats.integrated_autocorrelation_time(x) == pytest.approx(tau, rel=0.1)
    assert mcstats.integrated_autocorrelation_time(rng.normal(size=(8, 2000))) == pytest.approx(0.5, abs=0.05)
    block = int(10 * tau)
    _, err = mcstats.jackknife(lambda m: m, mcstats.block_means(x, block))
    exact = np.sqrt(2 * tau / (1 - rho**2) / (n_chains * n))  # var(x) = 1 / (1 - rho^2)
    assert err == pytest.approx(exact, rel=0.15)
