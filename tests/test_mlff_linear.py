"""The linear moment model's least-squares fit: exact for data it can represent, the same on
every run, and stored like a trained network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matjax.config import MLFFConfig, MLFFTrainConfig
from matjax.data.batching import budget_for
from matjax.data.forcefield import Frame, build_dataset
from matjax.data.graphs import build_graph
from matjax.models.mlff import create_model, moment_invariants
from matjax.train.forcefield import evaluate, load_force_field, make_eval_step
from matjax.train.linear import fit_linear, normal_equations, ridge_solve
from test_mlff import _batch, _efs

MODEL = MLFFConfig(model="linear", cutoff=3.5, num_rbf=4, product_rbf=2, min_distance=1.5, avg_neighbors=8.0)
FIT = MLFFTrainConfig(energy_weight=1.0, force_weight=1.0, ridge=1e-13)
MO = 42


def _cells(n: int, seed: int):
    """(species, frac, lattice) of n rattled, strained 4-atom fcc Mo cells (3.3 A)."""
    rng = np.random.default_rng(seed)
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    for _ in range(n):
        lattice = 3.3 * (np.eye(3) + 0.04 * rng.normal(size=(3, 3)))
        yield np.full(4, MO), frac + 0.04 * rng.normal(size=(4, 3)), lattice


def _model_and_variables():
    """The linear model with random coefficients and a reference energy of -4 eV for Mo."""
    model = create_model(MODEL)
    graph = _batch([build_graph(*next(_cells(1, 99)), cutoff=MODEL.cutoff)])
    variables = model.init(jax.random.PRNGKey(7), graph.nodes["species"], jnp.ones((graph.senders.shape[0], 3)),
                           graph.senders, graph.receivers)
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)  # callers enable x64
    constants = variables["constants"]["_Constants_0"]
    constants["reference"] = constants["reference"].at[MO].set(-4.0)
    return model, variables


def _teacher_data(n: int, seed: int):
    """n structures labelled by the linear model with random coefficients (float64)."""
    frames = []
    with jax.enable_x64(True):
        model, variables = _model_and_variables()
        for species, frac, lattice in _cells(n, seed):
            energies, forces, _ = _efs(model, variables, _batch([build_graph(species, frac, lattice, cutoff=MODEL.cutoff)]))
            frames.append(Frame(species, frac @ lattice, lattice, (True, True, True), float(energies[0]),
                                np.asarray(forces[:4], np.float64), None))
    return build_dataset([f"cell-{seed}-{i}" for i in range(n)], frames, MODEL.cutoff)


@pytest.fixture(scope="module")
def teacher():
    return {"train": _teacher_data(30, 0), "val": _teacher_data(6, 1)}


def test_the_fit_reproduces_a_linear_teacher_on_unseen_structures(teacher):
    """The teacher lies in the model's span: the least-squares solution predicts its energies
    and forces on structures it never saw to float64 precision (rows, Jacobians and normal
    equations all right)."""
    a, b, rms = normal_equations(MODEL, teacher["train"], np.array([MO]), 1.0, 1.0)
    solution = ridge_solve(a, b, rms, 1e-13, n_free=1)
    val = teacher["val"]
    with jax.enable_x64(True):
        model, variables = _model_and_variables()
        variables["params"]["coefficients"] = variables["params"]["coefficients"].at[MO].set(solution[:-1])
        variables["constants"]["_Constants_0"]["reference"] = variables["constants"]["_Constants_0"]["reference"].at[MO].set(solution[-1])
        for s in range(len(val)):
            energies, forces, _ = _efs(model, variables, _batch([val.graphs.graph(s)]))
            np.testing.assert_allclose(energies[0], val.energy[s], atol=1e-6)  # eV, of ~20
            np.testing.assert_allclose(forces[:4], val.forces[4 * s: 4 * s + 4], atol=1e-5 * np.abs(val.forces).max())
    assert np.abs(val.forces).max() > 0.1  # the forces checked are not trivially zero


def test_fit_linear_stores_a_loadable_deterministic_force_field(teacher, tmp_path):
    _, state, history = fit_linear(MODEL, FIT, teacher, tmp_path / "a")
    _, again, _ = fit_linear(MODEL, FIT, teacher, tmp_path / "b")
    np.testing.assert_array_equal(state.params["coefficients"], again.params["coefficients"])  # no seed, no chaos

    model, variables, model_cfg = load_force_field(tmp_path / "a")
    assert model_cfg.model == "linear" and history[0]["epoch"] == 1
    np.testing.assert_array_equal(variables["params"]["coefficients"], state.params["coefficients"])
    metrics = evaluate(make_eval_step(model_cfg, False), variables, teacher["val"], budget_for(teacher["val"].graphs, 4))
    # float32 evaluation of float64-fitted coefficients: rounding only
    assert metrics["energy_mae_meV_per_atom"] < 0.05 and metrics["force_mae_eV_per_A"] < 1e-3
    assert history[0]["val_energy_mae_meV_per_atom"] == metrics["energy_mae_meV_per_atom"]


def test_an_atom_without_neighbours_has_only_its_reference_energy():
    vectors = jnp.zeros((3, 3))
    invariants = moment_invariants(vectors, jnp.zeros(3, bool), jnp.zeros(3, jnp.int32), 2, MODEL)
    assert invariants.shape[0] == 2 and invariants.shape[1] > 100
    np.testing.assert_array_equal(invariants, 0.0)


def test_the_linear_fit_refuses_a_stress_weight(teacher, tmp_path):
    with pytest.raises(ValueError, match="stress_weight"):
        fit_linear(MODEL, MLFFTrainConfig(stress_weight=1.0), teacher, tmp_path)
