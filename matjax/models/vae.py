"""Crystal VAE: a CGCNN encoder to a Gaussian latent z, decoders from z to what a crystal is made of.

Per crystal graph (``matjax.data.batching`` layout)::

    [mu, log sigma^2] = CGCNN(graph) + E[n_atoms]    [G, 2 d]  (convolutions, masked mean pool, MLP)
    z                 = mu + sigma * eps,  eps ~ N(0, I) from an explicit PRNG key
    p(stoichiometry | z) = softmax(W_s h(z))         [G, P]  which of the P stoichiometries (below)
    p(e_r | z, n_r, e_<r) = softmax(...)             [G, S, 104]  the element of slot r (below)
    lattice(z)        = W_l h(z)                     [G, 6]  normalised (a, b, c, alpha, beta, gamma)
    y(z)              = MLP(z)                       [G, T]  standardised properties

h is an MLP shared by the structure heads. A stoichiometry is the sorted list of atom
counts of a cell's elements, e.g. (3, 1, 1) for any ABO3 cell of 5 atoms, (12, 4, 4) for
Ca4Ni4O12: an integer partition of the atom count. ``stoichiometries(max_atoms, max_species)``
lists every partition of 1..max_atoms into at most max_species parts (2,098 classes for 20 and
8), so the head can name any cell the size limits allow, seen in training or not. The
elements fill the stoichiometry's slots in order (largest count first, ties by Z;
``element_slots``): slot r reads h, its count n_r and the elements already placed, so a
crystal's elements are decoded jointly, one after the other. The reconstruction targets are
computed from the input graph itself, inside the loss: the stoichiometry and element slots
from ``species`` and ``n_node``, the lattice parameters from
``globals["lattice"]``. Lengths are normalised per atom, l / n_atoms^(1/3) (a crystal's
size grows with its cell), then standardised with training statistics (``LatticeScaler``);
angles are standardised.

The loss per crystal (averaged over real graphs, padding masked) is

    sum_r CE(e_r) + CE(stoichiometry) + |lattice - target|^2 / 6 + |y - target|^2 / T + beta * KL(q(z|x) || N(0, I))

with weights from ``VAEConfig``; the element terms are teacher-forced (slot r is given the
true earlier elements); beta rises linearly from 0 over the warm-up (``kl_weight``), so the
decoders learn before the prior pulls the codes together.

Decoding is deterministic: the most likely stoichiometry (n_1 >= ... >= n_k), then greedily
the most likely element of each slot given the ones before (``decode_composition`` turns
them into counts). Why categorical choices rather than a distribution over elements whose
fractions are rounded to atoms: a latent the decoder is unsure about gets fractions that
average the crystals it might be (Ca4Ni4O12 and a Ca-Ni-O cell of other proportions blur to
Ca7Ni6O7; an iodide and an oxide give an oxide-iodide), which no oxidation states balance,
while each argmax commits to one of them and the later slots follow it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from matjax.config import VAEConfig
from matjax.data.elements import element_descriptors
from matjax.models.cgcnn import create_model, masked_mean_pool, softplus

N_ELEMENTS = len(element_descriptors())  # composition slots indexed by Z; slot 0 (padding) is never decoded
MASKED_LOGIT = -1e9  # decoder score of an element a slot may not take (padding, or already placed)
LOGVAR_RANGE = (-12.0, 6.0)  # keeps exp(logvar) finite early in training; sigma in [2.5e-3, 20]


def lattice_parameters(lattice: jnp.ndarray) -> jnp.ndarray:
    """[..., 6] (a, b, c in Angstrom, alpha, beta, gamma in degrees) of lattice rows [..., 3, 3].

    alpha is the angle between b and c, beta between a and c, gamma between a and b
    (pymatgen's ``Lattice.parameters``).
    """
    lengths = jnp.linalg.norm(lattice, axis=-1)
    pairs = ((1, 2), (0, 2), (0, 1))
    cosines = [jnp.sum(lattice[..., i, :] * lattice[..., j, :], -1) / (lengths[..., i] * lengths[..., j]) for i, j in pairs]
    angles = jnp.degrees(jnp.arccos(jnp.clip(jnp.stack(cosines, -1), -1.0, 1.0)))
    return jnp.concatenate([lengths, angles], axis=-1)


class LatticeScaler(NamedTuple):
    """Lattice parameters <-> the decoder's normalised units.

    x = ((a, b, c) / n^(1/3), alpha, beta, gamma), standardised: (x - mean) / std; mean, std [6].
    """

    mean: jnp.ndarray
    std: jnp.ndarray

    @classmethod
    def fit(cls, parameters, n_atoms) -> "LatticeScaler":
        """From training lattice parameters [M, 6] and atom counts [M] (statistics in float64)."""
        x = np.asarray(parameters, np.float64) / _length_scale(np.asarray(n_atoms, np.float64))
        return cls(x.mean(0), np.maximum(x.std(0), 1e-6))

    def transform(self, parameters, n_atoms) -> jnp.ndarray:
        """[..., 6] normalised from physical parameters [..., 6] and atom counts [...]."""
        return (parameters / _length_scale(n_atoms) - self.mean) / self.std

    def inverse(self, normalised, n_atoms) -> jnp.ndarray:
        """[..., 6] physical lattice parameters from normalised ones and atom counts [...]."""
        return (normalised * self.std + self.mean) * _length_scale(n_atoms)


def _length_scale(n_atoms):
    """[..., 6] factors n^(1/3) on the three lengths, 1 on the three angles (numpy in, numpy out)."""
    xp = np if isinstance(n_atoms, np.ndarray) else jnp
    cube_root = xp.asarray(n_atoms, dtype=xp.float32 if xp is jnp else np.float64) ** (1.0 / 3.0)
    return xp.stack([cube_root] * 3 + [xp.ones_like(cube_root)] * 3, -1)


def composition_fractions(graph: jraph.GraphsTuple) -> jnp.ndarray:
    """[G, N_ELEMENTS] element fractions of each graph (rows of padding graphs: whatever they hold)."""
    onehot = jax.nn.one_hot(graph.nodes["species"], N_ELEMENTS)
    return masked_mean_pool(onehot, graph, jraph.get_node_padding_mask(graph))


def reparameterize(key: jax.Array, mu: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """[G, d] z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) drawn from ``key``."""
    return mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)


def kl_divergence(mu: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """[G] KL(N(mu, diag exp(logvar)) || N(0, I)) = 1/2 sum_k (sigma_k^2 + mu_k^2 - 1 - log sigma_k^2)."""
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mu) - 1.0 - logvar, axis=-1)


def kl_weight(step, beta: float, warmup_steps: int):
    """beta * min(1, step / warmup_steps): linear KL warm-up (beta from step 0 if warmup_steps = 0)."""
    if warmup_steps <= 0:
        return beta
    return beta * jnp.minimum(1.0, step / warmup_steps)


@functools.cache
def stoichiometries(max_atoms: int, max_species: int) -> np.ndarray:
    """[P, max_species] int32: every integer partition of 1..max_atoms into at most max_species
    parts, parts in descending order, zero-padded; rows by atom count, then lexicographically descending."""

    def partitions(n: int, largest: int, parts: int):
        if n == 0:
            yield ()
        elif parts > 0:
            for first in range(min(n, largest), 0, -1):
                yield from ((first, *rest) for rest in partitions(n - first, first, parts - 1))

    rows = [p + (0,) * (max_species - len(p)) for n in range(1, max_atoms + 1) for p in partitions(n, n, max_species)]
    return np.asarray(rows, dtype=np.int32)


def stoichiometry_index(counts: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """[G] row of ``table`` [P, S] (``stoichiometries``) equal to the sorted counts [G, K] (0 where none is)."""
    pattern = jax.lax.top_k(counts, table.shape[1])[0]
    return jnp.argmax(jnp.all(pattern[:, None, :] == table[None], -1), -1)


def element_slots(graph: jraph.GraphsTuple, config: VAEConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(stoichiometry class [G], elements [G, max_species]) of each graph: its elements by count,
    largest first, ties by Z; 0 in the slots beyond its number of elements (padding graphs: class 0)."""
    return count_slots(jnp.round(composition_fractions(graph) * graph.n_node[:, None]).astype(jnp.int32), config)


def count_slots(counts: jnp.ndarray, config: VAEConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(stoichiometry class [G], elements [G, max_species]) of atom counts [G, N_ELEMENTS] (``element_slots``)."""
    table = jnp.asarray(stoichiometries(config.max_atoms, config.max_species))
    values, order = jax.lax.top_k(counts * N_ELEMENTS - jnp.arange(N_ELEMENTS), table.shape[1])
    return stoichiometry_index(counts, table), jnp.where(values > 0, order, 0)


def composition_nll(element_logits: jnp.ndarray, stoichiometry_logits: jnp.ndarray, label: jnp.ndarray,
                    elements: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(composition [G], stoichiometry [G]) cross-entropies in nats of the true stoichiometry class
    label [G] and elements [G, S] (``element_slots``; the composition's summed over filled slots)."""
    log_p = jnp.take_along_axis(jax.nn.log_softmax(element_logits), elements[..., None], -1)[..., 0]
    composition = -jnp.sum(jnp.where(elements > 0, log_p, 0.0), -1)
    return composition, -jnp.take_along_axis(jax.nn.log_softmax(stoichiometry_logits), label[:, None], -1)[:, 0]


def decode_composition(elements: jnp.ndarray, stoichiometry: jnp.ndarray) -> jnp.ndarray:
    """[S, N_ELEMENTS] atom counts: elements [S, K] (Z, 0 = none) take the counts stoichiometry [S, K]."""
    return jnp.sum(jax.nn.one_hot(elements, N_ELEMENTS, dtype=jnp.int32) * stoichiometry[..., None], 1).at[:, 0].set(0)


def encoder_config(config: VAEConfig):
    """The CGCNNConfig of the encoder: ``config.encoder`` with 2 * latent_dim outputs (mu, then log-variance)."""
    d = config.latent_dim
    names = tuple(f"mu_{i}" for i in range(d)) + tuple(f"logvar_{i}" for i in range(d))
    return dataclasses.replace(config.encoder, targets=names)


class VAEOutput(NamedTuple):
    """Everything one forward pass produces, per graph: mu, logvar, z [G, d]; element_logits
    [G, max_species, N_ELEMENTS] (slot r: the element with the r-th largest count, given the
    earlier slots); stoichiometry_logits [G, P] (rows of ``stoichiometries``); lattice [G, 6]
    normalised; properties [G, T]."""

    mu: jnp.ndarray
    logvar: jnp.ndarray
    z: jnp.ndarray
    element_logits: jnp.ndarray
    stoichiometry_logits: jnp.ndarray
    lattice: jnp.ndarray
    properties: jnp.ndarray


class LatentDecoder(nn.Module):
    """z [G, d] -> (element_logits [G, S, N_ELEMENTS], elements [G, S], stoichiometry_logits [G, P],
    lattice [G, 6]); S = max_species.

    Given a stoichiometry class [G] and, in training, the true elements [G, S] (teacher
    forcing), slot r scores the element of the r-th largest count from z, that count, and the
    elements of slots < r; without them, the most likely stoichiometry and greedy decoding
    slot by slot (an element is never chosen twice; slots with no atoms hold 0).
    """

    config: VAEConfig

    @nn.compact
    def __call__(self, z: jnp.ndarray, stoichiometry: jnp.ndarray | None = None, elements: jnp.ndarray | None = None):
        cfg = self.config
        h = z
        for i in range(cfg.decoder_layers):
            h = softplus(nn.Dense(cfg.decoder_features, name=f"hidden_{i}")(h))
        table = jnp.asarray(stoichiometries(cfg.max_atoms, cfg.max_species))
        stoichiometry_logits = nn.Dense(len(table), name="stoichiometry")(h)
        if stoichiometry is None:
            stoichiometry = jnp.argmax(stoichiometry_logits, -1)
        counts = table[stoichiometry]  # [G, S]
        slots = counts.shape[1]
        features = cfg.decoder_features
        context = (nn.Dense(features, name="element_context")(h)[:, None] + nn.Embed(cfg.max_atoms + 1, features, name="slot_count")(counts)
                   + nn.Embed(slots, features, name="slot")(jnp.arange(slots)))  # [G, S, F]
        embedding = self.param("element_embedding", nn.initializers.normal(1.0), (N_ELEMENTS, features))
        readout = nn.Dense(N_ELEMENTS, name="element")

        def score(context, taken):  # context [..., F], taken [..., N_ELEMENTS] elements of earlier slots
            logits = readout(softplus(context + taken @ embedding))
            return jnp.where(taken > 0, MASKED_LOGIT, logits).at[..., 0].set(MASKED_LOGIT)  # no repeats; Z = 0 is padding

        if elements is not None:
            placed = jax.nn.one_hot(elements, N_ELEMENTS) * (elements > 0)[..., None]
            logits = score(context, jnp.cumsum(placed, 1) - placed)
        else:
            taken, columns, chosen = jnp.zeros((z.shape[0], N_ELEMENTS)), [], []
            for r in range(slots):
                logits_r = score(context[:, r], taken)
                element = jnp.where(counts[:, r] > 0, jnp.argmax(logits_r, -1), 0)
                taken = taken + jax.nn.one_hot(element, N_ELEMENTS) * (element > 0)[:, None]
                columns.append(logits_r)
                chosen.append(element)
            logits, elements = jnp.stack(columns, 1), jnp.stack(chosen, 1)
        return logits, elements, stoichiometry_logits, nn.Dense(6, name="lattice")(h)


class PropertyHead(nn.Module):
    """z [G, d] -> [G, T] standardised properties."""

    features: int
    n_targets: int

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        return nn.Dense(self.n_targets)(softplus(nn.Dense(self.features)(z)))


class CrystalVAE(nn.Module):
    """The VAE of ``config``; ``__call__`` runs encode -> sample -> decode, the methods run one part.

    Use ``model.apply(variables, z, method=model.decode)`` to decode latents and
    ``method=model.predict_properties`` for the property head.
    """

    config: VAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = create_model(encoder_config(cfg))
        self.decoder = LatentDecoder(cfg)
        self.property_head = PropertyHead(cfg.property_features, len(cfg.targets))
        self.size_offset = nn.Embed(cfg.max_atoms + 1, 2 * cfg.latent_dim, embedding_init=nn.initializers.zeros)

    def encode(self, graph: jraph.GraphsTuple, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(mu [G, d], logvar [G, d]) of q(z | graph)."""
        d = self.config.latent_dim
        # A mean pool cannot count atoms (a supercell pools like its primitive cell), so the
        # atom count enters the posterior directly, as a learned offset per count (zero at init).
        out = self.encoder(graph, train=train) + self.size_offset(jnp.clip(graph.n_node, 0, self.config.max_atoms))
        return out[:, :d], jnp.clip(out[:, d:], *LOGVAR_RANGE)

    def decode(self, z: jnp.ndarray, stoichiometry: jnp.ndarray | None = None, elements: jnp.ndarray | None = None):
        """(element_logits [G, S, N_ELEMENTS], elements [G, S], stoichiometry_logits [G, P], lattice [G, 6]
        normalised) of ``LatentDecoder``: decoded, or scored given the true stoichiometry and elements."""
        return self.decoder(z, stoichiometry, elements)

    def predict_properties(self, z: jnp.ndarray) -> jnp.ndarray:
        """[G, T] standardised properties from z [G, d]."""
        return self.property_head(z)

    def __call__(self, graph: jraph.GraphsTuple, key: jax.Array, train: bool = False) -> VAEOutput:
        mu, logvar = self.encode(graph, train)
        z = reparameterize(key, mu, logvar)
        element_logits, _, stoichiometry_logits, lattice = self.decode(z, *element_slots(graph, self.config))
        return VAEOutput(mu, logvar, z, element_logits, stoichiometry_logits, lattice, self.predict_properties(z))


def vae_loss(
    out: VAEOutput, graph: jraph.GraphsTuple, lattice_scaler: LatticeScaler, config: VAEConfig, beta
) -> tuple[jnp.ndarray, dict]:
    """(mean loss over real graphs, per-term means) of one padded batch.

    graph.globals["targets"]: [G, T] standardised properties; beta: the KL weight now
    (``kl_weight``). Terms: composition (the elements' cross-entropies summed over slots, nats),
    stoichiometry (cross-entropy, nats), lattice and property (mean squared error,
    standardised units), kl (nats).
    """
    mask = jraph.get_graph_padding_mask(graph)
    composition, stoichiometry = composition_nll(out.element_logits, out.stoichiometry_logits, *element_slots(graph, config))
    # Padding graphs have a zero lattice: give them the unit cube, or their NaN targets would
    # poison the gradient through the masked sum (0 * NaN).
    cell = jnp.where(mask[:, None, None], graph.globals["lattice"], jnp.eye(3))
    target_lattice = lattice_scaler.transform(lattice_parameters(cell), jnp.maximum(graph.n_node, 1))
    lattice = jnp.mean(jnp.square(out.lattice - target_lattice), -1)
    properties = jnp.mean(jnp.square(out.properties - graph.globals["targets"]), -1)
    kl = kl_divergence(out.mu, out.logvar)
    terms = {"composition": composition, "stoichiometry": stoichiometry, "lattice": lattice, "property": properties, "kl": kl}
    terms = {name: jnp.where(mask, value, 0.0) for name, value in terms.items()}
    per_graph = (
        config.composition_weight * terms["composition"] + config.stoichiometry_weight * terms["stoichiometry"]
        + config.lattice_weight * terms["lattice"] + config.property_weight * terms["property"] + beta * terms["kl"]
    )
    n_real = jnp.maximum(jnp.sum(mask), 1)
    return jnp.sum(per_graph) / n_real, {name: jnp.sum(value) / n_real for name, value in terms.items()}


def create_vae(config: VAEConfig) -> CrystalVAE:
    """The CrystalVAE of ``config``; raises ValueError naming every invalid field."""
    problems = [
        f"{name} = {getattr(config, name)} must be >= 1"
        for name in ("latent_dim", "decoder_features", "decoder_layers", "property_features", "max_atoms", "max_species")
        if getattr(config, name) < 1
    ]
    problems += [f"{name} = {getattr(config, name)} must be >= 0" for name in (
        "beta", "kl_warmup_epochs", "composition_weight", "stoichiometry_weight", "lattice_weight", "property_weight",
    ) if getattr(config, name) < 0]
    if not config.targets:
        problems.append("targets is empty (the property head needs at least one)")
    if problems:
        raise ValueError("invalid VAEConfig: " + "; ".join(problems))
    return CrystalVAE(config)
