"""Training and using a crystal VAE (``matjax.models.vae``).

``fit_vae`` trains one VAE with AdamW (``matjax.train.loop.create_optimizer``), a linear KL
warm-up, reduce-on-plateau on the validation loss and orbax checkpoints
(``matjax.train.checkpoint``): "latest" (the full training state, every epoch end; a
killed run started again resumes at the next epoch) and "best" (the variables of the
epoch with the lowest validation loss, evaluated at the full beta). The step is one
jitted program over static padded batches, so it compiles once.

Randomness is explicit: the reparameterisation key of training step s is
``fold_in(PRNGKey(seed), s)`` and of validation batch b ``fold_in(PRNGKey(seed + 1), b)``;
batches follow the permutation drawn from (seed, epoch). A run is a function of its
seed, and a resumed run repeats the uninterrupted one.

``refine_decoder`` then self-trains the decoder on charge-balanced decodes of prior latents, so
that N(0, I) samples decode to valid compositions as often as the training latents do.

``TrainedVAE`` wraps the best variables with the scalers for encoding crystals, decoding
latents to (composition, n_atoms, lattice) and predicting properties in physical units.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from tqdm.auto import tqdm

from matjax.config import DecoderRefineConfig, TrainConfig, VAEConfig
from matjax.data.batching import budget_for, iterate_batches
from matjax.data.dataset import Dataset
from matjax.data.elements import symbols
from matjax.data.graphs import PackedGraphs, concat
from matjax.discovery.validity import composition_valid
from matjax.models.vae import (MASKED_LOGIT, N_ELEMENTS, CrystalVAE, LatticeScaler, composition_nll, count_slots, create_vae, decode_composition,
                               kl_weight, lattice_parameters, stoichiometries, vae_loss)
from matjax.train.checkpoint import Checkpointer, abstract_like, config_from_dict, config_to_dict, restore_best
from matjax.train.loop import (NonFiniteLossError, TrainState, _stop_reason, check_split, create_optimizer, create_plateau,
                               guarded_update)
from matjax.train.losses import TargetScaler
from matjax.train.sharding import DeviceBatcher, data_mesh, replicated

log = logging.getLogger("matjax")
TERMS = ("composition", "stoichiometry", "lattice", "property", "kl")


class DecodedCrystals(NamedTuple):
    """S decoded latents (numpy): n_atoms [S]; counts [S, N_ELEMENTS] atoms per Z (sum n_atoms);
    lattice [S, 6] (a, b, c in Angstrom, alpha, beta, gamma in degrees)."""

    n_atoms: np.ndarray
    counts: np.ndarray
    lattice: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrainedVAE:
    """A trained VAE with the scalers of its training data; all inputs and outputs host numpy."""

    model: CrystalVAE
    variables: dict
    property_scaler: TargetScaler
    lattice_scaler: LatticeScaler

    @property
    def config(self) -> VAEConfig:
        return self.model.config

    def encode(self, graphs: PackedGraphs, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(mu [M, d], logvar [M, d]) of every graph, in order (eval mode)."""
        mu, logvar = [], []
        order = []
        for idx, batch in iterate_batches(graphs, budget_for(graphs, batch_size)):
            m, lv = _encode(self.model, self.variables, jax.tree.map(jnp.asarray, batch))
            mu.append(np.asarray(m)[: len(idx)])
            logvar.append(np.asarray(lv)[: len(idx)])
            order.append(idx)
        inverse = np.argsort(np.concatenate(order))
        return np.concatenate(mu)[inverse], np.concatenate(logvar)[inverse]

    def decode(self, z: np.ndarray, charge_balanced: bool = False) -> DecodedCrystals:
        """The most likely stoichiometry given to the most likely elements, and the lattice, of latents z [S, d].

        charge_balanced: decode the last element of each composition under the constraint that
        the composition is valid (``balance_last_slot``), as molecular decoders mask valences.
        """
        _, n_atoms, slot_counts, elements, logits, lattice = map(np.asarray, _decode(self.model, self.variables, self.lattice_scaler, jnp.asarray(z)))
        if charge_balanced:
            elements = balance_last_slot(elements, slot_counts, logits)
        return DecodedCrystals(n_atoms, np.asarray(decode_composition(elements, slot_counts)), lattice)

    def predict_properties(self, z: np.ndarray) -> np.ndarray:
        """[S, T] properties (physical units) of latents z [S, d], from the VAE's own head."""
        return self.property_scaler.inverse(np.asarray(_properties(self.model, self.variables, jnp.asarray(z))))


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, variables, graph):
    return model.apply(variables, graph, method=model.encode)


@functools.partial(jax.jit, static_argnums=0)
def _properties(model, variables, z):
    return model.apply(variables, z, method=model.predict_properties)


@functools.partial(jax.jit, static_argnums=0)
def _decode(model, variables, lattice_scaler, z):
    """(stoichiometry class [S], n_atoms [S], slot counts [S, K], elements [S, K], element logits [S, K, N_ELEMENTS], lattice [S, 6])."""
    logits, elements, stoichiometry_logits, lattice = model.apply(variables, z, method=model.decode)
    table = jnp.asarray(stoichiometries(model.config.max_atoms, model.config.max_species))
    label = jnp.argmax(stoichiometry_logits, -1)
    n_atoms = jnp.sum(table[label], -1)
    return label, n_atoms, table[label], elements, logits, lattice_scaler.inverse(lattice, n_atoms)


def balance_last_slot(elements: np.ndarray, slot_counts: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """elements [S, K] (Z; 0 = empty slot) with each invalid composition's last filled slot re-decoded.

    slot_counts [S, K]: atoms per slot; logits [S, K, N_ELEMENTS]: each slot's scores given the
    elements of the slots before it (the decoder's greedy pass), so the last slot's scores
    stay exact when its element changes. A composition that is not valid
    (``composition_valid``) takes the highest-scoring last element that makes it valid;
    where none does it is kept as decoded, and reported invalid downstream.
    """
    out = np.array(elements)
    for i, (row, counts) in enumerate(zip(out, slot_counts)):
        if slots_valid(row, counts):
            continue
        last = np.flatnonzero(counts > 0)[-1]
        allowed = np.flatnonzero(logits[i, last] > MASKED_LOGIT)  # not padding, not an earlier slot's element
        for z in allowed[np.argsort(-logits[i, last, allowed])]:
            row[last] = z
            if slots_valid(row, counts):
                break
        else:
            row[last] = elements[i, last]
    return out


def slots_valid(elements: np.ndarray, counts: np.ndarray) -> bool:
    """``composition_valid`` of one decoded composition: elements [K] (Z, 0 = empty) with counts [K]."""
    from pymatgen.core import Composition

    table = symbols()
    return composition_valid(Composition({table[z]: int(n) for z, n in zip(elements, counts) if n > 0}))


def refine_decoder(trained: TrainedVAE, train: Dataset, config: DecoderRefineConfig, workdir: str | Path | None = None,
                   progress: bool = True) -> tuple[TrainedVAE, list[dict]]:
    """The VAE with its decoder self-trained toward valid compositions between the training posteriors.

    Decoded from N(0, I), a VAE proposes charge-balanced compositions less often than from the
    latents it was trained on (the aggregate posterior): prior samples fall between the
    posteriors, where nothing taught the decoder chemistry. Each round draws ``n_prior`` prior
    latents, decodes them under the charge-balance constraint (``balance_last_slot``; those
    nothing balances are dropped) and fits the decoder to these pseudo-labels (the elements'
    cross-entropy given their stoichiometry) while it keeps reconstructing the training crystals
    (z ~ q(z|x), teacher-forced, every decoder term). The constraint so moves into the decoder's
    own greedy decoding: self-training with a validity filter, as validity rewards train
    molecular generators. Only the decoder changes; encoder, property head and scalers are kept.

    Returns (refined VAE, one record per round: share of the draws kept as pseudo-labels, share
    the constraint changed, mean loss). workdir: where the refined variables are written as a
    "best" checkpoint that ``load_vae`` reads (None: not written).
    """
    cfg, model, batch = trained.config, trained.model, config.batch_size
    chunks = np.array_split(graph_counts(train.graphs), max(1, len(train) // 1024))
    label, elements = (np.concatenate(a) for a in zip(*[map(np.asarray, count_slots(jnp.asarray(c), cfg)) for c in chunks]))
    lattice = np.asarray(trained.lattice_scaler.transform(graph_lattice_parameters(train.graphs), train.graphs.n_node.astype(np.float64)), np.float32)
    mu, logvar = trained.encode(train.graphs)
    tx = optax.adam(config.learning_rate)

    def with_decoder(decoder) -> TrainedVAE:
        return dataclasses.replace(trained, variables={**trained.variables, "params": {**trained.variables["params"], "decoder": decoder}})

    def nll(decoder, z, label, elements):
        logits, _, stoichiometry_logits, lattice_out = model.apply(with_decoder(decoder).variables, z, label, elements, method=model.decode)
        return (*composition_nll(logits, stoichiometry_logits, label, elements), lattice_out)

    @jax.jit
    def step(decoder, opt_state, real: dict, pseudo: dict):
        def loss_fn(decoder):
            composition, stoichiometry, lattice_out = nll(decoder, real["z"], real["label"], real["elements"])
            reconstruction = (cfg.composition_weight * composition + cfg.stoichiometry_weight * stoichiometry
                              + cfg.lattice_weight * jnp.mean(jnp.square(lattice_out - real["lattice"]), -1))
            pseudo_composition = nll(decoder, pseudo["z"], pseudo["label"], pseudo["elements"])[0]
            return jnp.mean(reconstruction) + config.pseudo_weight * cfg.composition_weight * jnp.mean(pseudo_composition)

        loss, grads = jax.value_and_grad(loss_fn)(decoder)
        updates, opt_state = tx.update(grads, opt_state, decoder)
        return optax.apply_updates(decoder, updates), opt_state, loss

    decoder = trained.variables["params"]["decoder"]
    opt_state, history = tx.init(decoder), []
    bar = tqdm(total=config.rounds * config.steps, desc="refining VAE decoder", disable=not progress, dynamic_ncols=True)
    for r in range(config.rounds):
        rng = np.random.default_rng([config.seed, r])
        z = rng.standard_normal((config.n_prior, cfg.latent_dim)).astype(np.float32)
        pseudo_label, _, slot_counts, decoded, logits, _ = map(np.asarray, _decode(model, with_decoder(decoder).variables, trained.lattice_scaler, jnp.asarray(z)))
        balanced = balance_last_slot(decoded, slot_counts, logits)
        keep = np.array([slots_valid(row, counts) for row, counts in zip(balanced, slot_counts)])
        if not keep.any():
            raise ValueError(f"refine_decoder round {r}: none of {config.n_prior} prior latents decodes to a valid composition, even constrained")
        pseudo = {"z": z[keep], "label": pseudo_label[keep], "elements": balanced[keep]}
        losses = []
        for _ in range(config.steps):
            i, j = rng.integers(0, len(mu), batch), rng.integers(0, int(keep.sum()), batch)
            real = {"z": (mu[i] + np.exp(0.5 * logvar[i]) * rng.standard_normal((batch, cfg.latent_dim))).astype(np.float32),
                    "label": label[i], "elements": elements[i], "lattice": lattice[i]}
            decoder, opt_state, loss = step(decoder, opt_state, real, {k: v[j] for k, v in pseudo.items()})
            losses.append(loss)
            bar.update()
        if not np.all(np.isfinite(losses)):
            raise NonFiniteLossError(f"non-finite loss while refining the VAE decoder in round {r}")
        history.append({"round": r, "kept": float(keep.mean()), "changed": float(np.any(balanced != decoded, 1).mean()), "loss": float(np.mean(losses))})
        bar.set_postfix(kept=f"{keep.mean():.3f}", loss=f"{history[-1]['loss']:.3f}", refresh=True)
    bar.close()
    refined = with_decoder(jax.device_get(decoder))
    if workdir is not None:
        configs = {"model": config_to_dict(cfg), "refine": config_to_dict(config), "data": _scaler_record(refined)}
        with Checkpointer(workdir, configs) as ckpt:
            ckpt.save("best", config.rounds, refined.variables, {"rounds": history})
            ckpt.wait()
    return refined, history


def _scaler_record(trained: TrainedVAE) -> dict:
    """The property and lattice scalers as JSON (``load_vae`` reads them back)."""
    return {"target_mean": np.asarray(trained.property_scaler.mean).tolist(), "target_std": np.asarray(trained.property_scaler.std).tolist(),
            "lattice_mean": np.asarray(trained.lattice_scaler.mean).tolist(), "lattice_std": np.asarray(trained.lattice_scaler.std).tolist()}


def graph_counts(graphs: PackedGraphs) -> np.ndarray:
    """[M, N_ELEMENTS] number of atoms of each Z in each graph."""
    graph_index = np.repeat(np.arange(len(graphs)), graphs.n_node)
    counts = np.zeros((len(graphs), N_ELEMENTS), dtype=np.int64)
    np.add.at(counts, (graph_index, graphs.species), 1)
    return counts


def graph_lattice_parameters(graphs: PackedGraphs) -> np.ndarray:
    """[M, 6] lattice parameters of every graph (a, b, c in Angstrom, angles in degrees)."""
    return np.asarray(lattice_parameters(jnp.asarray(graphs.lattice, jnp.float32)), dtype=np.float64)


def reconstruction_metrics(trained: TrainedVAE, dataset: Dataset, reference: Dataset) -> dict:
    """How well crystals survive encode (mu) -> decode, with the baselines from ``reference`` (train).

    composition_accuracy: decoded element fractions (counts / decoded n_atoms) equal the true
    ones exactly; cell_accuracy: counts and n_atoms both exact; stoichiometry_accuracy: the
    sorted atom counts exact (elements aside); n_atoms_accuracy;
    lattice_mae: mean |error| of the six lattice parameters in the decoder's normalised
    units (per-atom lengths and angles, each over its training std); lattice_length_mae
    (Angstrom) and lattice_angle_mae (degrees) in physical units with the decoded n_atoms.
    Baselines: the most common training composition and n_atoms, and the training-mean lattice.
    """
    mu, _ = trained.encode(dataset.graphs)
    decoded = trained.decode(mu)
    counts, n_atoms = graph_counts(dataset.graphs), dataset.graphs.n_node
    params = graph_lattice_parameters(dataset.graphs)
    same_fractions = lambda c, n: np.all(c * n_atoms[:, None] == counts * np.asarray(n)[:, None], axis=1)  # noqa: E731
    scaler = trained.lattice_scaler
    target = np.asarray(scaler.transform(params, n_atoms.astype(np.float64)))
    predicted = np.asarray(scaler.transform(decoded.lattice, decoded.n_atoms.astype(np.float64)))
    ref_counts, ref_n = graph_counts(reference.graphs), reference.graphs.n_node
    fractions, index = np.unique(ref_counts / ref_n[:, None], axis=0, return_inverse=True)
    common = fractions[np.bincount(index.ravel()).argmax()]
    return {
        "composition_accuracy": float(same_fractions(decoded.counts, decoded.n_atoms).mean()),
        "cell_accuracy": float(np.mean(np.all(decoded.counts == counts, axis=1))),
        "stoichiometry_accuracy": float(np.mean(np.all(-np.sort(-decoded.counts, 1) == -np.sort(-counts, 1), axis=1))),
        "n_atoms_accuracy": float(np.mean(decoded.n_atoms == n_atoms)),
        "lattice_mae": float(np.abs(predicted - target).mean()),
        "lattice_length_mae": float(np.abs(decoded.lattice[:, :3] - params[:, :3]).mean()),
        "lattice_angle_mae": float(np.abs(decoded.lattice[:, 3:] - params[:, 3:]).mean()),
        "baseline_composition_accuracy": float(np.mean(np.all(np.isclose(counts / n_atoms[:, None], common), axis=1))),
        "baseline_n_atoms_accuracy": float(np.mean(n_atoms == np.bincount(ref_n).argmax())),
        "baseline_lattice_mae": float(np.abs(target).mean()),
    }


@dataclasses.dataclass
class VAEFitResult:
    """Outcome of ``fit_vae``: the best-validation VAE and the per-epoch log.

    wall_s: this call's time; train_s: training time summed over resumed sessions.
    """

    trained: TrainedVAE
    history: list[dict]
    best_epoch: int
    stop_reason: str
    wall_s: float
    train_s: float


def _check_sizes(name: str, dataset: Dataset, config: VAEConfig) -> None:
    """ValueError naming the crystals with more atoms or distinct elements than the counting heads decode."""
    counts = {"atoms": dataset.graphs.n_node, "elements": (graph_counts(dataset.graphs) > 0).sum(1)}
    for (what, values), limit in zip(counts.items(), ("max_atoms", "max_species")):
        big = np.flatnonzero(values > getattr(config, limit))
        if len(big):
            shown = ", ".join(f"{dataset.ids[i]} ({values[i]} {what})" for i in big[:5])
            raise ValueError(f"{len(big)} crystal(s) in the {name} split exceed {limit} = {getattr(config, limit)}: {shown}")


def _make_steps(model, tx, lattice_scaler: LatticeScaler, config: VAEConfig, warmup_steps: int, seed: int):
    """(train_step, eval_step), jitted over one padded batch [1, ...] (a one-device DeviceBatcher step)."""
    train_key, eval_key = jax.random.PRNGKey(seed), jax.random.PRNGKey(seed + 1)

    def add(sums, terms, loss, mask_count, nonfinite=0):
        new = {name: sums[name] + terms[name] * mask_count for name in TERMS}
        return {**new, "loss": sums["loss"] + loss * mask_count, "count": sums["count"] + mask_count, "nonfinite": sums["nonfinite"] + nonfinite}

    def train_step(state: TrainState, sums: dict, batch):
        batch = jax.tree.map(lambda x: x[0], batch)
        beta = kl_weight(state.step, config.beta, warmup_steps)
        key = jax.random.fold_in(train_key, state.step)

        def loss_fn(params):
            out, updated = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch, key, train=True, mutable=["batch_stats"]
            )
            loss, terms = vae_loss(out, batch, lattice_scaler, config, beta)
            return loss, (updated["batch_stats"], terms)

        (loss, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new, finite = guarded_update(state, tx, loss, grads, batch_stats=batch_stats)
        count = jnp.sum(jraph.get_graph_padding_mask(batch)).astype(jnp.float32)
        return new, add(sums, jax.tree.map(lambda t: jnp.where(finite, t, 0.0), terms), jnp.where(finite, loss, 0.0), count, ~finite)

    def eval_step(variables, sums: dict, batch, index):
        batch = jax.tree.map(lambda x: x[0], batch)
        out = model.apply(variables, batch, jax.random.fold_in(eval_key, index), train=False)
        loss, terms = vae_loss(out, batch, lattice_scaler, config, config.beta)
        return add(sums, terms, loss, jnp.sum(jraph.get_graph_padding_mask(batch)).astype(jnp.float32))

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step)


def _zero_sums() -> dict:
    return {name: jnp.zeros(()) for name in (*TERMS, "loss", "count")} | {"nonfinite": jnp.zeros((), jnp.int32)}


def _means(sums: dict) -> dict:
    count = max(float(sums["count"]), 1.0)
    return {name: float(sums[name]) / count for name in (*TERMS, "loss")}


def fit_vae(
    config: VAEConfig,
    train_config: TrainConfig,
    train: Dataset,
    val: Dataset,
    workdir: str | Path | None = None,
    progress: bool = True,
    hooks: Sequence[Callable[[int, int], None]] = (),
) -> VAEFitResult:
    """Train the VAE of ``config`` on ``train`` (properties ``config.targets``), early-stopped on ``val``.

    Uses batch_size, learning_rate, weight_decay, warmup_epochs, grad_clip, max_epochs,
    early_stopping, time_budget_s and the plateau settings of ``train_config`` (ensemble_size and
    n_devices must be 1). workdir: checkpoint directory (None: none); a "latest"
    checkpoint there is resumed. hooks: ``hook(epoch, step)`` after every training step.
    """
    cfg = train_config
    if cfg.ensemble_size != 1 or cfg.n_devices not in (1, None):
        raise ValueError(f"fit_vae trains one model on one device; got ensemble_size={cfg.ensemble_size}, n_devices={cfg.n_devices}")
    start = time.perf_counter()
    y_train, y_val = check_split("train", train, config.targets), check_split("val", val, config.targets)
    for name, split in (("train", train), ("val", val)):
        _check_sizes(name, split, config)
    property_scaler = TargetScaler.fit(y_train)
    lattice_scaler = LatticeScaler.fit(graph_lattice_parameters(train.graphs), train.graphs.n_node)
    mesh = data_mesh(1)
    budget = budget_for(concat([train.graphs, val.graphs]), cfg.batch_size)
    train_batcher = DeviceBatcher(train.graphs, budget, mesh, property_scaler.transform(y_train))
    val_batcher = DeviceBatcher(val.graphs, budget, mesh, property_scaler.transform(y_val))
    order = lambda epoch: np.random.default_rng([cfg.seed, epoch]).permutation(len(train))  # noqa: E731
    steps_per_epoch = len(train_batcher.plan(order(0)))

    model = create_vae(config)
    tx, plateau = create_optimizer(cfg, steps_per_epoch), create_plateau(cfg)
    example = jax.tree.map(jnp.asarray, train_batcher.sub_batch(np.arange(1)))
    init_key, sample_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    variables = jax.jit(lambda k: model.init(k, example, sample_key, train=False))(init_key)
    params = variables["params"]
    # Committed to the mesh like the batches, so the first step's inputs match every later step's (one compile).
    state = jax.device_put(
        TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], tx.init(params), plateau.init(params)), replicated(mesh)
    )
    rec = {"epoch": 0, "history": [], "best_score": None, "best_epoch": -1, "train_s": 0.0}
    best_variables = jax.device_get(state.variables)
    configs = {
        "model": config_to_dict(config), "train": config_to_dict(cfg),
        "data": {"n_train": len(train), "n_val": len(val), **_scaler_record(TrainedVAE(model, {}, property_scaler, lattice_scaler))},
    }
    ckpt = Checkpointer(workdir, configs) if workdir is not None else None
    if ckpt is not None and (restored := ckpt.restore("latest", abstract_like({"state": state}, replicated(mesh)))) is not None:
        state, rec = restored[0]["state"], restored[1]
        best = ckpt.restore("best", abstract_like(best_variables))
        best_variables = best[0] if best is not None else best_variables
        log.info("resumed %s at epoch %d", workdir, rec["epoch"])

    train_step, eval_step = _make_steps(model, tx, lattice_scaler, config, config.kl_warmup_epochs * steps_per_epoch, cfg.seed)
    update_plateau = jax.jit(lambda s, v: plateau.update({}, s, value=v)[1])
    stop_reason = "max_epochs"
    session_start, session_base = time.perf_counter(), rec["train_s"]
    bar = tqdm(total=cfg.max_epochs * steps_per_epoch, initial=rec["epoch"] * steps_per_epoch, desc="training VAE",
               disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(rec["epoch"], cfg.max_epochs):
            if reason := _stop_reason(cfg, rec):
                stop_reason = reason
                break
            sums = jax.device_put(_zero_sums(), replicated(mesh))
            for i, batch in enumerate(train_batcher.batches(train_batcher.plan(order(epoch)))):
                state, sums = train_step(state, sums, batch)
                bar.update()
                for hook in hooks:
                    hook(epoch, i)
            if int(sums["nonfinite"]):
                where = f"the last good checkpoint is {ckpt.directory}" if ckpt else "no checkpoints were written (workdir=None)"
                raise NonFiniteLossError(f"non-finite VAE loss or gradient in epoch {epoch} ({int(sums['nonfinite'])} step(s)); {where}")
            val_sums = jax.device_put(_zero_sums(), replicated(mesh))
            for b, batch in enumerate(val_batcher.batches(val_batcher.plan())):
                val_sums = eval_step(state.variables, val_sums, batch, b)
            train_terms, val_terms = _means(sums), _means(val_sums)
            state = state.replace(plateau=update_plateau(state.plateau, jnp.asarray(val_terms["loss"], jnp.float32)))
            entry = {"epoch": epoch, "train": train_terms, "val": val_terms, "beta": float(kl_weight(state.step, config.beta, config.kl_warmup_epochs * steps_per_epoch)),
                     "lr_scale": float(state.plateau.scale), "wall_s": time.perf_counter() - start}
            rec["history"].append(entry)
            if rec["best_score"] is None or val_terms["loss"] < rec["best_score"]:
                rec["best_score"], rec["best_epoch"] = val_terms["loss"], epoch
                best_variables = jax.device_get(state.variables)
                if ckpt is not None:
                    ckpt.save("best", epoch, best_variables, {"epoch": epoch, "val": val_terms})
            rec["epoch"], rec["train_s"] = epoch + 1, session_base + time.perf_counter() - session_start
            if ckpt is not None:
                ckpt.save("latest", epoch + 1, jax.device_get({"state": state}), dict(rec))
            bar.set_postfix(loss=f"{train_terms['loss']:.3f}", val=f"{val_terms['loss']:.3f}", comp=f"{val_terms['composition']:.3f}", refresh=True)
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.wait()
            ckpt.close()
    trained = TrainedVAE(create_vae(config), best_variables, property_scaler, lattice_scaler)
    return VAEFitResult(trained, rec["history"], rec["best_epoch"], stop_reason, time.perf_counter() - start, rec["train_s"])


def load_vae(workdir: str | Path) -> TrainedVAE:
    """The best-validation VAE of a ``fit_vae(..., workdir)`` run, or the refined one of ``refine_decoder(..., workdir)``."""
    from matjax.train.ensemble import example_batch

    def abstract(configs: dict):
        model = create_vae(config_from_dict(VAEConfig, configs["model"]))
        return jax.eval_shape(lambda k: model.init(k, example_batch(), k, train=False), jax.random.PRNGKey(0))

    variables, configs = restore_best(workdir, abstract, "VAE")
    data = configs["data"]
    return TrainedVAE(
        create_vae(config_from_dict(VAEConfig, configs["model"])), variables,
        TargetScaler(np.asarray(data["target_mean"]), np.asarray(data["target_std"])),
        LatticeScaler(np.asarray(data["lattice_mean"]), np.asarray(data["lattice_std"])),
    )
