"""Crystal VAE: a CGCNN encoder to a Gaussian latent z, decoders from z to what a crystal is made of.

Per crystal graph (``matjax.data.batching`` layout)::

    [mu, log sigma^2] = CGCNN(graph) + E[n_atoms]    [G, 2 d]  (convolutions, masked mean pool, MLP)
    z                 = mu + sigma * eps,  eps ~ N(0, I) from an explicit PRNG key
    p(element | z)    = softmax(W_c h(z))            [G, 104]  composition, a distribution over Z
    p(n_atoms | z)    = softmax(W_n h(z))            [G, max_atoms]  classes 1..max_atoms
    p(n_species | z)  = softmax(W_k h(z))            [G, max_species]  distinct elements, 1..max_species
    lattice(z)        = W_l h(z)                     [G, 6]  normalised (a, b, c, alpha, beta, gamma)
    y(z)              = MLP(z)                       [G, T]  standardised properties

h is an MLP shared by the four structure heads. The reconstruction targets are computed
from the input graph itself, inside the loss: the element fractions from ``species``, the
atom and element counts from them and ``n_node``, the lattice parameters from
``globals["lattice"]``. Lengths are normalised per atom, l / n_atoms^(1/3) (a crystal's
size grows with its cell), then standardised with training statistics (``LatticeScaler``);
angles are standardised.

The loss per crystal (averaged over real graphs, padding masked) is

    KL(f || p) + CE(n_atoms) + CE(n_species) + |lattice - target|^2 / 6 + |y - target|^2 / T + beta * KL(q(z|x) || N(0, I))

with weights from ``VAEConfig``; beta rises linearly from 0 over the warm-up
(``kl_weight``), so the decoders learn before the prior pulls the codes together.
``KL(f || p) = sum_e f_e log(f_e / p_e)`` is the composition cross-entropy minus its floor,
the entropy of f, so 0 means a perfect composition.

Decoding is deterministic (``decode_composition``): the most likely atom count N and number
of elements k, the k most likely elements, one atom each, and the other N - k atoms
apportioned by their renormalised probabilities (largest remainders, ``apportion``). The
n_species head matters: apportioning a whole distribution decodes the small probabilities
that prior samples spread over many elements into a composition of eight or more elements.
"""

from __future__ import annotations

import dataclasses
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


def apportion(probabilities: jnp.ndarray, n_atoms: jnp.ndarray) -> jnp.ndarray:
    """[S, K] integer counts summing to n_atoms [S], proportional to probabilities [S, K].

    Largest remainders (Hamilton's method): floor(p * n), then one more atom to each of the
    n - sum(floor) elements with the largest fractional parts (ties to the lower index).
    """
    quota = probabilities * n_atoms[:, None]
    counts = jnp.floor(quota)
    remainder = quota - counts
    missing = n_atoms - counts.sum(-1)
    rank = jnp.argsort(jnp.argsort(-remainder, axis=-1, stable=True), axis=-1)
    return (counts + (rank < missing[:, None])).astype(jnp.int32)


def decode_composition(probabilities: jnp.ndarray, n_atoms: jnp.ndarray, n_species: jnp.ndarray) -> jnp.ndarray:
    """[S, K] counts: the min(k, N) most likely elements of probabilities [S, K], one atom each,
    the rest of the n_atoms [S] (N) apportioned by their renormalised probabilities; n_species [S] (k)."""
    k = jnp.minimum(n_species, n_atoms)
    rank = jnp.argsort(jnp.argsort(-probabilities, axis=-1, stable=True), axis=-1)
    chosen = rank < k[:, None]
    kept = jnp.where(chosen, probabilities, 0.0)
    kept = kept / jnp.sum(kept, -1, keepdims=True)
    return chosen.astype(jnp.int32) + apportion(kept, n_atoms - k)


def encoder_config(config: VAEConfig):
    """The CGCNNConfig of the encoder: ``config.encoder`` with 2 * latent_dim outputs (mu, then log-variance)."""
    d = config.latent_dim
    names = tuple(f"mu_{i}" for i in range(d)) + tuple(f"logvar_{i}" for i in range(d))
    return dataclasses.replace(config.encoder, targets=names)


class VAEOutput(NamedTuple):
    """Everything one forward pass produces, per graph: mu, logvar, z [G, d]; composition_logits
    [G, N_ELEMENTS]; n_atoms_logits [G, max_atoms]; n_species_logits [G, max_species];
    lattice [G, 6] normalised; properties [G, T]."""

    mu: jnp.ndarray
    logvar: jnp.ndarray
    z: jnp.ndarray
    composition_logits: jnp.ndarray
    n_atoms_logits: jnp.ndarray
    n_species_logits: jnp.ndarray
    lattice: jnp.ndarray
    properties: jnp.ndarray


class LatentDecoder(nn.Module):
    """z [G, d] -> (composition_logits [G, N_ELEMENTS], n_atoms_logits [G, max_atoms],
    n_species_logits [G, max_species], lattice [G, 6])."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z: jnp.ndarray):
        cfg = self.config
        h = z
        for i in range(cfg.decoder_layers):
            h = softplus(nn.Dense(cfg.decoder_features, name=f"hidden_{i}")(h))
        logits = nn.Dense(N_ELEMENTS, name="composition")(h)
        logits = logits.at[:, 0].set(-1e9)  # Z = 0 is padding, not an element
        counts = nn.Dense(cfg.max_atoms, name="n_atoms")(h), nn.Dense(cfg.max_species, name="n_species")(h)
        return logits, *counts, nn.Dense(6, name="lattice")(h)


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

    def decode(self, z: jnp.ndarray):
        """(composition_logits [G, N_ELEMENTS], n_atoms_logits [G, max_atoms], n_species_logits
        [G, max_species], lattice [G, 6] normalised)."""
        return self.decoder(z)

    def predict_properties(self, z: jnp.ndarray) -> jnp.ndarray:
        """[G, T] standardised properties from z [G, d]."""
        return self.property_head(z)

    def __call__(self, graph: jraph.GraphsTuple, key: jax.Array, train: bool = False) -> VAEOutput:
        mu, logvar = self.encode(graph, train)
        z = reparameterize(key, mu, logvar)
        return VAEOutput(mu, logvar, z, *self.decode(z), self.predict_properties(z))


def vae_loss(
    out: VAEOutput, graph: jraph.GraphsTuple, lattice_scaler: LatticeScaler, config: VAEConfig, beta
) -> tuple[jnp.ndarray, dict]:
    """(mean loss over real graphs, per-term means) of one padded batch.

    graph.globals["targets"]: [G, T] standardised properties; beta: the KL weight now
    (``kl_weight``). Terms: composition (KL(f || p), nats), n_atoms and n_species
    (cross-entropies, nats), lattice and property (mean squared error, standardised units), kl (nats).
    """
    mask = jraph.get_graph_padding_mask(graph)
    fractions = composition_fractions(graph)
    log_p = jax.nn.log_softmax(out.composition_logits)
    composition = jnp.sum(jax.scipy.special.xlogy(fractions, fractions) - fractions * log_p, -1)
    n_atoms = _cross_entropy(out.n_atoms_logits, graph.n_node)
    n_species = _cross_entropy(out.n_species_logits, jnp.sum(fractions > 0, -1))
    # Padding graphs have a zero lattice: give them the unit cube, or their NaN targets would
    # poison the gradient through the masked sum (0 * NaN).
    cell = jnp.where(mask[:, None, None], graph.globals["lattice"], jnp.eye(3))
    target_lattice = lattice_scaler.transform(lattice_parameters(cell), jnp.maximum(graph.n_node, 1))
    lattice = jnp.mean(jnp.square(out.lattice - target_lattice), -1)
    properties = jnp.mean(jnp.square(out.properties - graph.globals["targets"]), -1)
    kl = kl_divergence(out.mu, out.logvar)
    terms = {"composition": composition, "n_atoms": n_atoms, "n_species": n_species, "lattice": lattice, "property": properties, "kl": kl}
    terms = {name: jnp.where(mask, value, 0.0) for name, value in terms.items()}
    per_graph = (
        config.composition_weight * terms["composition"] + config.n_atoms_weight * (terms["n_atoms"] + terms["n_species"])
        + config.lattice_weight * terms["lattice"] + config.property_weight * terms["property"] + beta * terms["kl"]
    )
    n_real = jnp.maximum(jnp.sum(mask), 1)
    return jnp.sum(per_graph) / n_real, {name: jnp.sum(value) / n_real for name, value in terms.items()}


def _cross_entropy(logits: jnp.ndarray, count: jnp.ndarray) -> jnp.ndarray:
    """[G] -log p(count) for logits [G, C] over the classes 1..C (counts clipped into range)."""
    label = jnp.clip(count - 1, 0, logits.shape[-1] - 1)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], -1)[:, 0]


def create_vae(config: VAEConfig) -> CrystalVAE:
    """The CrystalVAE of ``config``; raises ValueError naming every invalid field."""
    problems = [
        f"{name} = {getattr(config, name)} must be >= 1"
        for name in ("latent_dim", "decoder_features", "decoder_layers", "property_features", "max_atoms", "max_species")
        if getattr(config, name) < 1
    ]
    problems += [f"{name} = {getattr(config, name)} must be >= 0" for name in (
        "beta", "kl_warmup_epochs", "composition_weight", "n_atoms_weight", "lattice_weight", "property_weight",
    ) if getattr(config, name) < 0]
    if not config.targets:
        problems.append("targets is empty (the property head needs at least one)")
    if problems:
        raise ValueError("invalid VAEConfig: " + "; ".join(problems))
    return CrystalVAE(config)
