"""``simsearch-wsi quantify``: positive-cell IHC scoring from the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box

from simsearch_wsi.cli.main import main
from simsearch_wsi.infer.ihc import intensity_bins
from simsearch_wsi.qupath.geojson import (
    geometry_feature,
    read_features,
    validate_feature_collection,
    write_feature_collection,
)
from simsearch_wsi.synthetic.ihc import make_ihc_cell_field

LEVELS = (0.05, 0.3, 0.5, 0.8)


@pytest.fixture(scope="module")
def ihc_pngs(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("ihc")
    out = []
    for seed, levels in ((1, LEVELS), (2, (0.05, 0.05, 0.3, 0.8))):
        f = make_ihc_cell_field((160, 160), dab_levels=levels, seed=seed)
        path = folder / f"slide{seed}.png"
        Image.fromarray(f.rgb).save(path)
        out.append((path, f))
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_quantify_with_annotations(ihc_pngs, tmp_path: Path, capsys) -> None:
    path, field = ihc_pngs[0]
    ann = tmp_path / "regions.geojson"
    write_feature_collection(
        ann, [geometry_feature(box(0, 0, 80, 160), class_name="Tumor", name="left")]
    )
    ann_bytes = ann.read_bytes()
    out = tmp_path / "out"
    code = main(
        [
            *("quantify", str(path), "--mpp", "0.5", "--annotations", str(ann)),
            *("--out", str(out), "--three-classes", "--json"),
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    (img,) = doc["images"]
    inside = field.centers_xy[:, 0] < 80
    truth = intensity_bins(field.nucleus_dab_od[inside], (0.2, 0.4, 0.6))
    (row,) = _rows(out / "ihc_scores.csv")
    assert row["region"] == "left" and row["region_class"] == "Tumor"
    assert int(row["n_cells"]) == inside.sum()
    assert float(row["positive_pct"]) == pytest.approx(100 * (truth > 0).mean(), abs=1e-3)
    counts = np.bincount(truth, minlength=4) / truth.size
    h = 100 * (counts[1] + 2 * counts[2] + 3 * counts[3])
    assert float(row["h_score"]) == pytest.approx(h, abs=1e-3)
    gj = Path(img["outputs"]["geojson"])
    validate_feature_collection(gj, image_size_l0=(160, 160))
    objs = read_features(gj)
    assert {o.class_name for o in objs if o.object_type == "cell"} <= {"Negative", "1+", "2+", "3+"}
    cells = _rows(Path(img["outputs"]["cells"]))
    assert "Nucleus: DAB OD mean" in cells[0] and cells[0]["class"] in (
        "Negative",
        "1+",
        "2+",
        "3+",
    )
    assert ann.read_bytes() == ann_bytes  # inputs untouched
    run = json.loads((out / "ihc_run.json").read_text(encoding="utf-8"))
    assert run["thresholds"] == [0.2, 0.4, 0.6] and run["compartment"] == "Nucleus: DAB OD mean"
    assert run["single_threshold"] is False and run["detection"]["pixel_size_um"] == 0.5
    (rec,) = run["images"]
    assert rec["working_pixel_size_um"] == pytest.approx(0.5) and len(rec["stains"]["dab"]) == 3


def test_quantify_cohort_manifest_with_groups(ihc_pngs, tmp_path: Path, capsys) -> None:
    (p1, f1), (p2, f2) = ihc_pngs
    p3 = tmp_path / "slide3.png"
    p3.write_bytes(p1.read_bytes())
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,arm\n{p1},A\n{p2},B\n{p1},A\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["quantify", "--manifest", str(manifest), "--mpp", "0.5", "--out", str(out)]
    # the same image twice would write the same files: one-line error, nothing written
    assert main(args) == 1
    assert "same files" in capsys.readouterr().err
    assert not out.exists()
    manifest.write_text(f"path,arm\n{p1},A\n{p2},B\n{p3},A\n", encoding="utf-8")
    assert main([*args, "--no-outlines"]) == 0
    doc = json.loads((out / "slide1.ihc.geojson").read_text(encoding="utf-8"))
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"annotation"}
    assert len(_rows(out / "slide1.cells.csv")) == len(f1.centers_xy)
    rows = _rows(out / "ihc_scores.csv")
    assert [(r["image"], r["arm"]) for r in rows] == [
        ("slide1", "A"),
        ("slide2", "B"),
        ("slide3", "A"),
    ]
    for row, field in zip(rows, (f1, f2, f1), strict=True):
        truth = intensity_bins(field.nucleus_dab_od, (0.2, 0.4, 0.6))
        assert int(row["n_positive"]) == int((truth > 0).sum())
        assert row["region"] == "Image"
    assert rows[0]["positive_pct"] == rows[2]["positive_pct"]
    assert (out / "ihc_groups.png").stat().st_size > 1000
    assert "Image:" in capsys.readouterr().out


def test_quantify_errors_are_one_line(ihc_pngs, tmp_path: Path, capsys) -> None:
    path, _ = ihc_pngs[0]
    # a PNG has no pixel size
    assert main(["quantify", str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "pixel size" in err and "\n" not in err
    assert main(["quantify", "--out", str(tmp_path / "o")]) == 1
    assert "no images" in capsys.readouterr().err
    code = main(
        [
            *("quantify", str(path), "--mpp", "0.5", "--out", str(tmp_path / "o")),
            *("--thresholds", "0.5", "0.2", "0.6"),
        ]
    )
    assert code == 1 and "non-decreasing" in capsys.readouterr().err
    code = main(
        [
            *("quantify", str(path), "--mpp", "0.5", "--out", str(tmp_path / "o")),
            *("--compartment", "Nucleus: DAB mean"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "compartment 'Nucleus: DAB mean'" in err and "\n" not in err
    code = main(
        ["quantify", str(path), "--mpp", "0.5", "--out", str(tmp_path / "o"), "--stains", "1,2"]
    )
    assert code == 1 and "--stains" in capsys.readouterr().err
    assert not (tmp_path / "o" / "ihc_scores.csv").exists()


def test_quantify_refuses_an_output_over_its_annotations(ihc_pngs, tmp_path: Path, capsys) -> None:
    path, _ = ihc_pngs[0]
    out = tmp_path / "out"
    out.mkdir()
    # the user passes an earlier run's output back as the regions: it would be replaced
    ann = out / f"{path.stem}.ihc.geojson"
    write_feature_collection(ann, [geometry_feature(box(0, 0, 80, 160), class_name="Tumor")])
    before = ann.read_bytes()
    args = ["quantify", str(path), "--mpp", "0.5", "--annotations", str(ann), "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--annotations" in err and "\n" not in err.strip()
    assert ann.read_bytes() == before and not (out / "ihc_scores.csv").exists()


def test_quantify_checks_every_input_before_the_first_detection(
    ihc_pngs, tmp_path: Path, capsys
) -> None:
    (p1, _), (p2, _) = ihc_pngs
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(gray)
    out = tmp_path / "out"
    args = ["quantify", str(p1), "--mpp", "0.5", "--out", str(out)]
    # the last image is not RGB: refused before the first one is processed
    assert main([*args[:2], str(gray), *args[2:]]) == 1
    assert "uint8 RGB" in capsys.readouterr().err
    assert not (out / "slide1.ihc.geojson").exists() and not (out / "ihc_scores.csv").exists()
    # the second image's annotations lie outside it: the error names their file
    anns = tmp_path / "anns"
    anns.mkdir()
    write_feature_collection(
        anns / "slide2.geojson", [geometry_feature(box(500, 500, 600, 600), class_name=None)]
    )
    assert main([*args[:2], str(p2), *args[2:], "--annotations", str(anns)]) == 1
    err = capsys.readouterr().err.strip()
    assert "slide2.geojson: none of its 1 regions overlaps" in err and "\n" not in err
    assert not (out / "slide1.ihc.geojson").exists()
    # a manifest column named like a score column
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,n_cells\n{p1},3\n{p2},4\n", encoding="utf-8")
    assert main(["quantify", "--manifest", str(manifest), "--mpp", "0.5", "--out", str(out)]) == 1
    assert "clash" in capsys.readouterr().err
    assert not (out / "slide1.ihc.geojson").exists()


def test_rerun_leaves_no_stale_files(tmp_path: Path, capsys) -> None:
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((96, 96, 3), 250, np.uint8)).save(blank)
    out = tmp_path / "out"
    out.mkdir()
    (out / "blank.cells.csv").write_text("x_l0,y_l0\n1,2\n", encoding="utf-8")
    (out / "ihc_groups.png").write_bytes(b"old plot")
    assert main(["quantify", str(blank), "--mpp", "0.5", "--out", str(out)]) == 0
    lines = (out / "blank.cells.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and lines[0].startswith("x_l0,y_l0,class,bin,")
    assert not (out / "ihc_groups.png").exists()
    (row,) = _rows(out / "ihc_scores.csv")
    assert row["n_cells"] == "0"
