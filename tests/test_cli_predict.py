"""``simsearch-wsi predict``: outputs per image, resuming, JSON, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from simsearch_wsi.cli.main import main


def test_predict_writes_every_output_and_resumes(
    tmp_path: Path, tiny_bundle: Path, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    args = ["predict", str(small_slides[1].path), "--model", str(tiny_bundle), "--out", str(out)]
    assert main([*args, "--threshold", "ring=0.6", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "small1.tiff: detections ring" in text
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "quantification.csv",
        "small1.geojson",
        "small1.ome.zarr",
        "small1.predict.json",
        "small1_overlay.png",
    ]
    record = json.loads((out / "small1.predict.json").read_text())
    assert record["run"]["settings"]["thresholds"] == {"ring": 0.6}
    # the same run again keeps the outputs; --json reports it
    assert main([*args, "--threshold", "ring=0.6", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["quantification"] == str(out / "quantification.csv")
    assert [im["reused"] for im in doc["images"]] == [True]
    assert main([*args, "--threshold", "ring=0.6", "--force", "--json", "--no-zarr"]) == 0
    (image,) = json.loads(capsys.readouterr().out)["images"]
    assert not image["reused"] and "ome_zarr" not in image["outputs"]


def test_a_changed_input_is_predicted_again_to_the_same_files(
    tmp_path: Path, tiny_bundle: Path, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = tmp_path / "slide.tiff"
    slide.write_bytes(small_slides[1].path.read_bytes())
    out = tmp_path / "results"
    args = ["predict", str(slide), "--model", str(tiny_bundle), "--out", str(out), "--json"]

    def reused() -> bool:
        assert main(args) == 0
        (image,) = json.loads(capsys.readouterr().out)["images"]
        return bool(image["reused"])

    assert not reused()
    first = (out / "slide.geojson").read_bytes()
    assert reused()
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input was replaced
    assert not reused()
    # the same pixels, model and settings give the same file, object ids included
    assert (out / "slide.geojson").read_bytes() == first


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "tumour=0.5"], "unknown class(es) ['tumour']"),
        (["--threshold", "ring=1.5"], "give a probability in [0, 1]"),
        (["--threshold", "ring"], "expected CLASS=VALUE"),
    ],
)
def test_bad_thresholds_are_one_line_errors(
    tmp_path: Path,
    tiny_bundle: Path,
    small_slides: Any,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    args = ["predict", str(small_slides[1].path), "--model", str(tiny_bundle)]
    assert main([*args, "--out", str(tmp_path / "o"), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_paths_are_one_line_errors(
    tmp_path: Path, tiny_bundle: Path, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = str(small_slides[1].path)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    cases = [
        (
            ["predict", slide, "--model", str(tmp_path / "none.zip"), "--out", str(tmp_path)],
            "none.zip",
        ),
        (["predict", slide, "--model", str(tiny_bundle), "--out", str(a_file)], "not a folder"),
        (
            [
                "predict",
                str(tmp_path / "gone.svs"),
                "--model",
                str(tiny_bundle),
                "--out",
                str(tmp_path / "o"),
            ],
            "gone.svs",
        ),
    ]
    for args, message in cases:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
