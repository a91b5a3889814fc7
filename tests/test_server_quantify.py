"""``POST /api/v1/jobs/quantify``: IHC scoring of one image as a server job."""

from __future__ import annotations

import csv
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.exceptions import StarletteDeprecationWarning  # type: ignore[attr-defined]

from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.infer.ihc import intensity_bins
from simsearch_wsi.qupath.geojson import validate_feature_collection
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.server import create_app
from simsearch_wsi.synthetic.ihc import make_ihc_cell_field

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

API = "/api/v1"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path, Any]]:
    root = tmp_path_factory.mktemp("allowed").resolve()
    field = make_ihc_cell_field((160, 160), dab_levels=(0.05, 0.3, 0.5, 0.8), seed=7)
    png = root / "core a.png"
    Image.fromarray(field.rgb).save(png)
    trunk, spec, info = build_trunk(weights="random", seed=0)
    search = SimSearch(
        FeatureExtractor(trunk, spec, info, autocast=False),
        FeatureCache(root / "cache"),
        settings=SearchSettings(tile_size=512),
    )
    with TestClient(create_app(search, allowed_roots=[root]), base_url="http://127.0.0.1") as c:
        yield c, png, field


def _done(client: TestClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"{API}/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def _region(x0: float, x1: float) -> dict[str, Any]:
    ring = [[x0, 0], [x1, 0], [x1, 160], [x0, 160], [x0, 0]]
    return {
        "type": "Feature",
        "id": "0f6a2b8e-4c1d-4e5f-9a7b-1c2d3e4f5a6b",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "name": "right"},
    }


def test_quantify_job_scores_and_returns_qupath_objects(world, tmp_path: Path) -> None:
    client, png, field = world
    out = png.parent / "ihc out"
    body = {
        "image": png.as_uri(),
        "annotations": {"type": "FeatureCollection", "features": [_region(80, 160)]},
        "mpp": 0.5,
        "three_classes": True,
        "out": str(out),
    }
    r = client.post(f"{API}/jobs/quantify", json=body)
    assert r.status_code == 202, r.text
    job = _done(client, r.json()["job_id"])
    assert job["state"] == "done", job
    res = job["result"]
    inside = field.centers_xy[:, 0] >= 80
    truth = intensity_bins(field.nucleus_dab_od[inside], (0.2, 0.4, 0.6))
    (row,) = res["scores"]
    assert row["region"] == "right" and row["n_cells"] == int(inside.sum())
    assert row["positive_pct"] == pytest.approx(100 * (truth > 0).mean())
    p = np.bincount(truth, minlength=4) / truth.size * 100
    assert row["h_score"] == pytest.approx(p[1] + 2 * p[2] + 3 * p[3])
    validate_feature_collection(res["features"], image_size_l0=(160, 160))
    regions = [
        f for f in res["features"]["features"] if f["properties"]["objectType"] == "annotation"
    ]
    assert [f["id"] for f in regions] == [_region(0, 1)["id"]]  # the annotation it scores
    assert regions[0]["properties"]["measurements"]["Num Positive"] == int((truth > 0).sum())
    assert set(res["outputs"]) == {"geojson", "cells", "table", "run"}
    assert (out / "ihc_scores.csv").is_file() and (out / "ihc_run.json").is_file()

    # a second image into the same folder keeps the first image's rows; a re-run replaces its own
    other = png.parent / "core b.png"
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(other)
    for image in (other, png):
        body2 = {"image": str(image), "mpp": 0.5, "out": str(out)}
        job = _done(client, client.post(f"{API}/jobs/quantify", json=body2).json()["job_id"])
        assert job["state"] == "done", job
    with (out / "ihc_scores.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["image"], r["region"]) for r in rows) == [
        ("core a.png", "Image"),
        ("core b.png", "Image"),
    ]
    assert [r["n_cells"] for r in rows if r["image"] == "core b.png"] == ["0"]


def test_quantify_job_refusals(world, tmp_path: Path) -> None:
    client, png, _ = world
    r = client.post(f"{API}/jobs/quantify", json={"image": str(tmp_path / "x.png"), "mpp": 0.5})
    assert r.status_code == 403, r.text
    r = client.post(f"{API}/jobs/quantify", json={"image": str(png), "thresholds": [0.4, 0.2, 0.6]})
    assert r.status_code == 400 and "non-decreasing" in r.json()["error"]["message"]
    # a wrong compartment is answered at once, not after the image is processed
    body = {"image": str(png), "mpp": 0.5, "compartment": "Nucleus: DAB"}
    r = client.post(f"{API}/jobs/quantify", json=body)
    assert r.status_code == 400 and "compartment" in r.json()["error"]["message"]
    # an output folder inside the input is refused
    r = client.post(f"{API}/jobs/quantify", json={"image": str(png), "out": str(png / "sub")})
    assert r.status_code == 400 and "inside the input" in r.json()["error"]["message"], r.text
    r = client.post(f"{API}/jobs/quantify", json={"image": str(png), "stains": "eosin"})
    assert r.status_code == 422, r.text
    # no pixel size: the job fails with the one-line reason
    r = client.post(f"{API}/jobs/quantify", json={"image": str(png)})
    job = _done(client, r.json()["job_id"])
    assert job["state"] == "failed" and "pixel size" in str(job["error"])
