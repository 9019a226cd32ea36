"""Molecular dynamics with an analytic Lennard-Jones potential: conservation, thermostats,
blow-up detection, neighbour-list overflow replay, trajectory files."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from ase.build import bulk

from matjax.geometry.neighbors import neighbor_list
from matjax.geometry.periodic import edge_graph_index, edge_vectors, node_graph_index
from matjax.models.layers import polynomial_envelope
from matjax.physics import md

SIGMA, EPSILON, CUTOFF, MASS = 3.4, 0.0104, 7.0, 39.95  # argon-like


def lennard_jones(graph):
    """energy(positions, lattice [1, 3, 3]) -> [1]: LJ times a smooth envelope (so E and F are continuous)."""

    def energy(positions, lattice):
        vectors = edge_vectors(positions, lattice, graph)
        r2 = jnp.sum(vectors**2, axis=-1)
        r2 = jnp.where(graph.edges["mask"], r2, CUTOFF**2)
        sr6 = (SIGMA**2 / r2) ** 3
        pair = 4 * EPSILON * (sr6**2 - sr6) * polynomial_envelope(jnp.sqrt(r2), CUTOFF)
        return 0.5 * jnp.sum(pair)[None]  # each pair is listed twice

    return energy


def scaled_lennard_jones(factor):
    return lambda graph: (lambda positions, lattice: factor * lennard_jones(graph)(positions, lattice))


def lennard_jones_pair(graph):
    """Two members, LJ and 3 x LJ: their mean force is 2 f and each atom's spread |f|."""
    return [lennard_jones(graph), scaled_lennard_jones(3.0)(graph)]


def _argon(repeat=3, rattle=0.05, seed=0):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    return atoms


def _setup(atoms, skin=0.5, capacity_multiplier=1.25):
    fns = neighbor_list(CUTOFF, skin, capacity_multiplier=capacity_multiplier, active_multiplier=capacity_multiplier)
    nbrs = fns.allocate(atoms.positions, atoms.cell.array)
    potential = md.neighbor_potential(lennard_jones, atoms.numbers)
    masses = np.full(len(atoms), MASS)
    return fns, nbrs, potential, masses


def test_nve_conserves_energy_and_writes_extxyz(tmp_path):
    from ase.io import read

    atoms = _argon()
    fns, nbrs, potential, masses = _setup(atoms)
    init_fn, step_fn = md.nve(potential, dt_fs=5.0)
    velocities = md.maxwell_boltzmann(jax.random.PRNGKey(0), masses, 60.0)
    state = init_fn(atoms.positions, atoms.cell.array, masses, velocities, nbrs)
    _, traj = md.simulate(step_fn, state, 1000, 10, dt_fs=5.0, neighbor_fns=fns, progress=False)
    assert traj.stopped is None and len(traj.time_fs) == 100
    # Energy flows between kinetic and potential while the sum stays put.
    assert np.std(traj.kinetic) > 50 * np.std(traj.conserved)
    assert abs(traj.drift_meV_per_atom_per_ps()) < 0.05
    assert int(state.nbrs.n_builds) >= 1
    path = tmp_path / "traj.extxyz"
    traj.write_extxyz(path, atoms.numbers, atoms.cell.array)
    frames = read(path, index=":")
    assert len(frames) == 100
    np.testing.assert_allclose(frames[-1].positions, traj.positions[-1], atol=1e-6)
    assert frames[2].info["time_fs"] == pytest.approx(150.0) == traj.time_fs[2]


def test_an_ensemble_potential_is_the_mean_of_its_members():
    atoms = _argon(repeat=2)
    _, nbrs, single, _ = _setup(atoms)
    members = jax.jit(md.neighbor_potentials(lennard_jones_pair, atoms.numbers))
    energies, forces, stress, _ = members(atoms.positions, atoms.cell.array, nbrs)
    assert energies.shape == (2,) and forces.shape == (2, len(atoms), 3) and stress.shape == (2, 3, 3)
    e, f, s, *_ = single(atoms.positions, atoms.cell.array, nbrs)
    np.testing.assert_allclose(energies, [e, 3 * e], rtol=1e-6)
    np.testing.assert_allclose(forces[1], 3 * f, rtol=1e-5, atol=1e-6)  # float32 sums of O(0.1) eV/A terms
    assert np.abs(f).max() > 1e-3
    # The mean potential is the potential of the mean energy: forces and stress are its derivatives.
    mean = md.mean_potential(md.neighbor_potentials(lennard_jones_pair, atoms.numbers))
    got = mean(atoms.positions, atoms.cell.array, nbrs)
    for got_x, want in zip(got[:3], md.neighbor_potential(scaled_lennard_jones(2.0), atoms.numbers)(atoms.positions, atoms.cell.array, nbrs)[:3]):
        np.testing.assert_allclose(got_x, want, rtol=1e-5, atol=1e-6)
    # Members f and 3 f about their mean 2 f: each atom's spread is |f|; one model has none.
    np.testing.assert_allclose(got[4], np.linalg.norm(f, axis=1), rtol=1e-5, atol=1e-6)
    assert np.all(single(atoms.positions, atoms.cell.array, nbrs)[4] == 0)


def test_md_records_the_ensemble_force_spread_at_every_record():
    atoms = _argon(repeat=2)
    fns, nbrs, _, masses = _setup(atoms)
    pair = md.mean_potential(md.neighbor_potentials(lennard_jones_pair, atoms.numbers))
    init_fn, step_fn = md.nve(pair, dt_fs=5.0)
    velocities = md.maxwell_boltzmann(jax.random.PRNGKey(0), masses, 60.0)
    state = init_fn(atoms.positions, atoms.cell.array, masses, velocities, nbrs)
    _, traj = md.simulate(step_fn, state, 100, 10, dt_fs=5.0, neighbor_fns=fns, progress=False)
    # The mean force is 2 f and the spread |f| on every atom, so the largest spread is half the largest force.
    assert traj.stopped is None and traj.max_force_std.shape == (10,)
    np.testing.assert_allclose(traj.max_force_std, traj.max_force / 2, rtol=1e-5)
    assert traj.max_force_std.min() > 1e-3
    # A bound on the spread stops the run at the first record beyond it, keeping those before.
    bound = float(np.median(traj.max_force_std))
    first = int(np.argmax(traj.max_force_std > bound))
    with pytest.warns(RuntimeWarning, match="force spread above .* extrapolating"):
        _, stopped = md.simulate(step_fn, state, 100, 10, dt_fs=5.0, neighbor_fns=fns, max_force_std=bound, progress=False)
    assert stopped.stopped is not None and len(stopped.time_fs) == first
    np.testing.assert_array_equal(stopped.max_force_std, traj.max_force_std[:first])


@pytest.mark.parametrize("thermostat", ["langevin", "nose_hoover_chain"])
def test_thermostats_reach_their_temperature(thermostat):
    atoms = _argon()
    fns, nbrs, potential, masses = _setup(atoms)
    target = 40.0
    if thermostat == "langevin":
        init_fn, step_fn = md.langevin(potential, dt_fs=5.0, temperature_K=target, friction_per_fs=0.01)
        conserved = None
    else:
        init_fn, step_fn, conserved = md.nose_hoover_chain(potential, dt_fs=5.0, temperature_K=target, tau_fs=200.0)
    # Start far from the target (cold) so that reaching it is the thermostat's doing.
    velocities = md.maxwell_boltzmann(jax.random.PRNGKey(1), masses, 5.0)
    state = init_fn(atoms.positions, atoms.cell.array, masses, velocities, nbrs, key=jax.random.PRNGKey(2))
    _, traj = md.simulate(step_fn, state, 2000, 10, dt_fs=5.0, neighbor_fns=fns, conserved=conserved, progress=False)
    late = traj.temperature[len(traj.temperature) // 2:]
    assert abs(late.mean() - target) < 0.1 * target, late.mean()
    if conserved is not None:  # the extended energy of the deterministic thermostat is conserved
        assert np.ptp(traj.conserved) < 0.05 * np.ptp(traj.kinetic + traj.potential)


def test_blow_up_stops_with_a_message_and_keeps_the_trajectory():
    atoms = _argon(repeat=2, rattle=0.0)
    atoms.positions[1] = atoms.positions[0] + [1.2, 0.0, 0.0]  # two atoms far too close
    fns, nbrs, potential, masses = _setup(atoms)
    init_fn, step_fn = md.nve(potential, dt_fs=5.0)
    state = init_fn(atoms.positions, atoms.cell.array, masses, np.zeros((len(atoms), 3)), nbrs)
    with pytest.warns(RuntimeWarning, match="MD stopped at step"):
        last, traj = md.simulate(step_fn, state, 400, 2, dt_fs=5.0, neighbor_fns=fns, max_force=50.0,
                                 records_per_segment=50, progress=False)
    assert traj.stopped is not None and "force above" in traj.stopped
    assert len(traj.time_fs) < 200
    assert np.isfinite(traj.positions).all() and np.all(traj.max_force <= 50.0)
    assert np.isfinite(np.asarray(last.positions)).all()


def test_neighbor_overflow_is_reallocated_and_replayed():
    atoms = _argon(rattle=0.3)
    results = []
    # A list allocated exactly full (any new pair overflows), then one with ample room;
    # both runs re-allocate with the ample settings.
    for multiplier in (1.0, 2.0):
        _, nbrs, potential, masses = _setup(atoms, skin=0.3, capacity_multiplier=multiplier)
        fns = neighbor_list(CUTOFF, 0.3, capacity_multiplier=2.0, active_multiplier=2.0)
        init_fn, step_fn = md.nve(potential, dt_fs=5.0)
        velocities = md.maxwell_boltzmann(jax.random.PRNGKey(3), masses, 300.0)
        state = init_fn(atoms.positions, atoms.cell.array, masses, velocities, nbrs)
        results.append(md.simulate(step_fn, state, 300, 10, dt_fs=5.0, neighbor_fns=fns,
                                   records_per_segment=5, progress=False)[1])
    tight, ample = results
    assert tight.reallocations >= 1 and ample.reallocations == 0
    np.testing.assert_allclose(tight.positions, ample.positions, atol=1e-4)
    np.testing.assert_allclose(tight.potential, ample.potential, rtol=1e-5)


def _counts_graph(n_node, n_edge):
    n, e = sum(n_node), sum(n_edge)
    return jraph.GraphsTuple(nodes={"species": jnp.zeros(n, jnp.int32)}, edges={}, senders=jnp.zeros(e, jnp.int32),
                             receivers=jnp.zeros(e, jnp.int32), n_node=jnp.array(n_node), n_edge=jnp.array(n_edge),
                             globals=None)


def test_graph_index_of_one_graph_folds_no_repeat():
    """An MD neighbour list's one graph has trace-time constant counts: its index must not be a
    repeat (whose cumulative sum over every edge XLA constant-folded for minutes on a GPU)."""
    one = _counts_graph([5], [40])
    jaxpr = str(jax.make_jaxpr(lambda: (edge_graph_index(one), node_graph_index(one)))())
    assert "cumsum" not in jaxpr and "scatter" not in jaxpr
    np.testing.assert_array_equal(edge_graph_index(one), np.zeros(40))
    two = _counts_graph([2, 3], [4, 1])
    np.testing.assert_array_equal(edge_graph_index(two), [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(node_graph_index(two), [0, 0, 1, 1, 1])


def test_md_and_the_calculator_import_without_pymatgen():
    """GPU machines run MD without pymatgen installed."""
    child = "import sys; sys.modules['pymatgen'] = None; import matjax.calculators, matjax.physics.md"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
