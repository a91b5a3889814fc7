"""The simsearch-wsi command line: output, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simsearch_wsi.cli import main


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
        [sys.executable, "-m", "simsearch_wsi.cli", "info", str(tmp_path / "nope.tif")],
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
