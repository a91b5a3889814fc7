"""``cohort``: one model over many images on Dask distributed, resumable, failures isolated."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed", reason="needs the 'distributed' extra")

from simsearch_wsi.cli import main  # noqa: E402
from simsearch_wsi.cohort import CohortEntry, cohort_targets, read_manifest, run_cohort  # noqa: E402
from simsearch_wsi.infer import untrained_bundle  # noqa: E402
from simsearch_wsi.io import open_image  # noqa: E402


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_local_cluster_runs_the_cohort_and_isolates_a_corrupt_slide(
    tmp_path: Path, tiny_bundle: Path, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "broken.tiff"
    corrupt.write_bytes(b"II*\x00" + b"\x00garbage" * 20)
    rows = [{"path": str(s.path), "patient": f"P{n}"} for n, s in enumerate(small_slides[:2])]
    rows.append({"path": "broken.tiff", "patient": "P9"})  # relative to the manifest
    manifest = _manifest(tmp_path / "cohort.csv", rows)
    out = tmp_path / "out"
    args = ["cohort", "--manifest", str(manifest), "--model", str(tiny_bundle)]
    args += ["--out", str(out), "--workers", "2"]
    assert main(args) == 1  # one image failed
    text = capsys.readouterr().out
    assert "2 done, 0 already finished, 1 failed" in text and "broken.tiff" in text
    record = json.loads((out / "run_metadata.json").read_text())
    status = {Path(i["path"]).name: i["status"] for i in record["images"]}
    assert status == {"small0.tiff": "done", "small1.tiff": "done", "broken.tiff": "failed"}
    (bad,) = [i for i in record["images"] if i["status"] == "failed"]
    assert "CorruptImageError" in bad["error"]
    assert record["summary"] == {"total": 3, "done": 2, "reused": 0, "failed": 1}
    assert record["model"]["digest"] and record["versions"]["distributed"]
    for stem in ("small0", "small1"):
        for suffix in (".geojson", ".ome.zarr", "_overlay.png", ".predict.json"):
            assert (out / f"{stem}{suffix}").exists()
    with (out / "quantification.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert {r["patient"] for r in table} == {"P0", "P1"}
    assert list(table[0])[:2] == ["image", "patient"]
    # a re-run skips the finished images (nothing rewritten) and tries the broken one again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("small*.geojson")}
    assert main(args) == 1
    assert "0 done, 2 already finished, 1 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("small*.geojson")} == stamps


def test_an_external_scheduler_runs_a_plate(tmp_path: Path, synthetic_plate: Any) -> None:
    """A `dask scheduler` and a `dask worker` started as processes on loopback, as on a
    cluster; the plate's fields become rows per well with the manifest's metadata."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    common = ["--scheduler-file", str(scheduler_file)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                *common,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dask",
                    "worker",
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    *common,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        field = cohort_targets([CohortEntry(str(synthetic_plate.path))])[0]
        with open_image(field.path) as im:
            bundle = untrained_bundle([im], classes=("positive", "background"), patch_size_l0=32)
        entries = read_manifest(
            _manifest(
                tmp_path / "m.csv", [{"path": str(synthetic_plate.path), "compound": "drug-7"}]
            )
        )
        with distributed.Client(scheduler_file=str(scheduler_file), timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
            result = run_cohort(cohort_targets(entries), bundle, tmp_path / "out", client=client)
        n_fields = len(synthetic_plate.wells) * synthetic_plate.fields_per_well
        assert [i.status for i in result.images] == ["done"] * n_fields
        with result.table.open(newline="") as fh:
            table = list(csv.DictReader(fh))
        assert len(table) == n_fields  # one class (positive) per field
        assert list(table[0])[:7] == [
            "image",
            "compound",
            "plate",
            "well",
            "row",
            "column",
            "field",
        ]
        assert {r["compound"] for r in table} == {"drug-7"}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_manifest_errors_are_clear(tmp_path: Path) -> None:
    from simsearch_wsi.errors import ConfigError

    with pytest.raises(ConfigError, match="no 'path' column"):
        read_manifest(_manifest(tmp_path / "a.csv", [{"image": "x.svs"}]))
    with pytest.raises(ConfigError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")
