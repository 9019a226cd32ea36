"""Machine-learned force fields: one learned energy, forces and stress by autodiff.

Both models map (species, edge vectors) to per-atom energies. Edge ``e`` carries a message
from ``senders[e] = j`` to ``receivers[e] = i`` along ``vectors[e] = r_ij`` (see
``matjax.data.graphs``); the vectors are recomputed from positions, lattice and image
shifts by ``matjax.geometry.periodic.edge_vectors`` so that ``jax.grad`` of the energy
gives forces and stress (``matjax.physics.forces``). Nothing here predicts a force.

Every message is multiplied by a smooth envelope that vanishes with two derivatives at
the cutoff, so the energy and the forces are continuous when an atom crosses it, and an
edge with ``edge_mask = False`` (an unused neighbour-list slot) contributes exactly zero.

Per-atom energy = ``scale * network(i) + reference[Z_i]``. ``reference`` [MAX_Z] (eV per
atom of each element, a least-squares fit on the training set) and ``scale`` (eV) are in
the ``constants`` variable collection: stored with the parameters, never trained.

- ``InvariantMLFF``: the seed's model. Species embedding; interaction blocks whose message
  is SiLU(Dense([h_j, rbf_ij])) times the envelope, summed over neighbours, then a SiLU
  MLP update; a per-atom readout. The dense layer over the concatenation is computed as a
  per-node projection of h plus a per-edge projection of the RBF: the same function with
  about a third of the per-edge work (edges outnumber atoms ~40:1 in a metal).
- ``PaiNN``: scalar and vector features per atom (Schütt et al., ICML 2021), equivariant
  messages along the unit edge vectors, more accurate at the same size.
- ``MomentMLFF``: invariant scalars updated from rank-0/1/2 Cartesian moments of each
  neighbourhood contracted to 2-, 3- and 4-body invariants (as in moment tensor
  potentials and MACE, in 3 x 3 algebra): bond angles resolved in every layer. With
  ``max_l`` 3 or 4, the power spectra of the l = 3 and 4 moments join them: a bcc or fcc
  atom's cubic neighbourhood has no l = 1 or 2 moment, so l = 4 is the first order that
  sees its bond angles without help from the neighbours' layers.
- ``TensorMLFF``: each atom carries 3 x 3 tensors (scalar, antisymmetric and symmetric
  traceless parts) from layer to layer, coupled by matrix products (TensorNet): the most
  accurate here on rMD17 aspirin (test forces 12.3 meV/A after 200 epochs; the moment model
  reached 15.1 after 500).
- ``LinearMomentMLFF``: no network. Each atom's energy is linear in up to 5-body invariants of
  its neighbourhood's moments (``moment_invariants``), as in moment tensor potentials, so it is
  fitted by least squares (``matjax.train.linear``): the recorded Mo model, whose unseen (211)
  surface it extrapolates to where every network over-stabilised it.
"""

from __future__ import annotations

import functools
import itertools
import operator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from matjax.config import MLFFConfig
from matjax.geometry.periodic import edge_vectors, node_graph_index
from matjax.models.layers import gaussian_rbf, gaussian_rbf_slope, polynomial_envelope

MAX_Z = 119


def _edge_geometry(vectors, edge_mask, cfg: MLFFConfig):
    """(distances [...], rbf [..., num_rbf], envelope [...]); masked edges get envelope 0.

    The envelope includes the 1 / avg_neighbors normalisation of the message sums.
    """
    sq = jnp.sum(vectors * vectors, axis=-1)
    # Masked or padding edges can have r = 0; keep sqrt's gradient finite there.
    distances = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    envelope = polynomial_envelope(distances, cfg.cutoff, cfg.envelope_p) / cfg.avg_neighbors
    envelope = jnp.where((sq > 0) & edge_mask, envelope, 0.0)
    return distances, gaussian_rbf(distances, cfg.cutoff, cfg.num_rbf), envelope


def _edge_directions(vectors, edge_mask, cfg: MLFFConfig):
    """(rbf [E, num_rbf], envelope [E], unit vectors [E, 3]) for the equivariant models; edge_mask None = all real."""
    mask = jnp.ones(vectors.shape[:1], bool) if edge_mask is None else edge_mask
    distances, rbf, envelope = _edge_geometry(vectors, mask, cfg)
    return rbf, envelope, vectors / distances[:, None]


class _Constants(nn.Module):
    """Per-element reference energies [MAX_Z] and the energy scale (never trained)."""

    @nn.compact
    def __call__(self, species, atom_out):
        reference = self.variable("constants", "reference", jnp.zeros, (MAX_Z,)).value
        scale = self.variable("constants", "scale", jnp.ones, ()).value
        return scale * atom_out + reference[species]


class _Readout(nn.Module):
    features: int

    @nn.compact
    def __call__(self, h):
        return nn.Dense(1)(nn.silu(nn.Dense(self.features // 2)(h)))[:, 0]


def _in_chunks(x, n_chunks: int, chunk: int):
    """[E, ...] -> [n_chunks, chunk, ...], zero-padded at the end."""
    pad = [(0, n_chunks * chunk - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad).reshape(n_chunks, chunk, *x.shape[1:])


@jax.custom_jvp
def radial_filter(distances, rbf, rbf_slope, kernel, bias):
    """[..., F] rbf @ kernel + bias, as a function of the distances [...].

    rbf [..., R] and rbf_slope [..., R] (its derivative in the distance) must come from
    ``distances`` (``gaussian_rbf`` and ``gaussian_rbf_slope``); kernel [R, F], bias [F].
    """
    return rbf @ kernel + bias


@radial_filter.defjvp
def _radial_filter_jvp(primals, tangents):
    # The distance enters as (rbf_slope @ kernel) * dr: a product in the forward matmul's
    # orientation. Plain autodiff takes the force through rbf's cotangent, [E, F] @ [F, R]
    # with R = 50, which XLA's CPU matmul runs about twice as slowly; the forces come out
    # 15-27% faster this way. rbf's own tangent equals rbf_slope * dr, so it is counted here
    # once, through dr; higher derivatives stay exact because rbf_slope is itself a
    # differentiable function of the distances.
    distances, rbf, rbf_slope, kernel, bias = primals
    d_distances, _, _, d_kernel, d_bias = tangents
    out = rbf @ kernel + bias
    return out, (rbf_slope @ kernel) * d_distances[..., None] + rbf @ d_kernel + d_bias


def message_sum(node, radial, envelope, kernel, bias, senders, receivers):
    """[N, F] sum over edges j -> i of SiLU(node_j + filter(r_ij) + bias) * envelope_ij.

    node: [N, F] per-atom projection; radial: (distances [C, K], rbf [C, K, R], rbf_slope
    [C, K, R]) and envelope / senders / receivers: [C, K], edges in C chunks of K; filter(r)
    = rbf(r) @ kernel (``radial_filter``); kernel: [R, F]; bias: [F].
    The scan bounds the live intermediates to one chunk's [K, F] arrays, and the
    rematerialised body makes the backward pass recompute them instead of storing [E, F]
    arrays (a 4000-atom Cu cell's 270,000 edges in one pass ran 2x slower than in chunks of
    32,768); a single chunk skips the loop (small systems are dominated by the count of XLA ops).
    """

    def body(acc, edges):
        s, r, (d, rb, slope), env = edges
        messages = nn.silu(node[s] + radial_filter(d, rb, slope, kernel, bias)) * env[:, None]
        return acc.at[r].add(messages), None

    zeros = jnp.zeros(node.shape, jnp.result_type(node, radial[1], kernel))
    edges = (senders, receivers, radial, envelope)
    if senders.shape[0] == 1:  # one chunk: no loop (fewer ops, which dominate small systems)
        return jax.checkpoint(body)(zeros, jax.tree.map(lambda x: x[0], edges))[0]
    agg, _ = jax.lax.scan(jax.checkpoint(body), zeros, edges)
    return agg


class Interaction(nn.Module):
    """h_i += MLP(sum_j SiLU(W [h_j, rbf_ij] + b) * u(r_ij) / avg_neighbors)."""

    features: int

    @nn.compact
    def __call__(self, h, radial, envelope, senders, receivers):
        # W [h_j, rbf_ij] = W_h h_j + W_r rbf_ij: project the atoms once, gather per edge.
        node = nn.Dense(self.features, use_bias=False, name="node")(h)
        kernel = self.param("edge_kernel", nn.initializers.lecun_normal(), (radial[1].shape[-1], self.features))
        bias = self.param("edge_bias", nn.initializers.zeros, (self.features,))
        agg = message_sum(node, radial, envelope, kernel, bias, senders, receivers)
        return h + nn.Dense(self.features)(nn.silu(nn.Dense(self.features)(agg)))


class InvariantMLFF(nn.Module):
    """The seed's invariant message-passing energy model.

    __call__(species [N] Z, vectors [E, 3], senders [E], receivers [E], edge_mask [E] or
    None) -> per-atom energies [N] (eV). Edges are processed in chunks of
    ``cfg.edge_chunk`` (a speed setting: the function does not depend on it).
    """

    cfg: MLFFConfig

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask=None):
        cfg = self.cfg
        mask = jnp.ones(vectors.shape[:1], bool) if edge_mask is None else edge_mask
        chunk = max(1, min(cfg.edge_chunk, vectors.shape[0]))
        n_chunks = -(-vectors.shape[0] // chunk)
        vectors, senders, receivers, mask = (
            _in_chunks(x, n_chunks, chunk) for x in (vectors, senders, receivers, mask)
        )
        distances, rbf, envelope = _edge_geometry(vectors, mask, cfg)
        radial = (distances, rbf, gaussian_rbf_slope(distances, rbf, cfg.cutoff, cfg.num_rbf))
        h = nn.Embed(MAX_Z, cfg.features)(species)
        for _ in range(cfg.num_interactions):
            h = Interaction(cfg.features)(h, radial, envelope, senders, receivers)
        return _Constants()(species, _Readout(cfg.features)(h))


class PaiNNMessage(nn.Module):
    """Equivariant message: scalar and vector updates from neighbours (PaiNN eq. 7-8)."""

    features: int

    @nn.compact
    def __call__(self, s, v, rbf, envelope, units, senders, receivers):
        F = self.features
        x = nn.Dense(3 * F)(nn.silu(nn.Dense(F)(s)))
        filt = nn.Dense(3 * F)(rbf) * envelope[:, None]
        ds, dvv, dvs = jnp.split(x[senders] * filt, 3, axis=-1)
        dv = v[senders] * dvv[:, None, :] + dvs[:, None, :] * units[:, :, None]
        n = s.shape[0]
        return s + jax.ops.segment_sum(ds, receivers, n), v + jax.ops.segment_sum(dv, receivers, n)


class PaiNNUpdate(nn.Module):
    """Per-atom mixing of scalar and vector channels (PaiNN eq. 9-11)."""

    features: int

    @nn.compact
    def __call__(self, s, v):
        F = self.features
        uv = nn.Dense(F, use_bias=False, name="U")(v)  # [N, 3, F], acts on channels only
        vv = nn.Dense(F, use_bias=False, name="V")(v)
        # eps keeps the norm's gradient finite while vectors start at zero.
        norm = jnp.sqrt(jnp.sum(vv * vv, axis=1) + 1e-8)
        a = nn.Dense(3 * F)(nn.silu(nn.Dense(F)(jnp.concatenate([s, norm], axis=-1))))
        avv, asv, ass = jnp.split(a, 3, axis=-1)
        return s + ass + asv * jnp.sum(uv * vv, axis=1), v + avv[:, None, :] * uv


class PaiNN(nn.Module):
    """Polarizable atom interaction network: equivariant scalar + vector features.

    Same call signature as ``InvariantMLFF``; vector features are [N, 3, F] and rotate
    with the structure, the energy reads out only the scalars, so it is invariant.
    """

    cfg: MLFFConfig

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask=None):
        cfg = self.cfg
        rbf, envelope, units = _edge_directions(vectors, edge_mask, cfg)
        s = nn.Embed(MAX_Z, cfg.features)(species)
        v = jnp.zeros((s.shape[0], 3, cfg.features), s.dtype)
        for _ in range(cfg.num_interactions):
            s, v = PaiNNMessage(cfg.features)(s, v, rbf, envelope, units, senders, receivers)
            s, v = PaiNNUpdate(cfg.features)(s, v)
        return _Constants()(species, _Readout(cfg.features)(s))


# Entries xx, yy, zz, xy, xz, yz of a symmetric 3 x 3 matrix, and where each (i, j) finds its entry.
_SYM_ROWS, _SYM_COLS = (0, 1, 2, 0, 0, 1), (0, 1, 2, 1, 2, 2)
_SYM_IDENTITY = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
_SYM_INDEX = ((0, 3, 4), (3, 1, 5), (4, 5, 2))


def _traceless_outer(units):
    """[E, 6] entries xx, yy, zz, xy, xz, yz of u u^T - identity / 3 for unit vectors [E, 3]."""
    return units[:, _SYM_ROWS] * units[:, _SYM_COLS] - _SYM_IDENTITY / 3.0


def _sym_full(s):
    """[N, 6, F] entries xx, yy, zz, xy, xz, yz -> [N, 3, 3, F] symmetric matrices."""
    return s[:, jnp.asarray(_SYM_INDEX)]


def real_harmonics(units, l: int):
    """[E, 2l + 1] real spherical harmonics of order l = 3 or 4 at unit vectors [E, 3], m = -l..l.

    Scaled by sqrt(4 pi / (2l + 1)), so that sum_m Y_lm(u) Y_lm(v) = P_l(u . v) (the addition
    theorem; 1 at u = v): the power spectrum sum_m A_lm A'_lm of two moments is rotation invariant.
    """
    x, y, z = units[:, 0], units[:, 1], units[:, 2]
    if l == 3:
        parts = [np.sqrt(10) / 4 * y * (3 * x * x - y * y), np.sqrt(15) * x * y * z,
                 np.sqrt(6) / 4 * y * (5 * z * z - 1), z * (5 * z * z - 3) / 2, np.sqrt(6) / 4 * x * (5 * z * z - 1),
                 np.sqrt(15) / 2 * z * (x * x - y * y), np.sqrt(10) / 4 * x * (x * x - 3 * y * y)]
    elif l == 4:
        parts = [np.sqrt(35) / 2 * x * y * (x * x - y * y), np.sqrt(17.5) / 2 * y * z * (3 * x * x - y * y),
                 np.sqrt(5) / 2 * x * y * (7 * z * z - 1), np.sqrt(2.5) / 2 * y * z * (7 * z * z - 3),
                 (35 * z**4 - 30 * z * z + 3) / 8, np.sqrt(2.5) / 2 * x * z * (7 * z * z - 3),
                 np.sqrt(5) / 4 * (x * x - y * y) * (7 * z * z - 1), np.sqrt(17.5) / 2 * x * z * (x * x - 3 * y * y),
                 np.sqrt(35) / 8 * (x**4 - 6 * x * x * y * y + y**4)]
    else:
        raise ValueError(f"real_harmonics covers l = 3 and 4, not {l}")
    return jnp.stack(parts, axis=-1)


class MomentInteraction(nn.Module):
    """Scalar update from Cartesian moments of the neighbourhood up to rank 2 (MTP / ACE style).

    Per atom and channel f, with unit vectors u_ij and weights w_ij = R(r_ij) * (W s_j):
    A0 = sum_j w0, A1 = sum_j w1 u [3], A2 = sum_j w2 (u u^T - I / 3) [3, 3]. Channel-mixed
    copies of them (linear maps over f commute with rotations) are contracted to invariants
    of body order 2 (A0), 3 (A1 . A1', A2 : A2') and 4 (A1^T A2 A1', tr A2 A2' A2''), which
    resolve bond angles that the l = 1 vectors of PaiNN can only reach by stacking layers.
    max_l 3 and 4 add A_l = sum_j w_l Y_l(u) [2l + 1] and its power spectrum A_l . A_l'.
    s_i += A0 + MLP([s_i, invariants]): the direct two-body term keeps the energy's
    dependence on geometry O(1) at initialisation, where the angular invariants are small.
    """

    features: int
    max_l: int = 2

    @nn.compact
    def __call__(self, s, rbf, envelope, units, senders, receivers):
        F, n, orders = self.features, s.shape[0], self.max_l + 1
        radial = nn.Dense(orders * F)(rbf) * envelope[:, None]
        w0, w1, w2, *w_high = jnp.split(nn.Dense(orders * F)(s)[senders] * radial, orders, axis=-1)  # [E, F] each
        # Only the 6 distinct entries of the symmetric rank-2 moment go through the edge sum
        # (a third less edge work); the full [3, 3] matrix is rebuilt per atom.
        traceless = _traceless_outer(units)  # [E, 6]
        a0 = jax.ops.segment_sum(w0, receivers, n)
        a1 = jax.ops.segment_sum(units[:, :, None] * w1[:, None, :], receivers, n)  # [N, 3, F]
        a2 = jax.ops.segment_sum(traceless[:, :, None] * w2[:, None, :], receivers, n)  # [N, 6, F]
        p, q = jnp.split(nn.Dense(2 * F, use_bias=False, name="mix1")(a1), 2, axis=-1)
        # Mix the 6 distinct entries, then rebuild [N, 3, 3, 3F]: a third less work than mixing all 9.
        mixed = _sym_full(nn.Dense(3 * F, use_bias=False, name="mix2")(a2))
        x, y, z = jnp.split(mixed, 3, axis=-1)
        invariants = [
            a0,
            jnp.sum(p * q, axis=1),
            jnp.sum(x * y, axis=(1, 2)),
            jnp.einsum("nif,nijf,njf->nf", p, z, q),
            jnp.einsum("nijf,njkf,nkif->nf", x, y, z),
        ]
        for l, w in enumerate(w_high, start=3):
            a = jax.ops.segment_sum(real_harmonics(units, l)[:, :, None] * w[:, None, :], receivers, n)  # [N, 2l+1, F]
            p, q = jnp.split(nn.Dense(2 * F, use_bias=False, name=f"mix{l}")(a), 2, axis=-1)
            invariants.append(jnp.sum(p * q, axis=1))
        update = nn.Dense(F)(nn.silu(nn.Dense(F)(jnp.concatenate([s, *invariants], axis=-1))))
        return s + a0 + update


class SqrtEmbedding(nn.Module):
    """[N] per-atom -sum_k a_k(Z_i) sqrt(rho_ik + eps), rho_ik = sum_j g_k(r_ij) (Finnis-Sinclair).

    The second-moment approximation of tight binding: an atom's band energy grows as the
    square root of its neighbour density. With g_k = softplus(Dense(rbf)) * envelope >= 0
    and a_k = softplus(Embed(Z)) >= 0, each lost neighbour raises the energy, and by more
    the fewer neighbours remain: the curvature a SiLU readout, which extrapolates about
    linearly below the coordinations it was trained on, lacks for under-coordinated atoms
    (unseen surface facets). ``eps`` (4-6% of a bulk Mo atom's density per channel, once
    trained) bounds the slope 1 / (2 sqrt(rho + eps)) for an atom with almost no neighbours.
    """

    channels: int
    eps: float = 1e-2

    @nn.compact
    def __call__(self, species, rbf, envelope, receivers):
        density = nn.softplus(nn.Dense(self.channels)(rbf)) * envelope[:, None]  # [E, K]
        rho = jax.ops.segment_sum(density, receivers, species.shape[0])  # [N, K]
        # Start at softplus(0) = 0.69 per channel, where the term alone carries about as much
        # coordination dependence as a metal's energy has: started at 0.05, the readout fitted it
        # all and the amplitudes never grew (Mo, 100 epochs: 0.047 -> 0.046).
        amplitude = nn.softplus(nn.Embed(MAX_Z, self.channels, embedding_init=nn.initializers.zeros)(species))
        return -jnp.sum(amplitude * jnp.sqrt(rho + self.eps), axis=-1)


class MomentMLFF(nn.Module):
    """Invariant scalars updated from rank-0/1/2 Cartesian moments of each neighbourhood.

    Same call signature as ``InvariantMLFF``. Every layer sees many-body angular
    information directly (up to 4-body), like moment tensor potentials and MACE, with
    only 3 x 3 tensor algebra: no spherical harmonics or Clebsch-Gordan tables. With
    ``cfg.sqrt_embedding`` > 0 a ``SqrtEmbedding`` term joins the readout.
    """

    cfg: MLFFConfig

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask=None):
        features = self.cfg.features
        rbf, envelope, units = _edge_directions(vectors, edge_mask, self.cfg)
        s = nn.Embed(MAX_Z, features)(species)
        for _ in range(self.cfg.num_interactions):
            s = MomentInteraction(features, self.cfg.max_l)(s, rbf, envelope, units, senders, receivers)
        atom_out = _Readout(features)(s)
        if self.cfg.sqrt_embedding:
            atom_out = atom_out + SqrtEmbedding(self.cfg.sqrt_embedding)(species, rbf, envelope, receivers)
        return _Constants()(species, atom_out)


def chebyshev_radial(distances, envelope, cfg: MLFFConfig):
    """[E, num_rbf] T_k(x) times ``envelope`` [E], x = 2 (r - min_distance) / (cutoff - min_distance) - 1.

    Chebyshev polynomials on [min_distance, cutoff], as in moment tensor potentials. Below
    min_distance they extrapolate as polynomials (smoothly: no clipping, so no kink in the
    forces of an atom pushed closer than any training pair).
    """
    x = 2.0 * (distances - cfg.min_distance) / (cfg.cutoff - cfg.min_distance) - 1.0
    basis = [jnp.ones_like(x), x]
    for _ in range(cfg.num_rbf - 2):
        basis.append(2.0 * x * basis[-1] - basis[-2])
    return jnp.stack(basis[: cfg.num_rbf], axis=-1) * envelope[:, None]


def _triu(a):
    """[N, M, M] symmetric in the last two axes -> [N, M (M + 1) / 2] entries with k <= k'."""
    rows, cols = np.triu_indices(a.shape[-1])
    return a[:, rows, cols]


def _symmetric_products(x, order: int):
    """[N, C(M + order - 1, order)] products x_a x_b ... (order factors, a <= b <= ...) of x [N, M]."""
    combos = itertools.combinations_with_replacement(range(x.shape[-1]), order)
    return jnp.stack([functools.reduce(operator.mul, [x[:, k] for k in c]) for c in combos], axis=-1)


def moment_invariants(vectors, edge_mask, receivers, n_atoms: int, cfg: MLFFConfig):
    """[n_atoms, K] rotation-invariant polynomials of each atom's neighbourhood moments.

    Per atom and radial function k (``chebyshev_radial``, M = cfg.num_rbf of them) the moments
    A_lk = sum_j R_k(r_ij) Y_l(u_ij) for l = 0..4 (l = 1, 2 Cartesian, 3, 4 real harmonics).
    Invariants, by body order (neighbours + 1):
    - 2: A_0k (M);
    - 3: the power spectra P_l(k, k') = A_lk . A_lk', l = 0..4, k <= k' (5 M (M + 1) / 2);
    - 4 and 5, on the first M3 = cfg.product_rbf radial functions only (where products
      multiply, the slowly varying functions carry most of the weight): A_0 A_0 A_0 and
      A_0 A_0 A_0 A_0, A_0 x P_l (l >= 1), A_1 . A_2 A_1', tr A_2 A_2' A_2'' and the pairwise
      products of the P_l (l >= 1): the many-body contractions of moment tensor potentials.
    All are polynomials in the A's without a constant term, so an atom without neighbours has
    B = 0, and the energy is linear in the coefficients (``LinearMomentMLFF``).
    """
    mask = jnp.ones(vectors.shape[:1], bool) if edge_mask is None else edge_mask
    # The envelope carries 1 / avg_neighbors: moments O(1), so that their products stay O(1) in float32.
    distances, _, envelope = _edge_geometry(vectors, mask, cfg)
    units = vectors / distances[:, None]
    radial = chebyshev_radial(distances, envelope, cfg)  # [E, M]

    def moment(angular):  # [E, D] -> [N, D, M]
        return jax.ops.segment_sum(angular[:, :, None] * radial[:, None, :], receivers, n_atoms)

    a0 = jax.ops.segment_sum(radial, receivers, n_atoms)  # [N, M]
    a1 = moment(units)  # [N, 3, M]
    a2 = moment(_traceless_outer(units))[:, jnp.asarray(_SYM_INDEX)]  # [N, 3, 3, M]
    high = [moment(real_harmonics(units, l)) for l in (3, 4)]  # [N, 2l + 1, M]
    power = [a0[:, :, None] * a0[:, None, :], jnp.einsum("nmk,nml->nkl", a1, a1),
             jnp.einsum("nijk,nijl->nkl", a2, a2), *[jnp.einsum("nmk,nml->nkl", a, a) for a in high]]
    m3 = cfg.product_rbf
    b0, b1, b2 = a0[:, :m3], a1[..., :m3], a2[..., :m3]
    pairs = jnp.concatenate([_triu(p[:, :m3, :m3]) for p in power[1:]], axis=-1)  # [N, 4 M3 (M3 + 1) / 2]
    vector_tensor_vector = jnp.einsum("nia,nijb,njc->nbac", b1, b2, b1).reshape(n_atoms * m3, m3, m3)
    triple_trace = [jnp.einsum("nij,njk,nki->n", b2[..., a], b2[..., b], b2[..., c])
                    for a, b, c in itertools.combinations_with_replacement(range(m3), 3)]
    return jnp.concatenate([
        a0, *[_triu(p) for p in power],
        _symmetric_products(b0, 3), _symmetric_products(b0, 4),
        (b0[:, :, None] * pairs[:, None, :]).reshape(n_atoms, -1),
        _triu(vector_tensor_vector).reshape(n_atoms, -1), jnp.stack(triple_trace, axis=-1),
        _symmetric_products(pairs, 2),
    ], axis=-1)


class LinearMomentMLFF(nn.Module):
    """Per-atom energy W[Z_i] . B_i + reference[Z_i], linear in the coefficients W [MAX_Z, K].

    B_i = ``moment_invariants`` (up to 5-body). Fitted by least squares, not trained
    (``matjax.train.linear``): one linear solve, the same result on every machine. The
    coefficients depend on the centre atom's element; neighbours enter the moments alike,
    whatever their element, so the model suits one-element systems (the mlearn sets) and
    is coarse for alloys, where the networks tell neighbours apart.
    """

    cfg: MLFFConfig

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask=None):
        invariants = moment_invariants(vectors, edge_mask, receivers, species.shape[0], self.cfg)
        coefficients = self.param("coefficients", nn.initializers.normal(1.0), (MAX_Z, invariants.shape[-1]))
        return _Constants()(species, jnp.sum(coefficients[species] * invariants, axis=-1))


def _skew(a):
    """[N, 3, F] axial vectors -> [N, 3, 3, F] antisymmetric matrices (skew(a) b = a x b)."""
    x, y, z = a[:, 0], a[:, 1], a[:, 2]
    zero = jnp.zeros_like(x)
    return jnp.stack([jnp.stack([zero, -z, y], 1), jnp.stack([z, zero, -x], 1), jnp.stack([-y, x, zero], 1)], 1)


def _compose(i, a, s):
    """(I [N, F], A [N, 3, F], S [N, 6, F]) -> X = I * identity + skew(A) + S, [N, 3, 3, F]."""
    return i[:, None, None, :] * jnp.eye(3)[None, :, :, None] + _skew(a) + _sym_full(s)


def _decompose(x):
    """[N, 3, 3, F] -> (trace / 3 [N, F], axial vector of the antisymmetric part [N, 3, F],
    symmetric traceless part as entries xx, yy, zz, xy, xz, yz [N, 6, F])."""
    i = jnp.trace(x, axis1=1, axis2=2) / 3.0
    anti = 0.5 * (x - jnp.swapaxes(x, 1, 2))
    a = jnp.stack([anti[:, 2, 1], anti[:, 0, 2], anti[:, 1, 0]], 1)
    sym = 0.5 * (x + jnp.swapaxes(x, 1, 2))
    s = sym[:, jnp.asarray(_SYM_ROWS), jnp.asarray(_SYM_COLS)] - i[:, None, :] * _SYM_IDENTITY[None, :, None]
    return i, a, s


def _sym_square_norm(s):
    """[N, F] squared Frobenius norm of symmetric matrices given as [N, 6, F] entries."""
    return jnp.sum(jnp.asarray([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])[None, :, None] * s * s, axis=1)


def _square_norm(i, a, s):
    """[N, F] squared Frobenius norm of each channel's matrix, from its parts."""
    return 3.0 * i * i + 2.0 * jnp.sum(a * a, axis=1) + _sym_square_norm(s)


def _normalise(i, a, s):
    """X / (|X|^2 + 1) per channel: bounded, smooth, and the same rescaling for every part."""
    scale = 1.0 / (_square_norm(i, a, s) + 1.0)
    return i * scale, a * scale[:, None], s * scale[:, None]


class _MixParts(nn.Module):
    """Separate channel mixing of the three parts (linear maps over channels commute with rotations)."""

    features: int

    @nn.compact
    def __call__(self, i, a, s):
        return tuple(nn.Dense(self.features, use_bias=False, name=n)(x) for n, x in (("I", i), ("A", a), ("S", s)))


class TensorEmbedding(nn.Module):
    """Per-atom rank-2 tensors from the neighbourhood: X_i = sum_j Z_ij R(r_ij) (f_I 1 + f_A skew(u) + f_S (u u^T - 1/3)).

    Z_ij is a learned embedding of the pair of elements; the three parts are then mixed over
    channels and rescaled by an MLP of their norms (invariant), as in TensorNet.
    """

    features: int

    @nn.compact
    def __call__(self, species, rbf, envelope, units, senders, receivers):
        F, n = self.features, species.shape[0]
        z = nn.Embed(MAX_Z, F)(species)
        # Dense([z_i, z_j]) as a per-atom projection of each side, gathered per edge.
        pair = nn.Dense(F, name="pair_i")(z)[receivers] + nn.Dense(F, use_bias=False, name="pair_j")(z)[senders]
        fi, fa, fs = jnp.split(nn.Dense(3 * F)(rbf) * (envelope[:, None] * jnp.tile(pair, 3)), 3, axis=-1)
        traceless = _traceless_outer(units)
        i = jax.ops.segment_sum(fi, receivers, n)
        a = jax.ops.segment_sum(units[:, :, None] * fa[:, None, :], receivers, n)
        s = jax.ops.segment_sum(traceless[:, :, None] * fs[:, None, :], receivers, n)
        i, a, s = _MixParts(F)(*_normalise(i, a, s))
        gate = nn.Dense(3 * F)(nn.silu(nn.Dense(F)(nn.LayerNorm()(_square_norm(i, a, s)))))
        gi, ga, gs = jnp.split(gate, 3, axis=-1)
        return i * gi, a * ga[:, None], s * gs[:, None]


class TensorInteraction(nn.Module):
    """X_i += Y' + Y'^2 with Y' = mix(normalise(Y_i M_i + M_i Y_i)), M_i = sum_j R(r_ij) * parts of Y_j.

    Y = channel-mixed parts of the normalised X. The products of 3 x 3 matrices couple the
    atom's and its neighbours' tensors (each built from bond directions) to every rank: each
    layer raises the body order, and every step is equivariant, so only invariants of the
    final tensors reach the energy. Y M + M Y (not Y M alone) keeps the energy invariant
    under reflections too.
    """

    features: int

    @nn.compact
    def __call__(self, x, rbf, envelope, senders, receivers):
        F, n = self.features, x[0].shape[0]
        i, a, s = _MixParts(F)(*_normalise(*x))
        fi, fa, fs = jnp.split(nn.Dense(3 * F)(rbf) * envelope[:, None], 3, axis=-1)
        mi = jax.ops.segment_sum(fi * i[senders], receivers, n)
        ma = jax.ops.segment_sum(fa[:, None, :] * a[senders], receivers, n)
        ms = jax.ops.segment_sum(fs[:, None, :] * s[senders], receivers, n)
        y, m = _compose(i, a, s), _compose(mi, ma, ms)
        product = jnp.einsum("nijf,njkf->nikf", y, m) + jnp.einsum("nijf,njkf->nikf", m, y)
        dx = _compose(*_MixParts(F)(*_normalise(*_decompose(product))))
        dx = dx + jnp.einsum("nijf,njkf->nikf", dx, dx)
        return tuple(old + new for old, new in zip(x, _decompose(dx)))


class TensorMLFF(nn.Module):
    """Cartesian rank-2 tensor features carried between layers (TensorNet, Simeon & De Fabritiis 2023).

    Same call signature as ``InvariantMLFF``. Each atom holds F 3 x 3 matrices, kept as
    their scalar, antisymmetric and symmetric-traceless parts; the energy reads the scalar
    part and the norms of the others (invariants), so rotations and reflections leave it
    unchanged. Unlike ``MomentMLFF``, directional information passes between layers.
    """

    cfg: MLFFConfig

    @nn.compact
    def __call__(self, species, vectors, senders, receivers, edge_mask=None):
        F = self.cfg.features
        rbf, envelope, units = _edge_directions(vectors, edge_mask, self.cfg)
        x = TensorEmbedding(F)(species, rbf, envelope, units, senders, receivers)
        for _ in range(self.cfg.num_interactions):
            x = TensorInteraction(F)(x, rbf, envelope, senders, receivers)
        i, a, s = x
        invariants = jnp.concatenate([i, jnp.sum(a * a, axis=1), _sym_square_norm(s)], axis=-1)
        h = nn.silu(nn.Dense(F)(nn.LayerNorm()(invariants)))
        return _Constants()(species, _Readout(F)(h))


MODELS = {"invariant": InvariantMLFF, "painn": PaiNN, "moment": MomentMLFF, "tensor": TensorMLFF,
          "linear": LinearMomentMLFF}
# The moment model's highest angular orders: 2 (Cartesian rank-0/1/2), 3 and 4 (``real_harmonics``).
MAX_L_CHOICES = (2, 3, 4)


def create_model(cfg: MLFFConfig) -> nn.Module:
    """The force-field module named by ``cfg.model`` (a key of ``MODELS``)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown force-field model {cfg.model!r}; choose one of {sorted(MODELS)}")
    if cfg.max_l not in MAX_L_CHOICES:
        raise ValueError(f"max_l must be one of {MAX_L_CHOICES}, not {cfg.max_l}")
    if cfg.sqrt_embedding and cfg.model != "moment":
        raise ValueError(f"sqrt_embedding is a term of the moment model, not of {cfg.model!r}")
    return MODELS[cfg.model](cfg)


def graph_energy_fn(model: nn.Module, variables, graph):
    """energy(positions [N, 3], lattice [G, 3, 3]) -> [G] total energies of ``graph``'s structures.

    ``graph`` is a (padded) ``jraph.GraphsTuple`` with nodes["species"], edges["shifts"]
    and optionally edges["mask"] (False on unused neighbour-list slots); the positions
    and lattice are arguments so that forces and stress can be taken by ``jax.grad``
    (``matjax.physics.forces.energy_forces_stress``).
    """

    def energy(positions, lattice):
        vectors = edge_vectors(positions, lattice, graph)
        atoms = model.apply(variables, graph.nodes["species"], vectors, graph.senders, graph.receivers,
                            graph.edges.get("mask"))
        return jax.ops.segment_sum(atoms, node_graph_index(graph), graph.n_node.shape[0])

    return energy
