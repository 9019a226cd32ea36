"""CDVAE CSV reading, skipped-row reporting and hashed splits."""

import logging

import numpy as np
import pandas as pd
import pytest

from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from conftest import cdvae_rows
from matjax.data.sources import _parse_cif, load_csv, mp20_lite_paths, read_cdvae_csv, shared_data_dir
from matjax.data.splits import split_dataset, split_indices


def split_of(ids):
    return {ids[i]: name for name, idx in split_indices(ids).items() for i in idx}


def test_gzip_and_plain_csv_give_the_same_dataset(tmp_path, cache_dir):
    rows = cdvae_rows(4)
    rows.to_csv(tmp_path / "a.csv", index=False)
    rows.to_csv(tmp_path / "a.csv.gz", index=False)
    plain = load_csv(tmp_path / "a.csv", ["formation_energy_per_atom", "band_gap"], cutoff=5.0)
    gz = load_csv(tmp_path / "a.csv.gz", ["formation_energy_per_atom", "band_gap"], cutoff=5.0)
    np.testing.assert_array_equal(plain.ids, gz.ids)
    np.testing.assert_allclose(plain.targets, rows[["formation_energy_per_atom", "band_gap"]].to_numpy())
    assert plain.target("band_gap")[3] == pytest.approx(3.0)
    assert plain.structure(2).matches(_parse_cif(rows.cif[2]))


def test_bad_rows_are_skipped_named_and_logged(tmp_path, cache_dir, caplog):
    rows = cdvae_rows(6)
    rows.loc[1, "cif"] = "data_broken\n_cell_length_a 3.0\nthis is not a CIF"
    rows.loc[3, "band_gap"] = np.nan
    rows.loc[4, "cif"] = str(CifWriter(Structure(Lattice.cubic(30.0), ["Na"], [[0, 0, 0]])))
    rows.to_csv(tmp_path / "rows.csv.gz", index=False)
    with caplog.at_level(logging.WARNING, logger="matjax"):
        data = load_csv(tmp_path / "rows.csv.gz", ["band_gap"], cutoff=3.0)
    skipped = dict(data.skipped)
    assert "test-0-1" in skipped and "non-finite" in skipped["test-0-3"]
    assert "IsolatedAtomError" in skipped["test-0-4"]
    assert sorted(data.ids) == ["test-0-0", "test-0-2", "test-0-5"]
    assert "skipped" in caplog.text and "test-0-1" in caplog.text


def test_duplicate_ids_keep_the_first_row(tmp_path):
    rows = cdvae_rows(3)
    pd.concat([rows, rows.assign(band_gap=99.0)]).to_csv(tmp_path / "dup.csv", index=False)
    assert read_cdvae_csv(tmp_path / "dup.csv").band_gap.max() == pytest.approx(3.0)


def test_wrong_format_and_missing_targets_are_clear_errors(tmp_path, cache_dir):
    cdvae_rows(2).drop(columns="cif").to_csv(tmp_path / "nocif.csv", index=False)
    with pytest.raises(ValueError, match=r"nocif.csv.*missing column.*cif"):
        read_cdvae_csv(tmp_path / "nocif.csv")
    cdvae_rows(2).to_csv(tmp_path / "ok.csv", index=False)
    with pytest.raises(ValueError, match="'bulk_modulus'"):
        load_csv(tmp_path / "ok.csv", ["bulk_modulus"])
    rows = cdvae_rows(2).assign(cif="garbage")
    rows.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="no usable rows"):
        load_csv(tmp_path / "bad.csv", ["band_gap"])


def test_split_depends_only_on_the_id():
    ids = [f"mp-{i}" for i in range(5000)]
    full = split_of(ids)
    fractions = {name: list(full.values()).count(name) / 5000 for name in ("train", "val", "test")}
    assert fractions["train"] == pytest.approx(0.8, abs=0.03) and fractions["test"] == pytest.approx(0.1, abs=0.02)
    other = split_of(list(reversed(ids[:100])) + ["extra-1", "extra-2"])
    assert all(other[i] == full[i] for i in ids[:100])


def test_too_few_items_for_a_split_is_an_error(tmp_path, cache_dir):
    cdvae_rows(2).to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(ValueError, match="empty"):
        split_dataset(load_csv(tmp_path / "two.csv", ["band_gap"], cutoff=5.0))


@pytest.mark.skipif(shared_data_dir() is None, reason="shared data absent")
def test_mp20_lite_split_sizes():
    rows = read_cdvae_csv(mp20_lite_paths())
    assert len(rows) == 15686
    assert {k: len(v) for k, v in split_indices(rows.material_id).items()} == {"train": 12595, "val": 1600, "test": 1491}
