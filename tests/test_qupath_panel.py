"""The SimSearch panel (``qupath_scripts/simsearch_panel.groovy``) in a real JavaFX window.

QuPath is not installable here: the panel runs with a real Groovy and JavaFX (Debian's openjfx)
under Xvfb, against the stand-ins of the QuPath classes it calls (``tests/groovy/stubs``) and the
real HTTP server. ``tests/groovy/panel_driver.groovy`` clicks its buttons and moves its sliders in
the same JVM and reports what the stand-in image held after each step. Skipped (with the reason)
where groovy, JavaFX or an X display (Xvfb) is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from PIL import Image

from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS, REJECTED_CLASS
from simsearch_wsi.review.session import Session
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.server import create_app
from simsearch_wsi.synthetic import SyntheticSlide, make_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
PANEL = REPO / "qupath_scripts" / "simsearch_panel.groovy"
DRIVER = REPO / "tests" / "groovy" / "panel_driver.groovy"
LAUNCHER = REPO / "tests" / "groovy" / "launcher.groovy"
STUBS = REPO / "tests" / "groovy" / "stubs"
HELPERS_MARK = "// ------------- HTTP helpers: the same block in every simsearch_*.groovy script"
GROOVY = shutil.which("groovy")
JAVA_17 = Path("/usr/lib/jvm/java-17-openjdk-amd64")
JAVAFX = Path(os.environ.get("SIMSEARCH_JAVAFX_LIB", "/usr/share/openjfx/lib"))
JAVAFX_JARS = ["javafx.base.jar", "javafx.graphics.jar", "javafx.controls.jar", "javafx.swing.jar"]
XVFB_RUN = shutil.which("xvfb-run")
SCREENSHOT = os.environ.get("SIMSEARCH_PANEL_SCREENSHOT")  # also save the snapshot there

if GROOVY is None:
    pytest.skip("the panel test needs `groovy` (apt-get install groovy)", allow_module_level=True)
if not all((JAVAFX / j).is_file() for j in JAVAFX_JARS):
    pytest.skip(
        f"the panel test needs JavaFX jars in {JAVAFX} (apt-get install openjfx, or set "
        "SIMSEARCH_JAVAFX_LIB)",
        allow_module_level=True,
    )
if XVFB_RUN is None and not os.environ.get("DISPLAY"):
    pytest.skip(
        "the panel test needs an X display or xvfb-run (apt-get install xvfb)",
        allow_module_level=True,
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if JAVA_17.is_dir():
        env["JAVA_HOME"] = str(JAVA_17)
    env["JAVA_OPTS"] = (env.get("JAVA_OPTS", "") + " -XX:TieredStopAtLevel=1").strip()
    return env


@dataclass
class World:
    root: Path
    slide: SyntheticSlide
    uri: str
    url: str
    prototypes: list[dict[str, Any]]
    second_uri: str  # a copy of the slide: another image to switch to


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("panel").resolve()
    slide = make_synthetic_slide(root / "s 1.tiff", width=1024, height=768, n_per_class=3)
    prototypes, seen = [], set()
    for f in slide.to_geojson()["features"]:
        name = f["properties"]["classification"]["name"]
        if name not in seen:
            seen.add(name)
            prototypes.append(f)
    trunk, spec, info = build_trunk(weights="random", seed=0)
    search = SimSearch(
        FeatureExtractor(trunk, spec, info, autocast=False),
        FeatureCache(root / "cache"),
        settings=SearchSettings(tile_size=512),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(search, allowed_roots=[root]), host="127.0.0.1", port=0, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    uri = "file:" + slide.path.as_uri().removeprefix("file://")
    second = root / "s 2.tiff"
    shutil.copyfile(slide.path, second)
    second_uri = "file:" + second.as_uri().removeprefix("file://")
    try:
        yield World(root, slide, uri, f"http://127.0.0.1:{port}", prototypes, second_uri)
    finally:
        server.should_exit = True
        thread.join(30)


def _run_panel(tmp: Path, props: dict[str, str], state: dict[str, Any]) -> tuple[str, int]:
    record, state_file = tmp / "record.json", tmp / "state.json"
    state_file.write_text(json.dumps({**state, "record": str(record)}))
    cp = os.pathsep.join([str(STUBS), *[str(JAVAFX / j) for j in JAVAFX_JARS]])
    cmd = [
        str(GROOVY),
        "-cp",
        cp,
        f"-Dqupath.standin.state={state_file}",
        *[f"-D{k}={v}" for k, v in props.items()],
        str(LAUNCHER),
        "--fx",
        str(PANEL),
        str(DRIVER),
    ]
    if not os.environ.get("DISPLAY"):
        assert XVFB_RUN is not None
        cmd = [XVFB_RUN, "-a", "-s", "-screen 0 1024x768x24", *cmd]
    proc = subprocess.run(
        cmd, env=_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    return proc.stdout + proc.stderr, proc.returncode


def test_panel_helpers_match_the_scripts() -> None:
    text = PANEL.read_text()
    suggest = (REPO / "qupath_scripts" / "simsearch_suggest.groovy").read_text()
    assert text[text.index(HELPERS_MARK) :] == suggest[suggest.index(HELPERS_MARK) :]
    assert "QuPath 0.4, 0.5, 0.6 and 0.7" in text[: text.index("import ")]
    assert "groovy.json" not in text  # QuPath does not bundle groovy-json


@pytest.mark.slow  # about 30 s: a JVM with JavaFX, and the first embedding of the slide
def test_panel_live_threshold_heatmap_and_review(world: World, tmp_path: Path) -> None:
    session = world.root / "sessions" / "panel"
    report_file, snapshot = tmp_path / "report.json", tmp_path / "panel.png"
    props = {
        "simsearch.url": world.url,
        "simsearch.session": str(session),
        "simsearch.floor": "0.1",
        "simsearch.background": "2",
        "panel.report": str(report_file),
        "panel.snapshot": str(snapshot),
        "panel.second_uri": world.second_uri,
    }
    state = {"uris": [world.uri], "objects": world.prototypes, "gui": True}
    out, rc = _run_panel(tmp_path, props, state)
    assert rc == 0, out
    assert "[launcher] simsearch_panel.groovy: ok" in out and "[driver] done" in out, out
    report = json.loads(report_file.read_text())
    assert "answers (simsearch_wsi" in report["server"] and "protocol 1" in report["server"]
    assert report["suggest"].startswith("Suggest: candidates down to 0.10"), report["suggest"]
    # the rule and candidates choosers start at "default": the server's rule (the object rule)
    # was used, and its `auto` candidates took the grid on these motifs
    assert report["rule"] == "default" and report["candidates"] == "default"
    assert "shown), object rule, grid candidates; embed" in report["suggest"], report["suggest"]

    # one slider per class, from the floor to 1, at the session's threshold (0.5 at first)
    names = [f["properties"]["classification"]["name"] for f in world.prototypes]
    assert sorted(report["classes"]) == sorted(names)
    for s in report["sliders"].values():
        assert s["min"] == pytest.approx(0.1) and s["max"] == 1.0 and s["value"] == 0.5
    # after Suggest: the candidates at or above 0.5 are shown, and only those
    shown = report["after_suggest"]
    for name in names:
        sims = shown.get(name, [])
        assert all(v >= 0.5 for v in sims)
        total = int(report["sliders"][name]["count"].split(" of ")[1].split()[0])
        assert report["sliders"][name]["count"] == f"{len(sims)} of {total} shown"
        assert total > len(sims)  # the floor brought candidates below the threshold

    c = report["classes"][0]
    at_one, at_floor, at_third, rejected_at_one, back = report["steps"]
    assert at_one["holding"].get(c, []) == [] and at_one["count"].startswith("0 of ")
    total = int(at_floor["count"].split(" of ")[1].split()[0])
    assert len(at_floor["holding"][c]) == total and at_floor["label"] == "0.10"
    assert min(at_floor["holding"][c]) >= 0.1
    assert len(at_third["holding"][c]) == 3 and at_third["count"] == f"3 of {total} shown"
    # the rejected candidate stays when the slider hides the others; the class holds none
    assert rejected_at_one["holding"].get(c, []) == []
    assert len(rejected_at_one["holding"][REJECTED_CLASS]) == 1
    assert rejected_at_one["count"] == f"1 of {total} shown"
    assert len(back["holding"][c]) == 2  # the two others above the 3rd's similarity

    # the heat map is drawn over the slide: the heat-map grid scaled to level 0, from its origin
    # (half a window pitch before the first window's centre)
    overlay = report["overlay"]
    assert overlay is not None
    w, h = overlay["image_width"], overlay["image_height"]
    d = overlay["width"] / w
    assert 0 <= overlay["x"] < 4 * d and 0 <= overlay["y"] < 4 * d
    assert world.slide.width - 4 * d < overlay["x"] + overlay["width"] <= world.slide.width + d
    assert world.slide.height - 4 * d < overlay["y"] + overlay["height"] <= world.slide.height + d
    argb = np.array(overlay["argb"], dtype=np.int64).reshape(h, w)
    alpha = (argb >> 24) & 0xFF
    red = (argb >> 16) & 0xFF
    # its hottest (red) pixel lies on the class's prototype
    proto = next(
        f
        for f in world.prototypes
        if f["properties"]["classification"]["name"] == report["heatmap_class"]
    )
    xs = [p[0] for p in proto["geometry"]["coordinates"][0]]
    ys = [p[1] for p in proto["geometry"]["coordinates"][0]]
    score = np.where(alpha > 0, red * 256 - ((argb >> 8) & 0xFF), -1)
    v, u = np.unravel_index(np.argmax(score), score.shape)
    cx, cy = overlay["x"] + (u + 0.5) * d, overlay["y"] + (v + 0.5) * d
    assert min(xs) - d <= cx <= max(xs) + d and min(ys) - d <= cy <= max(ys) + d

    # Review records the decisions and the thresholds the sliders ended at
    others = sum(len(shown.get(n, [])) for n in names if n != c)  # left in place: approved
    assert report["review"].startswith(f"Review: approved {2 + others}, rejected 1, "), report[
        "review"
    ]
    assert "below threshold 0, unreviewed 0," in report["review"]
    saved = Session.open(session)
    assert saved.thresholds[c] == pytest.approx(report["third"])
    assert all(saved.thresholds[n] == 0.5 for n in names if n != c)
    assert report["background"].startswith("Background: added 4"), report["background"]
    # Background sent the Candidates choice (set to grid before it): the session records it
    assert report["candidates_after_background"] == "grid"
    assert len(report["after_background"]["background"]) == 4

    # a deleted candidate stays deleted when the slider moves down and back
    assert report["deleted_id"] not in report["after_delete"]["ids"]
    # Suggest again: the relabelled candidate (not reviewed) and the rejected one stay, the
    # panel's own candidates left as they came are replaced (no duplicates)
    after2 = report["after_suggest2"]
    assert after2["classes"].get(report["relabelled_id"]) == report["relabelled_to"]
    assert after2["classes"].get(report["rejected_id"]) == REJECTED_CLASS
    assert not set(report["before_suggest2"]) - {report["relabelled_id"]} & set(after2["ids"])
    # another image: the heat map went with the first image, the old sliders touch nothing
    sw = report["switch"]
    assert sw["overlay"] is None
    assert "made for another image" in sw["status"] and sw["first_unchanged"]
    assert sw["second_detections"] == 0
    assert sw["suggest"].startswith("Suggest: candidates down to 0.10"), sw["suggest"]
    total2 = int(sw["at_floor"]["count"].split(" of ")[1].split()[0])
    at_one = sw["at_one"]["holding"].get(c, [])  # (a copy: the prototype's twin is at 1.0)
    assert (
        all(v >= 1.0 for v in at_one)
        and sw["at_one"]["count"] == f"{len(at_one)} of {total2} shown"
    )
    assert total2 > len(at_one) and len(sw["at_floor"]["holding"][c]) == total2
    assert sw["first_still_unchanged"] and sw["overlay_drawn"]

    img = Image.open(snapshot)
    assert img.size[0] >= 500 and img.size[1] >= 300
    if SCREENSHOT:
        shutil.copyfile(snapshot, SCREENSHOT)


def _reviewed_session(folder: Path, slide: SyntheticSlide) -> Session:
    """A reviewed session: per class a prototype, approved objects and a rejected one (another
    class's object); confirmed background away from every object."""
    session = Session.create(folder)
    for k, name in enumerate(slide.classes):
        first, *rest = slide.objects_of(name)
        session.add_prototypes(slide.path, [Prototype(name, first.box)])
        for obj in rest:
            session.add_decision(slide.path, "positive", class_name=name, box=obj.box)
        other = slide.objects_of(slide.classes[(k + 1) % len(slide.classes)])[0]
        session.add_decision(slide.path, "negative", class_name=name, box=other.box)
    near = [
        BoxL0(o.x_l0 - 16, o.y_l0 - 16, o.width_l0 + 32, o.height_l0 + 32) for o in slide.objects
    ]
    free = [
        BoxL0(float(x), float(y), 40.0, 40.0)
        for y in range(8, slide.height - 48, 48)
        for x in range(8, slide.width - 48, 48)
    ]
    free = [b for b in free if not any(b.intersects(o) for o in near)]
    for box in free[:: len(free) // 8][:8]:
        session.add_decision(slide.path, "background", class_name=BACKGROUND_CLASS, box=box)
    session.save()
    return session


@pytest.mark.slow  # about 45 s: a JVM with JavaFX, a (tiny) training and a prediction
@pytest.mark.usefixtures("tiny_training")
def test_panel_train_then_predict(world: World, tmp_path: Path) -> None:
    session = _reviewed_session(world.root / "sessions" / "jobs", world.slide)
    props = {
        "simsearch.url": world.url,
        "simsearch.session": str(session.root),
        "panel.steps": "jobs",
        "panel.report": str(tmp_path / "report.json"),
    }
    out, rc = _run_panel(tmp_path, props, {"uris": [world.uri], "objects": [], "gui": True})
    assert rc == 0 and "[driver] done" in out, out
    report = json.loads((tmp_path / "report.json").read_text())
    model = session.root / "model.zip"  # the default: model.zip in the session folder
    assert report["train"] == f"Train: model written to {model} (on the server)" or report[
        "train"
    ].startswith(f"Train: model written to {model} (on the server); validation"), report["train"]
    assert model.is_file()
    assert report["predict"].startswith("Predict: added "), report["predict"]
    n = int(report["predict"].split()[2])
    assert n > 0 and report["objects"] == n
    record = json.loads((tmp_path / "record.json").read_text())
    names = {*world.slide.classes, BACKGROUND_CLASS}
    assert any(
        f"probability {c}" in f["properties"].get("measurements", {})
        for f in record["objects"]
        for c in names
    )
