"""Monte Carlo samplers for the 2D Ising model on periodic L x L lattices.

    E(s) = -J sum_<ij> s_i s_j - h sum_i s_i,    s_i = +-1,  k_B = 1.

Each sampler is an ``(init_fn, sweep_fn)`` pair over a frozen pytree state (jax-md style)::

    init_fn, sweep_fn = checkerboard_metropolis(L=32, J=1.0, h=0.0)
    state = init_fn(key, temperature)          # hot start; init_fn(key, T, spins) starts from spins
    state = sweep_fn(state)                    # one sweep: one update attempt per spin
    state = sweep_fn(state, 10)                # ten sweeps in one loop (the count may be traced)

``init_fn`` builds one chain; ``jax.vmap`` it over keys and temperatures for a batch
(:func:`init_chains` does exactly that). ``sweep_fn`` accepts one chain or a batch with any
leading shape ``[*batch]`` (temperatures x chains) and is also plain ``jax.vmap``-able; both give
bit-identical results. Called on a whole batch, the plain sampler keeps the chain axes
innermost so that XLA vectorises over chains on small lattices (~5x faster than vmap at L = 32
on CPU).
:func:`run` scans over samples with ``thin`` sweeps between them.

Randomness: the state carries a typed PRNG key per chain; every sweep splits it and uses the
fresh subkey once (with distinct counters for every site and every draw inside the sweep), so no
key is ever reused. The per-site numbers are Threefry-2x32-20 (the hash behind ``jax.random``,
bit-identical to ``jax.extend.random.threefry_2x32``) written with jnp integer ops so that XLA fuses
the hash into the update instead of materialising random arrays. Acceptance compares a uint32
draw with floor(p 2^32), p = exp(-beta dE) in float32 for the few possible dE (so no exp() per
site and no float rounding of the draw). Moves with dE = 0 are accepted with probability 1/2, not 1 (see _acceptance_threshold: it
removes a deterministic 2-cycle that traps sublattice-sweep Metropolis chains).

Samplers
  * :func:`checkerboard_metropolis`: Metropolis on the two sublattices in turn; each half-sweep is
    a product of commuting single-spin kernels, each in detailed balance with exp(-beta E).
  * :func:`multispin_metropolis`: the same dynamics for 32 replicas bit-packed into one uint32
    per site (multispin coding): neighbour comparisons and the Metropolis test are bitwise over
    32 replicas at once.
  * :func:`swendsen_wang`: the Swendsen-Wang cluster update (connected components by hooking and
    pointer jumping), which removes critical slowing down near T_c.

Lattice layout inside a sweep: the L x L lattice is split into four (L/2 x L/2) sublattices by
(row parity, column parity): A = s[0::2, 0::2], B = s[0::2, 1::2], C = s[1::2, 0::2],
D = s[1::2, 1::2]. Black = (A, D), white = (B, C); every neighbour of a black site is white.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

T_C = 2.0 / math.log(1.0 + math.sqrt(2.0))  # Onsager: sinh(2 J / T_c) = 1, in units of J / k_B

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_ALWAYS = np.uint32(0xFFFFFFFF)  # threshold marking moves with dE < 0 (accepted with certainty)
_CALLS_PER_STEP = 4  # Threefry calls unrolled per loop step of the bitwise test (compile time vs speed)
_HALF = np.uint32(1 << 31)  # threshold of dE = 0 moves: accepted with probability exactly 1/2


def critical_temperature(J: float = 1.0) -> float:
    """Exact T_c of the square-lattice ferromagnet, 2 J / ln(1 + sqrt 2) = 2.269185 J."""
    return T_C * J


def onsager_magnetization(temperature, J: float = 1.0):
    """Spontaneous magnetisation (1 - sinh(2J/T)^-4)^(1/8) below T_c, 0 above (Onsager, Yang)."""
    x = 1.0 - np.sinh(2.0 * J / np.asarray(temperature, np.float64)) ** -4.0
    return np.where(x > 0, np.abs(x) ** 0.125, 0.0)


# ----------------------------------------------------------------------------- random numbers


def threefry2x32(k0, k1, x0, x1) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32-20 of counter pairs (x0, x1) under key words (k0, k1); all uint32, broadcast.

    Equal to ``jax.extend.random.threefry_2x32``; written with jnp ops so XLA fuses it.
    """
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for r in range(20):
        rot = _ROTATIONS[r % 8]
        x0 = x0 + x1
        x1 = ((x1 << jnp.uint32(rot)) | (x1 >> jnp.uint32(32 - rot))) ^ x0
        if r % 4 == 3:
            s = r // 4 + 1
            x0 = x0 + ks[s % 3]
            x1 = x1 + ks[(s + 1) % 3] + jnp.uint32(s)
    return x0, x1


class _Counters(NamedTuple):
    """Threefry inputs for one sweep: per-chain key words and per-site counters, broadcastable."""

    k0: jax.Array
    k1: jax.Array
    site: jax.Array


def _counters(subkey: jax.Array, n: int, layout: _Layout) -> _Counters:
    data = jax.random.key_data(subkey)  # [*batch, 2]
    site = jnp.arange(n * n, dtype=jnp.uint32).reshape(n, n)
    return _Counters(layout.per_chain(data[..., 0]), layout.per_chain(data[..., 1]), layout.per_site(site))


def _bits(c: _Counters, stream: int) -> jax.Array:
    """uint32, one fresh draw per site (and chain) for counter stream ``stream``."""
    return threefry2x32(c.k0, c.k1, c.site, jnp.full_like(c.site, stream))[0]


def _threshold(beta, dE: float) -> jax.Array:
    """uint32 floor(exp(-beta dE) 2^32) for dE > 0: a draw u < threshold accepts the move."""
    p = jnp.exp(-beta * jnp.float32(dE))
    return jnp.minimum(p * 4294967296.0, 4294967040.0).astype(jnp.uint32)  # < 2^32 - 1 = _ALWAYS


def _acceptance_threshold(beta, dE: float):
    """Threshold of the single-flip acceptance a(dE): 1 for dE < 0, 1/2 at 0, exp(-beta dE) above.

    a(dE) / a(-dE) = exp(-beta dE), so every single-spin kernel obeys detailed balance. The 1/2
    at dE = 0 (instead of Metropolis' 1) keeps the sublattice sweep ergodic: with certain
    acceptance, a state in which every spin has exactly two unlike neighbours (diagonal
    stripes) is mapped deterministically onto its mirror image and back, forever. That 2-cycle
    was hit by ~1 in 500 hot-started 4x4 chains. Constants are returned as numpy uint32.
    """
    if dE < 0:
        return _ALWAYS
    return _HALF if dE == 0 else _threshold(beta, dE)


def _split_keys(keys: jax.Array, num: int = 2) -> jax.Array:
    """[*batch] typed keys -> [num, *batch] independent subkeys."""
    flat = keys.reshape(-1)
    out = jax.vmap(lambda k: jax.random.split(k, num), out_axes=1)(flat)
    return out.reshape((num,) + keys.shape)


# ----------------------------------------------------------------------------- lattice


def _check_size(L: int) -> None:
    if L < 2 or L % 2:
        raise ValueError(f"Ising lattice size L={L}: need an even L >= 2 (checkerboard sublattices)")


class _Layout(NamedTuple):
    """Axis order of the sublattice arrays inside a sweep (a choice of speed only).

    chains_inner=True: [n, n, *batch], chains innermost; XLA vectorises over chains (plain
    Metropolis: 5x faster than [*batch, n, n] at L = 32 with 1024 chains on CPU).
    chains_inner=False: [*batch, n, n, 1]; what the heavier multispin update compiles best to
    (measured 1.3-2x faster at L = 32..1024, for 1 to 32 chains).
    """

    chains_inner: bool
    n_batch: int

    @property
    def row_axis(self) -> int:
        return 0 if self.chains_inner else -3

    def per_chain(self, x: jax.Array) -> jax.Array:
        """[*batch] -> broadcastable against the sublattice arrays."""
        return x.reshape((1, 1) + x.shape) if self.chains_inner else x.reshape(x.shape + (1, 1, 1))

    def per_site(self, x: jax.Array) -> jax.Array:
        """[n, n] -> broadcastable against the sublattice arrays."""
        return x.reshape(x.shape + (1,) * (self.n_batch if self.chains_inner else 1))


def to_quads(lattice: jax.Array, layout: _Layout) -> tuple[jax.Array, ...]:
    """[*batch, L, L] -> sublattices (A, B, C, D) of size n = L/2 in the given layout."""
    *batch, L, _ = lattice.shape
    n, nb = L // 2, len(batch)
    q = lattice.reshape(*batch, n, 2, n, 2)
    if layout.chains_inner:
        q = q.transpose(nb + 1, nb + 3, nb, nb + 2, *range(nb))  # [2, 2, n, n, *batch]
        return q[0, 0], q[0, 1], q[1, 0], q[1, 1]
    return tuple(q[..., i, :, j, None] for i in (0, 1) for j in (0, 1))


def from_quads(quads: tuple[jax.Array, ...], layout: _Layout) -> jax.Array:
    """Inverse of :func:`to_quads`."""
    A, B, C, D = quads
    if layout.chains_inner:
        n, _, *batch = A.shape
        q = jnp.stack([jnp.stack([A, B]), jnp.stack([C, D])])  # [2, 2, n, n, *batch]
        q = q.transpose(*range(4, 4 + len(batch)), 2, 0, 3, 1)
    else:
        *batch, n, _, _ = A.shape
        q = jnp.stack([jnp.stack([A, B], -1), jnp.stack([C, D], -1)], -4)  # [*batch, n, 2, n, 1, 2]
    return q.reshape(*batch, 2 * n, 2 * n)


# For each quad: (quad, row partner, column shift of the row partner, column partner, its row
# shift); the four neighbours of quad[r, c] are row[r, c], roll(row, dc, 1)[r, c], col[r, c] and
# roll(col, dr, 0)[r, c]. E.g. A[r, c] = s[2r, 2c] has horizontal neighbours B[r, c] = s[2r, 2c+1]
# and B[r, c-1] = s[2r, 2c-1], vertical ones C[r, c] = s[2r+1, 2c] and C[r-1, c] = s[2r-1, 2c].
_BLACK = ((0, 1, 1, 2, 1), (3, 2, -1, 1, -1))  # A from B, C; D from C, B
_WHITE = ((1, 0, -1, 3, 1), (2, 3, 1, 0, -1))  # B from A, D; C from D, A


def _neighbours(quads, layout: _Layout, row: int, dc: int, col: int, dr: int) -> tuple[jax.Array, ...]:
    R, Q = quads[row], quads[col]
    r = layout.row_axis
    return R, jnp.roll(R, dc, axis=r + 1), Q, jnp.roll(Q, dr, axis=r)


def energy_per_spin(spins: jax.Array, J: float = 1.0, h: float = 0.0) -> jax.Array:
    """E / N (float32 [*batch]) of [*batch, L, L] spins; each bond counted once (right, down)."""
    s = spins.astype(jnp.float32)
    bonds = s * (jnp.roll(s, -1, axis=-1) + jnp.roll(s, -1, axis=-2))
    return -J * bonds.mean((-2, -1)) - h * s.mean((-2, -1))


def magnetization(spins: jax.Array) -> jax.Array:
    """Signed m = sum s / N (float32 [*batch]) of [*batch, L, L] spins."""
    return spins.astype(jnp.float32).mean((-2, -1))


def _move_classes(J: float, h: float) -> list[tuple[int, int, float]]:
    """All single-flip moves as (x, s, dE): x = s * (sum of the 4 neighbours), s the old spin.

    dE = 2 J x + 2 h s. With h = 0 the old spin does not matter and s is reported as 0. The
    temperature enters later, through the acceptance thresholds.
    """
    spins = (0,) if h == 0 else (-1, 1)
    return [(x, s, 2.0 * (J * x + h * s)) for x in (-4, -2, 0, 2, 4) for s in spins]


# ----------------------------------------------------------------------------- states


@struct.dataclass
class IsingState:
    """Chains of int8 spins.

    spins: [*batch, L, L] int8 (+-1); key: [*batch] typed PRNG keys (split every sweep);
    beta: [*batch] float32 inverse temperatures. J, h: static coupling and field of the sampler.
    """

    spins: jax.Array
    key: jax.Array
    beta: jax.Array
    J: float = struct.field(pytree_node=False, default=1.0)
    h: float = struct.field(pytree_node=False, default=0.0)

    def lattice(self) -> jax.Array:
        """[*batch, L, L] int8 spins."""
        return self.spins


@struct.dataclass
class PackedIsingState:
    """32 replicas per chain, bit-packed: bit r of words[..., i, j] is replica r's spin (1 = up).

    words: [*batch, L, L] uint32; key: [*batch]; beta: [*batch] float32; J, h static.
    """

    words: jax.Array
    key: jax.Array
    beta: jax.Array
    J: float = struct.field(pytree_node=False, default=1.0)
    h: float = struct.field(pytree_node=False, default=0.0)

    def lattice(self) -> jax.Array:
        """[*batch, 32, L, L] int8 spins of the 32 replicas."""
        return unpack_spins(self.words)


def pack_spins(spins: jax.Array) -> jax.Array:
    """[*batch, 32, L, L] +-1 spins -> [*batch, L, L] uint32 words (replica r in bit r)."""
    up = (jnp.asarray(spins) > 0).astype(jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32).reshape(32, 1, 1)
    return (up << shifts).sum(axis=-3, dtype=jnp.uint32)  # distinct bits: sum == bitwise or


def unpack_spins(words: jax.Array) -> jax.Array:
    """[*batch, L, L] uint32 -> [*batch, 32, L, L] int8 (+-1)."""
    shifts = jnp.arange(32, dtype=jnp.uint32).reshape(32, 1, 1)
    bits = (words[..., None, :, :] >> shifts) & jnp.uint32(1)
    return (2 * bits.astype(jnp.int8) - 1).astype(jnp.int8)


def measure(state) -> dict[str, jax.Array]:
    """Per-sample observables {"e": E/N, "m": signed M/N}, float32 [*batch] (or [*batch, 32])."""
    spins = state.lattice()
    return {"e": energy_per_spin(spins, state.J, state.h), "m": magnetization(spins)}


def _random_lattice(key, shape) -> jax.Array:
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1, -1).astype(jnp.int8)


def _make_init(L: int, J: float, h: float, packed: bool = False) -> Callable:
    _check_size(L)

    def init_fn(key: jax.Array, temperature, spins=None):
        """One chain at ``temperature``: hot start, or from ``spins`` ([L, L] or [32, L, L])."""
        key, sub = jax.random.split(key)
        beta = 1.0 / jnp.asarray(temperature, jnp.float32)
        if packed:
            spins = _random_lattice(sub, (32, L, L)) if spins is None else jnp.broadcast_to(spins, (32, L, L))
            return PackedIsingState(words=pack_spins(spins), key=key, beta=beta, J=J, h=h)
        spins = _random_lattice(sub, (L, L)) if spins is None else jnp.asarray(spins, jnp.int8).reshape(L, L)
        return IsingState(spins=spins, key=key, beta=beta, J=J, h=h)

    return init_fn


@functools.partial(jax.jit, static_argnums=(0, 3))
def init_chains(init_fn: Callable, key: jax.Array, temperatures, n_chains: int, spins=None):
    """A [n_T, n_chains] batch of chains (independent keys) at the given temperatures [n_T]."""
    temperatures = jnp.asarray(temperatures, jnp.float32)
    keys = jax.random.split(key, temperatures.shape[0] * n_chains).reshape(-1, n_chains)
    one_t = jax.vmap(init_fn, in_axes=(0, None, None))
    return jax.vmap(one_t, in_axes=(0, 0, None))(keys, temperatures, spins)


# ----------------------------------------------------------------------------- checkerboard


def _checkerboard_sweeps(update: Callable, lattice, key, beta, n_sweeps: int, chains_inner: bool):
    """n_sweeps checkerboard sweeps of [*batch, L, L] spins (or words); returns (lattice, key).

    update(quad, neighbours, counters, stream, beta) -> new quad. The two halves run as two
    iterations of a loop: that boundary keeps XLA from re-computing the first half (and its
    random numbers) inside each consumer of the second.
    """
    layout = _Layout(chains_inner, beta.ndim)
    n = lattice.shape[-1] // 2
    beta = layout.per_chain(beta)

    def half(color, quads, counters):
        quads = list(quads)
        for k, (i, *nbr) in enumerate(_BLACK if color == 0 else _WHITE):
            quads[i] = update(quads[i], _neighbours(quads, layout, *nbr), counters, 2 * color + k, beta)
        return tuple(quads)

    def sweep(_, carry):
        quads, key = carry
        key, sub = _split_keys(key)
        counters = _counters(sub, n, layout)
        quads = jax.lax.fori_loop(
            0, 2, lambda c, q: jax.lax.cond(c == 0, lambda q: half(0, q, counters), lambda q: half(1, q, counters), q), quads
        )
        return quads, key

    quads, key = jax.lax.fori_loop(0, n_sweeps, sweep, (to_quads(lattice, layout), key))
    return from_quads(quads, layout), key


def _metropolis_update(J: float, h: float) -> Callable:
    classes = [(x, s, dE) for x, s, dE in _move_classes(J, h) if dE >= 0]

    def update(spins, neighbours, counters, stream, beta):
        """int8 spins: flip where dE < 0 or u < threshold(dE) (see _acceptance_threshold)."""
        x = spins * sum(neighbours[1:], neighbours[0])
        threshold = jnp.full(spins.shape, _ALWAYS)
        for xv, sv, dE in classes:
            member = (x == xv) if sv == 0 else (x == xv) & (spins == sv)
            threshold = jnp.where(member, _acceptance_threshold(beta, dE), threshold)
        u = _bits(counters, stream)
        flip = (threshold == _ALWAYS) | (u < threshold)
        return jnp.where(flip, -spins, spins)

    return update


def checkerboard_metropolis(L: int, J: float = 1.0, h: float = 0.0) -> tuple[Callable, Callable]:
    """Checkerboard Metropolis for L x L chains (L even): returns (init_fn, sweep_fn).

    A sweep updates all black sites given the white ones, then all white sites given the new
    black ones. ``sweep_fn(state, n_sweeps=1)`` takes any batch shape (see module docstring).
    """
    init_fn = _make_init(L, J, h)
    update = _metropolis_update(J, h)

    def sweep_fn(state: IsingState, n_sweeps: int = 1) -> IsingState:
        spins, key = _checkerboard_sweeps(update, state.spins, state.key, state.beta, n_sweeps, True)
        return state.replace(spins=spins, key=key)

    return init_fn, sweep_fn


# ----------------------------------------------------------------------------- multispin coding


def _count_anti(spins, neighbours) -> tuple[jax.Array, ...]:
    """Bit-sliced count n in 0..4 of anti-aligned neighbours: masks (n == 0, ..., n == 4)."""
    a = [spins ^ nb for nb in neighbours]
    s01, c01 = a[0] ^ a[1], a[0] & a[1]
    s23, c23 = a[2] ^ a[3], a[2] & a[3]
    b0, carry = s01 ^ s23, s01 & s23
    b1 = c01 ^ c23 ^ carry
    b2 = c01 & c23  # n = 4 needs all four anti-aligned
    return (~(b0 | b1 | b2), b0 & ~b1 & ~b2, ~b0 & b1, b0 & b1, b2)


def _multispin_update(J: float, h: float) -> Callable:
    """Bitwise Metropolis on uint32 words (32 replicas); exact Bernoulli tests, 32 bits deep.

    The test u < P for a 32-bit uniform u and threshold P is done bit-serially from the most
    significant bit, for 32 replicas at a time: at level i a replica is accepted if u_i < P_i,
    rejected if u_i > P_i and stays undecided if they are equal. Each level consumes one random
    word (one bit per replica), so a word of 32 spins costs 32 random words, like 32 scalar draws.
    """
    classes = _move_classes(J, h)

    def update(words, neighbours, counters, stream, beta):
        count = _count_anti(words, neighbours)
        accept = jnp.zeros_like(words)
        pending = []  # (mask, threshold) of the random moves, dE >= 0
        for x, s, dE in classes:
            mask = count[(4 - x) // 2]  # x = 4 - 2 n
            if s != 0:
                mask = mask & (words if s > 0 else ~words)
            threshold = _acceptance_threshold(beta, dE)
            if dE < 0:
                accept = accept | mask
            else:
                pending.append((mask, threshold))
        undecided = functools.reduce(jnp.bitwise_or, (m for m, _ in pending), jnp.zeros_like(words))
        thresholds = [(m, jnp.asarray(t, jnp.uint32)) for m, t in pending]

        def levels(j, carry):  # _CALLS_PER_STEP Threefry calls = twice as many bit levels
            accept, undecided = carry
            for t in range(_CALLS_PER_STEP):
                call = (j * _CALLS_PER_STEP + t).astype(jnp.uint32)
                draws = threefry2x32(counters.k0, counters.k1, counters.site, jnp.full_like(counters.site, 16 * stream) + call)
                for k, u in enumerate(draws):
                    bit = jnp.uint32(31 - k) - 2 * call  # level 2 call + k, most significant first
                    p_bit = jnp.zeros_like(words)
                    for mask, threshold in thresholds:
                        p_bit = p_bit | (mask & (jnp.uint32(0) - ((threshold >> bit) & jnp.uint32(1))))
                    accept = accept | (undecided & p_bit & ~u)
                    undecided = undecided & ~(p_bit ^ u)
            return accept, undecided

        accept, _ = jax.lax.fori_loop(0, 16 // _CALLS_PER_STEP, levels, (accept, undecided))
        return words ^ accept

    return update


def multispin_metropolis(L: int, J: float = 1.0, h: float = 0.0) -> tuple[Callable, Callable]:
    """Multispin-coded checkerboard Metropolis: 32 replicas per chain in uint32 bit planes.

    Same Markov chain per replica as :func:`checkerboard_metropolis` (same acceptance
    probabilities, exact to 2^-32); states are :class:`PackedIsingState`.
    """
    init_fn = _make_init(L, J, h, packed=True)
    update = _multispin_update(J, h)

    def sweep_fn(state: PackedIsingState, n_sweeps: int = 1) -> PackedIsingState:
        words, key = _checkerboard_sweeps(update, state.words, state.key, state.beta, n_sweeps, False)
        return state.replace(words=words, key=key)

    return init_fn, sweep_fn


# ----------------------------------------------------------------------------- Swendsen-Wang


def cluster_labels(bond_right: jax.Array, bond_down: jax.Array) -> jax.Array:
    """Connected components of an L x L periodic lattice with open bonds (hook and compress).

    bond_right[i, j] joins (i, j)-(i, j+1), bond_down[i, j] joins (i, j)-(i+1, j) (bool [L, L]).
    Returns int32 [L, L]: every site labelled by the smallest flat index in its cluster.

    Labels always point to a site of the same cluster with a smaller or equal index. Each round
    (i) takes the smallest label among bonded neighbours, (ii) hooks the root of every site onto
    it (scatter-min), (iii) compresses paths by pointer jumping (label <- label[label]) until
    every label is a root. Rounds repeat until nothing changes; hooking whole trees at once
    needs O(log N) rounds where plain label propagation needs O(cluster diameter) (60 vs 7 at
    L = 64, T_c).
    """
    L = bond_right.shape[0]
    bonds = ((bond_right, -1, 1), (jnp.roll(bond_right, 1, axis=1), 1, 1), (bond_down, -1, 0), (jnp.roll(bond_down, 1, axis=0), 1, 0))

    def compress(labels):
        def jump(carry):
            labels, _ = carry
            up = labels.at[labels].get(mode="promise_in_bounds")
            return up, jnp.any(up != labels)

        return jax.lax.while_loop(lambda c: c[1], jump, (labels, jnp.array(True)))[0]

    def step(carry):
        labels, _ = carry  # [N], all roots
        grid = labels.reshape(L, L)
        smallest = grid
        for bond, shift, axis in bonds:
            smallest = jnp.where(bond, jnp.minimum(smallest, jnp.roll(grid, shift, axis=axis)), smallest)
        smallest = smallest.reshape(-1)
        new = compress(jnp.minimum(labels.at[labels].min(smallest, mode="promise_in_bounds"), smallest))
        return new, jnp.any(new != labels)

    labels = jnp.arange(L * L, dtype=jnp.int32)
    return jax.lax.while_loop(lambda c: c[1], step, (labels, jnp.array(True)))[0].reshape(L, L)


def _swendsen_wang_chain(spins, key, beta, J: float, h: float):
    """One SW update of one chain: spins [L, L] int8, key [], beta [] -> (spins, key)."""
    L = spins.shape[0]
    key, sub = jax.random.split(key)
    counters = _counters(sub, L, _Layout(True, 0))  # one counter per site of the full lattice
    p_bond = _threshold(beta, 2.0 * abs(J))  # u < floor(e^{-2 beta |J|} 2^32): bond stays closed
    s = spins.astype(jnp.int32)
    bonds = []
    for stream, axis in ((0, 1), (1, 0)):
        satisfied = J * s * jnp.roll(s, -1, axis=axis) > 0
        bonds.append(satisfied & (_bits(counters, stream) >= p_bond))
    labels = cluster_labels(*bonds)
    # Field: a cluster of magnetisation M flips by heat bath, P = 1 / (1 + exp(2 beta h M)).
    cluster_m = jax.ops.segment_sum(s.reshape(-1), labels.reshape(-1), num_segments=L * L)
    p_flip = jax.nn.sigmoid(-2.0 * beta * h * cluster_m.astype(jnp.float32))
    u = (_bits(counters, 2) >> 8).astype(jnp.float32).reshape(-1) * (1.0 / (1 << 24))
    flip = (u < p_flip)[labels]
    return jnp.where(flip, -spins, spins), key


def swendsen_wang(L: int, J: float = 1.0, h: float = 0.0) -> tuple[Callable, Callable]:
    """Swendsen-Wang cluster sampler (Swendsen & Wang, PRL 58, 86, 1987): (init_fn, sweep_fn).

    Bonds between satisfied neighbours (J s_i s_j > 0) open with p = 1 - exp(-2 beta |J|); each
    cluster is then flipped by a heat-bath choice in the field h (probability 1/2 at h = 0).
    """
    init_fn = _make_init(L, J, h)

    def chain(spins, key, beta, n_sweeps):
        return jax.lax.fori_loop(0, n_sweeps, lambda _, c: _swendsen_wang_chain(*c, beta, J, h), (spins, key))

    def sweep_fn(state: IsingState, n_sweeps: int = 1) -> IsingState:
        batch = state.beta.shape
        flat = jax.vmap(chain, in_axes=(0, 0, 0, None))
        spins, key = flat(state.spins.reshape(-1, L, L), state.key.reshape(-1), state.beta.reshape(-1), n_sweeps)
        return state.replace(spins=spins.reshape(*batch, L, L), key=key.reshape(batch))

    return init_fn, sweep_fn


# ----------------------------------------------------------------------------- driver


def create_sampler(algorithm: str, L: int, J: float = 1.0, h: float = 0.0) -> tuple[Callable, Callable]:
    """(init_fn, sweep_fn) by name: "metropolis", "multispin" or "swendsen_wang"."""
    factories = {"metropolis": checkerboard_metropolis, "multispin": multispin_metropolis, "swendsen_wang": swendsen_wang}
    if algorithm not in factories:
        raise ValueError(f"unknown Ising algorithm {algorithm!r}; choose one of {sorted(factories)}")
    return factories[algorithm](L, J, h)


def run(sweep_fn: Callable, state, n_samples: int, thin: int = 1, observe: Callable = measure, burn_in: int = 0):
    """Discard ``burn_in`` sweeps, then take n_samples samples ``thin`` sweeps apart.

    lax.scan over samples, a fori loop over the sweeps in between. Returns (final state,
    observe(state) stacked on a leading [n_samples] axis). ``thin`` and ``burn_in`` are traced
    (the burn-in rides on the first scan step), so changing them never recompiles, and the
    sweep is compiled once per call signature.
    """
    return _run(sweep_fn, state, n_samples, thin, observe, burn_in)


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _run(sweep_fn, state, n_samples, thin, observe, burn_in):
    def step(state, i):
        state = sweep_fn(state, thin + jnp.where(i == 0, burn_in, 0))
        return state, observe(state)

    return jax.lax.scan(step, state, jnp.arange(n_samples))


def sample_series(
    sampler: tuple[Callable, Callable],
    key: jax.Array,
    temperatures,
    n_chains: int,
    n_samples: int,
    thin: int = 1,
    burn_in: int = 0,
    spins=None,
) -> dict[str, np.ndarray]:
    """Equilibrium time series of e = E/N and signed m at each temperature.

    Runs ``n_chains`` chains per temperature (hot start, or from ``spins``), discards ``burn_in``
    sweeps, then records ``n_samples`` samples ``thin`` sweeps apart. Returns numpy arrays
    {"e", "m"}: [n_T, n_series, n_samples], where n_series = n_chains (x 32 for multispin).
    """
    init_fn, sweep_fn = sampler
    state = init_chains(init_fn, key, np.asarray(temperatures, np.float32), n_chains, spins)
    _, obs = run(sweep_fn, state, n_samples, thin, burn_in=burn_in)
    n_t = state.beta.shape[0]
    return {k: np.moveaxis(np.asarray(v), 0, -1).reshape(n_t, -1, n_samples) for k, v in obs.items()}


def _lattice(state) -> jax.Array:
    return state.lattice()


def equilibrium_configurations(
    sampler: tuple[Callable, Callable],
    key: jax.Array,
    temperatures,
    n_configs: int,
    n_chains: int,
    pilot_sweeps: int = 400,
    burn_in_factor: float = 20.0,
    thin_factor: float = 2.0,
) -> tuple[np.ndarray, dict]:
    """Thermalised, decorrelated configurations [n_T, n_configs, L, L] int8 and how they were made.

    (With the multispin sampler every chain carries 32 replicas: 32 x n_configs per T.)

    Burn-in and thinning come from measured autocorrelation times: a pilot run of
    ``pilot_sweeps`` sweeps per chain, whose first half is discarded, gives tau_int of e and |m|
    at every temperature (in sweeps). With tau = the largest of them, the chains then run
    burn_in = ceil(burn_in_factor * tau) more sweeps and record n_configs / n_chains
    configurations per chain, thin = ceil(thin_factor * tau) sweeps apart (autocorrelation
    about exp(-thin_factor) between consecutive snapshots of a chain). A pilot shorter than
    25 tau is doubled (up to 8x) and measured again; if even that is too short, info["warning"]
    says so and the last estimate is used.
    """
    from matjax.physics import mcstats  # host-side analysis; keeps ising.py import-light

    init_fn, sweep_fn = sampler
    if n_configs % n_chains:
        raise ValueError(f"n_configs={n_configs} is not a multiple of n_chains={n_chains}")
    temperatures = np.asarray(temperatures, np.float32)
    state = init_chains(init_fn, key, temperatures, n_chains, None)
    length, total, info = pilot_sweeps, 0, {}
    while True:
        state, obs = run(sweep_fn, state, length, 1)
        total += length
        series = {k: np.moveaxis(np.asarray(v)[length // 2 :], 0, -1) for k, v in obs.items()}  # [n_T, chains, t]
        taus = np.array([[mcstats.integrated_autocorrelation_time(x[i]) for x in (series["e"], np.abs(series["m"]))] for i in range(len(temperatures))])
        tau = float(taus.max())
        if tau <= length / 25:
            break
        if length >= 8 * pilot_sweeps:
            info["warning"] = f"tau_int = {tau:.1f} sweeps from a pilot of only {length} sweeps"
            break
        length *= 2
    burn_in, thin = math.ceil(burn_in_factor * tau), math.ceil(thin_factor * tau)
    _, configs = run(sweep_fn, state, n_configs // n_chains, thin, observe=_lattice, burn_in=burn_in)
    configs = np.asarray(configs)  # [samples, n_T, chains, (32,) L, L]
    L = configs.shape[-1]
    configs = np.moveaxis(configs, 0, 2).reshape(len(temperatures), -1, L, L)
    info.update(tau_e=taus[:, 0].tolist(), tau_abs_m=taus[:, 1].tolist(), burn_in=total + burn_in, thin=thin)
    return configs, info
