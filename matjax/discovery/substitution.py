"""Candidate crystals by chemical substitution into known structures.

Substitution probabilities are Hautier et al.'s data-mined table (Inorg. Chem. 50, 656,
2011), shipped with pymatgen: P(new | old) for ions. A candidate replaces every species of a
parent crystal at once (identity allowed, at least one real change, distinct new elements);
its score is the product of the conditional probabilities, and candidates below
``threshold`` are dropped, as in pymatgen's SubstitutionPredictor.

- Ionic parents (a non-metal present and an oxidation-state assignment found) substitute
  ions and keep only charge-balanced candidates.
- Metallic parents (intermetallics such as the built-in EMT alloys) have no oxidation
  states; element similarity is the largest P(new ion | old ion) over the elements' ions.
- Single-site substitution (``single_site=True``) also replaces one atom of a parent by a
  similar element (an ion of the same charge where the parent is ionic): a partial
  substitution in the spirit of GNoME's SAPS (Merchant et al., Nature 624, 80, 2023), which
  reaches new compositions and orderings inside known near-hull cells. Symmetry-equivalent
  sites give the same crystal, which the pool's fingerprint removes.

The volume is rescaled by the ratio of summed atomic volumes (radius^3 from
``elements.csv``). A candidate is only (parent index, species map, probability, volume
scale): its graph is the parent's with species replaced and lengths scaled
(``candidate_graphs``), so a million candidates cost a few tens of MB until they are batched.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Sequence

import numpy as np

from matjax.data.elements import element_descriptors, symbols
from matjax.data.graphs import PackedGraphs, take

MAX_SPECIES = 6  # species per parent crystal; parents with more are skipped
RADIUS_COLUMN = 1  # atomic_radius in element_descriptors


@dataclasses.dataclass(frozen=True)
class Candidates:
    """C substitution candidates.

    parent: [C] int index into the parents; old: [C, MAX_SPECIES] parent Z per slot (0 = unused);
    new: [C, MAX_SPECIES] replacement Z per slot; probability: [C]; volume_scale: [C] (V_new / V_old);
    site: [C] parent atom that then becomes ``site_z`` [C] (-1 and 0: whole-element substitution).
    """

    parent: np.ndarray
    old: np.ndarray
    new: np.ndarray
    probability: np.ndarray
    volume_scale: np.ndarray
    site: np.ndarray
    site_z: np.ndarray

    def __len__(self) -> int:
        return len(self.parent)

    def subset(self, indices) -> "Candidates":
        return Candidates(*(getattr(self, f.name)[indices] for f in dataclasses.fields(self)))


@functools.cache
def _table():
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SubstitutionProbability()


@functools.cache
def _ion_matrix() -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """(ion names, Z [n_ions], charge [n_ions], [n_ions, n_ions] P(new = column | old = row))."""
    table = _table()
    ions = sorted(table.species, key=str)
    probs = np.array([[table.cond_prob(new, old) for new in ions] for old in ions])
    charges = np.array([int(round(s.oxi_state)) for s in ions])
    return tuple(str(s) for s in ions), np.array([s.Z for s in ions]), charges, probs


@functools.cache
def element_similarity() -> np.ndarray:
    """[104, 104] P(new element = column | old element = row): max over the elements' ions."""
    _, z, _, probs = _ion_matrix()
    sim = np.zeros((len(symbols()), len(symbols())))
    np.maximum.at(sim, (z[:, None], z[None, :]), probs)
    return sim


def ionic_species(composition) -> dict[str, str] | None:
    """element -> ion (e.g. "Fe" -> "Fe3+") for an ionic composition, else None."""
    from pymatgen.core import Element

    if all(Element(el.symbol).is_metal for el in composition.elements):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guesses = composition.oxi_state_guesses(max_sites=-20)
    if not guesses:
        return None
    names = set(_ion_matrix()[0])
    ions = {el: f"{el}{_charge(q)}" for el, q in guesses[0].items()}
    return ions if set(ions.values()) <= names else None


def _charge(q: float) -> str:
    q = int(round(q))
    return ("+" if q > 0 else "-") if abs(q) == 1 else f"{abs(q)}{'+' if q > 0 else '-'}"


def _options(old: Sequence, ions: dict | None, allowed: np.ndarray, threshold: float):
    """Per parent slot: (replacement Z [n_k], P [n_k], charge [n_k] or None)."""
    options = []
    if ions is None:
        sim = element_similarity()
        for z in old:
            p = sim[z] * allowed
            keep = np.flatnonzero(p >= threshold)
            options.append((keep, p[keep], None))
        return options
    names, ion_z, charges, probs = _ion_matrix()
    for z in old:
        row = probs[names.index(ions[symbols()[z]])] * allowed[ion_z]
        keep = np.flatnonzero(row >= threshold)
        options.append((ion_z[keep], row[keep], charges[keep]))
    return options


def substitutions(
    old: Sequence[int],
    counts: Sequence[int],
    ions: dict | None,
    allowed: np.ndarray,
    threshold: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """All substitutions of one parent: (new Z [S, k], probability [S]).

    old: [k] parent Z per slot; counts: [k] atoms per slot; ions: ionic species or None;
    allowed: [104] bool, elements a candidate may contain (chemical-space filter).
    """
    counts = np.asarray(counts)
    new, prob, charge = np.zeros((1, 0), dtype=np.int64), np.ones(1), np.zeros(1)
    # Expand slot by slot; every factor is <= 1, so pruning partial products is exact.
    for (z, p, q), n in zip(_options(old, ions, allowed, threshold), counts):
        pick = np.repeat(np.arange(len(new)), len(z)), np.tile(np.arange(len(z)), len(new))
        new = np.concatenate([new[pick[0]], z[pick[1], None]], axis=1)
        prob = prob[pick[0]] * p[pick[1]]
        charge = charge[pick[0]] + (0 if q is None else n * q[pick[1]])
        keep = prob >= threshold
        new, prob, charge = new[keep], prob[keep], charge[keep]
    ordered = np.sort(new, axis=1)
    ok = (new != np.asarray(old)).any(axis=1) & (np.diff(ordered, axis=1) != 0).all(axis=1)
    if ions is not None:
        ok &= charge == 0
    order = np.argsort(-prob[ok], kind="stable")
    return new[ok][order], prob[ok][order]


def single_site_substitutions(
    old: Sequence[int],
    site_slot: np.ndarray,
    ions: dict | None,
    allowed: np.ndarray,
    threshold: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every one-atom substitution of one parent that leaves at least two elements:
    (site [S], new Z [S], probability [S]).

    old: [k] parent Z per slot; site_slot: [n] slot of each parent atom; ions, allowed,
    threshold: as in ``substitutions`` (an ion only replaces an ion of its own charge, so
    a charge-balanced parent stays balanced).
    """
    charge = None
    if ions is not None:
        names, _, charges, _ = _ion_matrix()
        charge = {z: charges[names.index(ions[symbols()[z]])] for z in old}
    per_slot = []
    for z_old, (z, p, q) in zip(old, _options(old, ions, allowed, threshold)):
        keep = (z != z_old) & (True if q is None else q == charge[z_old])
        per_slot.append((z[keep], p[keep]))
    site = np.concatenate([np.full(len(per_slot[k][0]), i, dtype=np.int64) for i, k in enumerate(site_slot)])
    new = np.concatenate([per_slot[k][0] for k in site_slot]).astype(np.int64)
    prob = np.concatenate([per_slot[k][1] for k in site_slot]).astype(np.float64)
    # A lone atom replaced by an element already present can leave a pure element, the
    # formation-energy reference: no discovery, so never a candidate.
    n_elements = len(old) - (np.bincount(site_slot)[site_slot[site]] == 1) + ~np.isin(new, old)
    keep = n_elements >= 2
    return site[keep], new[keep], prob[keep]


def _volume_scale(old: np.ndarray, new: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[S] V_new / V_old from summed atomic-radius cubes."""
    return (_r3()[new] * counts).sum(1) / (_r3()[old] * counts).sum()


@functools.cache
def _r3() -> np.ndarray:
    return element_descriptors(standardize=False)[:, RADIUS_COLUMN].astype(np.float64) ** 3


def generate_candidates(
    parents: PackedGraphs,
    allowed_elements: Sequence[str] | None = None,
    threshold: float = 1e-3,
    max_per_parent: int | None = None,
    ionic: bool = True,
    single_site: bool = False,
) -> Candidates:
    """Substitution candidates for every parent crystal.

    allowed_elements: chemical-space filter (None allows every element in the table);
    max_per_parent: most whole-element substitutions per parent (the likeliest);
    ionic: detect ionic parents and substitute ions (False treats every parent as metallic);
    single_site: add every one-atom substitution (``single_site_substitutions``).
    """
    from pymatgen.core import Composition

    unknown = sorted(set(allowed_elements or ()) - set(symbols()[1:]))
    if unknown:
        raise ValueError(f"unknown element(s) in allowed_elements: {', '.join(unknown)}")
    allowed = np.zeros(len(symbols()), dtype=bool)
    allowed[[symbols().index(e) for e in allowed_elements] if allowed_elements else slice(1, None)] = True
    parts = []
    starts = np.cumsum(parents.n_node) - parents.n_node
    for i in range(len(parents)):
        species = parents.species[starts[i]: starts[i] + parents.n_node[i]]
        z, site_slot, counts = np.unique(species, return_inverse=True, return_counts=True)
        if len(z) > MAX_SPECIES:
            continue
        composition = Composition({symbols()[a]: int(c) for a, c in zip(z, counts)})
        ions = ionic_species(composition) if ionic else None
        new, prob = substitutions(z, counts, ions, allowed, threshold)
        if max_per_parent is not None:
            new, prob = new[:max_per_parent], prob[:max_per_parent]
        parts.append((i, z, new, prob, _volume_scale(z, new, counts), np.full(len(new), -1), np.zeros(len(new))))
        if single_site:
            site, site_z, prob = single_site_substitutions(z, site_slot, ions, allowed, threshold)
            scale = 1 + (_r3()[site_z] - _r3()[species[site]]) / _r3()[species].sum()
            parts.append((i, z, np.tile(z, (len(site), 1)), prob, scale, site, site_z))
    return _stack([part for part in parts if len(part[3])])


def _stack(parts) -> Candidates:
    n = sum(len(p[3]) for p in parts)
    old = np.zeros((n, MAX_SPECIES), dtype=np.int32)
    new = np.zeros((n, MAX_SPECIES), dtype=np.int32)
    row = 0
    for _, z, sub, *_ in parts:
        old[row: row + len(sub), : len(z)] = z
        new[row: row + len(sub), : len(z)] = sub
        row += len(sub)
    cat = lambda k, dtype: np.concatenate([p[k] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)
    parent = np.concatenate([np.full(len(p[3]), p[0]) for p in parts]) if parts else np.zeros(0, int)
    return Candidates(parent.astype(np.int64), old, new, cat(3, np.float64), cat(4, np.float64),
                      cat(5, np.int64), cat(6, np.int32))


def candidate_graphs(parents: PackedGraphs, candidates: Candidates, indices=None) -> PackedGraphs:
    """Graphs of candidates ``indices`` (default all): the parent's topology with species
    replaced and the lattice and distances scaled by volume_scale^(1/3).

    Exact for k-nearest-neighbour graphs, whose neighbour order isotropic scaling keeps,
    as long as the scaled distances stay inside the cutoff (see ``topology_reusable``).
    """
    idx = np.arange(len(candidates)) if indices is None else np.asarray(indices)
    graphs = take(parents, candidates.parent[idx])
    node_candidate = np.repeat(np.arange(len(idx)), graphs.n_node)
    slot = np.argmax(candidates.old[idx][node_candidate] == graphs.species[:, None], axis=1)
    species = candidates.new[idx][node_candidate, slot]
    one = np.flatnonzero(candidates.site[idx] >= 0)
    species[(np.cumsum(graphs.n_node) - graphs.n_node)[one] + candidates.site[idx][one]] = candidates.site_z[idx][one]
    scale = np.cbrt(candidates.volume_scale[idx])
    return graphs.replace(
        species=species.astype(graphs.species.dtype),
        lattice=graphs.lattice * scale[:, None, None],
        distances=graphs.distances * np.repeat(scale, graphs.n_edge),
    )


def topology_reusable(parents: PackedGraphs, candidates: Candidates, cutoff: float, max_neighbors: int) -> np.ndarray:
    """[C] bool: the scaled parent graph equals the candidate's own k-NN graph.

    Requires every parent atom to have its full k neighbours (else a shrunk cell could pull
    new atoms inside the cutoff) and the farthest scaled neighbour to stay within the cutoff.
    """
    node_start = np.cumsum(parents.n_node) - parents.n_node
    receivers = parents.receivers + np.repeat(node_start, parents.n_edge)
    complete = np.bincount(receivers, minlength=len(parents.species)) == max_neighbors
    full = np.logical_and.reduceat(complete, node_start)
    edge_start = np.cumsum(parents.n_edge) - parents.n_edge
    farthest = np.maximum.reduceat(parents.distances, edge_start) if len(parents.distances) else np.zeros(0)
    scaled = farthest[candidates.parent] * np.cbrt(candidates.volume_scale)
    return full[candidates.parent] & (scaled <= cutoff)
