"""``cohort`` on a real Dask cluster: a ``dask scheduler`` and a ``dask worker`` started as
separate processes on 127.0.0.1 from another working directory, as on any cluster, with a
relative manifest of a nested folder layout, output to a log (not a terminal), and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed", reason="needs the 'distributed' extra")

from PIL import Image  # noqa: E402

import simsearch_wsi  # noqa: E402
from simsearch_wsi.cli.main import main  # noqa: E402
from simsearch_wsi.cohort.run import (  # noqa: E402
    NO_PIXEL_SIZE,
    CohortEntry,
    check_workers_see,
    cohort_targets,
    read_manifest,
    run_cohort,
)
from simsearch_wsi.core.errors import ConfigError  # noqa: E402

REPO = Path(simsearch_wsi.__file__).resolve().parent.parent


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a ``dask scheduler`` with one single-threaded ``dask worker``, both
    started in a folder of their own (not the tests'); both killed at teardown."""
    home = tmp_path_factory.mktemp("cluster_home")
    logs = tmp_path_factory.mktemp("cluster_logs")
    scheduler_file = logs / "scheduler.json"
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p)}
    dask = [sys.executable, "-m", "dask"]
    at = ("--scheduler-file", str(scheduler_file))
    http = ("--dashboard-address", "127.0.0.1:0")
    commands = [
        # the scheduler's HTTP endpoint on a free port, not Dask's default 8787
        [*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", *at, *http],
        [*dask, "worker", "--nworkers", "1", "--nthreads", "1", "--no-dashboard", *at],
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for n, cmd in enumerate(commands):
            with (logs / f"{n}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=home,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: nanny and worker
                    )
                )
            deadline = time.monotonic() + 60
            while n == 0 and not scheduler_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
        assert not any(home.iterdir()), "the cluster wrote into its own working directory"
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGKILL)  # the worker process of a nanny too
        for p in procs:
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def inprocess_scheduler() -> Iterator[str]:
    """The address of a Dask cluster inside this process (one worker thread): for the tests
    that need a cluster but not separate processes, so that the worker finds torch and the
    library already imported (the separate-process cluster, :func:`scheduler`, costs tens of
    seconds on a loaded 2-core machine for its first task alone)."""
    with distributed.LocalCluster(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def nested_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``data/cohort.csv`` naming, relative to itself, ``b1/slide.tiff`` and ``b2/slide.tiff``
    (the same file name in two patient folders), ``top.png`` (no pixel size) and a truncated
    ``b1/broken.tiff``; a tiny untrained model for them."""
    from simsearch_wsi.infer.dense import untrained_bundle
    from simsearch_wsi.io import open_image
    from simsearch_wsi.synthetic import make_synthetic_slide
    from simsearch_wsi.train.bundle import save_bundle

    root = tmp_path_factory.mktemp("nested")
    data = root / "data"
    slides = []
    for n, folder in enumerate(("b1", "b2")):
        (data / folder).mkdir(parents=True)
        slides.append(
            make_synthetic_slide(
                data / folder / "slide.tiff", seed=20 + n, width=384, height=320, n_per_class=1
            )
        )
    with open_image(slides[0].path) as image:
        pixels = image.read_region((0, 0), 0, image.dimensions)
        bundle = untrained_bundle([image], threshold=0.3, seed=3)
    Image.fromarray(pixels).save(data / "top.png")  # a PNG: no pixel size
    (data / "b1" / "broken.tiff").write_bytes(b"II*\x00" + b"\x00garbage" * 20)
    manifest = _write_csv(
        data / "cohort.csv",
        [
            {"path": "b1/slide.tiff", "patient": "P1", "mpp": ""},
            {"path": "b2/slide.tiff", "patient": "P2", "mpp": "0.25"},
            {"path": "top.png", "patient": "P3", "mpp": ""},
            {"path": "b1/broken.tiff", "patient": "P1", "mpp": ""},
        ],
    )
    return {
        "root": root,
        "manifest": manifest,
        "model": save_bundle(root / "model.zip", bundle),
        "bundle": bundle,
    }


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow  # two runs of four small images (about 10 s on 2 idle cores)
def test_a_relative_manifest_on_an_external_cluster_logs_resumes_and_names_nested_images(
    tmp_path: Path,
    scheduler: str,
    nested_cohort: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run from the manifest's parent folder with a relative manifest and a relative --out:
    every output, record and the table land in that one --out; the log (stdout, not a
    terminal) has a line per image with counts and ETA; nested names stay apart; images
    without a pixel size are flagged; a rerun computes only what is missing."""
    root: Path = nested_cohort["root"]
    monkeypatch.chdir(root)
    args = ["cohort", "--manifest", "data/cohort.csv", "--model", "model.zip"]
    args += ["--out", "results", "--scheduler", scheduler]
    assert main(args) == 1  # the broken image failed, the others finished
    log = capsys.readouterr().out
    out = root / "results"
    stems = ("b1_slide", "b2_slide", "top")
    for stem in stems:
        for suffix in (".geojson", ".ome.zarr", "_overlay.png", ".predict.json"):
            assert (out / f"{stem}{suffix}").exists(), f"{stem}{suffix}"
    record = json.loads((out / "run_metadata.json").read_text())
    assert record["out"] == str(out) and record["summary"]["failed"] == 1
    (bad,) = [i for i in record["images"] if i["status"] == "failed"]
    assert bad["stem"] == "b1_broken" and "CorruptImageError" in bad["error"]
    assert {i["worker"] for i in record["images"]} != {None}  # computed on the worker
    # output paths in the completion records are absolute, inside --out
    outputs = json.loads((out / "b1_slide.predict.json").read_text())["result"]["outputs"]
    assert all(Path(p).is_absolute() and Path(p).parent == out for p in outputs.values())
    # the log: a start line, one line per image with counts and an ETA, then the summary
    lines = log.splitlines()
    assert lines[0] == "cohort: 4 images, 0 finished earlier, 4 to run"
    progress = [ln for ln in lines if ln.startswith("[")]
    assert len(progress) == 4 and progress[-1].startswith("[4/4] ")
    # an ETA once an image is done (at its pace), until none is left
    eta = ["ETA" in ln for ln in progress]
    assert eta[-1] is False and progress[-1].endswith(" 0 left")
    first_done = next(n for n, ln in enumerate(progress) if "] done " in ln)
    assert eta[first_done:-1] == [True] * (len(progress) - 1 - first_done)
    assert sum("FAILED b1_broken: CorruptImageError" in ln for ln in progress) == 1
    assert "4 images: 3 done, 0 already finished, 1 failed" in log
    assert "warning: 1 image(s) have no pixel size" in log
    # one table with every image; pixel sizes from the file, the manifest, or none (flagged)
    table = _table(out / "quantification.csv")
    by_image = {Path(r["image"]).relative_to(root / "data").as_posix(): r for r in table}
    assert sorted(by_image) == ["b1/slide.tiff", "b2/slide.tiff", "top.png"]
    pixel = {k: (r["mpp"], r["mpp_source"], r["warning"]) for k, r in by_image.items()}
    assert pixel == {
        "b1/slide.tiff": ("0.5", "file", ""),
        "b2/slide.tiff": ("0.25", "manifest", ""),
        "top.png": ("", "none", NO_PIXEL_SIZE),
    }
    assert by_image["top.png"]["area_um2"] == "" and by_image["b1/slide.tiff"]["area_um2"] != ""

    # resume: one image's record removed (as if killed before it finished); only it is redone
    (out / "b2_slide.predict.json").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.geojson")}
    assert main(args) == 1
    log = capsys.readouterr().out
    assert log.splitlines()[0] == "cohort: 4 images, 2 finished earlier, 2 to run"
    assert "4 images: 1 done, 2 already finished, 1 failed" in log
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.geojson")}
    assert {k for k in now if now[k] != stamps[k]} == {"b2_slide.geojson"}
    assert not (root / "data" / "results").exists()


def test_a_finished_cohort_reruns_without_a_cluster(
    tmp_path: Path,
    inprocess_scheduler: str,
    nested_cohort: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing left to do: no local cluster is started (here: none could be), the table and
    the run record are rewritten in well under the seconds a local cluster takes to start."""
    data: Path = nested_cohort["root"] / "data"
    manifest = _write_csv(tmp_path / "m.csv", [{"path": str(data / "b1" / "slide.tiff")}])
    args = ["cohort", "--manifest", str(manifest), "--model", str(nested_cohort["model"])]
    args += ["--out", str(tmp_path / "out")]
    assert main([*args, "--scheduler", inprocess_scheduler]) == 0
    capsys.readouterr()

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a cluster was started with nothing to do")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("simsearch_wsi.cohort.cluster.start_local_cluster", refuse)
        t0 = time.perf_counter()
        assert main([*args, "--workers", "1"]) == 0  # a local cluster, were one needed
        seconds = time.perf_counter() - t0
    assert "1 images: 0 done, 1 already finished, 0 failed" in capsys.readouterr().out
    assert seconds < 5, seconds


def test_workers_that_do_not_see_the_inputs_are_refused_with_one_error(
    tmp_path: Path, inprocess_scheduler: str
) -> None:
    """The check runs on the workers themselves (here: an input the client has but the
    workers cannot see is played by a path that exists nowhere)."""
    out = tmp_path / "out"
    out.mkdir()
    with distributed.Client(inprocess_scheduler, timeout="30s") as client:
        check_workers_see(client, [str(out)], out)  # the same machine: all seen
        with pytest.raises(ConfigError, match=r"1 of 1 Dask workers do not see .*1 of 2 inputs"):
            check_workers_see(client, [str(out), str(tmp_path / "elsewhere.tiff")], out)
    assert list(out.iterdir()) == []  # the marker file is gone


def test_nested_layouts_get_unique_names_from_the_common_folder_or_an_id(
    nested_cohort: dict[str, Any], tmp_path: Path
) -> None:
    data: Path = nested_cohort["root"] / "data"
    entries = read_manifest(nested_cohort["manifest"], cohort=True)
    assert all(Path(e.path).is_absolute() for e in entries)
    assert [t.stem for t in cohort_targets(entries)] == [
        "b1_slide",
        "b2_slide",
        "top",
        "b1_broken",
    ]
    # only the nested ones: named from their common folder, data/; unique file names as
    # they are, wherever they are
    two = [CohortEntry(str(data / f / "slide.tiff")) for f in ("b1", "b2")]
    assert [t.stem for t in cohort_targets(two)] == ["b1_slide", "b2_slide"]
    apart = [CohortEntry(str(data / "b1" / "slide.tiff")), CohortEntry(str(data / "top.png"))]
    assert [t.stem for t in cohort_targets(apart)] == ["slide", "top"]
    # an id column names the outputs (empty cells: from the file)
    manifest = _write_csv(
        tmp_path / "ids.csv",
        [
            {"path": str(data / "b1" / "slide.tiff"), "id": "case-7"},
            {"path": str(data / "b2" / "slide.tiff"), "id": ""},
        ],
    )
    targets = cohort_targets(read_manifest(manifest, cohort=True))
    assert [t.stem for t in targets] == ["case-7", "slide"]  # no clash left: file stems
    assert targets[0].extra["id"] == "case-7"  # kept as metadata
    clash = [CohortEntry(str(data / f / "slide.tiff"), name="x") for f in ("b1", "b2")]
    with pytest.raises(ConfigError, match=r"both write x\.\*; give the manifest an 'id' column"):
        cohort_targets(clash)
    bad = _write_csv(tmp_path / "bad.csv", [{"path": "a.tiff", "id": "../a"}])
    with pytest.raises(ConfigError, match=r"line 2: id '\.\./a'"):
        read_manifest(bad, cohort=True)
    bad = _write_csv(tmp_path / "bad.csv", [{"path": "a.tiff", "mpp": "-1", "warning": ""}])
    with pytest.raises(ConfigError, match=r"columns \['warning'\] are names the cohort table"):
        read_manifest(bad, cohort=True)
    bad = _write_csv(tmp_path / "bad.csv", [{"path": "a.tiff", "mpp": "-1"}])
    with pytest.raises(ConfigError, match=r"line 2: mpp '-1' is not a pixel size"):
        read_manifest(bad, cohort=True)
    # read for quantify: the rows as they are
    (entry,) = read_manifest(bad)
    assert entry.metadata == {"mpp": "-1"} and entry.mpp is None


def test_a_model_that_does_not_suit_a_plate_is_refused_once_before_any_task(
    tmp_path: Path, nested_cohort: dict[str, Any], synthetic_plate: Any
) -> None:
    """An RGB model on a fluorescence plate: one error naming the plate, not one per field,
    before a cluster is even asked for."""

    def connect() -> None:
        raise AssertionError("tasks were about to be submitted")

    targets = cohort_targets([CohortEntry(str(synthetic_plate.path))])
    assert len(targets) > 1
    with pytest.raises(ConfigError) as caught:
        run_cohort(targets, nested_cohort["bundle"], out_dir=tmp_path / "out", connect=connect)
    text = str(caught.value)
    assert text.startswith("the model does not suit 1 input(s), so nothing was run: ")
    assert f"{synthetic_plate.path}: the model needs channels" in text
    assert text.count("the model needs channels") == 1
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("command", ["predict", "cohort"])
@pytest.mark.parametrize("flag", ["--force", "--overwrite"])
def test_force_and_overwrite_are_one_option_of_predict_and_cohort(command: str, flag: str) -> None:
    from simsearch_wsi.cli.main import build_parser

    common = ["x.tiff", "--model", "m.zip", "--out", "o"]
    assert build_parser().parse_args([command, *common, flag]).force is True
    assert build_parser().parse_args([command, *common]).force is False


def test_an_image_renamed_by_a_later_run_is_counted_once_in_the_table(tmp_path: Path) -> None:
    """Review of issue 29: output stems depend on the whole cohort (a second ``slide.tiff``
    turns ``slide`` into ``b1_slide``), so a later run may name an input finished before
    otherwise; the cohort table takes that input's rows from this run's name only, while the
    rows of other images finished in the folder stay."""
    from simsearch_wsi.infer.predict import PredictResult, PredictSettings, _run_record, table_rows

    settings = PredictSettings()
    record = _run_record("digest", settings)
    out = tmp_path / "out"
    out.mkdir()

    def finished(stem: str, image: Path) -> None:
        mask = out / f"{stem}.mask.png"
        mask.write_bytes(b"")
        rows = [{"image": str(image), "class": "A", "count": 1}]
        result = PredictResult(str(image), stem, {"mask": str(mask)}, {"A": 1}, rows, 0.1)
        doc = {"run": record, "input": {"path": str(image)}, "result": result.to_dict()}
        (out / f"{stem}.predict.json").write_text(json.dumps(doc))

    b1, b2, other = (
        tmp_path / "b1" / "slide.tiff",
        tmp_path / "b2" / "slide.tiff",
        tmp_path / "o.tif",
    )
    finished("slide", b1)  # the first run: b1 alone
    finished("o", other)  # an image of another run into the same folder
    finished("b1_slide", b1)  # the second run: b1 and b2
    finished("b2_slide", b2)
    stems = {str(b1): "b1_slide", str(b2): "b2_slide"}
    rows = table_rows(out, "digest", settings=settings, results=[], stems=stems)
    assert sorted(r["image"] for r in rows) == sorted([str(b1), str(b2), str(other)])
    # without this run's names (predict): every record, as before
    assert len(table_rows(out, "digest", settings=settings, results=[])) == 4


def test_output_names_differing_only_in_case_are_qualified(tmp_path: Path) -> None:
    """``Slide.tiff`` and ``slide.tiff`` would write the same files on macOS and Windows."""
    entries = [
        CohortEntry(str(tmp_path / "a" / "Slide.tiff")),
        CohortEntry(str(tmp_path / "b" / "slide.tiff")),
    ]
    assert [t.stem for t in cohort_targets(entries)] == ["a_Slide", "b_slide"]
    clash = [
        CohortEntry(str(tmp_path / "Slide.tiff")),
        CohortEntry(str(tmp_path / "x.tiff"), name="slide"),
    ]
    with pytest.raises(ConfigError, match=r"would both write"):
        cohort_targets(clash)
