"""`simsearch-wsi demo` (what `make demo` runs) produces every file it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simsearch_wsi.cli import main
from simsearch_wsi.io import open_image, open_plate
from simsearch_wsi.qupath_geojson import validate_feature_collection


def test_demo_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    assert len(summary["files"]) >= 10
    for role, path in summary["files"].items():
        assert Path(path).exists(), role
        assert path in printed
    with open_image(out / "data" / "skimage_ihc.tiff") as ihc:  # real IHC pixels, 2 levels
        assert ihc.dimensions == (512, 512) and ihc.level_count == 2
    assert len(list(open_plate(out / "data" / "synthetic_plate.ome.zarr").fields())) == 12
    for name in (
        "data/synthetic_he.ground_truth.geojson",
        "data/synthetic_he.prototypes.geojson",
        "synthetic_he.suggestions.geojson",
    ):
        validate_feature_collection(out / name, image_size_l0=(2048, 1536))
    geojson = json.loads((out / "data" / "synthetic_he.ground_truth.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in geojson["features"]} == {
        "ring",
        "cluster",
        "stripes",
    }
    assert any("foreground" in line for line in summary["findings"])
