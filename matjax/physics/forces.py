"""Forces and stress as derivatives of one energy (never predicted).

The strain enters as an explicit argument: positions and cell are both deformed by
(1 + eps), eps symmetric, and

    forces = -dE/dR,        stress = (1 / V) dE/d eps  at eps = 0

(ASE's sign: positive under tension, eV/Angstrom^3). Because the model recomputes every
edge vector from (positions, lattice, image shift), the strain reaches all periodic
images, so the stress is right even in cells smaller than the cutoff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def energy_forces_stress(energy_fn, positions, lattice, node_graph=None, stress: bool = True):
    """Energies, forces and (optionally) stress of G structures.

    energy_fn(positions [N, 3], lattice [G, 3, 3]) -> [G] energies (eV); the structures
    are independent (each energy depends only on its own atoms).
    positions: [N, 3] Cartesian (Angstrom); lattice: [G, 3, 3] rows;
    node_graph: [N] structure of each atom (default: all in structure 0).
    Returns (energies [G], forces [N, 3] eV/A, stress [G, 3, 3] eV/A^3 or None).
    """
    n_graph = lattice.shape[0]
    node_graph = jnp.zeros(positions.shape[0], jnp.int32) if node_graph is None else node_graph
    eye = jnp.eye(3, dtype=positions.dtype)

    def total(positions, strain):
        deform = eye + 0.5 * (strain + jnp.swapaxes(strain, -1, -2))  # [G, 3, 3]
        strained = jnp.einsum("ni,nij->nj", positions, deform[node_graph])
        energies = energy_fn(strained, lattice @ deform)
        return energies.sum(), energies

    strain = jnp.zeros((n_graph, 3, 3), positions.dtype)
    argnums = (0, 1) if stress else 0
    (_, energies), grads = jax.value_and_grad(total, argnums=argnums, has_aux=True)(positions, strain)
    if not stress:
        return energies, -grads, None
    volume = jnp.abs(jnp.linalg.det(lattice))
    volume = jnp.where(volume > 0, volume, 1.0)  # padding graphs have a zero cell
    return energies, -grads[0], grads[1] / volume[:, None, None]
