"""The QuPath scripts of ``qupath_scripts/``, run by a real Groovy against the real HTTP server.

QuPath is not installable here: the scripts run against stand-ins of the QuPath classes they call
(``tests/groovy/stubs``, see ``tests/groovy/README.md``), through ``tests/groovy/launcher.groovy``,
which gives them QuPath's default static import of ``QP`` and leaves the files unchanged. Each
script's SETTINGS are overridden with Java system properties (``-Dsimsearch.url=...``). The
stand-in image is a JSON state file; what a script adds, removes or shows comes back in a record
file. One server (random trunk weights, a small synthetic slide) serves the whole module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn

from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS, REJECTED_CLASS
from simsearch_wsi.review.session import Session
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.server import API_PREFIX, PROTOCOL_VERSION, create_app
from simsearch_wsi.synthetic import SyntheticSlide, make_synthetic_slide
from simsearch_wsi.train.bundle import load_bundle
from simsearch_wsi.train.choices import DEFAULT_STRATEGY

GROOVY = shutil.which("groovy")
JAVA_17 = Path("/usr/lib/jvm/java-17-openjdk-amd64")
# CI sets SIMSEARCH_REQUIRE_GROOVY=1 where it installed groovy: there, no groovy is a failure
REQUIRED = os.environ.get("SIMSEARCH_REQUIRE_GROOVY") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"SIMSEARCH_REQUIRE_GROOVY=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if GROOVY is None or not (shutil.which("java") or os.environ.get("JAVA_HOME") or JAVA_17.is_dir()):
    _unavailable(
        "the QuPath scripts need `groovy` and a Java runtime on PATH to be tested "
        "(Debian/Ubuntu: apt-get install groovy)"
    )

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO / "qupath_scripts"
STUBS = REPO / "tests" / "groovy" / "stubs"
LAUNCHER = REPO / "tests" / "groovy" / "launcher.groovy"
SCRIPTS = ["suggest", "review", "background", "embed", "status", "train", "predict", "quantify"]
HELPERS_MARK = "// ------------- HTTP helpers: the same block in every simsearch_*.groovy script"


def _script(name: str) -> Path:
    return SCRIPTS_DIR / f"simsearch_{name}.groovy"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if JAVA_17.is_dir():  # Groovy 2.4 (Debian's) runs on Java 17, as QuPath 0.4/0.5 do
        env["JAVA_HOME"] = str(JAVA_17)
    env["JAVA_OPTS"] = (env.get("JAVA_OPTS", "") + " -XX:TieredStopAtLevel=1").strip()
    return env


@pytest.fixture(scope="module", autouse=True)
def _groovy_runs() -> None:
    """Skip (with the reason) where groovy is installed but cannot start (fail when required)."""
    try:
        proc = subprocess.run(
            [str(GROOVY), "-e", "println(GroovySystem.version)"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"groovy does not start: {exc}")
    else:
        if proc.returncode != 0:
            _unavailable(f"groovy does not start: {(proc.stdout + proc.stderr).strip()[-500:]}")


@dataclass
class Run:
    rc: int
    out: str  # stdout and stderr
    record: dict[str, Any]  # what the stand-in QuPath saw: added, removed, dialogs, objects

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.out.splitlines() if line.startswith(prefix)]


def _run(
    tmp: Path,
    names: list[str],
    *,
    props: dict[str, str],
    state: dict[str, Any] | None = None,
    compile_only: bool = False,
    scripts: list[Path] | None = None,
    classpath: Sequence[Path] = (),
) -> Run:
    """Run scripts in one JVM with the launcher; ``state`` is the stand-in image."""
    key = uuid.uuid4().hex[:8]
    record = tmp / f"record-{key}.json"
    state_file = tmp / f"state-{key}.json"
    state_file.write_text(json.dumps({**(state or {"uris": None}), "record": str(record)}))
    paths = scripts if scripts is not None else [_script(n) for n in names]
    cmd = [
        str(GROOVY),
        "-cp",
        os.pathsep.join([str(STUBS), *map(str, classpath)]),
        f"-Dqupath.standin.state={state_file}",
        *[f"-D{k}={v}" for k, v in props.items()],
        str(LAUNCHER),
        *(["--compile-only"] if compile_only else []),
        *[str(p) for p in paths],
    ]
    proc = subprocess.run(
        cmd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    out = proc.stdout + proc.stderr
    rec: dict[str, Any] = {"added": [], "removed": [], "dialogs": [], "objects": None}
    if record.exists():
        rec = json.loads(record.read_text())
    return Run(proc.returncode, out, rec)


def test_panel_compiles(tmp_path: Path) -> None:
    """The panel (simsearch_panel.groovy) compiles against the stand-ins and JavaFX; its run is
    tested in tests/test_qupath_panel.py."""
    javafx = Path(os.environ.get("SIMSEARCH_JAVAFX_LIB", "/usr/share/openjfx/lib"))
    jars = [javafx / f"javafx.{m}.jar" for m in ("base", "graphics", "controls", "swing")]
    if not all(j.is_file() for j in jars):
        pytest.skip(
            f"compiling the panel needs the JavaFX jars in {javafx} (apt-get install openjfx)"
        )
    panel = SCRIPTS_DIR / "simsearch_panel.groovy"
    broken = tmp_path / "simsearch_panel_broken.groovy"
    broken.write_text(panel.read_text().replace("Map body = [", "Map body = ([", 1))
    run = _run(tmp_path, [], props={}, compile_only=True, scripts=[panel, broken], classpath=jars)
    assert "[launcher] simsearch_panel.groovy: ok" in run.out, run.out
    assert "[launcher] simsearch_panel_broken.groovy: FAILED" in run.out and run.rc == 1


# --- the server ------------------------------------------------------------------------------
@dataclass
class World:
    root: Path
    slide: SyntheticSlide
    uri: str  # as Java's URI.toString() writes it: file:/... percent-encoded
    url: str
    prototypes: list[dict[str, Any]]
    search: SimSearch


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def _stop(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(30)


def _java_uri(path: Path) -> str:
    """What QuPath's getCurrentServer().getURIs() gives: Java's URI.toString(), file:/..."""
    return "file:" + path.as_uri().removeprefix("file://")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("groovy").resolve()
    folder = root / "my slides"  # a space: the URI is percent-encoded
    folder.mkdir()
    slide = make_synthetic_slide(folder / "s 1.tiff", width=1024, height=768, n_per_class=3)
    prototypes, seen = [], set()
    for f in slide.to_geojson()["features"]:
        name = f["properties"]["classification"]["name"]
        if name not in seen:
            seen.add(name)
            prototypes.append(f)
    trunk, spec, info = build_trunk(weights="random", seed=0)
    extractor = FeatureExtractor(trunk, spec, info, autocast=False)
    search = SimSearch(
        extractor, FeatureCache(root / "cache"), settings=SearchSettings(tile_size=512)
    )
    server, thread, url = _serve(create_app(search, allowed_roots=[root]))
    try:
        yield World(root, slide, _java_uri(slide.path), url, prototypes, search)
    finally:
        _stop(server, thread)


def _box(
    x: float, y: float, w: float, h: float, cls: str | None, *, triangle: bool = False
) -> dict[str, Any]:
    ring = (
        [[x, y], [x + w, y], [x, y + h], [x, y]]
        if triangle
        else [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    )
    props: dict[str, Any] = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [10, 20, 30]}
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": props,
    }


def _class(feature: dict[str, Any]) -> str | None:
    c = feature["properties"].get("classification")
    return None if c is None else str(c["name"])


def _detections(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in objects if f["properties"]["objectType"] == "detection"]


def _session_ids(folder: Path) -> set[str]:
    data = json.loads((folder / "session.json").read_text())
    return {s["id"] for s in data["suggestions"]}


def _failed(run: Run, name: str) -> str:
    lines = run.lines(f"[launcher] simsearch_{name}.groovy: FAILED: ")
    assert len(lines) == 1, run.out
    return lines[0]


# --- the scripts compile, and keep to what QuPath offers ------------------------------------
def test_scripts_compile_and_share_their_helpers(tmp_path: Path) -> None:
    broken = tmp_path / "simsearch_broken.groovy"
    broken.write_text(_script("status").read_text().replace("Map health = ", "Map health = (", 1))
    run = _run(
        tmp_path,
        [],
        props={},
        compile_only=True,
        scripts=[*[_script(n) for n in SCRIPTS], broken],
    )
    assert run.rc == 1, run.out  # a syntax error fails
    for name in SCRIPTS:
        assert f"[launcher] simsearch_{name}.groovy: ok" in run.out, run.out
    assert "[launcher] simsearch_broken.groovy: FAILED" in run.out

    helpers = set()
    for name in SCRIPTS:
        text = _script(name).read_text()
        head = text[: text.index("import ")]
        assert "QuPath 0.4, 0.5, 0.6 and 0.7" in head, name
        assert text.count("// ====================================== SETTINGS") == 1, name
        assert "String SERVER_URL = 'http://127.0.0.1:8765'" in text and "String TOKEN = ''" in text
        assert f"final int PROTOCOL_VERSION = {PROTOCOL_VERSION}" in text, name
        # QuPath bundles Gson (GsonTools) but not groovy-json; Groovy 3+ only syntax is out
        assert "groovy.json" not in text, name
        code = re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL))
        for pattern in (
            r"!in\b",
            r"!instanceof",
            r"^\s*var\s",
            r"===",
            r"\?\[",
            r"\brecord\s+\w+\(",
        ):
            assert not re.search(pattern, code, re.MULTILINE), (name, pattern)
        helpers.add(text[text.index(HELPERS_MARK) :])
    assert len(helpers) == 1, "the HTTP helper block differs between the scripts"


# --- the review loop from QuPath -------------------------------------------------------------
def test_review_loop_from_qupath(world: World, tmp_path: Path) -> None:
    session = world.root / "sessions" / "exp 1"
    props = {
        "simsearch.url": world.url,
        "simsearch.session": str(session),
        "simsearch.thresholds": "ring=0.4",
        "simsearch.background": "1",
    }
    others = [
        _box(10, 10, 40, 40, None),  # unclassified: not a prototype
        _box(60, 10, 40, 40, "ring", triangle=True),  # not a rectangle: not a prototype
    ]
    state = {"uris": [world.uri], "objects": world.prototypes + others, "selected": []}

    # suggest: the prototypes go out, the session's suggestions come back with their ids
    first = _run(tmp_path, ["suggest"], props=props, state=state)
    assert first.rc == 0, first.out
    added = set(first.record["added"])
    assert added and added == _session_ids(session)
    assert first.record["removed"] == [] and first.record["dialogs"] == []
    found = [f for f in _detections(first.record["objects"]) if f["id"] in added]
    assert len(found) == len(added)
    assert all("similarity" in f["properties"]["measurements"] for f in found)
    assert {_class(f) for f in found} <= {"ring", "cluster", "stripes", BACKGROUND_CLASS}
    assert sum(_class(f) == BACKGROUND_CLASS for f in found) == 2
    (line,) = first.lines("simsearch suggest on s 1.tiff: ")
    assert f"added {len(added)} detections" in line and "background 2" in line, line
    assert "from 3 prototype(s) (all annotations), replaced 0 earlier" in line, line
    assert "ring=0.40" in line and "cluster=0.50" in line, line
    # the server's default rule and candidates (`auto`, recorded as asked; it took the grid here)
    assert "earlier; object rule, grid candidates;" in line, line
    assert Session.open(session).dense is True and Session.open(session).candidates == "auto"

    # the user rejects one suggestion, then suggests again: the others are replaced
    objects = first.record["objects"]
    rejected = next(f for f in objects if f["id"] in added and _class(f) != BACKGROUND_CLASS)
    rejected_class = _class(rejected)
    rejected["properties"]["classification"] = {"name": REJECTED_CLASS, "color": [0, 0, 0]}
    second = _run(tmp_path, ["suggest"], props=props, state={**state, "objects": objects})
    assert second.rc == 0, second.out
    assert set(second.record["removed"]) == added - {rejected["id"]}
    new = set(second.record["added"])
    assert new and not new & added and new <= _session_ids(session)
    kept = {f["id"] for f in second.record["objects"]}
    assert rejected["id"] in kept and not (added - {rejected["id"]}) & kept
    assert f"replaced {len(added) - 1} earlier" in second.out

    # review: the decisions reach the session
    objects = second.record["objects"]
    n_found = sum(1 for f in objects if f["id"] in new and _class(f) != BACKGROUND_CLASS)
    review = _run(tmp_path, ["review"], props=props, state={**state, "objects": objects})
    assert review.rc == 0, review.out
    (line,) = review.lines("simsearch review of s 1.tiff")
    assert f"approved {n_found}, rejected 1, background 2, not background 0" in line, line
    assert "conflicts 0" in line, line
    summary = Session.open(session).summary()
    assert summary["classes"][rejected_class]["negatives"] == 1
    assert summary["background"] == 2 and summary["reviewed_images"] == [
        str(world.slide.path.resolve())
    ]

    # background candidates for the user to confirm
    bg = _run(tmp_path, ["background"], props={**props, "simsearch.background": "2"}, state=state)
    assert bg.rc == 0, bg.out
    bg_ids = set(bg.record["added"])
    assert len(bg_ids) == 4 and bg_ids <= _session_ids(session)
    assert {_class(f) for f in bg.record["objects"] if f["id"] in bg_ids} == {BACKGROUND_CLASS}
    assert "added 4 candidates" in bg.out

    # status shows the server and the session
    status = _run(tmp_path, ["status"], props=props, state=state)
    assert status.rc == 0, status.out
    assert f"simsearch-wsi server at {world.url}: ok, protocol {PROTOCOL_VERSION}" in status.out
    assert f"current image: {world.uri}" in status.out
    assert "3 classes" in status.out and "reviewed images 1 of 1" in status.out, status.out
    assert f"  {rejected_class}: threshold" in status.out and "negatives 1" in status.out
    assert "  ring: threshold 0.40" in status.out
    assert "background: 2 confirmed, 0 rejected" in status.out


def test_suggest_from_the_selection_without_a_session(world: World, tmp_path: Path) -> None:
    cluster = next(f for f in world.prototypes if _class(f) == "cluster")
    state = {"uris": [world.uri], "objects": world.prototypes, "selected": [cluster["id"]]}
    props = {"simsearch.url": world.url, "simsearch.rule": "patch"}
    run = _run(tmp_path, ["suggest"], props=props, state=state)
    assert run.rc == 0, run.out
    found = [f for f in _detections(run.record["objects"]) if f["id"] in run.record["added"]]
    assert found and {_class(f) for f in found} == {"cluster"}
    assert "from 1 prototype(s) (selected annotations)" in run.out and "session none" in run.out
    assert "earlier; patch rule, grid candidates;" in run.out  # RULE = 'patch' asked for it
    # CANDIDATES = 'objects' asks the server for object candidates
    props = {"simsearch.url": world.url, "simsearch.candidates": "objects"}
    objects = _run(tmp_path, ["suggest"], props=props, state=state)
    assert objects.rc == 0, objects.out
    assert "earlier; object rule, object candidates;" in objects.out, objects.out


def test_embed_job_with_progress(world: World, tmp_path: Path) -> None:
    props = {"simsearch.url": world.url, "simsearch.patchSizePx": "48", "simsearch.maxWait": "120"}
    run = _run(tmp_path, ["embed"], props=props, state={"uris": [world.uri], "objects": []})
    assert run.rc == 0, run.out
    assert run.lines("simsearch embed: job ") and "started for s 1.tiff" in run.out
    assert run.lines("  done: ") or run.lines("  running: "), run.out
    (line,) = run.lines("simsearch embed: done in ")
    assert "s 1.tiff" in line and "tiles embedded" in line, line
    assert run.record["added"] == []


def _training_session(folder: Path, slide: SyntheticSlide) -> Session:
    """What a reviewed session holds: per class a prototype, approved suggestions and a rejected
    one (another class's object); confirmed background away from every object."""
    session = Session.create(folder)
    for k, name in enumerate(slide.classes):
        first, *rest = slide.objects_of(name)
        session.add_prototypes(slide.path, [Prototype(name, first.box)])
        for obj in rest:
            session.add_decision(slide.path, "positive", class_name=name, box=obj.box)
        other = slide.objects_of(slide.classes[(k + 1) % len(slide.classes)])[0]
        session.add_decision(slide.path, "negative", class_name=name, box=other.box)
    side = 40.0
    near = [
        BoxL0(o.x_l0 - 16, o.y_l0 - 16, o.width_l0 + 32, o.height_l0 + 32) for o in slide.objects
    ]
    free = [
        BoxL0(float(x), float(y), side, side)
        for y in range(8, slide.height - 48, 48)
        for x in range(8, slide.width - 48, 48)
    ]
    free = [b for b in free if not any(b.intersects(o) for o in near)]
    for box in free[:: len(free) // 8][:8]:
        session.add_decision(slide.path, "background", class_name=BACKGROUND_CLASS, box=box)
    session.save()
    return session


@pytest.mark.usefixtures("tiny_training")
def test_train_job_with_progress(world: World, tmp_path: Path) -> None:
    session = _training_session(world.root / "sessions" / "train me", world.slide)
    model = world.root / "models" / "my model.zip"
    props = {
        "simsearch.url": world.url,
        "simsearch.session": str(session.root),
        "simsearch.model": str(model),
        "simsearch.maxWait": "120",
    }
    run = _run(tmp_path, ["train"], props=props, state={"uris": None})  # no image needed
    assert run.rc == 0, run.out
    (line,) = run.lines("simsearch train: job ")
    assert f"started for session {session.root} (strategy {DEFAULT_STRATEGY}, preset fast" in line
    assert run.lines("  running: ") or run.lines("  done: "), run.out
    (line,) = run.lines("simsearch train: done in ")
    assert f"model written to {model} (on the server)" in line, line
    classes = [*session.classes, BACKGROUND_CLASS]
    (line,) = run.lines("  classes: ")
    assert line.startswith("  classes: " + classes[0] + " (threshold 0."), line
    assert all(f"{c} (threshold " in line for c in classes), line
    (line,) = run.lines("  validation on ")
    assert re.search(r"held-out patches: balanced accuracy [01]\.\d{3}, accuracy", line), line
    assert "before training (linear probe on the starting trunk): balanced accuracy" in line
    (line,) = run.lines("  stages: ")
    assert re.fullmatch(
        r"  stages: selflearn [\d.]+ s \([\d.]+ views/s\), supcon [\d.]+ s \([\d.]+ views/s\), "
        r"linear [\d.]+ s",
        line,
    ), line
    assert any("random" in n for n in run.lines("  note: "))
    assert run.record["added"] == [] and run.record["dialogs"] == []
    assert list(load_bundle(model).classes) == classes

    # mistakes are the server's messages: a session it may not read, an unknown strategy
    bad = _run(
        tmp_path,
        ["train"],
        props={**props, "simsearch.session": str(tmp_path / "elsewhere")},
        state={"uris": None},
    )
    line = _failed(bad, "train")
    assert "simsearch-wsi server error (HTTP 403 on POST /api/v1/jobs/train): session " in line
    bad = _run(
        tmp_path, ["train"], props={**props, "simsearch.strategy": "neg"}, state={"uris": None}
    )
    line = _failed(bad, "train")
    assert "(HTTP 422 on POST /api/v1/jobs/train)" in line, line
    assert "unknown strategy 'neg'; use one of pos, pos+neg" in line, line


def _predicted(x: float, y: float, cls: str, *, detection: bool) -> dict[str, Any]:
    """An object as an earlier prediction wrote it: a detection with the model's probabilities,
    or a segmentation annotation with its area."""
    feature = _box(x, y, 48, 48, cls)
    props = feature["properties"]
    if detection:
        props["objectType"] = "detection"
        props["measurements"] = {"probability ring": 0.1, f"probability {cls}": 0.9}
    else:
        props["measurements"] = {"area_px": 2304.0}
    return feature


def test_predict_imports_the_objects(world: World, tmp_path: Path, tiny_bundle: Path) -> None:
    model = world.root / "models" / "tiny model.zip"
    model.parent.mkdir(exist_ok=True)
    shutil.copy(tiny_bundle, model)
    old_detection = _predicted(200, 200, "cluster", detection=True)
    old_region = _predicted(300, 200, "ring", detection=False)
    keep = [
        _box(100, 100, 48, 48, "cluster"),  # the user's prototype: kept
        {
            **_predicted(400, 200, "cluster", detection=True),
            "properties": {  # a suggestion
                "objectType": "detection",
                "classification": {"name": "cluster", "color": [1, 2, 3]},
                "measurements": {"similarity": 0.8},
            },
        },
        _predicted(500, 200, "Other", detection=False),  # not one of the model's classes
    ]
    state = {"uris": [world.uri], "objects": [old_detection, old_region, *keep]}
    props = {
        "simsearch.url": world.url,
        "simsearch.model": str(model),  # OUT left empty: predictions next to the model
        "simsearch.thresholds": "cluster=0.35",
        "simsearch.maxWait": "120",
    }
    run = _run(tmp_path, ["predict"], props=props, state=state)
    assert run.rc == 0, run.out
    out = model.parent / "predictions"
    geojson = out / "s 1.geojson"
    written = json.loads(geojson.read_text())["features"]
    detections = _detections(written)
    assert detections and len(detections) < len(written)  # detections and annotations

    (line,) = run.lines("simsearch predict: job ")
    assert f"started for s 1.tiff with model {model} (output folder {out})" in line, line
    assert run.lines("  running: "), run.out
    # the objects the server wrote replace the earlier prediction; the rest stays
    assert set(run.record["added"]) == {f["id"] for f in written}
    assert sorted(run.record["removed"]) == sorted([old_detection["id"], old_region["id"]])
    final = run.record["objects"]
    assert {f["id"] for f in final} == {f["id"] for f in written} | {f["id"] for f in keep}
    imported = [f for f in final if f["id"] in run.record["added"]]
    assert _detections(imported) and all(
        "probability cluster" in f["properties"]["measurements"] for f in _detections(imported)
    )
    # the ranking score comes into QuPath with the detection (sortable in its measurement table)
    scores = {f["id"]: f["properties"]["measurements"]["score"] for f in detections}
    assert {
        f["id"]: f["properties"]["measurements"].get("score") for f in _detections(imported)
    } == scores
    (line,) = run.lines("simsearch predict on s 1.tiff: done in ")
    counts = Counter(_class(f) for f in detections)
    expect = ", ".join(f"{c} {counts.get(c, 0)}" for c in ("ring", "cluster", "stripes"))
    assert (
        f"added {len(detections)} detections ({expect}) and "
        f"{len(written) - len(detections)} segmentation annotations, replaced 2 earlier"
    ) in line, line
    assert run.lines("  thresholds: ") == [
        "  thresholds: ring=0.30 cluster=0.35 stripes=0.30 background=0.30"
    ]
    assert f"  OME-Zarr (class probabilities and labels): {out / 's 1.ome.zarr'}" in run.out
    assert f"  overlay: {out / 's 1_overlay.png'}" in run.out
    assert f"  quantification.csv: {out / 'quantification.csv'}" in run.out
    assert (out / "quantification.csv").is_file() and (out / "s 1.ome.zarr").is_dir()
    assert run.record["dialogs"] == []


def test_quantify_scores_the_annotations(world: World, tmp_path: Path) -> None:
    from PIL import Image

    from simsearch_wsi.infer.ihc import intensity_bins
    from simsearch_wsi.synthetic.ihc import make_ihc_cell_field

    field = make_ihc_cell_field((160, 160), dab_levels=(0.05, 0.3, 0.5, 0.8), seed=5)
    png = world.root / "ihc slides" / "core 1.png"
    png.parent.mkdir(exist_ok=True)
    Image.fromarray(field.rgb).save(png)
    left = _box(0, 0, 80, 160, "Tumor")
    other = _box(100, 10, 20, 20, None)  # not selected: not scored
    old_cell = {
        **_box(10, 10, 6, 6, "Positive"),
        "properties": {
            "objectType": "detection",
            "classification": {"name": "Positive", "color": [200, 50, 50]},
            "measurements": {"Nucleus: DAB OD mean": 0.5},
        },
    }
    state = {
        "uris": [_java_uri(png)],
        "objects": [left, other, old_cell],
        "selected": [left["id"]],
    }
    props = {
        "simsearch.url": world.url,
        "simsearch.mpp": "0.5",
        "simsearch.threeClasses": "true",
        "simsearch.maxWait": "120",
    }
    run = _run(tmp_path, ["quantify"], props=props, state=state)
    assert run.rc == 0, run.out
    inside = field.centers_xy[:, 0] < 80
    truth = intensity_bins(field.nucleus_dab_od[inside], (0.2, 0.4, 0.6))
    final = {f["id"]: f for f in run.record["objects"]}
    assert old_cell["id"] in run.record["removed"]
    cells = [f for f in final.values() if f["properties"]["objectType"] == "detection"]
    assert len(cells) == int(inside.sum()) == len(run.record["added"])
    assert {_class(f) for f in cells} <= {"Negative", "1+", "2+", "3+"}
    assert all("Cell: DAB OD max" in f["properties"]["measurements"] for f in cells)
    scored = final[left["id"]]["properties"]["measurements"]
    assert scored["Num Detections"] == inside.sum()
    assert scored["Positive %"] == pytest.approx(100 * (truth > 0).mean())
    p = np.bincount(truth, minlength=4) / truth.size * 100
    assert scored["H-score"] == pytest.approx(p[1] + 2 * p[2] + 3 * p[3])
    assert "measurements" not in final[other["id"]]["properties"]
    (line,) = run.lines("  Tumor: ")
    assert f"{inside.sum()} cells, positive" in line
    assert run.record["dialogs"] == []


def test_token_is_sent(world: World, tmp_path: Path) -> None:
    app = create_app(world.search, allowed_roots=[world.root], token="s3cret")
    server, thread, url = _serve(app)
    try:
        ok = _run(tmp_path, ["status"], props={"simsearch.url": url, "simsearch.token": "s3cret"})
        bad = _run(tmp_path, ["status"], props={"simsearch.url": url, "simsearch.token": "nope"})
    finally:
        _stop(server, thread)
    assert ok.rc == 0, ok.out
    assert "token required: yes" in ok.out and "jobs: 0 running or queued" in ok.out
    assert "current image: none" in ok.out
    assert bad.rc == 0, bad.out  # status reports, it does not stop
    assert "HTTP 401" in bad.out and "missing or wrong token" in bad.out


# --- failures: plain messages, nothing added -------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_not_running(world: World, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    state = {"uris": [world.uri], "objects": world.prototypes, "gui": True}
    props = {"simsearch.url": url, "simsearch.session": "/x", "simsearch.model": "/x/m.zip"}
    run = _run(tmp_path, SCRIPTS, props=props, state=state)
    assert run.rc != 0
    message = (
        f"The simsearch-wsi server is not running at {url}; start it with "
        "`simsearch-wsi serve --allow <folder>`"
    )
    for name in SCRIPTS:
        assert message in _failed(run, name)
    assert run.record["added"] == [] and run.record["removed"] == []
    dialogs = run.record["dialogs"]
    assert len(dialogs) == len(SCRIPTS)  # QuPath's GUI: an error dialog each
    assert all(d["kind"] == "error" and message in d["message"] for d in dialogs)


class _FakeServer(BaseHTTPRequestHandler):
    """Mode "health": a server of protocol 2 whose /api/v1/health answers; "gate": a server of
    protocol 2 that answers clients sending protocol 1 with the real server's 409; "slow": a
    server of protocol 1 that never answers anything but /health."""

    mode = "health"
    release = threading.Event()

    def do_GET(self) -> None:
        health = self.path == f"{API_PREFIX}/health"
        if self.mode == "gate" and self.headers.get("X-SimSearch-Protocol") == "1":
            self._send(409, {"error": {"type": "protocol_mismatch", "message": "speaks 2"}})
        elif health:
            self._send(
                200,
                {"status": "ok", "protocol": 1 if self.mode == "slow" else 2, "version": "9.0.0"},
            )
        elif self.mode == "slow":
            self.release.wait(20)  # then hang up without an answer
        else:
            self._send(404, {"error": {"type": "not_found", "message": "no such route"}})

    def do_POST(self) -> None:
        self.do_GET()

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _fake_server() -> Iterator[str]:
    fake = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    fake.daemon_threads = True
    _FakeServer.release.clear()
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{fake.server_address[1]}"
    finally:
        _FakeServer.release.set()
        _FakeServer.mode = "health"
        fake.shutdown()
        fake.server_close()


def test_protocol_mismatch(world: World, tmp_path: Path) -> None:
    state = {"uris": [world.uri], "objects": world.prototypes}
    with _fake_server() as url:
        props = {
            "simsearch.url": url,
            "simsearch.session": str(world.root / "s"),
            "simsearch.model": str(world.root / "m.zip"),
        }
        _FakeServer.mode = "health"
        health = _run(tmp_path, SCRIPTS, props=props, state=state)
        _FakeServer.mode = "gate"
        gate = _run(tmp_path, ["status"], props=props, state=state)
    for name in SCRIPTS:
        line = _failed(health, name)
        assert "Protocol mismatch: this QuPath script speaks simsearch-wsi protocol 1" in line
        assert "speaks protocol 2 (simsearch_wsi 9.0.0)" in line
        assert "Update the QuPath scripts" in line and "or the simsearch_wsi package" in line
    assert health.record["added"] == []
    line = _failed(gate, "status")
    assert "Protocol mismatch" in line and "The server says: speaks 2" in line


def test_server_errors_are_shown(world: World, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "s.tiff"  # not under the server's --allow folder
    state = {"uris": [_java_uri(outside)], "objects": world.prototypes}
    props = {"simsearch.url": world.url, "simsearch.model": str(world.root / "m.zip")}
    run = _run(tmp_path, ["suggest", "embed", "predict"], props=props, state=state)
    for name, route in (
        ("suggest", "POST /api/v1/suggest"),
        ("embed", "POST /api/v1/jobs/embed"),
        ("predict", "POST /api/v1/jobs/predict"),
    ):
        line = _failed(run, name)
        assert f"simsearch-wsi server error (HTTP 403 on {route}): image {outside}" in line
        assert "is outside the folders this server may read" in line
    assert run.record["added"] == []

    junk = world.root / "junk.tiff"  # allowed, exists, but no image: the job fails
    junk.write_bytes(b"not a tiff")
    failed = _run(
        tmp_path,
        ["embed"],
        props={"simsearch.url": world.url},
        state={"uris": [_java_uri(junk)], "objects": []},
    )
    line = _failed(failed, "embed")
    assert "The embedding job failed on the server: " in line and "junk.tiff" in line, line


def test_slow_server_times_out(world: World, tmp_path: Path) -> None:
    state = {"uris": [world.uri], "objects": world.prototypes}
    with _fake_server() as url:
        _FakeServer.mode = "slow"
        start = time.monotonic()
        props = {"simsearch.url": url, "simsearch.timeout": "1"}
        run = _run(tmp_path, ["suggest"], props=props, state=state)
        seconds = time.monotonic() - start
    line = _failed(run, "suggest")
    assert f"The simsearch-wsi server at {url} did not answer POST /suggest within 1 s" in line
    assert seconds < 15 and run.record["added"] == []


def test_local_mistakes_are_explained(world: World, tmp_path: Path) -> None:
    state = {"uris": [world.uri], "objects": []}
    names = ["suggest", "review", "background", "train", "predict"]
    run = _run(tmp_path, names, props={"simsearch.url": world.url}, state=state)
    assert "No prototypes: draw rectangle annotations" in _failed(run, "suggest")
    props = {"simsearch.url": world.url, "simsearch.rule": "objects"}
    bad_rule = _run(tmp_path, ["suggest"], props=props, state=state)
    assert "RULE 'objects': use 'object', 'patch' or ''" in _failed(bad_rule, "suggest")
    props = {"simsearch.url": world.url, "simsearch.candidates": "object"}
    bad_candidates = _run(tmp_path, ["suggest"], props=props, state=state)
    assert "CANDIDATES 'object': use 'auto', 'grid', 'objects' or ''" in _failed(
        bad_candidates, "suggest"
    )
    for name in ("review", "background", "train"):
        assert "Set SESSION in the SETTINGS block" in _failed(run, name)
    assert "Set MODEL in the SETTINGS block to the model bundle (.zip)" in _failed(run, "predict")
    no_image = _run(tmp_path, ["embed"], props={"simsearch.url": world.url}, state={"uris": None})
    assert "No image is open" in _failed(no_image, "embed")
    bad_url = _run(tmp_path, ["status"], props={"simsearch.url": "127.0.0.1:8765"})
    assert 'SERVER_URL "127.0.0.1:8765" is not an http:// address' in _failed(bad_url, "status")
