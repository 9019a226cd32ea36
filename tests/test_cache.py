"""Graph cache: exact round trip, partial hits, and corrupt or stale entries never used."""

import numpy as np
import pytest

from conftest import cdvae_rows, crystal
from matjax.data.cache import GraphCache, content_key
from matjax.data.dataset import build_graphs
from matjax.data.graphs import pack, structure_to_graph
from matjax.data.sources import dataset_from_frame


def graphs_and_keys(n, seed=0):
    structures = [crystal(seed + i) for i in range(n)]
    graphs = [structure_to_graph(s, 5.0) for s in structures]
    keys = [content_key((g.species, g.frac, g.lattice)) for g in graphs]
    return graphs, keys


def assert_graphs_equal(packed_a, packed_b):
    for name in packed_a.fields():
        np.testing.assert_array_equal(getattr(packed_a, name), getattr(packed_b, name))


def test_round_trip_in_key_order_with_partial_hits(tmp_path):
    graphs, keys = graphs_and_keys(6)
    cache = GraphCache(tmp_path, 5.0, None)
    cache.save(keys[:3], pack(graphs[:3]))
    cache.save(keys[3:], pack(graphs[3:]))
    wanted = [keys[4], b"0" * 32, keys[1], keys[5]]
    found_graphs, found = cache.load(wanted)
    assert found.tolist() == [True, False, True, True]
    assert_graphs_equal(found_graphs, pack([graphs[4], graphs[1], graphs[5]]))


def test_parameters_select_separate_caches(tmp_path):
    graphs, keys = graphs_and_keys(2)
    GraphCache(tmp_path, 5.0, None).save(keys, pack(graphs))
    assert not GraphCache(tmp_path, 6.0, None).load(keys)[1].any()
    assert not GraphCache(tmp_path, 5.0, 12).load(keys)[1].any()


@pytest.mark.parametrize("damage", ["truncate", "flip bytes"])
def test_corrupt_shard_is_detected_deleted_and_rebuilt(tmp_path, damage):
    graphs, keys = graphs_and_keys(4)
    cache = GraphCache(tmp_path, 5.0, None)
    path = cache.save(keys, pack(graphs))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # inside the distances payload, near the end of the archive's data
        data[-700:-690] = bytes(b ^ 0xFF for b in data[-700:-690])
    path.write_bytes(bytes(data))
    calls = []

    def make(i):
        calls.append(i)
        return graphs[i]

    with pytest.warns(UserWarning, match="corrupt graph cache shard"):
        rebuilt, kept, skipped = build_graphs([f"id{i}" for i in range(4)], keys, make, cache)
    assert calls == [0, 1, 2, 3] and kept.all() and not skipped
    assert_graphs_equal(rebuilt, pack(graphs))
    assert cache.load(keys)[1].all()  # the rebuilt graphs were stored again


def test_second_build_reads_the_cache(cache_dir):
    rows = cdvae_rows(5)
    first = dataset_from_frame(rows, ["band_gap"], cutoff=5.0)
    calls = []
    import matjax.data.sources as sources

    original = sources._parse_cif
    sources._parse_cif = lambda cif: calls.append(cif) or original(cif)
    try:
        second = dataset_from_frame(rows, ["band_gap"], cutoff=5.0)
    finally:
        sources._parse_cif = original
    assert calls == []
    assert_graphs_equal(first.graphs, second.graphs)


def test_changed_structure_with_the_same_id_is_rebuilt_not_served_stale(cache_dir):
    rows = cdvae_rows(3)
    before = dataset_from_frame(rows, ["band_gap"], cutoff=5.0)
    changed = rows.copy()
    changed.loc[1, "cif"] = cdvae_rows(3, seed=7).loc[1, "cif"]
    after = dataset_from_frame(changed, ["band_gap"], cutoff=5.0)
    assert not np.array_equal(after.graphs.graph(1).lattice, before.graphs.graph(1).lattice)
    expected = structure_to_graph(crystal(7001), 5.0)
    np.testing.assert_allclose(after.graphs.graph(1).lattice, expected.lattice, atol=1e-6)
