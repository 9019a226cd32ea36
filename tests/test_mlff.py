"""Force-field models: forces and stress are exact derivatives of an invariant, extensive,
smooth energy."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matjax.config import MLFFConfig
from matjax.data.batching import Budget, graphs_tuple
from matjax.data.graphs import build_graph, pack
from matjax.geometry.periodic import node_graph_index
from matjax.models.layers import gaussian_rbf, gaussian_rbf_slope
from matjax.models.mlff import MomentInteraction, SqrtEmbedding, create_model, graph_energy_fn, radial_filter, real_harmonics
from matjax.physics.forces import energy_forces_stress
from matjax.testing import central_difference

CUTOFF = 3.0
CONFIGS = {
    "invariant": MLFFConfig(model="invariant", cutoff=CUTOFF, features=16, num_interactions=2, num_rbf=8, avg_neighbors=10.0),
    "painn": MLFFConfig(model="painn", cutoff=CUTOFF, features=16, num_interactions=2, num_rbf=8, avg_neighbors=10.0),
    "moment": MLFFConfig(model="moment", cutoff=CUTOFF, features=16, num_interactions=2, num_rbf=8, avg_neighbors=10.0),
    "moment_l4": MLFFConfig(model="moment", cutoff=CUTOFF, features=16, num_interactions=2, num_rbf=8, avg_neighbors=10.0,
                            max_l=4),
    "moment_sqrt": MLFFConfig(model="moment", cutoff=CUTOFF, features=16, num_interactions=2, num_rbf=8,
                              avg_neighbors=10.0, sqrt_embedding=4),
    "tensor": MLFFConfig(model="tensor", cutoff=CUTOFF, features=16, num_interactions=2, num_rbf=8, avg_neighbors=10.0),
    "linear": MLFFConfig(model="linear", cutoff=CUTOFF, num_rbf=6, product_rbf=3, min_distance=1.0, avg_neighbors=10.0),
}


def _structure(seed=0):
    """A rattled, skewed 2-species cell smaller than twice the cutoff (several images per pair)."""
    rng = np.random.default_rng(seed)
    lattice = np.array([[3.4, 0.0, 0.0], [0.6, 3.2, 0.0], [0.3, -0.4, 3.6]])
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]) + 0.03 * rng.normal(size=(4, 3))
    return np.array([29, 29, 79, 29]), frac, lattice


# One padded size for every batch of these tests: each jitted function compiles once.
BUDGET = Budget(n_node=24, n_edge=256, n_graph=3)


def _batch(graphs):
    """Padded batch; positions and lattice recomputed in the default float precision."""
    graphs = list(graphs)
    packed = pack(graphs)
    budget = BUDGET
    batch = graphs_tuple(packed, budget)
    n = int(packed.n_node.sum())
    positions = np.zeros((budget.n_node, 3))
    positions[:n] = np.einsum("ni,nij->nj", packed.frac, np.repeat(packed.lattice, packed.n_node, axis=0))
    lattice = np.array(batch.globals["lattice"], np.float64)
    lattice[: len(graphs)] = packed.lattice
    batch = batch._replace(nodes={**batch.nodes, "positions": positions}, globals={**batch.globals, "lattice": lattice})
    dtype = jnp.zeros(()).dtype
    return jax.tree.map(lambda x: jnp.asarray(x, dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else None), batch)


# Module instances are static jit arguments compared by identity: make each once.
MODELS = {name: create_model(cfg) for name, cfg in CONFIGS.items()}


@functools.lru_cache(maxsize=None)
def _initial_variables(name, seed):
    graph = _batch([build_graph(*_structure(), cutoff=CUTOFF)])
    return jax.jit(MODELS[name].init)(jax.random.PRNGKey(seed), graph.nodes["species"],
                                      jnp.ones((graph.senders.shape[0], 3)), graph.senders, graph.receivers)


def _variables(name, dtype=jnp.float32, seed=0):
    model = MODELS[name]
    variables = jax.tree.map(lambda x: x, _initial_variables(name, seed))  # a fresh dict tree
    # Non-trivial constants so that they are exercised.
    variables["constants"]["_Constants_0"]["reference"] = jnp.arange(119.0) * -0.01
    variables["constants"]["_Constants_0"]["scale"] = jnp.array(0.7)
    return model, jax.tree.map(lambda x: x.astype(dtype), variables)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _efs(model, variables, graph, stress=True):
    return energy_forces_stress(graph_energy_fn(model, variables, graph), graph.nodes["positions"],
                                graph.globals["lattice"], node_graph_index(graph), stress=stress)


def _energy(model, variables, species, frac, lattice, cutoff=CUTOFF, pbc=(True, True, True)):
    graph = _batch([build_graph(species, frac, lattice, cutoff=cutoff, pbc=pbc)])
    return float(_efs(model, variables, graph)[0][0])  # with stress: one compilation serves all


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forces_and_stress_equal_finite_differences(name):
    with jax.enable_x64(True):
        model, variables = _variables(name, jnp.float64)
        species, frac, lattice = _structure()
        graph = _batch([build_graph(species, frac, lattice, cutoff=CUTOFF)])
        energies, forces, stress = _efs(model, variables, graph)
        positions = frac @ lattice

        def energy_of_positions(flat):
            return _energy(model, variables, species, np.linalg.solve(lattice.T, flat.reshape(-1, 3).T).T, lattice)

        fd_forces = -central_difference(energy_of_positions, positions.ravel(), eps=1e-5).reshape(-1, 3)
        np.testing.assert_allclose(forces[:4], fd_forces, atol=1e-7 * max(1.0, np.abs(fd_forces).max()))

        def energy_of_strain(flat):
            eps = flat.reshape(3, 3)
            # The graph is rebuilt from the deformed cell: independent of the strain argument.
            return _energy(model, variables, species, frac, lattice @ (np.eye(3) + 0.5 * (eps + eps.T)))

        volume = abs(np.linalg.det(lattice))
        fd_stress = central_difference(energy_of_strain, np.zeros(9), eps=1e-5).reshape(3, 3) / volume
        np.testing.assert_allclose(stress[0], fd_stress, atol=1e-8 + 1e-6 * np.abs(fd_stress).max())
        assert np.abs(fd_stress).max() > 1e-4  # the test can fail: the stress is not trivially zero


def _rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_energy_invariant_and_forces_equivariant(name):
    model, variables = _variables(name)
    species, frac, lattice = _structure()
    base = _batch([build_graph(species, frac, lattice, cutoff=CUTOFF)])
    e0, f0, s0 = _efs(model, variables, base)
    n = len(species)
    # Rotation of positions and cell (same fractional coordinates).
    rot = _rotation(1)
    e1, f1, s1 = _efs(model, variables, _batch([build_graph(species, frac, lattice @ rot.T, cutoff=CUTOFF)]))
    np.testing.assert_allclose(e1, e0, rtol=1e-5)
    np.testing.assert_allclose(f1[:n], f0[:n] @ rot.T, atol=1e-5)
    np.testing.assert_allclose(s1[0], rot @ s0[0] @ rot.T, atol=1e-6)
    # Translation (fractional shift, with wrapping of one atom into the cell).
    shifted = frac + np.array([0.31, -0.17, 0.52])
    e2, f2, _ = _efs(model, variables, _batch([build_graph(species, shifted, lattice, cutoff=CUTOFF)]))
    np.testing.assert_allclose(e2, e0, rtol=1e-5)
    np.testing.assert_allclose(f2[:n], f0[:n], atol=1e-5)
    # Permutation of the atoms.
    perm = np.array([2, 0, 3, 1])
    e3, f3, _ = _efs(model, variables, _batch([build_graph(species[perm], frac[perm], lattice, cutoff=CUTOFF)]))
    np.testing.assert_allclose(e3, e0, rtol=1e-5)
    np.testing.assert_allclose(f3[:n], f0[perm], atol=1e-5)
    # Newton's third law for a periodic crystal.
    np.testing.assert_allclose(f0[:n].sum(0), 0.0, atol=1e-5)
    assert np.abs(f0[:n]).max() > 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
@jax.enable_x64(True)
def test_mirror_images_have_the_same_energy(name):
    """No model may be chiral. float64: the tensor model with Y M alone in place of Y M + M Y
    (equivariant under rotations only) differs by ~1e-7 eV at initialisation."""
    model, variables = _variables(name, jnp.float64)
    species, frac, lattice = _structure()
    mirror = _rotation(1) @ np.diag([1.0, 1.0, -1.0])
    e0, f0, _ = _efs(model, variables, _batch([build_graph(species, frac, lattice, cutoff=CUTOFF)]))
    e1, f1, _ = _efs(model, variables, _batch([build_graph(species, frac, lattice @ mirror.T, cutoff=CUTOFF)]))
    np.testing.assert_allclose(e1[0], e0[0], rtol=0, atol=1e-11)
    np.testing.assert_allclose(f1[:4], f0[:4] @ mirror.T, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_neighbours_beyond_the_cutoff_change_nothing(name):
    # Ensembles whose members differ in cutoff evaluate every member on graphs built at the largest.
    model, variables = _variables(name)
    species, frac, lattice = _structure()
    own, wider = (_batch([build_graph(species, frac, lattice, cutoff=c)]) for c in (CUTOFF, CUTOFF + 1.5))
    assert int(wider.n_edge[0]) > 2 * int(own.n_edge[0])
    (e0, f0, s0), (e1, f1, s1) = _efs(model, variables, own), _efs(model, variables, wider)
    np.testing.assert_allclose(e1[0], e0[0], rtol=1e-6)
    np.testing.assert_allclose(f1[:4], f0[:4], atol=1e-5)
    np.testing.assert_allclose(s1[0], s0[0], atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_energy_is_extensive(name):
    model, variables = _variables(name)
    species, frac, lattice = _structure()
    cell = _batch([build_graph(species, frac, lattice, cutoff=CUTOFF)])
    reps = np.array([2, 1, 2])
    images = np.array([[i, j, k] for i in range(2) for j in range(1) for k in range(2)])
    super_frac = ((frac[None] + images[:, None]) / reps).reshape(-1, 3)
    sup = _batch([build_graph(np.tile(species, 4), super_frac, lattice * reps[:, None], cutoff=CUTOFF)])
    e_cell, f_cell, s_cell = _efs(model, variables, cell)
    e_sup, f_sup, s_sup = _efs(model, variables, sup)
    np.testing.assert_allclose(e_sup[0], 4 * e_cell[0], rtol=1e-5)
    np.testing.assert_allclose(f_sup[:16], np.tile(f_cell[:4], (4, 1)), atol=1e-5)
    np.testing.assert_allclose(s_sup[0], s_cell[0], atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@jax.enable_x64(True)
def test_energy_smooth_when_an_atom_crosses_the_cutoff(name):
    model, variables = _variables(name, jnp.float64, seed=3)
    species = np.array([29, 79, 29])
    lattice = np.eye(3) * 30.0

    def energy_force(x):
        positions = np.array([[10.0, 10.0, 10.0], [8.6, 10.9, 10.0], [10.0 + x, 10.0, 10.0]])
        graph = _batch([build_graph(species, positions / 30.0, lattice, cutoff=CUTOFF + 1.0, pbc=(False,) * 3)])
        energies, forces, _ = _efs(model, variables, graph)
        return float(energies[0]), np.asarray(forces[2])

    # Atom 2 leaves atom 0's sphere at x = CUTOFF; it stays > 3.8 A from atom 1.
    inside, outside = energy_force(CUTOFF - 1e-3), energy_force(CUTOFF + 1e-3)
    far = energy_force(CUTOFF + 0.5)
    # The envelope vanishes with two derivatives: energy jumps O(1e-9), forces O(1e-6).
    assert abs(inside[0] - outside[0]) < 1e-8
    assert np.abs(inside[1]).max() < 1e-5 and np.abs(outside[1]).max() < 1e-5
    np.testing.assert_allclose(outside[0], far[0], atol=1e-12)  # beyond the cutoff nothing changes
    assert abs(energy_force(CUTOFF - 0.6)[0] - far[0]) > 1e-4  # while inside it does


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padding_and_batching_do_not_change_results(name):
    model, variables = _variables(name)
    a = build_graph(*_structure(0), cutoff=CUTOFF)
    b = build_graph(*_structure(1), cutoff=CUTOFF)
    ea, fa, sa = _efs(model, variables, _batch([a]))
    eb, fb, sb = _efs(model, variables, _batch([b]))
    eab, fab, sab = _efs(model, variables, _batch([a, b]))
    np.testing.assert_allclose(eab[:2], [ea[0], eb[0]], rtol=1e-5)
    np.testing.assert_allclose(fab[:8], np.concatenate([fa[:4], fb[:4]]), atol=1e-5)
    np.testing.assert_allclose(sab[:2], np.stack([sa[0], sb[0]]), atol=1e-6)
    chex.assert_tree_all_finite((eab, fab, sab))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_only_the_equivariant_models_resolve_bond_angles(name):
    """A-B-A at 100 and 140 degrees, bonds of 2 A, the A-A distance beyond the cutoff: every
    pair distance within the cutoff is the same, so only angular features tell them apart."""
    def bent(degrees):
        half = np.radians(degrees) / 2
        cart = 6.0 + np.array([[0, 0, 0], [2 * np.sin(half), 2 * np.cos(half), 0], [-2 * np.sin(half), 2 * np.cos(half), 0]])
        return _energy(model, variables, np.array([14, 8, 8]), cart / 12.0, 12.0 * np.eye(3))

    with jax.enable_x64(True):  # float64: the invariant model's difference is rounding only
        model, variables = _variables(name, jnp.float64)
        difference = abs(bent(100.0) - bent(140.0))
    if name == "invariant":
        assert difference < 1e-10
    else:
        assert difference > 1e-7


@pytest.mark.parametrize("l", [3, 4])
def test_real_harmonics_obey_the_addition_theorem(l):
    """sum_m Y_lm(u) Y_lm(v) = P_l(u . v): the moment model's l = 3, 4 power spectra are invariant."""
    rng = np.random.default_rng(l)
    u, v = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 40, 3)))
    with jax.enable_x64(True):
        spectrum = np.sum(real_harmonics(jnp.asarray(u), l) * real_harmonics(jnp.asarray(v), l), axis=1)
    np.testing.assert_allclose(spectrum, np.polynomial.legendre.legval(np.sum(u * v, axis=1), np.eye(l + 1)[l]), atol=1e-12)
    with pytest.raises(ValueError, match="l = 3 and 4"):
        real_harmonics(jnp.asarray(u), 5)


@pytest.mark.parametrize("max_l, differs", [(2, False), (3, False), (4, True)])
def test_only_l4_moments_tell_a_bcc_cube_from_a_square_antiprism(max_l, differs):
    """Eight neighbours at 2 A on a cube (bcc's first shell) or on a square antiprism of the same
    height: both have the same l = 0 moment and no l = 1, 2 or 3 moment, so one moment layer
    sees them alike unless it has l = 4."""
    def centre_update(twist):
        phi = np.radians(45.0 + 90.0 * np.arange(4))
        rings = [np.stack([np.sqrt(2 / 3) * np.cos(phi + shift), np.sqrt(2 / 3) * np.sin(phi + shift),
                           np.full(4, height)], axis=1) for shift, height in ((0.0, 3**-0.5), (twist, -(3**-0.5)))]
        units = jnp.asarray(np.concatenate(rings))
        rbf = gaussian_rbf(jnp.full(8, 2.0), CUTOFF, 8)
        args = (jnp.ones((9, 16)), rbf, jnp.full(8, 0.1), units, jnp.arange(1, 9), jnp.zeros(8, int))
        layer = MomentInteraction(16, max_l)
        return layer.apply(layer.init(jax.random.PRNGKey(0), *args), *args)[0]

    with jax.enable_x64(True):
        difference = float(jnp.max(jnp.abs(centre_update(0.0) - centre_update(np.pi / 4))))
    assert (difference > 1e-6) == differs, difference


def test_moment_orders_beyond_4_are_refused():
    with pytest.raises(ValueError, match=r"max_l must be one of \(2, 3, 4\), not 6"):
        create_model(MLFFConfig(model="moment", max_l=6))


def test_sqrt_embedding_costs_more_per_neighbour_the_fewer_remain():
    """Finnis-Sinclair: removing neighbours one by one raises the energy by growing steps,
    down to the isolated atom, whose energy gradient stays finite."""
    term = SqrtEmbedding(4)
    rbf = gaussian_rbf(jnp.full(8, 2.5), CUTOFF, 8)
    species = jnp.full(9, 42)  # a Mo atom and its 8 possible neighbours

    def centre_energy(envelope):
        return term.apply(variables, species, rbf, envelope, jnp.zeros(8, int))[0]

    variables = term.init(jax.random.PRNGKey(0), species, rbf, jnp.ones(8), jnp.zeros(8, int))
    energies = np.array([centre_energy(jnp.arange(8) < n) for n in range(9)])  # n neighbours
    steps = -np.diff(energies)  # energy lost by adding the n-th neighbour
    assert np.all(steps > 0) and np.all(np.diff(steps) < 0), energies
    chex.assert_tree_all_finite(jax.grad(centre_energy)(jnp.zeros(8)))


def test_sqrt_embedding_is_refused_for_models_without_it():
    with pytest.raises(ValueError, match="sqrt_embedding is a term of the moment model, not of 'painn'"):
        create_model(MLFFConfig(model="painn", sqrt_embedding=4))


def test_edge_chunks_do_not_change_the_invariant_model():
    model, variables = _variables("invariant")
    graph = _batch([build_graph(*_structure(), cutoff=CUTOFF)])
    chunked = create_model(CONFIGS["invariant"].__class__(**{**CONFIGS["invariant"].__dict__, "edge_chunk": 7}))
    e1, f1, _ = _efs(model, variables, graph)
    e2, f2, _ = _efs(chunked, variables, graph)
    np.testing.assert_allclose(e2, e1, rtol=1e-6)
    np.testing.assert_allclose(f2, f1, atol=1e-6)


@jax.enable_x64(True)
def test_radial_filter_derivatives_equal_plain_autodiff():
    """The invariant model's hand-written filter derivative: first and second derivatives in
    the distances (forces, Hessians) and the mixed one that force training takes."""
    rng = np.random.default_rng(0)
    distances = jnp.asarray(rng.uniform(0.5, CUTOFF, 11))
    kernel, bias, weights = (jnp.asarray(rng.normal(size=shape)) for shape in ((8, 5), (5,), (11, 5)))

    def energy(filter_fn, distances, kernel):
        return jnp.sum(jnp.tanh(filter_fn(distances, kernel)) * weights)

    def plain(distances, kernel):
        return gaussian_rbf(distances, CUTOFF, 8) @ kernel + bias

    def custom(distances, kernel):
        rbf = gaussian_rbf(distances, CUTOFF, 8)
        return radial_filter(distances, rbf, gaussian_rbf_slope(distances, rbf, CUTOFF, 8), kernel, bias)

    for derivative in (
        lambda f: energy(f, distances, kernel),
        lambda f: jax.grad(energy, argnums=(1, 2))(f, distances, kernel),
        lambda f: jax.hessian(energy, argnums=1)(f, distances, kernel),
        lambda f: jax.grad(lambda k: jnp.sum(jax.grad(energy, argnums=1)(f, distances, k) ** 2))(kernel),
    ):
        chex.assert_trees_all_close(derivative(custom), derivative(plain), rtol=1e-12, atol=1e-12)


def test_jitted_forces_compile_once_and_equal_eager():
    model, variables = _variables("painn")
    graphs = [_batch([build_graph(*_structure(seed), cutoff=CUTOFF)]) for seed in range(2)]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forces(variables, graph):
        return _efs(model, variables, graph)[1]

    budget_equal = [g.senders.shape == graphs[0].senders.shape for g in graphs]
    for g in graphs[: 2 if all(budget_equal) else 1]:
        np.testing.assert_allclose(forces(variables, g), _efs(model, variables, g)[1], atol=1e-5)


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="unknown force-field model"):
        create_model(MLFFConfig(model="schnet2"))


def test_tensor_parts_compose_and_decompose_exactly():
    """The tensor model's 3 x 3 matrices: scalar, axial vector and symmetric traceless parts."""
    from matjax.models.mlff import _compose, _decompose, _square_norm

    rng = np.random.default_rng(0)
    i, a, s6 = rng.normal(size=(2, 5)), rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 6, 5))
    s6[:, 2] = -s6[:, 0] - s6[:, 1]  # traceless
    x = np.asarray(_compose(jnp.asarray(i), jnp.asarray(a), jnp.asarray(s6)))
    matrix = x[1, :, :, 3]
    np.testing.assert_allclose(np.trace(matrix) / 3, i[1, 3], rtol=1e-6)
    np.testing.assert_allclose(0.5 * (matrix - matrix.T) @ [1.0, -2.0, 0.5], np.cross(a[1, :, 3], [1.0, -2.0, 0.5]), rtol=1e-5)
    for got, want in zip(_decompose(jnp.asarray(x)), (i, a, s6)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_square_norm(jnp.asarray(i), jnp.asarray(a), jnp.asarray(s6)),
                               np.sum(x**2, axis=(1, 2)), rtol=1e-5)
