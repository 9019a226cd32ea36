"""Force-field training: reference energies, resumable runs, NaN stop, the ASE calculator."""

import dataclasses
from types import SimpleNamespace

import jax
import numpy as np
import optax
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

import matjax.train.forcefield as tf
from matjax.config import MLFFConfig, MLFFTrainConfig
from matjax.data.forcefield import Frame, build_dataset, emt_frames, with_isolated_atoms
from matjax.data.splits import split_indices
from matjax.train.checkpoint import CheckpointMismatchError

MODEL = MLFFConfig(model="invariant", cutoff=4.0, features=16, num_interactions=1, num_rbf=8)
TRAIN = MLFFTrainConfig(dataset="emt", batch_size=4, epochs=3, learning_rate=3e-3, warmup_epochs=1)


@pytest.fixture(scope="module")
def splits():
    data = build_dataset(*emt_frames(n_frames=20, seed=1), cutoff=MODEL.cutoff)
    idx = split_indices(data.ids)
    return {"train": data.subset(np.concatenate([idx["train"], idx["test"]])), "val": data.subset(idx["val"])}


@pytest.fixture(scope="module")
def straight_run(splits, tmp_path_factory):
    """(run folder, best state, history) of one uninterrupted training run."""
    run = tmp_path_factory.mktemp("straight")
    _, best, history = tf.train(MODEL, TRAIN, splits, run)
    return run, best, history


def test_reference_energies_recover_an_additive_model(splits):
    data = splits["train"]
    per_element = {29: -3.5, 79: -4.25}
    counts = [np.bincount(data.graphs.species[a:b], minlength=80) for a, b in
              zip(np.cumsum(data.n_atoms) - data.n_atoms, np.cumsum(data.n_atoms))]
    additive = dataclasses.replace(data, energy=np.array([c[29] * -3.5 + c[79] * -4.25 for c in counts]))
    reference = tf.fit_reference_energies(additive)
    assert reference[29] == pytest.approx(per_element[29]) and reference[79] == pytest.approx(per_element[79])
    assert np.count_nonzero(reference) == 2


def _model_for(data):
    """The test model, its message normalisation set from ``data``'s mean neighbour count."""
    return tf.create_model(dataclasses.replace(MODEL, avg_neighbors=round(tf.data_statistics(data)["avg_neighbors"], 3)))


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_training_learns_and_a_killed_run_resumes_the_same_trajectory(splits, straight_run, tmp_path, monkeypatch):
    _, straight, history = straight_run
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    epochs = _count_epochs(monkeypatch)
    make_batch = tf.make_batch

    def crashing(*args, **kwargs):  # the process dies inside the third epoch
        if epochs["done"] >= 2:
            raise KeyboardInterrupt
        return make_batch(*args, **kwargs)

    monkeypatch.setattr(tf, "make_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        tf.train(MODEL, TRAIN, splits, tmp_path / "resumed")
    monkeypatch.undo()
    _, resumed, _ = tf.train(MODEL, TRAIN, splits, tmp_path / "resumed")
    assert int(resumed.epoch) == 3
    assert _leaves_equal(resumed.params, straight.params) and _leaves_equal(resumed.ema, straight.ema)


def _count_epochs(monkeypatch):
    """Patch ``evaluate`` (once per epoch here) to count finished epochs."""
    epochs = {"done": 0}
    evaluate = tf.evaluate

    def counting(*args, **kwargs):
        epochs["done"] += 1
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(tf, "evaluate", counting)
    return epochs


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(splits, tmp_path, monkeypatch):
    epochs = _count_epochs(monkeypatch)
    make_batch = tf.make_batch

    def maybe_nan(*args):  # the third epoch's data turn to NaN
        batch = make_batch(*args)
        if epochs["done"] >= 2:
            batch["forces"] = batch["forces"] * np.nan
        return batch

    monkeypatch.setattr(tf, "make_batch", maybe_nan)
    with pytest.raises(FloatingPointError, match="last good checkpoints"):
        tf.train(MODEL, TRAIN, splits, tmp_path / "run")
    model, variables, _ = tf.load_force_field(tmp_path / "run", "latest")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_calculator_matches_the_model_and_relaxes(straight_run):
    from ase.optimize import BFGS

    from matjax.calculators import MatjaxCalculator

    calc = MatjaxCalculator(straight_run[0])
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(2)
    atoms.numbers[[1, 6]] = 79
    atoms.rattle(0.05, seed=0)
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
    # The same structure through the training path (graphs from the host).
    data = build_dataset(["x"], [Frame(atoms.numbers, atoms.positions, atoms.cell.array,
                                                                   (True,) * 3, 0.0, np.zeros((32, 3)), None)], MODEL.cutoff)
    budget = tf.budget_for(data.graphs, 1)
    batch = tf.make_batch(data, [0], budget, np.zeros(119))
    (model, variables), = calc.members
    e_ref, f_ref, s_ref = tf.predict(model, variables, batch["graph"], stress=True)
    assert energy == pytest.approx(float(e_ref[0]), rel=1e-5)
    np.testing.assert_allclose(forces, f_ref[:32], atol=1e-5)
    np.testing.assert_allclose(stress, s_ref[0], atol=1e-6)
    # Moving an atom updates the result; a relaxation lowers the energy.
    atoms.positions[0] += [0.1, 0.0, 0.0]
    assert atoms.get_potential_energy() != energy and not np.allclose(atoms.get_forces(), forces)
    moved = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=1e-3, steps=10)
    assert atoms.get_potential_energy() < moved
    co = molecule("CO")
    co.calc = calc  # a molecule: no cell, no stress
    assert np.isfinite(co.get_potential_energy()) and co.get_forces().shape == (2, 3)


def test_calculator_over_an_ensemble_gives_the_members_mean_and_spread(splits, straight_run, tmp_path):
    from matjax.calculators import MatjaxCalculator

    # A second member with a longer cutoff: the shared neighbour list reaches 4.5 A.
    tf.train(dataclasses.replace(MODEL, cutoff=4.5), dataclasses.replace(TRAIN, seed=1), splits, tmp_path / "b")
    runs = [straight_run[0], tmp_path / "b"]
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(2)
    atoms.numbers[[1, 6]] = 79
    atoms.rattle(0.05, seed=0)

    def results(calc):
        atoms.calc = calc
        atoms.get_potential_energy()
        atoms.get_stress()
        return calc.results

    (a, b), both = [results(MatjaxCalculator(run)) for run in runs], results(MatjaxCalculator(runs))
    assert both["energy"] == pytest.approx((a["energy"] + b["energy"]) / 2, rel=1e-6)
    np.testing.assert_allclose(both["forces"], (a["forces"] + b["forces"]) / 2, atol=1e-6)
    np.testing.assert_allclose(both["stress"], (a["stress"] + b["stress"]) / 2, atol=1e-7)
    # Two members: each sits half their difference from the mean.
    assert both["energy_std"] == pytest.approx(abs(a["energy"] - b["energy"]) / 2, rel=1e-5)
    np.testing.assert_allclose(both["forces_std"], np.linalg.norm(a["forces"] - b["forces"], axis=1) / 2, atol=1e-6)
    assert both["forces_std"].max() > 1e-4
    twins = results(MatjaxCalculator([runs[0], runs[0]]))
    assert twins["energy"] == pytest.approx(a["energy"]) and np.all(twins["forces_std"] == 0)
    assert "forces_std" not in a  # one model has no spread to report
    members, _ = tf.load_ensemble(runs)
    direct = results(MatjaxCalculator(members=members, cutoff=4.5))
    np.testing.assert_array_equal(direct["forces_std"], both["forces_std"])
    with pytest.raises(ValueError, match="no runs given"):
        MatjaxCalculator([])
    with pytest.raises(ValueError, match="members .* and cutoff"):
        MatjaxCalculator(members=members)


def test_time_budget_stops_after_one_epoch_and_a_larger_budget_goes_on(splits, straight_run, tmp_path):
    _, best, history = tf.train(MODEL, dataclasses.replace(TRAIN, time_budget_s=0.0), splits, tmp_path / "run")
    assert [h["epoch"] for h in history] == [1] and int(best.epoch) == 1
    assert int(tf.load_force_field(tmp_path / "run", "latest")[2].num_interactions) == MODEL.num_interactions
    # The next session raises the budget and ends where an uninterrupted run ends.
    _, best, history = tf.train(MODEL, dataclasses.replace(TRAIN, time_budget_s=1e6), splits, tmp_path / "run")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert _leaves_equal(best.params, straight_run[1].params)
    assert 0 < history[0]["train_s"] < history[1]["train_s"]  # the clock goes on from the first session


def test_final_stage_trains_with_its_energy_weight_and_selects_among_its_epochs(splits, straight_run, tmp_path):
    staged = dataclasses.replace(TRAIN, final_stage_epochs=2, final_energy_weight=1e4 * TRAIN.energy_weight)
    assert [tf.stage_config(staged, e).energy_weight for e in range(3)] == [TRAIN.energy_weight] + [1e4 * TRAIN.energy_weight] * 2
    _, best, history = tf.train(MODEL, staged, splits, tmp_path / "run")
    plain = straight_run[2]
    assert [h["stage"] for h in history] == [0, 1, 1]
    # Identical first epoch (same parameters and shuffles); then the energy term weighs 1e4x more.
    assert history[0]["train_loss"] == plain[0]["train_loss"]
    assert history[1]["train_loss"] > 1.2 * plain[1]["train_loss"]
    assert int(best.epoch) >= 2


def test_group_energy_weights_scale_each_structures_energy_term(splits, straight_run, tmp_path):
    groups = np.array(["bulk", "Surface", "bulk", "Vacancy"])
    np.testing.assert_array_equal(tf.energy_weights("Surface=10,Vacancy=0.5", groups), [1, 10, 1, 0.5])
    np.testing.assert_array_equal(tf.energy_weights("", groups), np.ones(4))
    with pytest.raises(ValueError, match="'Surfaces'.*'Surface', 'Vacancy', 'bulk'"):
        tf.energy_weights("Surfaces=10", groups)
    with pytest.raises(ValueError, match="'Surface=ten' is not Name=number"):
        tf.energy_weights("Surface=ten", groups)
    # Energy-only loss: a structure's weight multiplies its own squared error and nothing else.
    data, best = splits["train"], straight_run[1]
    budget = tf.budget_for(data.graphs, 4)
    model = _model_for(data)
    cfg = dataclasses.replace(TRAIN, energy_weight=1.0, force_weight=0.0)

    def loss(weights):
        batch = tf.make_batch(data, [0, 1, 2], budget, np.zeros(119), weights)
        return tf.loss_fn(best.params, best.constants, model, batch, cfg)

    plain, err = loss(None)
    heavier, _ = loss(np.array([1.0, 4.0, 1.0] + [1.0] * (len(data) - 3), np.float32))
    e1 = float(err["energy"][1])
    # weight 4 instead of 1 on structure 1, averaged over the batch's 3 structures
    assert e1 != 0 and float(heavier) - float(plain) == pytest.approx((4 - 1) * e1**2 / 3, rel=1e-4)
    with pytest.raises(ValueError, match="'Surface'"):  # the EMT set has no groups
        tf.train(MODEL, dataclasses.replace(TRAIN, group_energy_weights="Surface=10"), splits, tmp_path / "run")


def _free_atom_errors(model, state, data, index):
    """(per-atom energy error eV, forces [3] eV/A) of a trained ``model`` on structure ``index``."""
    batch = tf.make_batch(data, [index], tf.budget_for(data.graphs, 1),
                          np.asarray(state.constants["_Constants_0"]["reference"], np.float64))
    err = tf.batch_errors(model, state.variables(averaged=False), batch, False)
    return float(err["energy"][0]), np.asarray(err["pred_forces"][0])


def test_isolated_atoms_are_edgeless_structures_that_anchor_the_free_atom_energy(splits, tmp_path):
    data = splits["train"]
    free = EMT().get_potential_energy(Atoms("Cu", cell=[20] * 3, pbc=True))  # EMT's own free Cu atom (eV)
    anchored = with_isolated_atoms(data, f"Cu={free},Au=0.25")
    assert len(anchored) == len(data) + 2 and list(anchored.ids[-2:]) == ["isolated-Cu", "isolated-Au"]
    assert list(anchored.n_atoms[-2:]) == [1, 1] and list(anchored.graphs.n_edge[-2:]) == [0, 0]
    assert list(anchored.graphs.species[-2:]) == [29, 79] and list(anchored.energy[-2:]) == [free, 0.25]
    assert not anchored.forces[-2:].any() and np.isnan(anchored.stress[-2:]).all()
    np.testing.assert_array_equal(anchored.subset(np.arange(len(data))).forces, data.forces)
    with pytest.raises(ValueError, match="'Cu=-3.x' is not Name=number"):
        with_isolated_atoms(data, "Cu=-3.x")
    with pytest.raises(ValueError, match="'Cx' is not an element symbol"):
        with_isolated_atoms(data, "Cx=-3.0")
    # Trained on, the free atom's error shrinks (3.0 -> 2.2 eV here); with no neighbour its force is exactly zero.
    cfg = dataclasses.replace(TRAIN, epochs=4, learning_rate=3e-2, energy_weight=30.0)
    errors = {}
    for spec in ("", f"Cu={free}"):
        model, best, _ = tf.train(MODEL, dataclasses.replace(cfg, isolated_atom_energies=spec), splits, tmp_path / spec)
        errors[spec], force = _free_atom_errors(model, best, anchored, len(anchored) - 2)
        assert not force.any()
    assert abs(errors[f"Cu={free}"]) < abs(errors[""]) - 0.4


def test_huber_force_loss_is_quadratic_inside_delta_and_linear_beyond(splits, straight_run):
    x = np.array([-0.3, -0.05, 0.0, 0.02, 0.05, 0.2])
    np.testing.assert_allclose(tf.squared_or_huber(x, 0.0), x**2)
    np.testing.assert_allclose(tf.squared_or_huber(x, 0.05), [0.05 * 0.55, 0.0025, 0, 0.0004, 0.0025, 0.05 * 0.35], rtol=1e-6)
    slope = jax.vmap(jax.grad(lambda v: tf.squared_or_huber(v, 0.05)))(x)
    np.testing.assert_allclose(slope, [-0.1, -0.1, 0, 0.04, 0.1, 0.1], rtol=1e-6)  # continuous, capped at 2 delta
    # Force-only loss: the Huber mean of the same force errors, below the MSE once errors pass delta.
    data, best = splits["train"], straight_run[1]
    model = _model_for(data)
    batch = tf.make_batch(data, [0, 1, 2], tf.budget_for(data.graphs, 4), np.zeros(119))

    def force_loss(delta):
        cfg = dataclasses.replace(TRAIN, energy_weight=0.0, force_weight=1.0, force_huber_delta=delta)
        return tf.loss_fn(best.params, best.constants, model, batch, cfg)

    mse, err = force_loss(0.0)
    n = 3 * int(err["node_mask"].sum())
    delta = float(np.median(np.abs(err["forces"][err["node_mask"]])))
    huber, _ = force_loss(delta)
    assert float(huber) == pytest.approx(float(np.sum(tf.squared_or_huber(np.asarray(err["forces"]), delta))) / n, rel=1e-5)
    assert float(mse) == pytest.approx(float(np.sum(np.asarray(err["forces"]) ** 2)) / n, rel=1e-5)
    assert float(huber) < 0.9 * float(mse)


@pytest.mark.parametrize("holdout", [True, False])
def test_without_holdout_the_last_evaluation_is_kept(splits, tmp_path, monkeypatch, holdout):
    epochs = _count_epochs(monkeypatch)
    evaluate = tf.evaluate

    def worsening(*args, **kwargs):  # validation gets worse every epoch
        return evaluate(*args, **kwargs) | {"energy_mae_meV_per_atom": 1e3 * epochs["done"]}

    monkeypatch.setattr(tf, "evaluate", worsening)
    _, best, history = tf.train(MODEL, dataclasses.replace(TRAIN, holdout=holdout), splits, tmp_path / "run")
    assert len(history) == 3 and int(best.epoch) == (1 if holdout else 3)


def test_load_forcefield_without_holdout_trains_on_the_validation_structures_too():
    from matjax.data.forcefield import load_forcefield

    held, full = (load_forcefield("emt", MODEL.cutoff, n_frames=20, holdout=h) for h in (True, False))
    assert sorted(full["train"].ids) == sorted([*held["train"].ids, *held["val"].ids])
    assert list(full["val"].ids) == list(held["val"].ids) and list(full["test"].ids) == list(held["test"].ids)
    with pytest.raises(ValueError, match="aspirin trains on 1000 frames"):
        load_forcefield("aspirin", MODEL.cutoff, holdout=False)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_weight_decay_shrinks_parameters_only_when_set(weight_decay):
    """With zero gradients Adam leaves parameters alone; AdamW's decoupled decay shrinks them by lr * wd."""
    cfg = dataclasses.replace(TRAIN, weight_decay=weight_decay, warmup_epochs=0)
    tx = tf.create_optimizer(cfg, steps_per_epoch=10)
    params = {"w": jax.numpy.ones(3)}
    updates, _ = tx.update(jax.tree_util.tree_map(jax.numpy.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -cfg.learning_rate * weight_decay * np.ones(3), rtol=1e-5)


def test_runs_without_weight_decay_keep_the_optimizer_state_of_earlier_versions():
    """Checkpoints hold the optimizer state: without decay it must stay plain Adam's, or runs
    trained before weight decay existed no longer load."""
    legacy = optax.chain(optax.clip_by_global_norm(TRAIN.grad_clip), optax.adam(optax.constant_schedule(1e-3)))
    params = {"w": jax.numpy.ones(2)}
    assert (jax.tree_util.tree_structure(tf.create_optimizer(TRAIN, 1).init(params))
            == jax.tree_util.tree_structure(legacy.init(params)))


def test_runs_saved_before_a_config_field_existed_load_and_resume(splits, tmp_path, monkeypatch):
    """A field added later (max_l, force_huber_delta) is absent from older checkpoints: at its
    default they load and resume; set to anything else, they are refused."""
    current = tf.run_configs

    def older_version(model_cfg, train_cfg):
        configs = current(model_cfg, train_cfg)
        return {"model": {k: v for k, v in configs["model"].items() if k != "max_l"},
                "train": {k: v for k, v in configs["train"].items() if k != "force_huber_delta"}}

    cfg = dataclasses.replace(TRAIN, epochs=2)
    monkeypatch.setattr(tf, "run_configs", older_version)
    tf.train(MODEL, dataclasses.replace(cfg, time_budget_s=1e-9), splits, tmp_path)  # stops after epoch 1
    monkeypatch.undo()
    tf.load_force_field(tmp_path)
    _, _, history = tf.train(MODEL, cfg, splits, tmp_path)
    assert [h["epoch"] for h in history] == [1, 2]
    with pytest.raises(CheckpointMismatchError, match=r"model\.max_l: 2 -> 3"):
        tf.train(dataclasses.replace(MODEL, max_l=3), cfg, splits, tmp_path)


def test_an_ensemble_of_one_is_its_member_and_of_two_averages_energies_and_forces(splits, straight_run, tmp_path):
    _, best, _ = straight_run
    _, other, _ = tf.train(MODEL, dataclasses.replace(TRAIN, seed=1), splits, tmp_path / "seed1")
    model = _model_for(splits["train"])
    step = tf.make_eval_step(model.cfg, False)
    budget = tf.budget_for(splits["train"].graphs, TRAIN.batch_size)
    members = [tf.evaluate(step, state.variables(), splits["val"], budget) for state in (best, other)]
    alone = tf.ensemble_metrics(members[:1], splits["val"])
    for key in ("energy_mae_meV_per_atom", "energy_mae_meV", "force_mae_eV_per_A"):
        assert alone[key] == members[0][key]
    assert np.isnan(alone["force_std_error_spearman"]) and not alone["force_std"].any()
    both = tf.ensemble_metrics(members, splits["val"])
    np.testing.assert_allclose(both["force_pred"], (members[0]["force_pred"] + members[1]["force_pred"]) / 2)
    np.testing.assert_allclose(both["force_std"], np.abs(members[0]["force_pred"] - members[1]["force_pred"]) / 2, atol=1e-7)
    # Different seeds: different members; the mean's error is never above the members' mean error.
    assert members[0]["force_mae_eV_per_A"] != members[1]["force_mae_eV_per_A"]
    for key in ("energy_mae_meV_per_atom", "force_mae_eV_per_A"):
        assert both[key] <= (members[0][key] + members[1][key]) / 2 * (1 + 1e-6)  # float32 rounding


def _member(energy_error, force_error) -> dict:
    """An ``evaluate`` result with zero targets and the given signed errors."""
    return tf._error_metrics(np.zeros(len(energy_error)), np.asarray(energy_error), np.zeros(len(force_error)),
                             np.asarray(force_error), np.zeros(0), np.ones(len(energy_error)))


def test_an_ensemble_of_members_that_err_alike_gains_nothing_and_of_opposite_errors_cancels_them():
    data = SimpleNamespace(n_atoms=np.ones(3))
    e, f = np.array([0.002, -0.001, 0.004]), np.array([0.3, -0.1, 0.2, 0.0, -0.5, 0.1])
    alike = tf.ensemble_metrics([_member(e, f), _member(2 * e, 2 * f)], data)
    assert alike["energy_error_correlation"] == pytest.approx(1) and alike["force_error_correlation"] == pytest.approx(1)
    assert alike["energy_mae_over_member_mean"] == pytest.approx(1) and alike["force_mae_over_member_mean"] == pytest.approx(1)
    opposite = tf.ensemble_metrics([_member(e, f), _member(-e, -f)], data)
    assert opposite["energy_error_correlation"] == pytest.approx(-1)
    assert opposite["energy_mae_over_member_mean"] == 0 and opposite["force_mae_over_member_mean"] == 0
    third = tf.ensemble_metrics([_member(e, f), _member(-e, -f), _member(e, f)], data)
    assert third["energy_error_correlation"] == pytest.approx(-1 / 3)  # pairs: -1, 1, -1
    assert np.isnan(tf.ensemble_metrics([_member(e, f)], data)["energy_error_correlation"])


def test_errors_by_group_split_the_maes_by_structure():
    metrics = {"energy_true": np.zeros(3), "energy_pred": np.array([0.001, 0.002, -0.004]),
               "force_true": np.zeros(12), "force_pred": np.arange(12.0)}  # structures of 1, 2 and 1 atoms
    by_group = tf.errors_by_group(metrics, ["bulk", "surface", "bulk"], np.array([1, 2, 1]))
    assert by_group["bulk"] == {"n": 2, "energy_mae_meV_per_atom": pytest.approx(2.5),
                                "force_mae_eV_per_A": pytest.approx(np.mean([0, 1, 2, 9, 10, 11]))}
    assert by_group["surface"] == {"n": 1, "energy_mae_meV_per_atom": pytest.approx(2.0),
                                   "force_mae_eV_per_A": pytest.approx(np.mean(np.arange(3, 9)))}
