"""A small CNN that tells ordered from disordered Ising configurations (Carrasquilla & Melko 2017).

The network respects the symmetries of the problem by construction:
* periodic lattice: circular padding and a global mean pool make the logit exactly invariant
  under lattice translations and let one network take any L;
* Z2 spin flip: the logit is symmetrised, f(s) = (g(s) + g(-s)) / 2, so P(ordered) is the same
  for a configuration and its mirror image (the label does not depend on the sign of m).

Training (:func:`train_classifier`) is binary cross-entropy with optax AdamW on minibatches;
the output of :func:`predict_ordered` is P(ordered) per configuration.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from matjax.config import PhaseCNNConfig


class PhaseCNN(nn.Module):
    """spins [batch, L, L] (+-1) -> logit of P(ordered) [batch].

    conv_layers circular 3x3 convolutions (ReLU), a global mean pool, a ReLU dense layer of
    ``hidden`` units and a linear output. One layer already expresses the order parameter:
    the pool of ReLU(s_i) is (1 + m) / 2, and the dense ReLU layer turns m into |m|.
    """

    channels: int = 16
    hidden: int = 32
    conv_layers: int = 1

    @nn.compact
    def __call__(self, spins: jax.Array) -> jax.Array:
        convs = [nn.Conv(self.channels, (3, 3), padding="CIRCULAR") for _ in range(self.conv_layers)]
        dense = nn.Dense(self.hidden)
        out = nn.Dense(1)

        def g(x):
            for conv in convs:
                x = nn.relu(conv(x))
            return out(nn.relu(dense(x.mean(axis=(1, 2)))))[:, 0]

        x = spins.astype(jnp.float32)[..., None]
        return 0.5 * (g(x) + g(-x))


def create_model(cfg: PhaseCNNConfig) -> PhaseCNN:
    """PhaseCNN from a config; only the architecture named "cnn" exists."""
    if cfg.architecture != "cnn":
        raise ValueError(f"unknown phase classifier architecture {cfg.architecture!r}; only 'cnn'")
    return PhaseCNN(channels=cfg.channels, hidden=cfg.hidden, conv_layers=cfg.conv_layers)


@functools.lru_cache(maxsize=None)
def create_optimizer(cfg: PhaseCNNConfig) -> optax.GradientTransformation:
    """AdamW; cached per config so that the jitted train step compiles once per config."""
    return optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)


@functools.partial(jax.jit, static_argnums=0)
def _init(model, key, spins):  # one compile per model and shape, not one per layer initializer
    return model.init(key, spins)


def _loss(model, params, spins, labels):
    logits = model.apply(params, spins)
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(model, optimizer, params, opt_state, spins, labels):
    loss, grads = jax.value_and_grad(functools.partial(_loss, model))(params, spins, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(cfg: PhaseCNNConfig, spins: np.ndarray, labels: np.ndarray, key: jax.Array):
    """Train on spins [n, L, L] with labels [n] (1 = ordered); returns (model, params, losses).

    One epoch visits every configuration once in a random order (last partial batch dropped).
    A non-finite loss stops training and returns the parameters of the last finite step.
    """
    model = create_model(cfg)
    n = len(spins)
    if n < cfg.batch_size:
        raise ValueError(f"{n} training configurations are fewer than one batch of {cfg.batch_size}")
    init_key, key = jax.random.split(key)
    params = _init(model, init_key, jnp.asarray(spins[:1]))
    optimizer = create_optimizer(cfg)
    opt_state = optimizer.init(params)
    labels = np.asarray(labels, np.float32)
    losses = []
    for _ in range(cfg.epochs):
        key, sub = jax.random.split(key)
        order = np.asarray(jax.random.permutation(sub, n))
        epoch = []
        for b in range(n // cfg.batch_size):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            new_params, new_state, loss = _train_step(model, optimizer, params, opt_state, jnp.asarray(spins[idx]), jnp.asarray(labels[idx]))
            if not math.isfinite(float(loss)):
                return model, params, losses
            params, opt_state = new_params, new_state
            epoch.append(float(loss))
        losses.append(float(np.mean(epoch)))
    return model, params, losses


@functools.partial(jax.jit, static_argnums=0)
def _probability(model, params, spins):
    return jax.nn.sigmoid(model.apply(params, spins))


def predict_ordered(model: PhaseCNN, params, spins: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """P(ordered) [n] for spins [n, L, L]; batches are padded to one shape (one compile)."""
    n = len(spins)
    padded = np.concatenate([spins, np.ones((-n % batch_size, *spins.shape[1:]), spins.dtype)])
    out = [_probability(model, params, jnp.asarray(padded[i : i + batch_size])) for i in range(0, len(padded), batch_size)]
    return np.asarray(jnp.concatenate(out))[:n]
