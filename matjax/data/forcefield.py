"""Force-field training data: structures with DFT energies, forces and stresses.

Readers turn each source into ``Frame``s (species, positions, cell, labels; eV, Angstrom,
eV/Angstrom, eV/Angstrom^3 with ASE's stress sign), and ``build_dataset`` turns frames into
a ``ForceFieldData`` of crystal graphs, skipping and reporting frames that fail.

Sources (``load_forcefield``):
- ``mlearn-{Si,Ge,Li,Mo}``: periodic bulk, surfaces and vacancies (Zuo et al. 2020).
  ``outputs.virial_stress`` is VASP's stress in kbar with VASP's sign (compression
  positive) and an element-dependent Voigt order. We checked this against the
  Elastic group (strained ground states): the work V sigma : d eps with
  sigma = -0.1 / 160.2177 * virial (eV/A^3) matches the DFT energy differences of
  neighbouring strains to 0.7% (Si), 1.1% (Ge) and 1.7% (Mo) RMS with the orders in
  ``MLEARN_VOIGT``, while the other shear orders miss the shear strains by 75-94%; Li's
  tiny 2-atom strains are too soft for this, and single out the same order as Si by which
  component each shear mode excites. ``tests/test_forcefield_data.py`` repeats the checks.
  Mo's AIMD stresses appear to include the ideal-gas kinetic pressure, which an energy
  model cannot have: a Mo model trained on energies and forces only falls short of the
  labelled pressure by 3.2 and 5.4 GPa at 3000 and 6000 K, where N k_B T / V is 2.7 and
  5.3 GPa (``benchmarks/results/mlff_mlearn.md``). Keep that in mind with ``stress_weight``.
  Si's, Ge's and Li's show no such shortfall: short energy/force probes meet Li's labels
  within 0.1 GPa at 907 K (N k_B T / V: 0.6 GPa) and overshoot Si's and Ge's liquid ones by
  about 3 GPa, flat in temperature, where a kinetic part would leave them short.
- ``aspirin`` (rMD17, 1000 training frames + 200 validation, the shipped 1800-frame test
  set) and ``3bpa`` (500 frames at 300 K): molecules, extended XYZ, no stress.
- ``water``: DeePMD-kit liquid water (64 H2O, periodic, npy sets), ``data_3`` held out.
- ``emt``: the offline default, generated here: Langevin MD snapshots of a strained fcc
  Cu-Au alloy under ASE's EMT potential (energies, forces, stresses), no files needed.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from matjax.data.dataset import report_skipped
from matjax.data.graphs import PackedGraphs, build_graph, concat, pack, ragged_arange, take
from matjax.data.sources import shared_data_dir
from matjax.data.splits import hash_bucket, split_indices
from matjax.geometry.periodic import MOLECULE_BOX

KBAR = 0.1 / 160.21766208  # eV/A^3 per kbar
# Voigt order of mlearn's virial_stress per element (see the module docstring).
MLEARN_VOIGT = {
    "Si": ("xx", "yy", "zz", "xy", "yz", "zx"),
    "Ge": ("xx", "yy", "zz", "xy", "yz", "zx"),
    "Li": ("xx", "yy", "zz", "xy", "yz", "zx"),
    "Mo": ("xx", "yy", "zz", "xy", "zx", "yz"),
}
_AXIS = {"x": 0, "y": 1, "z": 2}


class Frame(NamedTuple):
    """One labelled structure (host side, float64).

    species [N] Z; positions [N, 3] Angstrom; lattice [3, 3] rows; pbc (3 bools);
    energy eV; forces [N, 3] eV/A; stress [3, 3] eV/A^3 (ASE sign) or None.
    """

    species: np.ndarray
    positions: np.ndarray
    lattice: np.ndarray
    pbc: tuple[bool, bool, bool]
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None


def voigt_to_tensor(values, order: Sequence[str]) -> np.ndarray:
    """[3, 3] symmetric tensor from 6 components named by ``order`` (e.g. "xx", "yz")."""
    tensor = np.zeros((3, 3))
    for value, name in zip(values, order, strict=True):
        i, j = _AXIS[name[0]], _AXIS[name[1]]
        tensor[i, j] = tensor[j, i] = value
    return tensor


def mlearn_stress(virial, element: str) -> np.ndarray:
    """[3, 3] stress (eV/A^3, ASE sign) from mlearn's ``virial_stress`` (kbar, VASP sign)."""
    if element not in MLEARN_VOIGT:
        raise ValueError(f"no verified stress convention for mlearn element {element!r}")
    return -KBAR * voigt_to_tensor(virial, MLEARN_VOIGT[element])


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; set MATJAX_DATA to the shared data folder")
    return path


def _root(data_dir) -> Path:
    root = Path(data_dir) if data_dir else shared_data_dir()
    if root is None:
        raise FileNotFoundError("shared data folder not found; set MATJAX_DATA")
    return root


def _mlearn_entries(element: str, split: str, data_dir) -> list[dict]:
    path = _require(_root(data_dir) / "ff_mlearn" / element / f"{split}.json.gz")
    with gzip.open(path, "rt") as f:
        return json.load(f)


def mlearn_groups(element: str, split: str = "training", data_dir=None) -> list[str]:
    """The group of each mlearn structure ("AIMD-NVT", "Elastic", "Vacancy", "Surface", ...),
    in ``read_mlearn``'s order."""
    return [entry["group"] for entry in _mlearn_entries(element, split, data_dir)]


def structure_groups(ids, data_dir=None) -> np.ndarray:
    """[M] the mlearn group of each structure id ("mlearn-<element>-<split>-<index>", as
    ``read_mlearn`` names them), "" for structures of other sources."""
    groups = {}
    labels = []
    for structure_id in ids:
        source, *key, index = str(structure_id).split("-")
        if source != "mlearn" or len(key) != 2:
            labels.append("")
            continue
        if tuple(key) not in groups:
            groups[tuple(key)] = mlearn_groups(*key, data_dir)
        labels.append(groups[tuple(key)][int(index)])
    return np.array(labels, dtype=str)


def read_mlearn(element: str, split: str = "training", data_dir=None) -> tuple[list[str], list[Frame]]:
    """mlearn ``{element}/{split}.json.gz`` (split "training" or "test") as frames."""
    ids, frames = [], []
    for i, entry in enumerate(_mlearn_entries(element, split, data_dir)):
        lattice = np.asarray(entry["structure"]["lattice"]["matrix"], dtype=np.float64)
        sites = entry["structure"]["sites"]
        species = np.array([_atomic_number(site["species"][0]["element"]) for site in sites], dtype=np.int32)
        positions = np.array([site["xyz"] for site in sites], dtype=np.float64)
        out = entry["outputs"]
        ids.append(f"mlearn-{element}-{split}-{i}")
        frames.append(Frame(
            species, positions, lattice, (True, True, True), float(out["energy"]),
            np.asarray(out["forces"], dtype=np.float64), mlearn_stress(out["virial_stress"], element),
        ))
    return ids, frames


def _atomic_number(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]


def _extxyz_columns(properties: str) -> dict[str, slice]:
    """Column slices of an extended-XYZ ``Properties=name:type:count:...`` spec."""
    fields, columns, start = properties.split(":"), {}, 0
    for name, _, count in zip(fields[0::3], fields[1::3], fields[2::3]):
        columns[name] = slice(start, start + int(count))
        start += int(count)
    return columns


def read_extxyz(path, prefix: str | None = None) -> tuple[list[str], list[Frame]]:
    """Frames of an extended-XYZ file (plain or .gz) with ``energy`` and per-atom ``forces``.

    The comment line is parsed by ASE's key=value parser and the atom block by numpy (ASE's
    full reader is ~10x slower on rMD17). Non-periodic frames are put in a
    ``MOLECULE_BOX`` cube; a ``stress`` key (ASE sign, 3x3 or Voigt) is read where present.
    """
    from ase.data import atomic_numbers
    from ase.io.extxyz import key_val_str_to_dict

    path = _require(Path(path))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    prefix = prefix or path.name.split(".")[0]
    ids, frames, at = [], [], 0
    while at < len(lines) and lines[at].strip():
        n = int(lines[at])
        info = key_val_str_to_dict(lines[at + 1])
        name = f"{prefix}-{len(frames)}"
        cols = _extxyz_columns(info.get("Properties", "species:S:1:pos:R:3"))
        if "forces" not in cols or "energy" not in info:
            raise ValueError(f"{path}: frame {len(frames)} ({name}) lacks energy or per-atom forces")
        table = np.array([line.split() for line in lines[at + 2: at + 2 + n]])
        pbc = tuple(bool(p) for p in np.broadcast_to(info.get("pbc", False), 3))
        lattice = np.asarray(info["Lattice"], np.float64).reshape(3, 3) if all(pbc) else np.eye(3) * MOLECULE_BOX
        stress = info.get("stress")
        if stress is not None:
            stress = np.asarray(stress, np.float64)
            stress = voigt_to_tensor(stress, ("xx", "yy", "zz", "yz", "zx", "xy")) if stress.size == 6 else stress.reshape(3, 3)
        ids.append(name)
        frames.append(Frame(
            np.array([atomic_numbers[s] for s in table[:, cols["species"]].ravel()], dtype=np.int32),
            table[:, cols["pos"]].astype(np.float64), lattice, pbc, float(info["energy"]),
            table[:, cols["forces"]].astype(np.float64), stress,
        ))
        at += n + 2
    return ids, frames


def read_deepmd(system_dir) -> tuple[list[str], list[Frame]]:
    """All ``set.*`` frames of one DeePMD-kit npy system (``type.raw``, ``type_map.raw``)."""
    system_dir = _require(Path(system_dir))
    type_map = (system_dir / "type_map.raw").read_text().split()
    types = np.loadtxt(system_dir / "type.raw", dtype=np.int64).reshape(-1)
    species = np.array([_atomic_number(type_map[t]) for t in types], dtype=np.int32)
    n = len(species)
    ids, frames = [], []
    for set_dir in sorted(system_dir.glob("set.*")):
        coord, force = np.load(set_dir / "coord.npy"), np.load(set_dir / "force.npy")
        box, energy = np.load(set_dir / "box.npy"), np.load(set_dir / "energy.npy")
        for k in range(len(energy)):
            ids.append(f"{system_dir.name}-{set_dir.name}-{k}")
            frames.append(Frame(
                species, coord[k].reshape(n, 3).astype(np.float64), box[k].reshape(3, 3).astype(np.float64),
                (True, True, True), float(energy[k]), force[k].reshape(n, 3).astype(np.float64), None,
            ))
    return ids, frames


def emt_frames(n_frames: int = 300, seed: int = 0, size: int = 2, gold_fraction: float = 0.25) -> tuple[list[str], list[Frame]]:
    """Offline default: EMT Langevin snapshots of strained fcc Cu-Au cells (32 atoms at size 2).

    Each trajectory draws a random Cu/Au occupation, a random strain (up to 3%) and a
    temperature in 300-1500 K; snapshots are 20 steps (40 fs) apart. Deterministic in seed.
    """
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    rng = np.random.default_rng(seed)
    per_run = 10
    ids, frames = [], []
    for run in range(-(-n_frames // per_run)):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((size, size, size))
        atoms.numbers[rng.random(len(atoms)) < gold_fraction] = 79
        strain = np.eye(3) + 0.03 * rng.uniform(-1, 1, (3, 3))
        atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.calc = EMT()
        temperature = rng.uniform(300, 1500)
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
        dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng)
        for k in range(min(per_run, n_frames - len(frames))):
            dyn.run(20)
            ids.append(f"emt-{seed}-{run}-{k}")
            frames.append(Frame(
                atoms.numbers.astype(np.int32), atoms.positions.copy(), atoms.cell.array.copy(), (True, True, True),
                float(atoms.get_potential_energy()), atoms.get_forces(), atoms.get_stress(voigt=False),
            ))
    return ids, frames


@dataclasses.dataclass(frozen=True)
class ForceFieldData:
    """M labelled structures as crystal graphs (host side, numpy).

    energy [M] eV; forces [sum N, 3] eV/A in the graphs' node order; stress [M, 3, 3]
    eV/A^3 (ASE sign), NaN where the source has none; skipped: (id, reason) of frames
    left out.
    """

    ids: np.ndarray
    graphs: PackedGraphs
    energy: np.ndarray
    forces: np.ndarray
    stress: np.ndarray
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_atoms(self) -> np.ndarray:
        """[M] atoms per structure."""
        return self.graphs.n_node

    def subset(self, indices) -> "ForceFieldData":
        indices = np.asarray(indices, dtype=np.int64)
        start = np.cumsum(self.graphs.n_node) - self.graphs.n_node
        nodes = ragged_arange(start[indices], self.graphs.n_node[indices])
        return dataclasses.replace(
            self, ids=self.ids[indices], graphs=take(self.graphs, indices), energy=self.energy[indices],
            forces=self.forces[nodes], stress=self.stress[indices],
        )


def _check_frame(frame: Frame) -> None:
    n = len(frame.species)
    if frame.positions.shape != (n, 3) or frame.forces.shape != (n, 3):
        raise ValueError(f"{n} atoms but positions {frame.positions.shape}, forces {frame.forces.shape}")
    if not (np.isfinite(frame.energy) and np.isfinite(frame.forces).all()):
        raise ValueError("non-finite energy or forces")


def build_dataset(ids: Sequence[str], frames: Sequence[Frame], cutoff: float) -> ForceFieldData:
    """Graphs (all neighbours within ``cutoff``) and labels of ``frames``.

    A frame with inconsistent shapes, non-finite labels or an isolated atom is skipped,
    logged and listed in ``skipped``; the others go on.
    """
    graphs, kept, skipped = [], [], []
    for i, frame in enumerate(frames):
        try:
            _check_frame(frame)
            frac = np.linalg.solve(frame.lattice.T, frame.positions.T).T
            graphs.append(build_graph(frame.species, frac, frame.lattice, cutoff=cutoff, pbc=frame.pbc))
            kept.append(i)
        except ValueError as err:  # includes IsolatedAtomError; one bad frame must not stop the set
            skipped.append((str(ids[i]), f"{type(err).__name__}: {err}"))
    report_skipped(skipped, len(frames), "frames")
    if not kept:
        raise ValueError(f"no usable frames: all {len(frames)} were skipped (first: {skipped[0] if skipped else None})")
    nan = np.full((3, 3), np.nan)
    return ForceFieldData(
        ids=np.array([ids[i] for i in kept]),
        graphs=pack(graphs),
        energy=np.array([frames[i].energy for i in kept]),
        forces=np.concatenate([frames[i].forces for i in kept]),
        stress=np.stack([nan if frames[i].stress is None else frames[i].stress for i in kept]),
        skipped=tuple(skipped),
    )


def parse_assignments(spec: str, option: str) -> dict[str, float]:
    """{name: value} of a "Name=value,..." command-line spec; a malformed item names ``option``."""
    values = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        try:
            values[name] = float(value)
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not Name=number") from None
    return values


def with_isolated_atoms(data: ForceFieldData, spec: str) -> ForceFieldData:
    """``data`` plus one free atom per "Symbol=energy" of ``spec`` (eV, e.g. "Mo=-4.5876").

    Each is a one-node graph without edges, zero forces and no stress: the DFT energy of the
    isolated (spin-polarised) atom in the data's own setup, as GAP's e0 and MACE's E0 give
    it. It anchors the model where no training structure reaches (no neighbours), so
    under-coordinated atoms (unseen surfaces) are interpolated towards the free atom instead
    of extrapolated from the lowest trained coordination.
    """
    energies = parse_assignments(spec, "isolated_atom_energies")
    try:
        species = np.array([_atomic_number(symbol) for symbol in energies], dtype=data.graphs.species.dtype)
    except KeyError as err:
        raise ValueError(f"isolated_atom_energies: {err.args[0]!r} is not an element symbol") from None
    n, g = len(species), data.graphs
    atoms = PackedGraphs(
        n_node=np.ones(n, g.n_node.dtype), n_edge=np.zeros(n, g.n_edge.dtype),
        lattice=np.repeat(np.eye(3)[None] * MOLECULE_BOX, n, axis=0).astype(g.lattice.dtype),
        species=species, frac=np.full((n, 3), 0.5, g.frac.dtype), senders=np.zeros(0, g.senders.dtype),
        receivers=np.zeros(0, g.receivers.dtype), shifts=np.zeros((0, 3), g.shifts.dtype),
        distances=np.zeros(0, g.distances.dtype),
    )
    return dataclasses.replace(
        data, ids=np.concatenate([data.ids, [f"isolated-{symbol}" for symbol in energies]]),
        graphs=concat([g, atoms]), energy=np.concatenate([data.energy, list(energies.values())]),
        forces=np.concatenate([data.forces, np.zeros((n, 3))]),
        stress=np.concatenate([data.stress, np.full((n, 3, 3), np.nan)]),
    )


def _hold_out(data: ForceFieldData, holdout: bool = True) -> tuple[ForceFieldData, ForceFieldData]:
    """(train, val): one id-hash bucket in ten (10%) goes to validation, deterministically;
    without ``holdout`` train keeps them too (val then monitors the fit, it cannot select)."""
    val = np.array([hash_bucket(i) == 9 for i in data.ids])
    train = ~val if holdout else np.ones_like(val)
    return data.subset(np.flatnonzero(train)), data.subset(np.flatnonzero(val))


def _split_three(data: ForceFieldData, holdout: bool = True) -> dict[str, ForceFieldData]:
    """The project's hashed-id 80/10/10 train/val/test split (train + val to train without ``holdout``)."""
    idx = split_indices(data.ids)
    if not holdout:
        idx["train"] = np.sort(np.concatenate([idx["train"], idx["val"]]))
    return {name: data.subset(i) for name, i in idx.items()}


def load_forcefield(name: str, cutoff: float, data_dir=None, n_frames: int = 300,
                    holdout: bool = True) -> dict[str, ForceFieldData]:
    """{"train", "val", "test"} splits of a named force-field set (see the module docstring).

    holdout=False trains on the validation structures too, for the final model of a set
    whose rare structures (mlearn: 9-12 surfaces) a 10% hold-out would thin out; aspirin's
    validation frames are not part of its 1000-frame training set, so it has no such option.
    """
    if name == "aspirin" and not holdout:
        raise ValueError("aspirin trains on 1000 frames by definition; its validation frames are extra, "
                         "so there is no hold-out to give up")
    root = None if name == "emt" else _root(data_dir)
    if name.startswith("mlearn-"):
        element = name.split("-", 1)[1]
        train, val = _hold_out(build_dataset(*read_mlearn(element, "training", root), cutoff), holdout)
        return {"train": train, "val": val, "test": build_dataset(*read_mlearn(element, "test", root), cutoff)}
    if name == "aspirin":
        folder = root / "ff_rmd17_aspirin"
        full = build_dataset(*read_extxyz(folder / "rmd17_aspirin_train.xyz.gz"), cutoff)
        test = build_dataset(*read_extxyz(folder / "rmd17_aspirin_test.xyz.gz"), cutoff)
        return {"train": full.subset(np.arange(1000)), "val": full.subset(np.arange(1000, len(full))), "test": test}
    if name == "3bpa":
        return _split_three(build_dataset(*read_extxyz(root / "ff_3bpa" / "3bpa_train_300K.xyz.gz"), cutoff), holdout)
    if name == "water":
        systems = [root / "ff_water_deepmd" / f"data_{k}" for k in range(4)]
        frames = [read_deepmd(s) for s in systems[:3]]
        train, val = _hold_out(build_dataset(sum((f[0] for f in frames), []), sum((f[1] for f in frames), []), cutoff), holdout)
        return {"train": train, "val": val, "test": build_dataset(*read_deepmd(systems[3]), cutoff)}
    if name == "emt":
        return _split_three(build_dataset(*emt_frames(n_frames), cutoff), holdout)
    raise ValueError(f"unknown force-field data set {name!r}; choose mlearn-<Si|Ge|Li|Mo>, aspirin, 3bpa, water or emt")
