"""``simsearch-wsi train``: a bundle from a review session, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simsearch_wsi.bundle import load_bundle
from simsearch_wsi.cli import main


def test_train_writes_a_bundle(
    tmp_path: Path,
    labelled_session: Any,
    small_slides: Any,
    tiny_training: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "model.zip"
    args = ["train", "--session", str(labelled_session.root), "--out", str(out)]
    args += ["--weights", "random", "--cache", str(tmp_path / "cache"), "--json"]
    args += ["--noisy-images", str(small_slides[2].path), "--strategy", "pos+selflearn"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == str(out)
    bundle = load_bundle(out)
    assert bundle.classes == ("ring", "cluster", "stripes", "background")
    assert bundle.strategy == "pos+selflearn"
    assert bundle.provenance["noisy_images"] == [str(small_slides[2].path.resolve())]
    assert bundle.config["preset"] == "fast"


def test_train_default_output_and_text_summary(
    tmp_path: Path, labelled_session: Any, tiny_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--session", str(labelled_session.root), "--strategy", "pos"]
    assert main([*args, "--weights", "random", "--cache", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert (labelled_session.root / "model.zip").is_file()
    assert "confidence thresholds" in text and "supcon" in text


def test_train_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--session", str(tmp_path), "--weights", "random"])
    err = capsys.readouterr().err
    assert code == 1 and "not a review session" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_train_refuses_a_folder_as_output(
    tmp_path: Path, labelled_session: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--session", str(labelled_session.root), "--out", str(tmp_path)]
    assert main([*args, "--weights", "random"]) == 1
    assert "is a folder" in capsys.readouterr().err
