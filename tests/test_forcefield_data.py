"""Force-field data: readers, the mlearn stress convention, skipping bad frames."""

import json
import gzip
import re
from collections import defaultdict

import numpy as np
import pytest

from matjax.data.forcefield import (
    KBAR, MLEARN_VOIGT, Frame, build_dataset, emt_frames, load_forcefield, mlearn_groups, mlearn_stress,
    structure_groups, read_extxyz,
    read_mlearn, voigt_to_tensor,
)
from matjax.data.sources import shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "ff_mlearn").exists(), reason="shared data absent")


def test_voigt_to_tensor_places_components():
    t = voigt_to_tensor([1, 2, 3, 4, 5, 6], ("xx", "yy", "zz", "xy", "zx", "yz"))
    np.testing.assert_array_equal(t, [[1, 4, 5], [4, 2, 6], [5, 6, 3]])


def _elastic_work_error(element, order, shear_only=False):
    """RMS of (dE - V sigma : d eps) / RMS dE over consecutive Elastic-group strains."""
    entries = [e for split in ("training", "test")
               for e in json.load(gzip.open(DATA / "ff_mlearn" / element / f"{split}.json.gz"))
               if e["group"] == "Elastic"]
    modes = defaultdict(list)
    for e in entries:
        m = re.search(r"mode (\d+), strain (-?[\d.]+)", e["description"])
        if m:
            modes[(e["num_atoms"], m.group(1))].append((float(m.group(2)), e))
    errors, changes = [], []
    for path in modes.values():
        path.sort(key=lambda item: item[0])
        for (_, a), (_, b) in zip(path[:-1], path[1:]):
            la, lb = (np.array(x["structure"]["lattice"]["matrix"]) for x in (a, b))
            deform = np.linalg.solve(la, lb)
            d_eps = 0.5 * (deform + deform.T) - np.eye(3)
            if shear_only and np.abs(d_eps - np.diag(np.diag(d_eps))).max() < 1e-4:
                continue
            volume = 0.5 * (abs(np.linalg.det(la)) + abs(np.linalg.det(lb)))
            virial = 0.5 * (np.array(a["outputs"]["virial_stress"]) + np.array(b["outputs"]["virial_stress"]))
            sigma = -KBAR * voigt_to_tensor(virial, order)
            d_energy = b["outputs"]["energy"] - a["outputs"]["energy"]
            errors.append(d_energy - volume * np.sum(sigma * d_eps))
            changes.append(d_energy)
    return np.sqrt(np.mean(np.square(errors)) / np.mean(np.square(changes)))


@needs_data
@pytest.mark.parametrize("element", ["Si", "Ge", "Mo"])
def test_mlearn_stress_is_kbar_with_vasp_sign_in_the_element_order(element):
    # The work done by the stress along each strain path equals the DFT energy change.
    assert _elastic_work_error(element, MLEARN_VOIGT[element]) < 0.06
    assert _elastic_work_error(element, MLEARN_VOIGT[element], shear_only=True) < 0.1
    others = {("xx", "yy", "zz", "yz", "zx", "xy"), ("xx", "yy", "zz", "xy", "yz", "zx"), ("xx", "yy", "zz", "xy", "zx", "yz")}
    for order in others - {MLEARN_VOIGT[element]}:  # a wrong shear order fails the shear strains
        assert _elastic_work_error(element, order, shear_only=True) > 0.5


@needs_data
def test_mlearn_li_shear_modes_excite_the_right_component():
    # Li's soft 2-atom cells change energy too little for the work test; each shear mode must excite
    # exactly the component the order says.
    _, frames = read_mlearn("Li", "training", DATA)
    entries = json.load(gzip.open(DATA / "ff_mlearn" / "Li" / "training.json.gz"))
    seen = 0
    for entry, frame in zip(entries, frames):
        if entry["group"] != "Elastic" or not re.search(r"mode [456]", entry["description"]):
            continue
        lattice = np.array(entry["structure"]["lattice"]["matrix"])
        shear = np.abs(lattice - np.diag(np.diag(lattice)))
        i, j = np.unravel_index(np.argmax(shear), (3, 3))
        off = np.abs(frame.stress - np.diag(np.diag(frame.stress)))
        assert off[i, j] == off.max() > 0
        seen += 1
    assert seen >= 10


@needs_data
def test_mlearn_reader_shapes_and_units():
    ids, frames = read_mlearn("Mo", "test", DATA)
    assert len(frames) == 23 and len(set(ids)) == 23
    f = frames[0]
    assert f.forces.shape == f.positions.shape == (len(f.species), 3) and set(f.species) == {42}
    assert -11.5 < f.energy / len(f.species) < -10.0  # eV/atom, VASP PBE
    assert np.abs(f.stress).max() < 0.2  # eV/A^3 (a few GPa), not kbar
    np.testing.assert_allclose(f.stress, mlearn_stress(json.load(gzip.open(DATA / "ff_mlearn/Mo/test.json.gz"))[0]["outputs"]["virial_stress"], "Mo"))


@needs_data
def test_mlearn_groups_follow_the_reader_order():
    groups = mlearn_groups("Mo", "test", DATA)
    assert len(groups) == len(read_mlearn("Mo", "test", DATA)[0])
    assert {g: groups.count(g) for g in set(groups)} == {"AIMD-NVT": 12, "Elastic": 6, "Vacancy": 3, "Surface": 2}
    # By id, as training and the test report find them: the index in the file, not the position.
    ids = ["mlearn-Mo-test-22", "emt-3", "mlearn-Mo-test-0"]
    assert structure_groups(ids, DATA).tolist() == [groups[22], "", groups[0]]


@needs_data
def test_molecule_and_water_readers():
    ids, frames = read_extxyz(DATA / "ff_3bpa" / "3bpa_train_300K.xyz.gz")
    assert len(frames) == 500 and all(len(f.species) == 27 for f in frames)
    from ase.io import read

    ref = read(gzip.open(DATA / "ff_3bpa" / "3bpa_train_300K.xyz.gz", "rt"), index="7", format="extxyz")
    np.testing.assert_allclose(frames[7].positions, ref.positions)
    np.testing.assert_allclose(frames[7].forces, ref.get_forces())
    assert frames[7].energy == ref.get_potential_energy() and frames[7].pbc == (False,) * 3
    water = load_forcefield("water", 4.0, DATA)
    assert {k: len(v) for k, v in water.items()}["test"] == 80
    assert water["train"].graphs.n_node[0] == 192 and np.isnan(water["train"].stress).all()


def _frame(positions, forces=None, energy=-1.0):
    positions = np.asarray(positions, float)
    return Frame(np.full(len(positions), 29), positions, np.eye(3) * 10.0, (True,) * 3, energy,
                 np.zeros_like(positions) if forces is None else forces, None)


def test_build_dataset_skips_and_reports_bad_frames():
    good = _frame([[0, 0, 0], [2.0, 0, 0]])
    lonely = _frame([[0, 0, 0], [2.0, 0, 0], [6.0, 5.0, 5.0]])
    nan = _frame([[0, 0, 0], [2.0, 0, 0]], forces=np.full((2, 3), np.nan))
    short = _frame([[0, 0, 0], [2.0, 0, 0]], forces=np.zeros((3, 3)))
    data = build_dataset(["good", "lonely", "nan", "short"], [good, lonely, nan, short], cutoff=3.0)
    assert list(data.ids) == ["good"]
    reasons = dict(data.skipped)
    assert "IsolatedAtomError" in reasons["lonely"] and "non-finite" in reasons["nan"] and "forces" in reasons["short"]
    with pytest.raises(ValueError, match="no usable frames"):
        build_dataset(["nan"], [nan], cutoff=3.0)


def test_emt_default_is_deterministic_and_labelled_consistently():
    ids, frames = emt_frames(n_frames=12, seed=5)
    ids2, frames2 = emt_frames(n_frames=12, seed=5)
    assert ids == ids2 and len(frames) == 12
    np.testing.assert_array_equal(frames[11].positions, frames2[11].positions)
    f = frames[3]
    assert set(f.species) <= {29, 79} and f.stress.shape == (3, 3)
    np.testing.assert_allclose(f.forces.sum(0), 0.0, atol=1e-8)  # EMT conserves momentum
    data = build_dataset(ids, frames, cutoff=4.0)
    sub = data.subset([3, 1])
    np.testing.assert_array_equal(sub.forces[: len(frames[3].species)], frames[3].forces)
    np.testing.assert_array_equal(sub.energy, [frames[3].energy, frames[1].energy])
