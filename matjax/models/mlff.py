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
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from matjax.config import MLFFConfig
from matjax.geometry.periodic import edge_vectors, node_graph_index
from matjax.models.layers import gaussian_rbf, polynomial_envelope

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


def message_sum(node, rbf, envelope, kernel, bias, senders, receivers):
    """[N, F] sum over edges j -> i of SiLU(node_j + rbf_ij @ kernel + bias) * envelope_ij.

    node: [N, F] per-atom projection; rbf: [C, K, R], envelope / senders / receivers:
    [C, K], edges in C chunks of K; kernel: [R, F]; bias: [F].
    The scan keeps each chunk's [K, F] intermediates in cache, and the rematerialised
    body makes the backward pass recompute them instead of storing [E, F] arrays: the
    forces of the seed-size model come out ~1.7x faster on CPU than from one pass; a
    single chunk skips the loop (small systems are dominated by the count of XLA ops).
    """

    def body(acc, edges):
        s, r, rb, env = edges
        messages = nn.silu(node[s] + rb @ kernel + bias) * env[:, None]
        return acc.at[r].add(messages), None

    zeros = jnp.zeros(node.shape, jnp.result_type(node, rbf, kernel))
    if senders.shape[0] == 1:  # one chunk: no loop (fewer ops, which dominate small systems)
        return jax.checkpoint(body)(zeros, (senders[0], receivers[0], rbf[0], envelope[0]))[0]
    agg, _ = jax.lax.scan(jax.checkpoint(body), zeros, (senders, receivers, rbf, envelope))
    return agg


class Interaction(nn.Module):
    """h_i += MLP(sum_j SiLU(W [h_j, rbf_ij] + b) * u(r_ij) / avg_neighbors)."""

    features: int

    @nn.compact
    def __call__(self, h, rbf, envelope, senders, receivers):
        # W [h_j, rbf_ij] = W_h h_j + W_r rbf_ij: project the atoms once, gather per edge.
        node = nn.Dense(self.features, use_bias=False, name="node")(h)
        kernel = self.param("edge_kernel", nn.initializers.lecun_normal(), (rbf.shape[-1], self.features))
        bias = self.param("edge_bias", nn.initializers.zeros, (self.features,))
        agg = message_sum(node, rbf, envelope, kernel, bias, senders, receivers)
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
        _, rbf, envelope = _edge_geometry(vectors, mask, cfg)
        h = nn.Embed(MAX_Z, cfg.features)(species)
        for _ in range(cfg.num_interactions):
            h = Interaction(cfg.features)(h, rbf, envelope, senders, receivers)
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
        mask = jnp.ones(vectors.shape[:1], bool) if edge_mask is None else edge_mask
        distances, rbf, envelope = _edge_geometry(vectors, mask, cfg)
        units = vectors / distances[:, None]
        s = nn.Embed(MAX_Z, cfg.features)(species)
        v = jnp.zeros((s.shape[0], 3, cfg.features), s.dtype)
        for _ in range(cfg.num_interactions):
            s, v = PaiNNMessage(cfg.features)(s, v, rbf, envelope, units, senders, receivers)
            s, v = PaiNNUpdate(cfg.features)(s, v)
        return _Constants()(species, _Readout(cfg.features)(s))


MODELS = {"invariant": InvariantMLFF, "painn": PaiNN}


def create_model(cfg: MLFFConfig) -> nn.Module:
    """The force-field module named by ``cfg.model`` ("invariant" or "painn")."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown force-field model {cfg.model!r}; choose one of {sorted(MODELS)}")
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
