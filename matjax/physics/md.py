"""Molecular dynamics under ``jit``: integrators as (init_fn, step_fn) pairs, scanned runs.

A potential is ``potential(positions, lattice, nbrs) -> (energy, forces, stress, nbrs,
force_std)``: it updates its neighbour list (``matjax.geometry.neighbors``) and returns the
energy (eV), forces (eV/A), stress (eV/A^3, ASE sign) and each atom's spread of the members'
forces (eV/A, zero for one model) — ``model_potential`` makes one from a trained force
field, ``ensemble_potential`` from several (their mean energy). Integrators (all one force
evaluation per step):

- ``nve``: velocity Verlet (symplectic, time-reversible);
- ``langevin``: BAOAB Langevin (Leimkuhler & Matthews 2013), stochastic NVT; the PRNG
  key lives in the state and is split every step;
- ``nose_hoover_chain``: deterministic NVT, a chain of thermostats integrated by the
  Trotter splitting of Martyna, Tuckerman, Tobias & Klein (1996); ``conserved`` adds
  the thermostat energy, which stays constant.

``simulate`` runs ``lax.scan`` over records of an inner ``lax.fori_loop`` of steps,
recording thinned observables (kinetic and potential energy, temperature, pressure,
max force, largest member force spread) and positions. It runs in segments: after each,
the host re-allocates the neighbour list and replays the segment if it overflowed, and
stops with a message (keeping the trajectory so far) if the run blew up or, for an
ensemble given a bound on its members' force spread, left their training data.

Units at the interface: Angstrom, eV, amu, fs, K. Inside, time is in ASE's unit
(Angstrom sqrt(amu / eV) = 10.18 fs), so F / m is an acceleration and m v^2 / 2 an energy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from matjax.geometry.neighbors import NeighborListFns, update, within_cutoff
from matjax.models.mlff import graph_energy_fn
from matjax.physics.forces import energy_forces_stress

KB = 8.617333262e-5  # eV / K
FS = 0.09822694788464063  # ASE time units per fs (ase.units.fs)
EV_PER_A3_IN_GPA = 160.21766208


@struct.dataclass
class MDState:
    """State of every integrator (N atoms, M chain thermostats; M = 0 without one).

    positions [N, 3] A; velocities [N, 3] A per ASE time unit; forces [N, 3] eV/A;
    energy () eV; stress [3, 3] eV/A^3; force_std [N] eV/A (``force_deviation`` of an
    ensemble's members, zeros for one model); masses [N] amu; lattice [3, 3]; nbrs: the
    potential's neighbour list (or None); key: PRNG key; chain_positions / chain_velocities
    [M]: Nose-Hoover chain; step: () int32.
    """

    positions: jnp.ndarray
    velocities: jnp.ndarray
    forces: jnp.ndarray
    energy: jnp.ndarray
    stress: jnp.ndarray
    force_std: jnp.ndarray
    masses: jnp.ndarray
    lattice: jnp.ndarray
    nbrs: object
    key: jnp.ndarray
    chain_positions: jnp.ndarray
    chain_velocities: jnp.ndarray
    step: jnp.ndarray


def neighbor_potentials(make_energies: Callable, species, stress: bool = True) -> Callable:
    """K potentials over one neighbour list: ``make_energies(graph)`` returns K energy
    functions with ``graph_energy_fn``'s signature (energy(positions [N, 3], lattice
    [1, 3, 3]) -> [1]), e.g. the members of an ensemble.

    Returns potential(positions, lattice, nbrs) -> (energies [K], forces [K, N, 3],
    stress [K, 3, 3] (zeros without ``stress``), nbrs); each member's forces and stress
    are the derivatives of its own energy.
    """
    species = jnp.asarray(species)

    def potential(positions, lattice, nbrs):
        active, nbrs = within_cutoff(positions, lattice, update(positions, lattice, nbrs))
        energies, forces, sigmas = [], [], []
        for energy_fn in make_energies(active.graph(species)):
            e, f, s = energy_forces_stress(energy_fn, positions, lattice[None], stress=stress)
            energies.append(e[0])
            forces.append(f)
            sigmas.append(s[0] if stress else jnp.zeros((3, 3), positions.dtype))
        return jnp.stack(energies), jnp.stack(forces), jnp.stack(sigmas), nbrs

    return potential


def force_deviation(forces) -> jnp.ndarray:
    """[N] each atom's RMS deviation of K members' forces [K, N, 3] from their mean (eV/A):
    DeePMD's model deviation, large where the members disagree, i.e. off their training data."""
    # Array methods only, so numpy input stays numpy (float64 in the ASE calculator).
    return ((forces - forces.mean(0)) ** 2).sum(-1).mean(0) ** 0.5


def mean_potential(potentials: Callable) -> Callable:
    """The potential whose energy is the mean of ``potentials``' (``neighbor_potentials``)
    energies; its forces and stress, the derivatives of that mean, are the members' means,
    so MD with it conserves energy like MD with any one member. Its last output is the
    members' ``force_deviation`` [N]."""

    def potential(positions, lattice, nbrs):
        energies, forces, sigma, nbrs = potentials(positions, lattice, nbrs)
        return energies.mean(0), forces.mean(0), sigma.mean(0), nbrs, force_deviation(forces)

    return potential


def neighbor_potential(make_energy: Callable, species, stress: bool = True) -> Callable:
    """Potential over a neighbour list from ``make_energy(graph) -> energy(positions [N, 3],
    lattice [1, 3, 3]) -> [1]`` (the signature of ``graph_energy_fn``); forces and stress
    are its derivatives."""
    return mean_potential(neighbor_potentials(lambda graph: [make_energy(graph)], species, stress))


def members_potentials(members, species, stress: bool = True) -> Callable:
    """``neighbor_potentials`` of trained force fields: members [(flax module, variables)].

    The neighbour list must reach the largest member cutoff: each model's envelope is zero
    beyond its own, so one list serves members of different cutoffs.
    """
    return neighbor_potentials(lambda graph: [graph_energy_fn(m, v, graph) for m, v in members], species, stress)


def ensemble_potential(members, species, stress: bool = True) -> Callable:
    """Potential of an ensemble of trained force fields [(flax module, variables)]: the
    members' mean energy, and its derivatives (``mean_potential``)."""
    return mean_potential(members_potentials(members, species, stress))


def model_potential(model, variables, species, stress: bool = True) -> Callable:
    """Potential of a trained force field (flax module + variables) over a neighbour list."""
    return ensemble_potential([(model, variables)], species, stress)


def kinetic_energy(velocities, masses) -> jnp.ndarray:
    """() eV."""
    return 0.5 * jnp.sum(masses[:, None] * velocities**2)


def degrees_of_freedom(n_atoms: int) -> int:
    """3N - 3: the centre-of-mass momentum is zero and conserved."""
    return max(3 * n_atoms - 3, 1)


def temperature(velocities, masses) -> jnp.ndarray:
    """() K from the equipartition of the kinetic energy."""
    return 2.0 * kinetic_energy(velocities, masses) / (degrees_of_freedom(masses.shape[0]) * KB)


def maxwell_boltzmann(key, masses, temperature_K: float) -> jnp.ndarray:
    """[N, 3] velocities drawn at ``temperature_K``, zero total momentum, rescaled to exactly
    that temperature (so short runs start where they should)."""
    masses = jnp.asarray(masses)
    v = jax.random.normal(key, (masses.shape[0], 3)) * jnp.sqrt(KB * temperature_K / masses)[:, None]
    v = v - jnp.sum(masses[:, None] * v, axis=0) / jnp.sum(masses)
    current = temperature(v, masses)
    return v * jnp.where(current > 0, jnp.sqrt(temperature_K / current), 0.0)


def _init(potential, positions, lattice, masses, velocities, nbrs, key, chain_length: int) -> MDState:
    positions, lattice = jnp.asarray(positions), jnp.asarray(lattice, dtype=jnp.asarray(positions).dtype)
    energy, forces, sigma, nbrs, force_std = jax.jit(potential)(positions, lattice, nbrs)
    return MDState(
        positions=positions, velocities=jnp.asarray(velocities, positions.dtype), forces=forces, energy=energy,
        stress=sigma, force_std=force_std, masses=jnp.asarray(masses, positions.dtype), lattice=lattice, nbrs=nbrs,
        key=jax.random.PRNGKey(0) if key is None else key,
        chain_positions=jnp.zeros(chain_length, positions.dtype),
        chain_velocities=jnp.zeros(chain_length, positions.dtype), step=jnp.array(0, jnp.int32),
    )


def _kick(state: MDState, half_dt) -> MDState:
    return state.replace(velocities=state.velocities + half_dt * state.forces / state.masses[:, None])


def _forces(potential, state: MDState) -> MDState:
    energy, forces, sigma, nbrs, force_std = potential(state.positions, state.lattice, state.nbrs)
    return state.replace(energy=energy, forces=forces, stress=sigma, nbrs=nbrs, force_std=force_std)


def nve(potential, dt_fs: float):
    """Velocity Verlet. init_fn(positions, lattice, masses, velocities, nbrs=None) -> MDState."""
    dt = dt_fs * FS

    def init_fn(positions, lattice, masses, velocities, nbrs=None, key=None):
        return _init(potential, positions, lattice, masses, velocities, nbrs, key, 0)

    def step_fn(state: MDState) -> MDState:
        state = _kick(state, 0.5 * dt)
        state = _forces(potential, state.replace(positions=state.positions + dt * state.velocities))
        return _kick(state, 0.5 * dt).replace(step=state.step + 1)

    return init_fn, step_fn


def langevin(potential, dt_fs: float, temperature_K: float, friction_per_fs: float = 0.01):
    """BAOAB Langevin dynamics at ``temperature_K`` with friction gamma (1/fs)."""
    dt = dt_fs * FS
    c1 = math.exp(-friction_per_fs * dt_fs)
    c2 = math.sqrt(1.0 - c1 * c1)
    kT = KB * temperature_K

    def init_fn(positions, lattice, masses, velocities, nbrs=None, key=None):
        return _init(potential, positions, lattice, masses, velocities, nbrs, key, 0)

    def step_fn(state: MDState) -> MDState:
        state = _kick(state, 0.5 * dt)
        state = state.replace(positions=state.positions + 0.5 * dt * state.velocities)
        key, noise_key = jax.random.split(state.key)
        noise = jax.random.normal(noise_key, state.velocities.shape, state.velocities.dtype)
        velocities = c1 * state.velocities + c2 * jnp.sqrt(kT / state.masses)[:, None] * noise
        state = state.replace(velocities=velocities, key=key)
        state = _forces(potential, state.replace(positions=state.positions + 0.5 * dt * state.velocities))
        return _kick(state, 0.5 * dt).replace(step=state.step + 1)

    return init_fn, step_fn


def _chain_masses(n_dof: int, kT: float, tau: float, chain_length: int) -> jnp.ndarray:
    return jnp.array([n_dof * kT * tau**2] + [kT * tau**2] * (chain_length - 1))


def _chain_half_step(state: MDState, Q, kT: float, n_dof: int, dt: float) -> MDState:
    """Propagate the chain by dt / 2 and rescale the velocities (MTTK 1996, one Trotter stage)."""
    v = list(state.chain_velocities)
    m = len(v)
    quarter, eighth = 0.25 * dt, 0.125 * dt

    def sweep(order, kinetic2):
        for k in order:
            force = (kinetic2 - n_dof * kT) / Q[0] if k == 0 else (Q[k - 1] * v[k - 1] ** 2 - kT) / Q[k]
            if k == m - 1:
                v[k] = v[k] + quarter * force
            else:
                damp = jnp.exp(-eighth * v[k + 1])
                v[k] = (v[k] * damp + quarter * force) * damp

    kinetic2 = 2.0 * kinetic_energy(state.velocities, state.masses)
    sweep(range(m - 1, -1, -1), kinetic2)
    scale = jnp.exp(-0.5 * dt * v[0])
    xi = state.chain_positions + 0.5 * dt * jnp.stack(v)
    sweep(range(m), kinetic2 * scale**2)
    return state.replace(velocities=state.velocities * scale, chain_positions=xi, chain_velocities=jnp.stack(v))


def nose_hoover_chain(potential, dt_fs: float, temperature_K: float, tau_fs: float = 100.0, chain_length: int = 3):
    """Deterministic NVT: velocity Verlet between two half steps of a Nose-Hoover chain.

    tau_fs: thermostat period; the chain's masses are Q_1 = N_f kT tau^2, Q_k = kT tau^2.
    Returns (init_fn, step_fn, conserved): conserved(state) is the extended energy (eV).
    """
    dt, kT, tau = dt_fs * FS, KB * temperature_K, tau_fs * FS

    def init_fn(positions, lattice, masses, velocities, nbrs=None, key=None):
        return _init(potential, positions, lattice, masses, velocities, nbrs, key, chain_length)

    def step_fn(state: MDState) -> MDState:
        n_dof = degrees_of_freedom(state.masses.shape[0])
        Q = _chain_masses(n_dof, kT, tau, chain_length)
        state = _chain_half_step(state, Q, kT, n_dof, dt)
        state = _kick(state, 0.5 * dt)
        state = _forces(potential, state.replace(positions=state.positions + dt * state.velocities))
        state = _kick(state, 0.5 * dt)
        return _chain_half_step(state, Q, kT, n_dof, dt).replace(step=state.step + 1)

    def conserved(state: MDState) -> jnp.ndarray:
        n_dof = degrees_of_freedom(state.masses.shape[0])
        Q = _chain_masses(n_dof, kT, tau, chain_length)
        thermostat = 0.5 * jnp.sum(Q * state.chain_velocities**2)
        thermostat += kT * (n_dof * state.chain_positions[0] + jnp.sum(state.chain_positions[1:]))
        return kinetic_energy(state.velocities, state.masses) + state.energy + thermostat

    return init_fn, step_fn, conserved


def observe(state: MDState, conserved=None) -> dict:
    """Thinned observables of one state (scalars, plus positions [N, 3])."""
    kinetic = kinetic_energy(state.velocities, state.masses)
    volume = jnp.abs(jnp.linalg.det(state.lattice))
    pressure = 2.0 * kinetic / (3.0 * volume) - jnp.trace(state.stress) / 3.0
    return {
        "step": state.step,
        "kinetic": kinetic, "potential": state.energy,
        "temperature": temperature(state.velocities, state.masses),
        "pressure_GPa": EV_PER_A3_IN_GPA * pressure,
        "conserved": kinetic + state.energy if conserved is None else conserved(state),
        "max_force": jnp.sqrt(jnp.max(jnp.sum(state.forces**2, axis=-1))),
        "max_force_std": jnp.max(state.force_std),
        "positions": state.positions,
    }


@dataclasses.dataclass
class Trajectory:
    """Recorded observables (T records), host side.

    time_fs, kinetic, potential, conserved (eV), temperature (K), pressure_GPa,
    max_force, max_force_std (eV/A, the largest atomic ``force_deviation`` of an ensemble's
    members; zeros for one model): [T]; positions [T, N, 3]. stopped: why the run ended
    early, or None. reallocations: neighbour-list re-allocations (each replayed its segment).
    """

    time_fs: np.ndarray
    kinetic: np.ndarray
    potential: np.ndarray
    conserved: np.ndarray
    temperature: np.ndarray
    pressure_GPa: np.ndarray
    max_force: np.ndarray
    max_force_std: np.ndarray
    positions: np.ndarray
    stopped: str | None = None
    reallocations: int = 0

    def drift_meV_per_atom_per_ps(self) -> float:
        """Slope of a least-squares line through the conserved energy, per atom."""
        n_atoms = self.positions.shape[1]
        if len(self.time_fs) < 2:
            return float("nan")
        slope = np.polyfit(self.time_fs, self.conserved, 1)[0]  # eV / fs
        return float(slope * 1e3 * 1e3 / n_atoms)

    def write_extxyz(self, path, species, lattice, pbc=(True, True, True)) -> None:
        """Extended XYZ with one frame per record (readable by ``ase.io.read``)."""
        from ase import Atoms
        from ase.io import write

        frames = []
        for k in range(len(self.time_fs)):
            atoms = Atoms(numbers=np.asarray(species), positions=self.positions[k], cell=np.asarray(lattice), pbc=pbc)
            atoms.info.update(time_fs=float(self.time_fs[k]), kinetic_eV=float(self.kinetic[k]),
                              potential_eV=float(self.potential[k]), temperature_K=float(self.temperature[k]))
            frames.append(atoms)
        write(str(path), frames, format="extxyz")


def _first_bad(records: dict, max_temperature: float, max_force: float, max_force_std: float) -> tuple[int | None, str | None]:
    """Index of the first record that blew up (or extrapolated), and why."""
    scalars = ["kinetic", "potential", "temperature", "max_force"]
    finite = np.all([np.isfinite(records[k]) for k in scalars], axis=0) & np.isfinite(records["positions"]).all(axis=(1, 2))
    checks = [
        (~finite, "non-finite energy, forces or positions"),
        (records["temperature"] > max_temperature, f"temperature above {max_temperature:g} K"),
        (records["max_force"] > max_force, f"a force above {max_force:g} eV/A"),
        (records["max_force_std"] > max_force_std,
         f"the members' force spread above {max_force_std:g} eV/A (the ensemble is extrapolating)"),
    ]
    bad = [(int(np.argmax(mask)), why) for mask, why in checks if mask.any()]
    return min(bad) if bad else (None, None)


@functools.lru_cache(maxsize=32)
def _runner(step_fn, record_every: int, conserved):
    """Jitted (state, n_records) -> (state, records); cached so repeated runs compile once."""

    def record(state, _):
        state = jax.lax.fori_loop(0, record_every, lambda _, s: step_fn(s), state)
        return state, observe(state, conserved)

    return jax.jit(lambda s, length: jax.lax.scan(record, s, None, length=length), static_argnums=1)


def simulate(
    step_fn,
    state: MDState,
    n_steps: int,
    record_every: int = 10,
    dt_fs: float = 1.0,
    neighbor_fns: NeighborListFns | None = None,
    conserved=None,
    max_temperature: float = 1e4,
    max_force: float = 100.0,
    max_force_std: float = math.inf,
    records_per_segment: int = 20,
    progress: bool = True,
) -> tuple[MDState, Trajectory]:
    """Run ``n_steps`` (a multiple of ``record_every``) and record every ``record_every``.

    The run is ``lax.scan`` over records of a ``fori_loop`` of steps, compiled once per
    segment of ``records_per_segment`` records. After each segment the host checks: if
    the neighbour list overflowed, it is re-allocated (``neighbor_fns.allocate``) from the
    segment's start and the segment replayed; if a record is non-finite or beyond
    ``max_temperature`` / ``max_force`` / ``max_force_std`` (eV/A, the largest atomic
    spread of an ensemble's member forces: DeePMD-style sampling keeps frames below about
    0.15-0.3 eV/A), the run stops with ``Trajectory.stopped`` set, a warning, and the
    records before it. Returns (last good state, Trajectory).
    """
    if n_steps <= 0 or n_steps % record_every:
        raise ValueError(f"n_steps ({n_steps}) must be a positive multiple of record_every ({record_every})")
    n_records = n_steps // record_every
    run = _runner(step_fn, record_every, conserved)
    chunks, done, reallocations, stopped = [], 0, 0, None
    bar = tqdm(total=n_steps, desc="MD steps", disable=not progress, unit="step")
    while done < n_records:
        length = min(records_per_segment, n_records - done)
        # The state stays on the device between segments; only the records and the flag travel.
        new_state, records = run(state, length)
        records = jax.device_get(records)
        if neighbor_fns is not None and bool(new_state.nbrs.overflow):
            nbrs = neighbor_fns.allocate(state.positions, state.lattice, previous=new_state.nbrs)
            state = state.replace(nbrs=nbrs)
            reallocations += 1
            continue
        bad, why = _first_bad(records, max_temperature, max_force, max_force_std)
        if bad is not None:
            records = {k: v[:bad] for k, v in records.items()}
            step = int(state.step) + (bad + 1) * record_every
            stopped = f"MD stopped at step {step} ({step * dt_fs:g} fs): {why}; kept the {done + bad} records before it"
            chunks.append(records)
            warnings.warn(stopped, RuntimeWarning, stacklevel=2)
            break
        chunks.append(records)
        state = new_state
        done += length
        bar.update(length * record_every)
    bar.close()
    cat = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    cat["time_fs"] = cat.pop("step") * dt_fs
    return state, Trajectory(**cat, stopped=stopped, reallocations=reallocations)
