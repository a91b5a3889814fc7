"""`simsearch-wsi demo` (what `make demo` runs): every file it reports exists and opens with its
format's validator, the loop ran (prototypes from examples/, review, train, predict), and the
scores are in the summary. Training is shrunk to seconds (``tiny_training``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from simsearch_wsi.cli.main import main
from simsearch_wsi.io import open_image, open_plate
from simsearch_wsi.io.labels import validate_label_store
from simsearch_wsi.qupath.geojson import validate_feature_collection
from simsearch_wsi.review.session import Session
from simsearch_wsi.train.bundle import load_bundle


def test_demo_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_training: None
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--weights", "random"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    files = {role: Path(p) for role, p in summary["files"].items()}
    assert len(files) >= 20
    for role, path in files.items():
        assert path.exists(), role
        assert str(path) in printed
    assert "seeded random" in summary["weights"] and "weights: seeded random" in printed

    # inputs: real IHC pixels as a 2-level pyramid, the plate, the three H&E slides
    with open_image(out / "data" / "skimage_ihc.tiff") as ihc:
        assert ihc.dimensions == (512, 512) and ihc.level_count == 2
    assert len(list(open_plate(out / "data" / "synthetic_plate.ome.zarr").fields())) == 12
    he = out / "data" / "synthetic_he"
    assert {p.name for p in he.glob("*.tiff")} == {"review0.tiff", "unlabelled0.tiff", "test0.tiff"}
    validate_feature_collection(he / "review0.ground_truth.geojson", image_size_l0=(1536, 1024))

    # outputs of both experiments open with their validators
    for what, size in (("H&E test slide", (1536, 1024)), ("IHC", (512, 512))):
        validate_feature_collection(files[f"{what} QuPath GeoJSON"], image_size_l0=size)
        validate_label_store(files[f"{what} OME-Zarr labels"])
        assert files[f"{what} overlay PNG"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with files[f"{what} quantification CSV"].open() as fh:
            rows = list(csv.DictReader(fh))
        assert rows and {"class_name", "area_um2"} <= set(rows[0])
    ihc_rows = list(csv.DictReader(files["IHC quantification CSV"].open()))
    assert {r["class_name"] for r in ihc_rows} >= {"Epithelium", "Stroma"}
    assert load_bundle(files["H&E model bundle"]).classes[:3] == ("ring", "cluster", "stripes")

    # the review used the shipped prototypes and recorded decisions
    session = Session.open(files["H&E session (review decisions)"].parent)
    assert len(session.all_prototypes()) == 9
    assert session.examples("positive") and session.examples("negative")
    assert session.examples("background")
    scores = summary["scores"]
    he_scores = scores["synthetic_he"]
    assert set(he_scores["pr_auc_model"]) == {"ring", "cluster", "stripes"}
    for v in [*he_scores["pr_auc_model"].values(), *he_scores["pr_auc_search"].values()]:
        assert 0.0 <= v <= 1.0
    assert he_scores["review"]["prototypes"] == {"ring": 3, "cluster": 3, "stripes": 3}
    iou = scores["skimage_ihc"]["iou_with_colour_rule"]
    assert set(iou) == {"Epithelium", "Stroma"}
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in iou.values())
    assert any("pseudo-truth" in line for line in summary["findings"])


def test_demo_without_examples_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["demo", "--out", str(tmp_path / "d"), "--weights", "random", "--examples", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert "synthetic_he.prototypes.geojson" in err and "--examples" in err
    assert "Traceback" not in err
