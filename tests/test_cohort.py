"""``cohort``: one model over many images on Dask distributed, resumable, failures isolated."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed", reason="needs the 'distributed' extra")

from PIL import Image  # noqa: E402

from simsearch_wsi.cli.main import main  # noqa: E402
from simsearch_wsi.cohort.run import CohortEntry, cohort_targets, read_manifest, run_cohort  # noqa: E402
from simsearch_wsi.infer.dense import untrained_bundle  # noqa: E402
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
    """A `dask scheduler` and two `dask worker`s started as processes on loopback, as on a
    cluster, one declaring a GPU resource: the tasks asking for it all run there, and the
    plate's fields become rows per well with the manifest's metadata."""
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
        for extra in ([], ["--resources", "GPU=1"]):  # a CPU worker and a "GPU" worker
            procs.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "dask", "worker", "--nworkers", "1"),
                        *("--nthreads", "1", "--no-dashboard", *common, *extra),
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        field = cohort_targets([CohortEntry(str(synthetic_plate.path))])[0]
        with open_image(field.path) as im:
            bundle = untrained_bundle([im], classes=("positive", "background"), patch_size_l0=32)
        # a plate map: one manifest row per well, with its compound and dose
        wells = sorted(synthetic_plate.wells)  # "A/1", ...
        doses = {w: f"{10 ** (n % 3)}" for n, w in enumerate(wells)}
        plate_map = [
            {"path": str(synthetic_plate.path), "well": w.replace("/", ""), "compound": "drug-7"}
            | {"dose": doses[w]}
            for w in wells
        ]
        entries = read_manifest(_manifest(tmp_path / "m.csv", plate_map))
        with distributed.Client(scheduler_file=str(scheduler_file), timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            (gpu_worker,) = [a for a, w in workers.items() if w.get("resources", {}).get("GPU")]
            result = run_cohort(
                cohort_targets(entries),
                bundle,
                out_dir=tmp_path / "out",
                client=client,
                resources={"GPU": 1},  # as the CLI asks with --device cuda
            )
        n_fields = len(synthetic_plate.wells) * synthetic_plate.fields_per_well
        assert [i.status for i in result.images] == ["done"] * n_fields
        assert {i.worker for i in result.images} == {gpu_worker}  # tasks went to the GPU worker
        with result.table.open(newline="") as fh:
            table = list(csv.DictReader(fh))
        assert len(table) == n_fields  # one class (positive) per field
        assert list(table[0])[:8] == [
            "image",
            "compound",
            "dose",
            "plate",
            "well",
            "row",
            "column",
            "field",
        ]
        assert {r["compound"] for r in table} == {"drug-7"}
        assert {(r["well"], r["dose"]) for r in table} == {
            (w.replace("/", ""), d) for w, d in doses.items()
        }
        # plots: fractions per well, the plate heat map, the dose response (dose found by name)
        assert sorted(result.plots) == ["dose_response", "fractions", "plate_plate", "wells"]
        for name in ("dose_response", "fractions", "plate_plate"):
            with Image.open(result.plots[name]) as png:
                assert png.format == "PNG" and png.width > 300
        with result.plots["wells"].open(newline="") as fh:
            per_well = list(csv.DictReader(fh))
        assert len(per_well) == len(wells)
        assert {r["n_fields"] for r in per_well} == {str(synthetic_plate.fields_per_well)}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_a_plate_map_gives_metadata_to_its_wells(tmp_path: Path, synthetic_plate: Any) -> None:
    plate = str(synthetic_plate.path)
    entries = read_manifest(
        _manifest(
            tmp_path / "map.csv",
            [
                {"path": plate, "well": "A1", "dose": "0.1"},
                {"path": plate, "well": "b/02", "dose": "1"},  # spelled otherwise
            ],
        )
    )
    targets = cohort_targets(entries)
    n = synthetic_plate.fields_per_well
    assert [(t.extra["well"], t.extra["dose"]) for t in targets] == [("A1", "0.1")] * n + [
        ("B2", "1")
    ] * n  # only the wells listed run


def test_manifest_errors_are_clear(tmp_path: Path, synthetic_plate: Any, small_slides: Any) -> None:
    from simsearch_wsi.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no 'path' column"):
        read_manifest(_manifest(tmp_path / "a.csv", [{"image": "x.svs"}]))
    with pytest.raises(ConfigError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")
    plate = str(synthetic_plate.path)
    with pytest.raises(ConfigError, match="names well Z9, which this plate does not have"):
        cohort_targets([CohortEntry(plate, {"well": "Z9"})])
    with pytest.raises(ConfigError, match="names well A1 but this is not an OME-Zarr plate"):
        cohort_targets([CohortEntry(str(small_slides[0].path), {"well": "A1"})])
    with pytest.raises(ConfigError, match="would both write"):  # a plate whole and by well
        cohort_targets([CohortEntry(plate), CohortEntry(plate, {"well": "A1"})])


# --- kill and resume ----------------------------------------------------------------------------
N_KILL_SLIDES = 6


@pytest.fixture(scope="module")
def kill_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of six small synthetic slides in two groups."""
    from simsearch_wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("kill")
    rows = []
    for n in range(N_KILL_SLIDES):
        slide = make_synthetic_slide(
            root / f"s{n}.tiff", seed=10 + n, width=1024, height=768, n_per_class=4
        )
        rows.append({"path": slide.path.name, "arm": "treated" if n % 2 else "control"})
    return _manifest(root / "cohort.csv", rows)


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` by relative path, with the run-specific parts of the records
    (timings, absolute output paths, the run's own metadata) left out."""
    files: dict[str, bytes] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_dir() or rel == "run_metadata.json":
            continue
        data = p.read_bytes()
        if rel.endswith(".predict.json"):
            doc = json.loads(data)
            doc["result"].pop("seconds")
            doc["result"]["outputs"] = {
                k: Path(v).relative_to(out).as_posix() for k, v in doc["result"]["outputs"].items()
            }
            data = json.dumps(doc, sort_keys=True).encode()
        files[rel] = data
    return files


def test_a_killed_run_resumes_to_the_outputs_of_an_uninterrupted_run(
    tmp_path: Path, tiny_bundle: Path, kill_cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The node dies (SIGKILL to the CLI, its cluster and workers) after some images finished;
    the re-run computes only the rest, and the folder ends up as an uninterrupted run's."""
    common = ["--manifest", str(kill_cohort), "--model", str(tiny_bundle), "--workers", "1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["cohort", *common, "--out", str(full)]) == 0
    capsys.readouterr()

    cmd = [sys.executable, "-m", "simsearch_wsi.cli.main", "cohort", *common, "--out", str(killed)]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(killed.glob("*.predict.json"))) >= 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its scheduler, nanny and worker
        proc.wait(timeout=30)
    finished = {p.name[: -len(".predict.json")] for p in killed.glob("*.predict.json")}
    assert 2 <= len(finished) < N_KILL_SLIDES, f"kill came too late or never: {finished}"
    assert not (killed / "quantification.csv").exists()
    stamps = {
        p.name: p.stat().st_mtime_ns for p in killed.iterdir() if p.name.split(".")[0] in finished
    }

    assert main(["cohort", *common, "--out", str(killed)]) == 0
    record = json.loads((killed / "run_metadata.json").read_text())
    status = {i["stem"]: i["status"] for i in record["images"]}
    assert {s for s, v in status.items() if v == "reused"} == finished
    assert {s for s, v in status.items() if v == "done"} == {
        f"s{n}" for n in range(N_KILL_SLIDES)
    } - finished
    now = {p.name: p.stat().st_mtime_ns for p in killed.iterdir() if p.name in stamps}
    assert now == stamps  # no finished image was written again
    # identical outputs, and nothing left over from the killed writes (temporaries)
    expected, got = _snapshot(full), _snapshot(killed)
    assert sorted(got) == sorted(expected)
    differing = [name for name in expected if got[name] != expected[name]]
    assert not differing


def test_tasks_needing_a_resource_no_worker_offers_are_refused() -> None:
    from simsearch_wsi.cohort.run import check_resources
    from simsearch_wsi.core.errors import ConfigError

    class Client:
        def __init__(self, resources: list[dict[str, float]]) -> None:
            self.workers = {f"tcp://w{n}": {"resources": r} for n, r in enumerate(resources)}

        def scheduler_info(self, n_workers: int = 5) -> dict[str, Any]:
            assert n_workers == -1  # all workers, not the first few
            return {"workers": self.workers}

    check_resources(Client([{}, {"GPU": 1}]), {"GPU": 1})
    with pytest.raises(ConfigError, match=r"no Dask worker offers the resources GPU=1.*2 workers"):
        check_resources(Client([{}, {"GPU": 0.5}]), {"GPU": 1})


def _worker_setup() -> tuple[str | None, str | None, int]:
    import torch

    env = os.environ
    threads = torch.get_num_threads()
    return env.get("CUDA_VISIBLE_DEVICES"), env.get("MALLOC_TRIM_THRESHOLD_"), threads


@pytest.mark.parametrize("gpus", [(), (0, 1)], ids=["cpu", "gpus"])
def test_local_clusters_set_up_their_workers_for_torch(
    gpus: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `cohort` starts locally: single-threaded worker processes sharing the cores for
    torch, with glibc's adaptive allocator (not Dask's MALLOC_TRIM_THRESHOLD_); with GPUs one
    worker per GPU that sees only that GPU and declares the GPU resource (checked here without
    a GPU: the worker processes' environment and resources)."""
    from simsearch_wsi.cohort.cluster import start_local_cluster

    for name in ("MALLOC_TRIM_THRESHOLD_", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    client, cluster = start_local_cluster(2, cores=4, gpus=gpus)
    try:
        client.wait_for_workers(2, timeout=60)
        seen = sorted(client.run(_worker_setup).values(), key=str)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        # no dashboard, and the scheduler's HTTP endpoint not on Dask's default port 8787
        # (which warns when taken)
        assert cluster.scheduler.http_server.port != 8787
    finally:
        client.close()
        cluster.close()
    if gpus:
        assert seen == [("0", None, 2), ("1", None, 2)]
        assert [w["resources"] for w in workers.values()] == [{"GPU": 1}, {"GPU": 1}]
    else:
        assert seen == [(None, None, 2), (None, None, 2)]
        assert [w.get("resources") or {} for w in workers.values()] == [{}, {}]
