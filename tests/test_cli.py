"""The simsearch-wsi command line: output, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simsearch_wsi.cli.main import main
from simsearch_wsi.qupath.geojson import validate_feature_collection


def test_info_json(synthetic_slide: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(synthetic_slide.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimensions"] == [synthetic_slide.width, synthetic_slide.height]
    assert info["level_count"] == 3
    assert info["mpp"] == pytest.approx(synthetic_slide.mpp, rel=1e-3)
    assert info["channels"] == ["R", "G", "B"]


def test_info_text_with_user_mpp(synthetic_slide: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(synthetic_slide.path), "--mpp", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "0.25 um/px (user)" in out
    assert "brightfield" in out


def test_info_plate(synthetic_plate: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(synthetic_plate.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_wells"] == 6 and info["n_fields"] == 12
    assert info["first_field"]["channels"] == ["DAPI", "GFP"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.svs", "missing.svs: no such file"),
        (lambda d: d, "is not an OME-Zarr image"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    assert main(["info", str(make(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        main(["--debug", "info", str(tmp_path / "missing.svs")])


def test_console_script_exit_code(tmp_path: Path) -> None:
    """The installed entry point exits non-zero with one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "simsearch_wsi.cli.main", "info", str(tmp_path / "nope.tif")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"simsearch-wsi: error: {tmp_path / 'nope.tif'}: no such file or directory; check the path"
    ]


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: simsearch-wsi" in capsys.readouterr().err


# --- embed / suggest ----------------------------------------------------------------------------
def _one_prototype_per_class(slide: Any, path: Path) -> Path:
    doc = slide.to_geojson()
    seen: set[str] = set()
    feats = []
    for f in doc["features"]:
        name = f["properties"]["classification"]["name"]
        if name not in seen:
            seen.add(name)
            feats.append(f)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_embed_then_suggest(
    synthetic_slide: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    common = ["--weights", "random", "--cache", str(cache), "--tile-size", "512"]
    protos = _one_prototype_per_class(synthetic_slide, tmp_path / "protos.geojson")
    # the expected prototype size: the object rule (the default) takes the median box
    sides = [
        max(np.ptp(np.asarray(f["geometry"]["coordinates"][0]), axis=0))
        for f in json.loads(protos.read_text())["features"]
    ]
    size = f"{float(np.median(sides)):g}"
    assert main(["embed", str(synthetic_slide.path), "--patch-size-px", size, *common]) == 0
    out = capsys.readouterr().out
    assert "tiles embedded" in out and len(list(cache.glob("*.zarr"))) == 1
    result_path = tmp_path / "suggestions.geojson"
    assert (
        main(
            [
                "suggest",
                str(synthetic_slide.path),
                "--annotations",
                str(protos),
                "--out",
                str(result_path),
                "--threshold",
                "ring=0.6",
                "--background",
                "3",
                "--json",
                *common,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["thresholds"]["ring"] == 0.6 and summary["thresholds"]["cluster"] == 0.5
    assert summary["seconds_embed"] < 2.0  # the cached map was reused
    assert len(list(cache.glob("*.zarr"))) == 1
    doc = json.loads(result_path.read_text())
    validate_feature_collection(doc, image_size_l0=(synthetic_slide.width, synthetic_slide.height))
    names = {f["properties"]["classification"]["name"] for f in doc["features"]}
    assert {"ring", "background"} <= names
    assert (
        sum(1 for f in doc["features"] if f["properties"]["classification"]["name"] == "background")
        == 6
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "FeatureCollection", "features": []}', "no prototypes found"),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            "[[[5000,5000],[5050,5000],[5050,5050],[5000,5050],[5000,5000]]]}, "
            '"properties": {"objectType": "annotation", "classification": {"name": "A", '
            '"color": [1,2,3]}}}',
            "is not inside the image",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            "[[[50,50],[50,50],[50,90],[50,90],[50,50]]]}, "
            '"properties": {"objectType": "annotation", "classification": "A"}}',
            "zero area",
        ),
    ],
    ids=["malformed", "empty", "outside", "zero-area"],
)
def test_suggest_bad_annotations(
    synthetic_slide: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    message: str,
) -> None:
    ann = tmp_path / "in.geojson"
    ann.write_text(content)
    out = tmp_path / "out.geojson"
    code = main(
        [
            "suggest",
            str(synthetic_slide.path),
            "--annotations",
            str(ann),
            "--out",
            str(out),
            "--weights",
            "random",
            "--cache",
            str(tmp_path / "c"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert not out.exists()  # nothing written


def test_bad_threshold_syntax(
    synthetic_slide: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    protos = _one_prototype_per_class(synthetic_slide, tmp_path / "p.geojson")
    code = main(
        [
            "suggest",
            str(synthetic_slide.path),
            "--annotations",
            str(protos),
            "--out",
            str(tmp_path / "o.geojson"),
            "--threshold",
            "ring:0.5",
            "--weights",
            "random",
        ]
    )
    assert code == 1 and "expected CLASS=VALUE" in capsys.readouterr().err


def test_unreadable_objects_are_left_out_with_a_note(
    synthetic_slide: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An object suggest does not use (an empty geometry collection) does not abort the run."""
    protos = _one_prototype_per_class(synthetic_slide, tmp_path / "p.geojson")
    doc = json.loads(protos.read_text())
    doc["features"].append(
        {
            "type": "Feature",
            "properties": {"objectType": "annotation"},
            "geometry": {"type": "GeometryCollection", "geometries": []},
        }
    )
    protos.write_text(json.dumps(doc))
    out = tmp_path / "o.geojson"
    assert (
        main(
            [
                "suggest",
                str(synthetic_slide.path),
                "--annotations",
                str(protos),
                "--out",
                str(out),
                "--weights",
                "random",
                "--cache",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert "1 object(s) left out" in capsys.readouterr().err
    assert out.exists()


def test_serve_refuses_off_loopback_without_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIMSEARCH_WSI_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--weights", "random"]) == 1
    assert "also pass --token" in capsys.readouterr().err


def test_qpproj_without_paquo_is_one_line(
    synthetic_slide: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "paquo", None)
    monkeypatch.setitem(sys.modules, "paquo.projects", None)
    assert (
        main(
            [
                "suggest",
                str(synthetic_slide.path),
                "--qpproj",
                str(tmp_path / "p.qpproj"),
                "--weights",
                "random",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "simsearch_wsi[qupath]" in err and err.count("\n") == 1
