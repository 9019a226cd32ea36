"""Materials Project access through mp-api, cached on disk.

``query_materials_project`` returns CDVAE-style rows (``material_id``, ``cif`` and the
requested properties), so ``dataset_from_frame`` turns them into a Dataset like any CSV.
Each distinct query is cached as ``<cache>/mp/<query hash>.csv.gz``: a repeated query makes
no request and needs no API key, so work can continue offline.

The key comes from the ``MP_API_KEY`` environment variable (or the ``api_key`` argument).
A missing key, a rejected key, rate limiting and network failure each raise
``MaterialsProjectError`` with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from matjax.data.cache import cached_frame, default_cache_dir

DEFAULT_FIELDS = ("formation_energy_per_atom", "band_gap", "energy_above_hull", "formula_pretty")
KEY_URL = "https://next-gen.materialsproject.org/api"


class MaterialsProjectError(RuntimeError):
    """Materials Project access failed; the message says why and what to do."""


def explain_error(err: Exception) -> MaterialsProjectError:
    """Translate an mp-api / requests exception into an actionable MaterialsProjectError."""
    import requests

    text = str(err)
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)) or re.search(
        r"timed out|Max retries|Failed to resolve|Connection (refused|aborted)", text
    ):
        return MaterialsProjectError(
            f"network failure reaching the Materials Project API ({text[:200]}). Check the connection or "
            "proxy and retry; queries already cached are answered offline."
        )
    if re.search(r"\b429\b|rate limit|too many requests", text, re.IGNORECASE):
        return MaterialsProjectError(
            "the Materials Project API is rate-limiting this key (HTTP 429). Wait a minute and retry, or "
            "narrow the query (fewer elements, a smaller energy-above-hull range)."
        )
    if re.search(r"\b40[13]\b|api[ _]key|unauthori[sz]ed|forbidden", text, re.IGNORECASE):
        return MaterialsProjectError(
            f"the Materials Project rejected the API key ({text[:200]}). Check MP_API_KEY: current keys "
            f"have 32 characters and are listed at {KEY_URL}."
        )
    return MaterialsProjectError(f"Materials Project query failed: {type(err).__name__}: {text[:300]}")


def _default_rester(api_key: str):
    from mp_api.client import MPRester

    return MPRester(api_key, mute_progress_bars=True)


def _query_path(cache_dir: Path, query: dict) -> Path:
    digest = hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / "mp" / f"{digest}.csv.gz"


def _doc_to_row(doc, fields: Sequence[str]) -> dict:
    from pymatgen.io.cif import CifWriter

    row = {"material_id": str(doc.material_id), "cif": str(CifWriter(doc.structure))}
    row.update({f: getattr(doc, f) for f in fields})
    return row


def query_materials_project(
    elements: Sequence[str] | None = None,
    num_elements: int | tuple[int, int] | None = None,
    energy_above_hull: tuple[float, float] | None = (0.0, 0.1),
    fields: Sequence[str] = DEFAULT_FIELDS,
    api_key: str | None = None,
    cache_dir: str | Path | None = None,
    rester: Callable[[str], object] = _default_rester,
) -> pd.DataFrame:
    """Materials from the MP summary endpoint as CDVAE-style rows.

    elements: every returned material contains all of these (e.g. ["Li", "O"]);
    num_elements: exact count or (min, max); energy_above_hull: (min, max) eV/atom;
    fields: summary properties to keep as columns. ``rester`` builds the client from a key
    (tests pass a fake; the default is ``mp_api.client.MPRester``).
    """
    query = {
        "elements": sorted(elements) if elements else None,
        "num_elements": list(num_elements) if isinstance(num_elements, tuple) else num_elements,
        "energy_above_hull": list(energy_above_hull) if energy_above_hull else None,
        "fields": list(fields),
    }
    search = {k: tuple(v) if isinstance(v, list) else v for k, v in query.items() if v is not None and k != "fields"}
    return cached_frame(
        _query_path(Path(cache_dir or default_cache_dir()), query),
        lambda: _fetch(search, fields, api_key or os.environ.get("MP_API_KEY"), rester),
    )


def _fetch(search: dict, fields: Sequence[str], key: str | None, rester) -> pd.DataFrame:
    if not key:
        raise MaterialsProjectError(
            f"MP_API_KEY is not set. Get a key at {KEY_URL} and run `export MP_API_KEY=<your key>`; "
            "the built-in EMT dataset and CSV files need no key."
        )
    try:
        with rester(key) as mpr:
            docs = mpr.materials.summary.search(**search, fields=["material_id", "structure", *fields])
    except Exception as err:  # mp-api raises MPRestError, ValueError or requests errors
        raise explain_error(err) from err
    return pd.DataFrame([_doc_to_row(d, fields) for d in docs], columns=["material_id", "cif", *fields])
