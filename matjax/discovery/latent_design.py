"""Inverse design in a VAE's latent space, and decoded latents turned into structures a user can open.

Design: from S latent starts z_s ~ N(0, I), minimise per start

    L(z) = (y(z) - y*)^2 + lambda * |z|^2 / 2

with optax (Adam), where y is the VAE's property head in standardised units and y* the
target. The second term is the negative log prior (up to a constant), which keeps z where
the decoder has seen data. All starts run in one jitted program: ``vmap`` over starts of
a ``lax.scan`` over steps (``optimise_latents``). The head reads z, but a user gets the
structure decoded from z, and decoding loses detail (a composition is discrete, the
positions come from a template); so a design keeps only the candidates whose realised
structure, encoded again, still meets the target by the head (``reencoded_properties``).

Realisation: a decoded latent is (element counts, n_atoms, lattice parameters); atom
positions come from a template, the training crystal nearest in latent space with the
same number of atoms, preferring one with the same stoichiometric pattern (e.g. 1:1:3 for
ABX3). Its species are substituted (``assign_species``) and its lattice is replaced by
the decoded one. A latent with no template of its size, or whose lattice parameters do
not form a cell, is reported and skipped, never replaced by something else.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from matjax.data.dataset import Dataset
from matjax.data.elements import element_descriptors, symbols
from matjax.config import LatentDesignConfig
from matjax.train.vae import DecodedCrystals, TrainedVAE, graph_counts

ELECTRONEGATIVITY = element_descriptors()[:, 0]  # [104] Pauling, by Z


def optimise_latents(
    predict: Callable[[jnp.ndarray], jnp.ndarray], z0: jnp.ndarray, target: float, steps: int,
    learning_rate: float, prior_weight: float, stop_within: float = 0.0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Minimise (predict(z) - target)^2 + prior_weight * |z|^2 / 2 from every start z0 [S, d].

    predict: z [d] -> scalar property (same units as target). Each start has its own Adam
    state (vmap). A start stops moving once |predict(z) - target| <= stop_within: with a
    prior term the objective has one minimiser that every start would otherwise reach, and
    a design run that returns one crystal S times is no search. Returns (z [S, d] after ``steps`` steps, trajectory [steps + 1, S] of
    predict(z), the start first).
    """
    tx = optax.adam(learning_rate)

    def objective(z):
        value = predict(z)
        return jnp.square(value - target) + 0.5 * prior_weight * jnp.sum(jnp.square(z)), value

    def run(z):
        def step(carry, _):
            z, opt_state = carry
            (_, value), grad = jax.value_and_grad(objective, has_aux=True)(z)
            updates, opt_state = tx.update(grad, opt_state, z)
            moved = optax.apply_updates(z, updates)
            return (jnp.where(jnp.abs(value - target) <= stop_within, z, moved), opt_state), value

        (z, _), values = jax.lax.scan(step, (z, tx.init(z)), None, length=steps)
        return z, jnp.append(values, predict(z))

    z, trajectory = jax.jit(jax.vmap(run))(jnp.asarray(z0))
    return z, trajectory.T


def check_target(target: float, values: np.ndarray, name: str) -> None:
    """Warn when ``target`` lies outside the range of the training ``values`` of property ``name``."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if not lo <= target <= hi:
        warnings.warn(
            f"target {name} = {target} is outside the training data's range [{lo:.3g}, {hi:.3g}]: "
            "the property head extrapolates there, so designs are unreliable", stacklevel=2,
        )


def assign_species(template_species: np.ndarray, counts: dict[int, int]) -> np.ndarray:
    """[N] species for the template's sites (in order) that realise ``counts`` (Z -> atoms, sum N).

    Same stoichiometric pattern (the sorted multisets of counts agree): whole species
    groups are mapped onto whole groups, equal-sized groups paired by electronegativity
    rank, so symmetry-equivalent sites keep one species (BaTiO3 -> SrZrO3 puts Sr on Ba,
    Zr on Ti, O on O). Otherwise sites, ordered by their template species'
    electronegativity, are filled with the new atoms in electronegativity order: anions
    go where the template's anions were.
    """
    template_species = np.asarray(template_species)
    if sum(counts.values()) != len(template_species):
        raise ValueError(f"counts {counts} have {sum(counts.values())} atoms, the template {len(template_species)} sites")
    groups = Counter(template_species.tolist())
    key = lambda table: lambda z: (table[z], ELECTRONEGATIVITY[z], z)  # noqa: E731
    if sorted(groups.values()) == sorted(counts.values()):
        mapping = dict(zip(sorted(groups, key=key(groups)), sorted(counts, key=key(counts))))
        return np.array([mapping[z] for z in template_species.tolist()], dtype=np.int32)
    sites = np.lexsort((template_species, ELECTRONEGATIVITY[template_species]))
    atoms = sorted((z for z, n in counts.items() for _ in range(n)), key=lambda z: (ELECTRONEGATIVITY[z], z))
    species = np.empty(len(template_species), dtype=np.int32)
    species[sites] = atoms
    return species


def lattice_problem(parameters: Sequence[float]) -> str | None:
    """Why (a, b, c, alpha, beta, gamma) cannot be a cell, or None if it can.

    Needs positive lengths, angles in (0, 180) and a positive-definite metric:
    1 - cos^2 a - cos^2 b - cos^2 g + 2 cos a cos b cos g > 0.
    """
    a, b, c, alpha, beta, gamma = map(float, parameters)
    if not np.all(np.isfinite(parameters)):
        return "non-finite lattice parameters"
    if min(a, b, c) <= 0:
        return f"non-positive lattice length(s) {a:.3g}, {b:.3g}, {c:.3g}"
    if not all(0 < angle < 180 for angle in (alpha, beta, gamma)):
        return f"angles {alpha:.1f}, {beta:.1f}, {gamma:.1f} outside (0, 180)"
    ca, cb, cg = np.cos(np.radians([alpha, beta, gamma]))
    if 1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg <= 1e-6:
        return f"angles {alpha:.1f}, {beta:.1f}, {gamma:.1f} do not close a cell"
    return None


def formula(counts: np.ndarray) -> str:
    """'Li2O1'-style formula of a counts row [N_ELEMENTS] (Z order)."""
    table = symbols()
    return "".join(f"{table[z]}{n}" for z, n in enumerate(counts) if n)


def compositions(counts: np.ndarray) -> list:
    """pymatgen Compositions of counts rows [S, N_ELEMENTS]."""
    from pymatgen.core import Composition

    table = symbols()
    return [Composition({table[z]: int(row[z]) for z in np.flatnonzero(row)}) for row in counts]


@dataclasses.dataclass(frozen=True)
class Templates:
    """Training crystals as position templates: their graphs, latent means mu [M, d] and counts [M, N_ELEMENTS]."""

    dataset: Dataset
    mu: np.ndarray
    counts: np.ndarray
    patterns: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, dataset: Dataset, mu: np.ndarray) -> "Templates":
        counts = graph_counts(dataset.graphs)
        return cls(dataset, np.asarray(mu), counts, tuple(_pattern(row) for row in counts))

    def nearest(self, z: np.ndarray, counts: np.ndarray) -> tuple[int, str]:
        """(template index, "pattern" or "size") for one latent z [d] with decoded counts, or (-1, reason)."""
        n_atoms = int(counts.sum())
        same_size = np.flatnonzero(self.dataset.graphs.n_node == n_atoms)
        if len(same_size) == 0:
            return -1, f"no training crystal has {n_atoms} atoms to take positions from"
        pattern = _pattern(counts)
        same_pattern = same_size[[self.patterns[i] == pattern for i in same_size]]
        pool, match = (same_pattern, "pattern") if len(same_pattern) else (same_size, "size")
        distance = np.sum(np.square(self.mu[pool] - z), axis=1)
        return int(pool[np.argmin(distance)]), match


def _pattern(counts: np.ndarray) -> tuple[int, ...]:
    return tuple(sorted(int(n) for n in counts if n))


@dataclasses.dataclass(frozen=True)
class Realisation:
    """Structures for S decoded latents: structures [S] (None where skipped); template [S] index
    into the templates' dataset (-1 where skipped); match [S] "pattern" / "size" / "";
    skipped: (latent index, formula, reason) of every latent that could not be realised."""

    structures: list
    template: np.ndarray
    match: list[str]
    skipped: list[tuple[int, str, str]]

    @property
    def realised(self) -> np.ndarray:
        """[S] bool: a structure was built."""
        return self.template >= 0


def realise(decoded: DecodedCrystals, z: np.ndarray, templates: Templates) -> Realisation:
    """pymatgen Structures for decoded latents z [S, d] (see the module docstring)."""
    from pymatgen.core import Lattice, Structure

    structures, chosen, matches, skipped = [], np.full(len(z), -1), [], []
    for s in range(len(z)):
        counts = decoded.counts[s]
        problem = lattice_problem(decoded.lattice[s])
        index, match = (-1, problem) if problem else templates.nearest(z[s], counts)
        if index < 0:
            structures.append(None)
            matches.append("")
            skipped.append((s, formula(counts), match))
            continue
        template = templates.dataset.graphs.graph(index)
        species = assign_species(template.species, {int(k): int(counts[k]) for k in np.flatnonzero(counts)})
        structures.append(Structure(Lattice.from_parameters(*decoded.lattice[s]), species.tolist(), template.frac))
        chosen[s] = index
        matches.append(match)
    return Realisation(structures, chosen, matches, skipped)


def write_cifs(structures: Sequence, names: Sequence[str], directory: str | Path) -> list[Path]:
    """Write each non-None structure to ``directory/<name>.cif``; returns the paths written."""
    from pymatgen.io.cif import CifWriter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for structure, name in zip(structures, names):
        if structure is not None:
            path = directory / f"{name}.cif"
            CifWriter(structure).write_file(path)
            paths.append(path)
    return paths


def prior_latents(n: int, latent_dim: int, seed: int) -> np.ndarray:
    """[n, latent_dim] samples of the prior N(0, I), from PRNGKey(seed)."""
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, latent_dim)))


def aggregate_posterior_latents(mu: np.ndarray, logvar: np.ndarray, n: int, seed: int) -> np.ndarray:
    """[n, d] samples of the aggregate posterior q(z) = mean_i N(mu_i, exp(logvar_i)) of M crystals (mu, logvar [M, d]).

    The latents the decoder was trained on; where the posteriors are much narrower than the
    prior they leave holes in N(0, I) that prior samples fall into.
    """
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(mu), n)
    return mu[pick] + np.exp(0.5 * logvar[pick]) * rng.standard_normal((n, mu.shape[1]))


def design_latents(trained: TrainedVAE, config: LatentDesignConfig, target: float, train_values: np.ndarray):
    """(z0 [S, d], z [S, d], trajectory [steps + 1, S]) of ``optimise_latents`` toward ``target``
    (physical units) of ``config.property``, from ``config.n_starts`` prior samples.

    The trajectory is the VAE head's property in physical units. A start stops once the head
    is within half the hit tolerance of the target. Warns if the target lies outside the
    training values [M] of that property.
    """
    if config.property not in trained.config.targets:
        raise ValueError(f"property {config.property!r} is not predicted by this VAE (targets {trained.config.targets})")
    check_target(target, train_values, config.property)
    column = trained.config.targets.index(config.property)
    mean, std = float(trained.property_scaler.mean[column]), float(trained.property_scaler.std[column])
    model, variables = trained.model, trained.variables

    def predict(z):
        return model.apply(variables, z[None], method=model.predict_properties)[0, column]

    z0 = prior_latents(config.n_starts, trained.config.latent_dim, config.seed)
    z, trajectory = optimise_latents(predict, z0, (target - mean) / std, config.steps, config.learning_rate, config.prior_weight,
                                     stop_within=0.5 * config.tolerance / std)
    return z0, np.asarray(z), np.asarray(trajectory) * std + mean


def predict_structures(predictor, structures: Sequence, column: int = 0, **predict_kwargs) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """([S] ensemble-mean prediction of ``predictor`` (NaN where None or unusable), skipped (index, reason)).

    predictor: an ``EnsemblePredictor``; graphs are built with its model's graph settings;
    predict_kwargs go to ``predictor.predict`` (e.g. one ``budget`` for every call: one compilation).
    """
    values, graphs, kept, skipped = _graphs_of(structures, predictor.model.config.graph)
    if kept:
        values[kept] = predictor.predict(graphs, **predict_kwargs)[0][:, column]
    return values, skipped


def reencoded_properties(trained: TrainedVAE, structures: Sequence, column: int) -> np.ndarray:
    """[S] the VAE's own head on the posterior mean of each structure (NaN where None or unusable).

    The design's self-check: a realised candidate re-encodes near the latent it was decoded
    from only when decoding kept what the head read there.
    """
    values, graphs, kept, _ = _graphs_of(structures, trained.config.encoder.graph)
    if kept:
        values[kept] = trained.predict_properties(trained.encode(graphs)[0])[:, column]
    return values


def _graphs_of(structures: Sequence, graph_config):
    """(NaN values [S], packed graphs of the usable structures, their indices, skipped (index, reason))."""
    from matjax.data.graphs import pack, structure_to_graph

    values, graphs, kept, skipped = np.full(len(structures), np.nan), [], [], []
    for i, structure in enumerate(structures):
        if structure is None:
            continue
        try:
            graphs.append(structure_to_graph(structure, graph_config.cutoff, graph_config.max_neighbors))
            kept.append(i)
        except ValueError as err:  # coincident or isolated atoms: reported, counted as a miss
            skipped.append((i, f"{type(err).__name__}: {err}"))
    return values, pack(graphs) if graphs else None, kept, skipped


def hit_rate(values: np.ndarray, target: float, tolerance: float) -> float:
    """Share of ``values`` [S] within ``tolerance`` of ``target``; NaN (no candidate) counts as a miss."""
    return float(np.mean(np.abs(np.nan_to_num(values, nan=np.inf) - target) <= tolerance))
