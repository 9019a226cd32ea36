"""Materials Project access through the real mp-api client over a mocked HTTP layer.

requests.get (mp-api's heartbeat) and requests.Session.get (its queries) are patched, so
no test can reach the network.
"""

import json
from unittest import mock

import pytest
import requests
from pymatgen.core import Lattice, Structure

from matjax.data.materials_project import MaterialsProjectError, query_materials_project
from matjax.data.sources import dataset_from_frame

SILICON = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
KEY = "k" * 32


def response(status, payload):
    r = requests.Response()
    r.status_code, r._content, r.url = status, json.dumps(payload).encode(), "https://api.materialsproject.org/x"
    return r


HEARTBEAT = response(200, {"db_version": "2025_09_25", "access_controlled_batch_ids": [], "version": "0.87.3"})
SUMMARY = response(200, {"data": [{
    "material_id": "mp-149", "structure": SILICON.as_dict(), "formation_energy_per_atom": 0.0,
    "band_gap": 0.61, "energy_above_hull": 0.0, "formula_pretty": "Si",
}], "meta": {"total_doc": 1}})


@pytest.fixture
def http():
    """Patch the HTTP layer; set ``http.query`` to a response or an exception."""
    with mock.patch("requests.get", return_value=HEARTBEAT), mock.patch("requests.Session.get") as query:
        query.return_value = SUMMARY
        yield query


def test_query_returns_cdvae_rows_and_caches_them(http, tmp_path, monkeypatch):
    monkeypatch.setenv("MP_API_KEY", KEY)
    rows = query_materials_project(elements=["Si"], cache_dir=tmp_path)
    assert rows.material_id.tolist() == ["mp-149"] and rows.band_gap[0] == pytest.approx(0.61)
    params = http.call_args.kwargs["params"]
    assert params["elements"] == "Si" and params["energy_above_hull_max"] == 0.1
    data = dataset_from_frame(rows, ["band_gap"], cutoff=4.0, cache_dir=tmp_path)
    assert data.structure(0).matches(SILICON)
    # A repeated query is answered from disk: no request, no key needed.
    monkeypatch.delenv("MP_API_KEY")
    http.side_effect = AssertionError("network used for a cached query")
    again = query_materials_project(elements=["Si"], cache_dir=tmp_path)
    assert again.equals(rows)
    assert http.call_count == 1


def test_missing_key_says_how_to_get_one(http, tmp_path, monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(MaterialsProjectError, match="MP_API_KEY is not set.*export MP_API_KEY"):
        query_materials_project(elements=["Si"], cache_dir=tmp_path)
    assert http.call_count == 0


@pytest.mark.parametrize(
    "answer, message",
    [
        (response(401, {"detail": "Invalid API key"}), "rejected the API key"),
        (response(403, {"detail": "Forbidden"}), "rejected the API key"),
        (response(429, {"detail": "Too many requests"}), "rate-limiting"),
        (requests.exceptions.ConnectionError("Max retries exceeded"), "network failure"),
        (requests.exceptions.ReadTimeout("read timed out"), "network failure"),
    ],
)
def test_failures_give_actionable_errors_and_cache_nothing(http, tmp_path, answer, message):
    if isinstance(answer, Exception):
        http.side_effect = answer
    else:
        http.return_value = answer
    with pytest.raises(MaterialsProjectError, match=message):
        query_materials_project(elements=["Si"], api_key=KEY, cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.csv.gz"))


def test_malformed_key_is_reported_as_a_key_problem(http, tmp_path):
    with pytest.raises(MaterialsProjectError, match="API key"):
        query_materials_project(elements=["Si"], api_key="old-16-char-key!", cache_dir=tmp_path)
