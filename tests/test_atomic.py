from __future__ import annotations

from pathlib import Path

import pytest

from simsearch_wsi.core.atomic import atomic_path, write_json_atomic


def test_success_replaces_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_folder_outputs(tmp_path: Path) -> None:
    target = tmp_path / "store.zarr"
    for content in ("first", "second"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "data").write_text(content)
    assert (target / "data").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]


def test_non_finite_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"v": float("nan")})
    assert list(tmp_path.iterdir()) == []
