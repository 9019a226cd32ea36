"""Frozen configuration dataclasses.

Configs are hashable, so they can be static arguments of jitted functions. Each
experiment has a ``default`` and a tiny ``test`` config (see ``experiments/``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """How crystals become graphs.

    cutoff: neighbour radius (Angstrom); max_neighbors: keep the nearest k per atom
    (None keeps all); num_rbf: Gaussian centres on [0, cutoff] for the distance expansion.
    """

    cutoff: float = 6.0
    max_neighbors: int | None = None
    num_rbf: int = 40


@dataclasses.dataclass(frozen=True)
class DiscoveryConfig:
    """The active-learning discovery loop (``matjax.discovery.active``).

    rounds: train -> generate -> screen -> validate cycles; n_select: candidates chosen by
    the acquisition and validated per round; n_random: random candidates validated per
    round as the enrichment baseline; noise_floor: error (eV/atom) added in quadrature to
    the ensemble std in the hit probability that ranks candidates;
    parent_max_e_above_hull: known crystals within this of the hull (eV/atom) are parents
    for substitution; substitution_threshold: minimum substitution probability;
    single_site: also substitute single atoms of the parents (partial substitution), which
    keeps the pool growing with every round's discoveries;
    allowed_elements: chemical-space filter (None: any); max_per_formula: most candidates of
    one reduced formula selected per round (None: no limit); hit_tolerance: a validated crystal
    within this of the known hull (eV/atom) counts as a hit; seed.
    """

    rounds: int = 3
    n_select: int = 24
    n_random: int = 24
    noise_floor: float = 0.01
    parent_max_e_above_hull: float = 0.03
    substitution_threshold: float = 1e-3
    single_site: bool = True
    allowed_elements: tuple[str, ...] | None = None
    max_per_formula: int | None = None
    hit_tolerance: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MLFFConfig:
    """A machine-learned force field (``matjax.models.mlff.create_model``).

    model: "invariant" (the seed's SchNet-style model), "painn" (equivariant vectors),
    "moment" (rank-0/1/2 moments contracted to invariants in every layer), "tensor"
    (rank-2 Cartesian tensors carried between layers, TensorNet-style) or "linear" (linear
    in many-body moment invariants, fitted by least squares: ``matjax.train.linear``);
    cutoff: neighbour radius (Angstrom), where the smooth envelope reaches zero;
    features / num_interactions / num_rbf: width, depth and Gaussian centres on [0, cutoff];
    envelope_p: polynomial order of the envelope; max_l: the moment model's highest angular
    order, 2 (rank-0/1/2 Cartesian moments), 3 or 4 (the power spectra of the l = 3 and 4
    moments added; other models ignore it); avg_neighbors: messages are summed and divided
    by this (the training set's mean neighbour count keeps activations O(1));
    sqrt_embedding: channels of the moment model's Finnis-Sinclair term, -a sqrt(neighbour
    density) per atom (``matjax.models.mlff.SqrtEmbedding``; 0 = none);
    min_distance / product_rbf: the linear model's Chebyshev radial basis spans [min_distance,
    cutoff] (num_rbf functions); its 4- and 5-body products use the first product_rbf of them;
    edge_chunk: edges per step of the invariant model's message scan (speed only; 32,768
    was the fastest of 4,096-65,536 and one pass for 64-4000-atom Cu on a 2-core Xeon; on
    an H200 GPU, chunks of up to 1,048,576 ran 4000-atom MD 1.42x faster).
    """

    model: str = "invariant"
    cutoff: float = 5.0
    features: int = 128
    num_interactions: int = 6
    num_rbf: int = 50
    envelope_p: int = 6
    max_l: int = 2
    avg_neighbors: float = 1.0
    sqrt_embedding: int = 0
    edge_chunk: int = 32768
    min_distance: float = 0.0
    product_rbf: int = 4


@dataclasses.dataclass(frozen=True)
class MLFFTrainConfig:
    """Training a force field on energies, forces and stresses (``experiments/train_mlff.py``).

    Loss per batch = energy_weight * mean((dE / n_atoms)^2) + force_weight * mean(|dF|^2) / 3
    + stress_weight * mean(|d sigma|^2) / 9 (eV, Angstrom; stress only where labelled).
    force_huber_delta > 0 replaces each force component's squared error x^2 by the Huber
    form, x^2 for |x| <= delta and delta * (2|x| - delta) beyond (eV/A): the few atoms with
    large errors (mlearn's 6000 K liquid) then pull no harder than the MAE they count for.
    Adam (AdamW, decoupled weight_decay, when that is > 0) with a linear warm-up then cosine
    decay to final_lr_fraction * learning_rate; gradients clipped to grad_clip (global norm);
    evaluation uses an exponential moving average of the parameters (ema_decay). Checkpoints
    every ``eval_every`` epochs; time_budget_s: stop after the first epoch that ends past this
    much training time (None: no limit).

    Final stage (MACE's second stage): the last ``final_stage_epochs`` epochs train with
    ``final_energy_weight`` instead of ``energy_weight``, at the low learning rate of the
    cosine's tail, where the force error has levelled off and the energies still improve;
    the best checkpoint is then chosen among the final stage's evaluations (0: no final stage).

    group_energy_weights, e.g. "Surface=10,Vacancy=3": multiplies the energy term of the
    training structures of those groups (mlearn's structure groups), as GAP fits give each
    configuration type its own energy tolerance: a few surfaces among hundreds of bulk
    frames otherwise barely move the per-atom energy loss ("": all structures alike).

    isolated_atom_energies, e.g. "Mo=-4.5876": DFT energies (eV) of free atoms, each added to
    the training structures as a one-atom structure without neighbours
    (``matjax.data.forcefield.with_isolated_atoms``) ("": none).

    holdout=False trains on the validation structures too (``load_forcefield``): the model
    of the last evaluation is then the one kept, as validation can no longer select.

    The linear model (``matjax.train.linear``) minimises the same energy and force terms in
    one least-squares solve; of the rest it uses only group_energy_weights,
    isolated_atom_energies, holdout and ridge: the relative ridge penalty on its coefficients
    (``matjax.train.linear.ridge_solve``).
    """

    dataset: str = "emt"
    n_frames: int = 300
    batch_size: int = 4
    epochs: int = 100
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.01
    warmup_epochs: int = 2
    energy_weight: float = 1.0
    force_weight: float = 10.0
    force_huber_delta: float = 0.0
    stress_weight: float = 0.0
    grad_clip: float = 10.0
    weight_decay: float = 0.0
    ema_decay: float = 0.99
    eval_every: int = 1
    time_budget_s: float | None = None
    final_stage_epochs: int = 0
    final_energy_weight: float = 1000.0
    group_energy_weights: str = ""
    isolated_atom_energies: str = ""
    holdout: bool = True
    ridge: float = 1e-10
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class CGCNNConfig:
    """CGCNN model (Xie & Grossman 2018); defaults are the reference implementation's.

    graph: neighbour graph and distance expansion (reference: 8 A, 12 neighbours, 41
    Gaussians 0.2 A apart); atom_features: F, the width of the atom features; n_conv:
    gated convolutions; hidden_features / n_hidden: the MLP head after pooling;
    targets: predicted columns, e.g. ("formation_energy_per_atom", "band_gap");
    use_descriptors: also feed ``element_descriptors()`` to the atom embedding;
    bn_momentum: running-average decay of BatchNorm (torch's momentum 0.1).
    """

    graph: GraphConfig = GraphConfig(cutoff=8.0, max_neighbors=12, num_rbf=41)
    atom_features: int = 64
    n_conv: int = 3
    hidden_features: int = 128
    n_hidden: int = 1
    targets: tuple[str, ...] = ("formation_energy_per_atom",)
    use_descriptors: bool = False
    bn_momentum: float = 0.9


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Supervised training of a graph property model (``matjax.train``).

    batch_size: crystals per step, over all devices (the padded budget fits this many
    average crystals); learning_rate / weight_decay: AdamW; max_epochs; early_stopping:
    epochs without a better validation MAE before stopping; plateau_patience /
    plateau_factor / min_lr_scale: reduce-on-plateau of the learning rate on the
    validation MAE; warmup_epochs: linear learning-rate warm-up; cosine_decay: after the
    warm-up, decay the learning rate along a cosine to final_lr_fraction of its peak at the
    end of max_epochs (a run meant to end by time_budget_s should set max_epochs to the
    epochs that fit, so it ends annealed); grad_clip: global-norm
    clipping (None: off); ensemble_size: K models trained together (vmapped over their
    PRNG keys); checkpoint_every: steps between "latest" checkpoints (and at every
    epoch end); n_devices: data-parallel devices (None: all); member_batching: how the
    members share a step, "vmap", "map" (lax.map) or "auto" (map on CPU, see
    ``matjax.train.ensemble.map_members``); time_budget_s: stop after the first epoch
    that ends past this much training time (summed over resumed sessions; None: no
    limit); seed.
    """

    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 300
    early_stopping: int = 50
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    min_lr_scale: float = 1e-3
    warmup_epochs: int = 0
    cosine_decay: bool = False
    final_lr_fraction: float = 0.01
    grad_clip: float | None = None
    ensemble_size: int = 1
    checkpoint_every: int = 500
    n_devices: int | None = 1
    member_batching: str = "auto"
    time_budget_s: float | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PhaseCNNConfig:
    """Ordered/disordered classifier of Ising configurations (matjax.models.phase_cnn).

    conv_layers circular 3x3 convolutions of ``channels`` channels; hidden: units of the dense
    layer after the global mean pool. Trained with optax AdamW (learning_rate, weight_decay)
    for ``epochs`` passes over the data in minibatches of ``batch_size``.
    """

    architecture: str = "cnn"
    channels: int = 16
    hidden: int = 32
    conv_layers: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 100
    epochs: int = 10


@dataclasses.dataclass(frozen=True)
class IsingConfig:
    """2D Ising phase-transition study (experiments/ising_phase.py); k_B = 1, energies in J.

    Sampler: ``algorithm`` ("metropolis", "multispin", "swendsen_wang") with coupling J, field h.
    Seed dataset (per lattice size): n_temperatures evenly in [t_min, t_max], n_configs per
    temperature from n_chains chains; burn-in = burn_in_factor * tau and thinning =
    thin_factor * tau sweeps, tau measured in a pilot of pilot_sweeps sweeps.
    Finite-size scaling over ``sizes``: n_fine temperatures in [fine_t_min, fine_t_max] with
    fine_configs snapshots each (CNN and PCA curves); Binder cumulants from binder_chains x
    binder_samples sweeps at the fine temperatures inside binder_window.
    CNN: ``cnn`` trained with n_seeds seeds on labels T < T_c, once on all temperatures and once
    only on T < far_window[0] or T > far_window[1].
    """

    J: float = 1.0
    h: float = 0.0
    algorithm: str = "swendsen_wang"
    t_min: float = 1.0
    t_max: float = 4.0
    n_temperatures: int = 30
    n_configs: int = 200
    n_chains: int = 10
    pilot_sweeps: int = 250
    burn_in_factor: float = 20.0
    thin_factor: float = 2.0
    sizes: tuple[int, ...] = (8, 16, 32, 64)
    fine_t_min: float = 2.1
    fine_t_max: float = 2.7
    n_fine: int = 30
    fine_configs: int = 100
    binder_window: tuple[float, float] = (2.19, 2.35)
    binder_chains: int = 32
    binder_samples: int = 1500
    cnn: PhaseCNNConfig = PhaseCNNConfig()
    n_seeds: int = 4
    far_window: tuple[float, float] = (1.6, 3.2)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MDConfig:
    """A molecular-dynamics run (``experiments/run_md.py``, ``matjax.physics.md``).

    ensemble: "nve" (velocity Verlet), "langevin" (BAOAB) or "nhc" (Nose-Hoover chain);
    system: named starting crystal, repeated ``repeat`` times along each axis;
    temperature_K: initial (NVE) or target temperature; dt_fs: time step; steps, recorded
    every ``record_every`` steps; friction_per_fs (Langevin); tau_fs (chain period);
    skin: neighbour-list skin (Angstrom); seed: velocities and noise; max_force_std: stop
    when an ensemble's largest atomic member force spread passes it (eV/A; none by default).
    """

    ensemble: str = "nve"
    system: str = "cu_au"
    repeat: int = 3
    temperature_K: float = 300.0
    dt_fs: float = 2.0
    steps: int = 10000
    record_every: int = 20
    friction_per_fs: float = 0.01
    tau_fs: float = 100.0
    skin: float = 0.5
    seed: int = 0
    max_force_std: float = float("inf")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Crystal VAE (``matjax.models.vae``): CGCNN encoder -> z -> composition, size, lattice, properties.

    encoder: the CGCNN trunk (graph, widths, convolutions); its output layer is replaced by
    the 2 * latent_dim posterior parameters (mu, log-variance). latent_dim: size of z;
    decoder_features / decoder_layers: the MLP from z shared by the composition,
    stoichiometry and lattice heads; property_features: width of the property MLP on z;
    max_atoms / max_species: largest cell and most distinct elements the stoichiometry head
    can decode (its classes are the partitions of 1..max_atoms into <= max_species parts); targets: properties predicted from z, e.g.
    ("band_gap", "formation_energy_per_atom").
    Loss weights: beta (KL, reached after kl_warmup_epochs of linear warm-up from 0),
    composition_weight, stoichiometry_weight, lattice_weight, property_weight.
    """

    encoder: CGCNNConfig = CGCNNConfig(graph=GraphConfig(cutoff=8.0, max_neighbors=12, num_rbf=41))
    latent_dim: int = 32
    decoder_features: int = 256
    decoder_layers: int = 2
    property_features: int = 128
    max_atoms: int = 20
    max_species: int = 8
    targets: tuple[str, ...] = ("band_gap", "formation_energy_per_atom")
    beta: float = 0.01
    kl_warmup_epochs: int = 10
    composition_weight: float = 1.0
    stoichiometry_weight: float = 1.0
    lattice_weight: float = 1.0
    property_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class LatentDesignConfig:
    """Inverse design in a VAE's latent space (``matjax.discovery.latent_design``).

    property: the target column optimised; n_starts: latent starts drawn from the prior,
    optimised together in one vmapped program; steps / learning_rate: Adam on z;
    prior_weight: lambda of the in-distribution penalty lambda * ||z||^2 / 2 (the negative
    log prior up to a constant); tolerance: a candidate hits when |property - target| <=
    tolerance; seed.
    """

    property: str = "band_gap"
    n_starts: int = 256
    steps: int = 200
    learning_rate: float = 0.05
    prior_weight: float = 0.1
    tolerance: float = 0.3
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DecoderRefineConfig:
    """Self-training of a trained VAE's decoder toward valid compositions (``matjax.train.vae.refine_decoder``).

    rounds: pseudo-labelling rounds; n_prior: latents drawn from N(0, I) and decoded under the
    charge-balance constraint per round; steps: Adam steps per round on batches of batch_size
    training latents (reconstruction) plus batch_size pseudo-labelled ones, the latter's
    cross-entropy weighted by pseudo_weight; learning_rate; seed (the draws are numpy's
    ``default_rng([seed, round])``, apart from the JAX-keyed latents the experiment evaluates).
    """

    rounds: int = 16
    n_prior: int = 8192
    steps: int = 200
    batch_size: int = 256
    learning_rate: float = 3e-4
    pseudo_weight: float = 1.0
    seed: int = 0
