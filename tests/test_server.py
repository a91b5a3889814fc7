"""The local HTTP server: the review loop over HTTP, jobs, security and error shapes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.exceptions import StarletteDeprecationWarning

from simsearch_wsi import __version__
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.qupath.geojson import (
    BACKGROUND_CLASS,
    REJECTED_CLASS,
    validate_feature_collection,
)
from simsearch_wsi.review.data import train_session
from simsearch_wsi.review.session import Session
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.server import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    create_app,
    is_loopback,
    local_path,
)
from simsearch_wsi.synthetic import SyntheticSlide, make_synthetic_slide
from simsearch_wsi.train.bundle import load_bundle
from simsearch_wsi.train.choices import DEFAULT_HEAD_INPUT, DEFAULT_STRATEGY, STRATEGIES

with warnings.catch_warnings():  # starlette 1.x prefers httpx2; httpx works the same here
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

API = "/api/v1"
BASE = "http://127.0.0.1"  # a server without a token answers loopback Host headers only


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one folder the server may read."""
    return tmp_path_factory.mktemp("allowed").resolve()


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outside").resolve()


@pytest.fixture(scope="module")
def slide(root: Path) -> SyntheticSlide:
    folder = root / "my slides"  # a space: file: URIs percent-encode it
    folder.mkdir()
    return make_synthetic_slide(
        folder / "slide 1.tiff", width=1024, height=768, n_per_class=3, seed=0
    )


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    trunk, spec, info = build_trunk(weights="random", seed=0)
    return FeatureExtractor(trunk, spec, info, autocast=False)


@pytest.fixture(scope="module")
def search(extractor: FeatureExtractor, root: Path) -> SimSearch:
    return SimSearch(
        extractor, FeatureCache(root / "cache"), settings=SearchSettings(tile_size=512)
    )


@contextlib.contextmanager
def _client(app: Any, **kwargs: Any) -> Iterator[TestClient]:
    kwargs.setdefault("base_url", BASE)
    with TestClient(app, **kwargs) as client:
        yield client


@pytest.fixture()
def client(search: SimSearch, root: Path) -> Iterator[TestClient]:
    with _client(create_app(search, allowed_roots=[root])) as c:
        yield c


def _prototypes(slide: SyntheticSlide) -> dict[str, Any]:
    """One classified rectangle per class, as QuPath exports them."""
    feats, seen = [], set()
    for f in slide.to_geojson()["features"]:
        name = f["properties"]["classification"]["name"]
        if name not in seen:
            seen.add(name)
            feats.append(f)
    return {"type": "FeatureCollection", "features": feats}


def _error(r: httpx.Response, status: int, code: str | None = None, text: str = "") -> str:
    """Assert the JSON error shape, the status (never 5xx) and a useful message."""
    assert r.status_code == status, r.text
    assert r.status_code < 500
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "\n" not in message
    assert "Traceback" not in message
    if code is not None:
        assert body["error"]["type"] == code, body
    assert text.lower() in message.lower(), message
    return message


def _class_of(feature: dict[str, Any]) -> str:
    return str(feature["properties"]["classification"]["name"])


def _with_class(feature: dict[str, Any], name: str) -> dict[str, Any]:
    out = json.loads(json.dumps(feature))
    out["properties"]["classification"] = {"name": name, "color": [1, 2, 3]}
    return out


def _box_annotation(x: float, y: float, side: float, name: str) -> dict[str, Any]:
    ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def _wait_job(
    client: TestClient, job_id: str, *, until: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    until = until or (lambda j: j["state"] in ("done", "failed", "cancelled"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = client.get(f"{API}/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there: {job}")


# --- health, docs, helpers ----------------------------------------------------------------------
def test_health_and_docs(client: TestClient, search: SimSearch) -> None:
    r = client.get(f"{API}/health")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "protocol": PROTOCOL_VERSION,
        "version": __version__,
        "backbone": "resnet18-l3",
        "weights": search.extractor.weights.description,
        "device": "cpu",
        "auth_required": False,
    }
    spec = client.get(f"{API}/openapi.json").json()
    assert {
        f"{API}/suggest",
        f"{API}/jobs/embed",
        f"{API}/jobs/train",
        f"{API}/jobs/predict",
        f"{API}/jobs/{{job_id}}",
    } <= set(spec["paths"])
    assert "swagger" in client.get(f"{API}/docs").text.lower()
    # the protocol header: the same version or none is fine
    assert client.get(f"{API}/health", headers={PROTOCOL_HEADER: "1"}).status_code == 200


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "localhost", "LOCALHOST.", "::1", "[::1]"):
        assert is_loopback(host), host
    assert is_loopback("::ffff:127.0.0.1")
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "example.org", "localhost.example.org"):
        assert not is_loopback(host), host


def test_local_path_decodes_file_uris() -> None:
    assert local_path("/data/a b.svs") == "/data/a b.svs"
    assert local_path("/data/100%.svs") == "/data/100%.svs"  # a path is not decoded
    assert local_path("file:/data/a%20b%23c.svs") == "/data/a b#c.svs"  # QuPath on Linux/macOS
    assert local_path("file:///data/%C3%A9.svs") == "/data/\u00e9.svs"
    assert local_path("file://localhost/data/a.svs") == "/data/a.svs"
    assert local_path("file:/C:/Users/me/my%20slide.svs") == "C:/Users/me/my slide.svs"  # Windows
    if os.name == "nt":
        assert local_path("file://server/share/a.svs") == "//server/share/a.svs"  # UNC
    else:
        with pytest.raises(ConfigError, match="another machine"):
            local_path("file://server/share/a.svs")
    for bad in ("http://host/a.svs", "file:///a.svs?x=1", "file:///%FF", "file://", ""):
        with pytest.raises(ConfigError):
            local_path(bad)
    assert local_path("C:\\slides\\a.svs") == "C:\\slides\\a.svs"  # a Windows path, not a URI


# --- the review loop ----------------------------------------------------------------------------
def test_review_loop_over_http(
    client: TestClient, slide: SyntheticSlide, search: SimSearch, root: Path
) -> None:
    size = (slide.width, slide.height)
    session = root / "sessions" / "exp 1"
    body = {
        "image": str(slide.path),
        "annotations": _prototypes(slide),
        "session": str(session),
        "thresholds": {"ring": 0.4},
        "background": 2,
    }
    r = client.post(f"{API}/suggest", json=body, headers={PROTOCOL_HEADER: "1"})
    assert r.status_code == 200, r.text
    doc = r.json()
    summary = doc.pop("summary")
    validate_feature_collection(doc, image_size_l0=size)
    assert summary["thresholds"] == {"ring": 0.4, "cluster": 0.5, "stripes": 0.5}
    assert summary["image"] == str(slide.path.resolve())
    assert summary["session"] == str(session)
    features = doc["features"]
    found = [f for f in features if _class_of(f) != BACKGROUND_CLASS]
    bg = [f for f in features if _class_of(f) == BACKGROUND_CLASS]
    assert found and len(bg) == 4

    # warm: the same image again, with the session's prototypes, embeds no tile
    shapes: list[tuple[int, ...]] = []
    hook = search.extractor.trunk.register_forward_pre_hook(
        lambda _m, args: shapes.append(tuple(args[0].shape))
    )
    try:
        r = client.post(f"{API}/suggest", json={"image": str(slide.path), "session": str(session)})
    finally:
        hook.remove()
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["summary"]["seconds_embed"] < 1.0
    tile_input = search.settings.tile_size + 2 * search.extractor.spec.halo
    assert shapes and all(s[-1] < tile_input for s in shapes), shapes  # prototypes only

    # review in QuPath: reject a suggestion, keep one background candidate, reject another
    reviewed = [_with_class(found[0], REJECTED_CLASS), bg[0], _with_class(bg[1], REJECTED_CLASS)]
    r = client.post(
        f"{API}/review",
        json={
            "image": slide.path.as_uri(),
            "annotations": {"type": "FeatureCollection", "features": reviewed},
            "session": str(session),
        },
    )
    assert r.status_code == 200, r.text
    report = r.json()
    assert (report["rejected"], report["background"], report["not_background"]) == (1, 1, 1)
    assert report["conflicts"] == [] and report["image"] == str(slide.path.resolve())

    r = client.post(
        f"{API}/background", json={"image": str(slide.path), "session": str(session), "n": 3}
    )
    assert r.status_code == 200, r.text
    bg_doc = r.json()
    bg_doc.pop("summary")
    validate_feature_collection(bg_doc, image_size_l0=size)
    assert len(bg_doc["features"]) == 6
    assert {_class_of(f) for f in bg_doc["features"]} == {BACKGROUND_CLASS}

    r = client.get(f"{API}/session", params={"dir": str(session)})
    assert r.status_code == 200, r.text
    shown = r.json()
    assert set(shown["classes"]) == {"ring", "cluster", "stripes"}
    assert shown["classes"][_class_of(found[0])]["negatives"] == 1
    assert (shown["background"], shown["not_background"]) == (1, 1)
    assert shown["reviewed_images"] == [str(slide.path.resolve())]
    assert shown["suggestions_sent"] == len(features) + len(again["features"]) + 6


def test_suggest_floor_heatmap_and_review_thresholds_over_http(
    client: TestClient, slide: SyntheticSlide, root: Path
) -> None:
    import base64
    import io

    import numpy as np
    from PIL import Image

    from simsearch_wsi.review.session import SESSION_FILE

    session = root / "sessions" / "loop"
    body = {"image": str(slide.path), "annotations": _prototypes(slide), "session": str(session)}
    r = client.post(f"{API}/suggest", json={**body, "floor": 0.1, "heatmap": True})
    assert r.status_code == 200, r.text
    doc = r.json()
    summary, heat = doc["summary"], doc["heatmap"]
    assert summary["floor"] == 0.1
    sims = [f["properties"]["measurements"]["similarity"] for f in doc["features"]]
    assert min(sims) < 0.5 <= max(sims) and min(sims) > 0.1  # below the thresholds, to the floor
    assert set(heat["png_base64"]) == set(summary["thresholds"])
    for data in heat["png_base64"].values():
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.size == (heat["width"], heat["height"]) and img.mode == "LA"
    x0 = heat["origin_l0"][0]
    assert x0 >= 0 and x0 + heat["width"] * heat["downsample"] <= slide.width + heat["downsample"]
    # a coarser heat map on request, the same maxima
    r = client.post(
        f"{API}/suggest",
        json={**body, "heatmap": True, "heatmap_downsample": 3 * heat["downsample"]},
    )
    assert r.status_code == 200, r.text
    coarse = r.json()["heatmap"]
    assert coarse["downsample"] == 3 * heat["downsample"] and coarse["width"] == -(
        -heat["width"] // 3
    )
    for name, data in coarse["png_base64"].items():
        fine = np.asarray(Image.open(io.BytesIO(base64.b64decode(heat["png_base64"][name]))))
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        assert img[..., 0].max() == fine[..., 0].max()
    for bad in ({"floor": 1.5}, {"heatmap_downsample": 0}):
        _error(client.post(f"{API}/suggest", json={**body, **bad}), 422)

    # review: an unknown class's threshold is refused, and nothing is saved
    before = (session / SESSION_FILE).read_bytes()
    name = next(iter(summary["thresholds"]))
    review = {"image": str(slide.path), "annotations": [], "session": str(session)}
    r = client.post(f"{API}/review", json={**review, "thresholds": {name: 0.3, "nope": 0.2}})
    _error(r, 400, text="unknown class")
    assert (session / SESSION_FILE).read_bytes() == before
    r = client.post(f"{API}/review", json={**review, "thresholds": {name: 0.3}})
    assert r.status_code == 200, r.text
    assert Session.open(session).thresholds[name] == pytest.approx(0.3)


def test_file_uri_input(client: TestClient, slide: SyntheticSlide) -> None:
    """QuPath sends getURIs(): file:/... (Java's URI.toString) or file:///... percent-encoded."""
    protos = _prototypes(slide)
    uris = [slide.path.as_uri(), "file:" + slide.path.as_uri().removeprefix("file://")]
    assert "%20" in uris[0]
    for uri in uris:
        r = client.post(f"{API}/suggest", json={"image": uri, "annotations": protos})
        assert r.status_code == 200, r.text
        assert r.json()["summary"]["image"] == str(slide.path.resolve())
        assert r.json()["summary"]["session"] is None


# --- jobs ---------------------------------------------------------------------------------------
def test_embed_job(client: TestClient, slide: SyntheticSlide) -> None:
    r = client.post(
        f"{API}/jobs/embed", json={"images": [slide.path.as_uri()], "patch_size_px": 64}
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["location"] == f"{API}/jobs/{job_id}"
    job = _wait_job(client, job_id)
    assert job["state"] == "done", job
    assert job["kind"] == "embed" and job["error"] is None
    (result,) = job["result"]["images"]
    assert result["image"] == str(slide.path.resolve())
    assert Path(result["feature_cache"]).is_dir()
    assert 0 < result["tiles_embedded"] <= result["tiles_total"]
    assert job["progress"]["stage"].endswith("done")
    listed = client.get(f"{API}/jobs").json()["jobs"]
    assert job_id in [j["id"] for j in listed]
    _error(client.delete(f"{API}/jobs/{job_id}"), 409, "job_finished", "already done")
    _error(client.get(f"{API}/jobs/nope"), 404, "job_not_found", "no job 'nope'")
    _error(client.delete(f"{API}/jobs/nope"), 404, "job_not_found")


def test_cancel_jobs(extractor: FeatureExtractor, slide: SyntheticSlide, root: Path) -> None:
    """A queued job is cancelled at once; a running embed stops at its next progress report
    and leaves a resumable partial cache entry."""
    cache = root / "cancel-cache"
    search = SimSearch(
        extractor, FeatureCache(cache), settings=SearchSettings(tile_size=256, batch_size=1)
    )
    started, release = threading.Event(), threading.Event()
    original = search.embed

    def slow_embed(image: Any, patch: float, **kwargs: Any) -> Any:
        report = kwargs.pop("progress")

        def progress(stage: str, done: int, total: int) -> None:
            report(stage, done, total)  # raises once the job is cancelled
            started.set()
            release.wait(30)

        return original(image, patch, progress=progress, **kwargs)

    search.embed = slow_embed  # type: ignore[method-assign]
    body = {"images": [str(slide.path)], "patch_size_px": 64}
    with _client(create_app(search, allowed_roots=[root], job_workers=1)) as client:
        running = client.post(f"{API}/jobs/embed", json=body).json()["job_id"]
        assert started.wait(30)
        queued = client.post(f"{API}/jobs/embed", json=body).json()["job_id"]
        assert client.get(f"{API}/jobs/{queued}").json()["state"] == "queued"
        r = client.delete(f"{API}/jobs/{queued}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = client.delete(f"{API}/jobs/{running}")
        assert r.status_code == 202 and r.json()["state"] == "running"
        assert r.json()["cancel_requested"] is True
        release.set()
        job = _wait_job(client, running)
        assert job["state"] == "cancelled" and job["error"] is None and job["result"] is None
        assert len(list(cache.glob("*.partial"))) == 1  # resumable
        assert not list(cache.glob("*.zarr"))
        assert client.delete(f"{API}/jobs/{running}").status_code == 200  # idempotent
        del search.embed  # type: ignore[method-assign]  # back to the real method
        again = client.post(f"{API}/jobs/embed", json=body).json()["job_id"]
        assert _wait_job(client, again)["state"] == "done"
        assert len(list(cache.glob("*.zarr"))) == 1 and not list(cache.glob("*.partial"))
        states = {j["id"]: j["state"] for j in client.get(f"{API}/jobs").json()["jobs"]}
        assert states == {running: "cancelled", queued: "cancelled", again: "done"}


def test_engine_runs_one_thing_at_a_time(
    extractor: FeatureExtractor, slide: SyntheticSlide, root: Path
) -> None:
    """An embed job and a suggest at the same time never run the trunk concurrently."""
    search = SimSearch(
        extractor, FeatureCache(root / "lock-cache"), settings=SearchSettings(tile_size=256)
    )
    active, peak = [0], [0]
    guard = threading.Lock()

    def enter(_m: Any, _a: Any) -> None:
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)

    def leave(_m: Any, _a: Any, _o: Any) -> None:
        with guard:
            active[0] -= 1

    # 128-px prototypes: a coarse analysis scale keeps this test cheap
    big = [
        _box_annotation(x, y, 128, name)
        for x, y, name in ((100, 100, "a"), (600, 300, "b"), (300, 500, "a"))
    ]
    hooks = [
        extractor.trunk.register_forward_pre_hook(enter),
        extractor.trunk.register_forward_hook(leave),
    ]
    try:
        with _client(create_app(search, allowed_roots=[root])) as c:
            job = c.post(f"{API}/jobs/embed", json={"images": [str(slide.path)]}).json()
            r = c.post(f"{API}/suggest", json={"image": str(slide.path), "annotations": big})
            assert r.status_code == 200, r.text
            assert _wait_job(c, job["job_id"])["state"] == "done"
    finally:
        for h in hooks:
            h.remove()
    assert peak[0] == 1


# --- training jobs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_slide(root: Path) -> SyntheticSlide:
    folder = root / "train slides"
    folder.mkdir()
    return make_synthetic_slide(
        folder / "slide 2.tiff", width=1024, height=768, n_per_class=6, seed=0
    )


def _background_boxes(slide: SyntheticSlide, side: float, n: int) -> list[BoxL0]:
    """``n`` boxes spread over the slide, each well away from every object."""
    margin = 16.0
    objects = [
        BoxL0(o.x_l0 - margin, o.y_l0 - margin, o.width_l0 + 2 * margin, o.height_l0 + 2 * margin)
        for o in slide.objects
    ]
    free = [
        BoxL0(float(x), float(y), side, side)
        for y in range(8, int(slide.height - side), 48)
        for x in range(8, int(slide.width - side), 48)
    ]
    free = [b for b in free if not any(b.intersects(o) for o in objects)]
    assert len(free) >= n
    return free[:: len(free) // n][:n]


def _training_session(folder: Path, slide: SyntheticSlide) -> Session:
    """Per class a prototype, positives and a negative (another class's object, rejected for
    this one); confirmed background patches."""
    session = Session.create(folder)
    for k, name in enumerate(slide.classes):
        first, *rest = slide.objects_of(name)
        session.add_prototypes(slide.path, [Prototype(name, first.box)])
        for obj in rest:
            session.add_decision(slide.path, "positive", class_name=name, box=obj.box)
        other = slide.objects_of(slide.classes[(k + 1) % len(slide.classes)])[0]
        session.add_decision(slide.path, "negative", class_name=name, box=other.box)
    assert session.patch_size_l0 is not None
    for box in _background_boxes(slide, max(session.patch_size_l0), 8):
        session.add_decision(slide.path, "background", class_name=BACKGROUND_CLASS, box=box)
    session.save()
    return session


@pytest.mark.usefixtures("tiny_training")
def test_train_job(client: TestClient, train_slide: SyntheticSlide, root: Path) -> None:
    session = _training_session(root / "train" / "exp 1", train_slide)
    out = root / "models" / "exp 1.zip"
    # the paper's model (the default ``auto`` trains the slower ensemble from 5 labels per class)
    body = {"session": session.root.as_uri(), "out": str(out), "seed": 3, "head_input": "trunk"}
    r = client.post(f"{API}/jobs/train", json=body, headers={PROTOCOL_HEADER: "1"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["location"] == f"{API}/jobs/{job_id}"
    stages: set[str] = set()

    def finished(job: dict[str, Any]) -> bool:
        stages.add(job["progress"]["stage"])
        return job["state"] in ("done", "failed", "cancelled")

    job = _wait_job(client, job_id, until=finished)
    assert job["state"] == "done" and job["error"] is None, job
    assert job["kind"] == "train"
    assert job["params"] == {
        "session": str(session.root),
        "out": str(out),
        "strategy": DEFAULT_STRATEGY,
        "preset": "fast",
        "head_input": "trunk",
        "similarity_expert": 0.0,
        "noisy_images": [],
        "seed": 3,
    }
    assert job["progress"] == {"stage": "done", "done": 1, "total": 1}
    # the library's progress text comes through as it is
    assert any(
        s.startswith(("selflearn | epoch 1/1 loss", "supcon | epoch 1/1 loss")) for s in stages
    )

    result = job["result"]
    classes = [*session.classes, BACKGROUND_CLASS]
    assert result["model"] == str(out) and out.is_file()
    assert result["classes"] == classes
    assert (result["strategy"], result["preset"]) == (DEFAULT_STRATEGY, "fast")
    assert result["head_input"] == "trunk"  # what was trained, as the bundle's selection says
    assert set(result["thresholds"]) == set(classes)
    assert all(0 < t < 1 for t in result["thresholds"].values())
    metrics = result["metrics"]
    for key in ("validation", "baseline_validation"):
        assert set(metrics[key]) == {"n", "accuracy", "balanced_accuracy"}
        assert metrics[key]["n"] > 0 and 0 <= metrics[key]["balanced_accuracy"] <= 1
    assert list(metrics["stages"]) == ["selflearn", "supcon", "linear"]
    for name in ("selflearn", "supcon"):
        assert metrics["stages"][name]["seconds"] > 0 and metrics["stages"][name]["views_per_s"] > 0
    assert metrics["counts"]["clean"] == {c: 6 for c in session.classes} | {BACKGROUND_CLASS: 8}
    assert metrics["counts"]["negatives"] == {c: 1 for c in session.classes} | {BACKGROUND_CLASS: 0}
    assert isinstance(result["notes"], list) and all(isinstance(n, str) for n in result["notes"])
    assert any("random" in n for n in result["notes"])
    assert result["seconds"] > 0
    assert len(json.dumps(result)) < 4000  # the summary; the full metrics are in the bundle

    bundle = load_bundle(out)
    assert list(bundle.classes) == classes
    assert bundle.thresholds == result["thresholds"]
    assert bundle.strategy == DEFAULT_STRATEGY
    assert (
        bundle.metrics["validation"]["balanced_accuracy"]
        == (metrics["validation"]["balanced_accuracy"])
    )
    assert bundle.provenance["session"] == str(session.root)


def test_train_job_waits_for_the_engine_and_cancels(
    client: TestClient, train_slide: SyntheticSlide, root: Path
) -> None:
    """A train job holds the engine lock like the other engine work; cancelling a job that
    waits for it stops it as soon as it gets the lock, and writes no model."""
    session = _training_session(root / "train" / "exp wait", train_slide)
    engine: threading.Lock = client.app.state.locks.engine  # type: ignore[attr-defined]
    with engine:
        job_id = client.post(f"{API}/jobs/train", json={"session": str(session.root)}).json()[
            "job_id"
        ]
        job = _wait_job(
            client, job_id, until=lambda j: j["progress"]["stage"] == "waiting for the engine"
        )
        time.sleep(0.2)
        assert client.get(f"{API}/jobs/{job_id}").json()["state"] == "running"
        r = client.delete(f"{API}/jobs/{job_id}")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
    job = _wait_job(client, job_id)
    assert job["state"] == "cancelled" and job["error"] is None and job["result"] is None
    assert job["params"]["out"] == str(session.root / "model.zip")  # the default
    assert job["params"]["head_input"] == DEFAULT_HEAD_INPUT == "auto"  # the asked head, shown
    assert job["params"]["similarity_expert"] == 0.0  # off by default, shown
    assert not (session.root / "model.zip").exists()


def test_a_train_job_refuses_a_similarity_expert_without_an_ensemble(
    client: TestClient, train_slide: SyntheticSlide, root: Path
) -> None:
    """``similarity_expert`` is a third expert of the ensemble: asked with a head input that
    trains none it is refused at once (400, one line), not silently dropped in the job."""
    session = _training_session(root / "train" / "exp expert", train_slide)
    body = {"session": str(session.root), "head_input": "search", "similarity_expert": 0.5}
    message = _error(client.post(f"{API}/jobs/train", json=body), 400, "ConfigError")
    assert "similarity_expert" in message and "'search'" in message
    assert client.get(f"{API}/jobs").json()["jobs"] == []  # no job was started


def test_train_job_cancelled_while_training(
    client: TestClient,
    train_slide: SyntheticSlide,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelling stops training at its next progress report; no model is written."""
    started, release = threading.Event(), threading.Event()

    def slow_train(*args: Any, **kwargs: Any) -> Any:
        report = kwargs.pop("progress")

        def progress(stage: str, done: int, total: int) -> None:
            report(stage, done, total)
            started.set()
            release.wait(30)
            report(stage, done, total)  # raises once the job is cancelled

        return train_session(*args, progress=progress, **kwargs)

    monkeypatch.setattr("simsearch_wsi.server.routes.train.train_session", slow_train)
    session = _training_session(root / "train" / "exp cancel", train_slide)
    out = root / "models" / "cancelled.zip"
    body = {"session": str(session.root), "out": str(out), "strategy": "pos"}
    job_id = client.post(f"{API}/jobs/train", json=body).json()["job_id"]
    assert started.wait(30)
    r = client.delete(f"{API}/jobs/{job_id}")
    assert r.status_code == 202 and r.json()["state"] == "running"
    release.set()
    job = _wait_job(client, job_id)
    assert job["state"] == "cancelled" and job["error"] is None and job["result"] is None
    assert job["params"]["strategy"] == "pos"
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_train_job_bad_requests(
    client: TestClient, train_slide: SyntheticSlide, root: Path, outside: Path
) -> None:
    """Every mistake is answered before anything is queued."""
    good = _training_session(root / "train" / "exp checks", train_slide).root
    empty = Session.create(root / "train" / "empty").root
    moved = Session.create(root / "train" / "moved slide")
    moved.add_prototypes(root / "gone.tiff", [Prototype("ring", BoxL0(10, 10, 40, 40))])
    moved.save()
    elsewhere = Session.create(root / "train" / "slide elsewhere")
    elsewhere.add_prototypes(outside / "secret.tiff", [Prototype("ring", BoxL0(10, 10, 40, 40))])
    elsewhere.save()
    (root / "train" / "a folder.zip").mkdir()
    s = str(good)
    post = client.post
    route = f"{API}/jobs/train"
    cases: list[tuple[httpx.Response, int, str | None, str]] = [
        (
            post(route, json={"session": s, "strategy": "pos+magic"}),
            422,
            "validation_error",
            f"strategy: unknown strategy 'pos+magic'; use one of {', '.join(STRATEGIES)}",
        ),
        (
            post(route, json={"session": s, "preset": "slow"}),
            422,
            "validation_error",
            "preset: unknown preset 'slow'; use one of quick, fast, paper",
        ),
        (post(route, json={"session": s, "seed": -1}), 422, None, "seed"),
        (post(route, json={"session": s, "seed": "1"}), 422, None, "seed"),
        (post(route, json={"session": s, "seed": 1.5}), 422, None, "seed"),
        (post(route, json={"session": s, "epochs": 1}), 422, None, "epochs: extra inputs"),
        (post(route, json={"out": str(root / "m.zip")}), 422, None, "session: field required"),
        (post(route, json={"session": ""}), 422, None, "session"),
        (post(route, json={"session": s, "noisy_images": "x"}), 422, None, "noisy_images"),
        (
            post(route, json={"session": str(outside)}),
            403,
            "forbidden_path",
            f"session {outside} is outside the folders",
        ),
        (
            post(route, json={"session": s, "out": str(outside / "m.zip")}),
            403,
            "forbidden_path",
            "model",
        ),
        (
            post(route, json={"session": s, "noisy_images": [str(outside / "n.tiff")]}),
            403,
            "forbidden_path",
            "noisy image",
        ),
        (
            post(route, json={"session": str(elsewhere.root)}),
            403,
            "forbidden_path",
            f"session image {outside / 'secret.tiff'}",
        ),
        (
            post(route, json={"session": str(root / "train" / "no such session")}),
            400,
            "ConfigError",
            "not a review session",
        ),
        (post(route, json={"session": str(empty)}), 400, "ConfigError", "no prototypes"),
        (
            post(route, json={"session": s, "out": str(train_slide.path)}),
            400,
            "ConfigError",
            "ending in .zip",
        ),
        (
            post(route, json={"session": s, "out": str(root / "train" / "a folder.zip")}),
            400,
            "ConfigError",
            "is a folder",
        ),
        (
            post(route, json={"session": s, "noisy_images": [str(root / "missing.tiff")]}),
            404,
            "ImageNotFoundError",
            "missing.tiff",
        ),
        (
            post(route, json={"session": str(moved.root)}),
            404,
            "ImageNotFoundError",
            "gone.tiff",
        ),
    ]
    for r, status, code, text in cases:
        _error(r, status, code, text)
    assert client.get(f"{API}/jobs").json()["jobs"] == []
    assert not (good / "model.zip").exists()


# --- predict jobs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predict_inputs(root: Path, small_slides: Any, tiny_bundle: Path) -> tuple[Path, Path]:
    """A small slide and an untrained model bundle inside the allowed folder."""
    folder = root / "predict"
    folder.mkdir()
    image = shutil.copy(small_slides[0].path, folder / "small 0.tiff")
    model = shutil.copy(tiny_bundle, folder / "tiny model.zip")
    return Path(image), Path(model)


def test_predict_job(client: TestClient, predict_inputs: tuple[Path, Path], root: Path) -> None:
    image, model = predict_inputs
    out = root / "predict" / "out 1"
    body = {
        "images": [image.as_uri()],
        "model": str(model),
        "out": str(out),
        "thresholds": {"cluster": 0.35},
        "min_area_um2": 10,
    }
    r = client.post(f"{API}/jobs/predict", json=body, headers={PROTOCOL_HEADER: "1"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["location"] == f"{API}/jobs/{job_id}"
    stages: set[str] = set()

    def finished(job: dict[str, Any]) -> bool:
        stages.add(job["progress"]["stage"])
        return job["state"] in ("done", "failed", "cancelled")

    job = _wait_job(client, job_id, until=finished)
    assert job["state"] == "done" and job["error"] is None, job
    assert job["kind"] == "predict"
    assert job["params"] == {
        "images": [str(image)],
        "model": str(model),
        "out": str(out),
        "thresholds": {"cluster": 0.35},
        "simplify_px": 1.0,
        "min_area_um2": 10.0,
        "write_back": False,
        "force": False,
    }
    assert job["progress"] == {"stage": "done", "done": 1, "total": 1}
    assert any(s.startswith("image 1/1: ") for s in stages), stages  # the library's stages

    result = job["result"]
    classes = ["ring", "cluster", "stripes", "background"]
    assert result["model"] == str(model) and result["out"] == str(out)
    assert result["classes"] == classes
    assert result["thresholds"] == {c: 0.35 if c == "cluster" else 0.3 for c in classes}
    assert result["quantification"] == str(out / "quantification.csv")
    assert (out / "quantification.csv").is_file()
    (one,) = result["images"]
    assert one["image"] == str(image) and one["stem"] == "small 0" and one["reused"] is False
    assert one["outputs"] == {
        "geojson": str(out / "small 0.geojson"),
        "ome_zarr": str(out / "small 0.ome.zarr"),
        "overlay": str(out / "small 0_overlay.png"),
        "summary": str(out / "small 0.predict.json"),
    }
    assert all(Path(p).exists() for p in one["outputs"].values())
    assert set(one["n_detections"]) == {"ring", "cluster", "stripes"}
    doc = json.loads((out / "small 0.geojson").read_text())
    validate_feature_collection(doc)
    kinds = [f["properties"]["objectType"] for f in doc["features"]]
    assert kinds.count("detection") == sum(one["n_detections"].values()) > 0
    assert "annotation" in kinds
    assert result["seconds"] > 0

    # the same request again: the outputs are kept, not recomputed
    again = _wait_job(client, client.post(f"{API}/jobs/predict", json=body).json()["job_id"])
    assert again["state"] == "done", again
    (kept,) = again["result"]["images"]
    assert kept["reused"] is True
    assert {k: v for k, v in kept.items() if k != "reused"} == {
        k: v for k, v in one.items() if k != "reused"
    }


def test_predict_job_runs_beside_the_engine_and_cancels(
    client: TestClient,
    predict_inputs: tuple[Path, Path],
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A predict job does not wait for the engine lock; cancelling it stops it at the next
    progress report of the library, before the table is written."""
    started, release = threading.Event(), threading.Event()

    def slow_predict(targets: Any, model: Any, **kwargs: Any) -> Any:
        progress = kwargs["progress"]
        progress("images", 0, len(targets))
        started.set()
        release.wait(30)
        progress("embedding tiles", 1, 2)  # raises once the job is cancelled
        raise AssertionError("not cancelled")

    monkeypatch.setattr("simsearch_wsi.server.routes.predict.predict_images", slow_predict)
    image, model = predict_inputs
    out = root / "predict" / "cancelled"
    body = {"images": [str(image)], "model": str(model), "out": str(out)}
    engine: threading.Lock = client.app.state.locks.engine  # type: ignore[attr-defined]
    with engine:
        job_id = client.post(f"{API}/jobs/predict", json=body).json()["job_id"]
        assert started.wait(30)
    r = client.delete(f"{API}/jobs/{job_id}")
    assert r.status_code == 202 and r.json()["state"] == "running"
    release.set()
    job = _wait_job(client, job_id)
    assert job["state"] == "cancelled" and job["error"] is None and job["result"] is None
    assert not (out / "quantification.csv").exists()


def test_predict_job_bad_requests(
    client: TestClient, predict_inputs: tuple[Path, Path], root: Path, outside: Path
) -> None:
    """Every mistake is answered before anything is queued."""
    image, model = predict_inputs
    folder = root / "predict"
    twin = folder / "twin"
    twin.mkdir(exist_ok=True)
    shutil.copy(image, twin / image.name)
    not_a_folder = folder / "a file"
    not_a_folder.write_text("x")
    good = {"images": [str(image)], "model": str(model), "out": str(folder / "out bad")}
    route = f"{API}/jobs/predict"

    def post(**change: Any) -> httpx.Response:
        r: httpx.Response = client.post(route, json={**good, **change})
        return r

    classes = "['ring', 'cluster', 'stripes', 'background']"
    cases: list[tuple[httpx.Response, int, str | None, str]] = [
        (
            post(images=[str(outside / "secret.tiff")]),
            403,
            "forbidden_path",
            f"image {outside / 'secret.tiff'} is outside the folders",
        ),
        (post(model=str(outside / "m.zip")), 403, "forbidden_path", f"model {outside}"),
        (post(out=str(outside / "out")), 403, "forbidden_path", f"output folder {outside}"),
        (
            post(thresholds={"cluster": 0.5, "tumour": 0.5}),
            400,
            "ConfigError",
            f"thresholds for unknown class(es) ['tumour']; the model's classes are {classes}",
        ),
        (
            post(thresholds={"ring": 1.5}),
            422,
            "validation_error",
            "thresholds: ring=1.5: give a probability in [0, 1]",
        ),
        (
            post(model=str(folder / "missing.zip")),
            404,
            "BundleNotFoundError",
            f"{folder / 'missing.zip'}: model bundle not found; check the path",
        ),
        (post(model=str(image)), 400, "BundleError", str(image)),
        (
            post(images=[str(folder / "missing.tiff")]),
            404,
            "ImageNotFoundError",
            "missing.tiff: no such file",
        ),
        (post(out=str(not_a_folder)), 400, "ConfigError", "exists and is not a folder"),
        (
            post(images=[str(image), str(twin / image.name)]),
            400,
            "ConfigError",
            "would both write small 0.*",
        ),
        (post(images=[]), 422, "validation_error", "images"),
        (post(simplify_px=-1), 422, "validation_error", "simplify_px"),
        (post(device="cuda"), 422, "validation_error", "device: extra inputs"),
        (client.post(route, json={"images": [str(image)]}), 422, None, "model: field required"),
    ]
    for r, status, code, text in cases:
        _error(r, status, code, text)
    assert client.get(f"{API}/jobs").json()["jobs"] == []
    assert not (folder / "out bad").exists()


# --- security -----------------------------------------------------------------------------------
def test_paths_outside_the_allowed_roots(
    client: TestClient, slide: SyntheticSlide, root: Path, outside: Path
) -> None:
    secret = outside / "secret.tiff"
    shutil.copy(slide.path, secret)
    (root / "link.tiff").symlink_to(secret)
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    protos = _prototypes(slide)
    for image in (
        str(secret),
        secret.as_uri(),
        str(root / "link.tiff"),  # a symlink inside the root pointing outside
        str(root / "linkdir" / "secret.tiff"),
        f"{root}/../{outside.name}/secret.tiff",
        str(outside / "missing.tiff"),  # 403 before 404: no probing outside the roots
    ):
        r = client.post(f"{API}/suggest", json={"image": image, "annotations": protos})
        message = _error(r, 403, "forbidden_path", "outside the folders")
        assert str(root) in message
    message = _error(
        client.post(f"{API}/suggest", json={"image": str(root / "link.tiff"), "annotations": {}}),
        403,
    )
    assert f"resolves to {secret}" in message
    checks = [
        client.post(
            f"{API}/suggest",
            json={"image": str(slide.path), "annotations": protos, "session": str(outside / "s")},
        ),
        client.post(
            f"{API}/review",
            json={"image": str(slide.path), "annotations": protos, "session": str(outside)},
        ),
        client.post(f"{API}/background", json={"image": str(secret), "session": str(root)}),
        client.get(f"{API}/session", params={"dir": str(outside)}),
        client.post(f"{API}/jobs/embed", json={"images": [str(slide.path), str(secret)]}),
    ]
    for r in checks:
        _error(r, 403, "forbidden_path", str(outside))
    assert not (outside / "s").exists()
    assert client.get(f"{API}/jobs").json()["jobs"] == []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_session_file_cannot_name_images_outside_the_roots(
    client: TestClient,
    slide: SyntheticSlide,
    root: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 31: a session.json inside an allowed folder naming a prototype image outside it
    made /suggest and /background open and embed that image (200). Now 403, before anything
    is opened, and the session file is unchanged."""
    import simsearch_wsi.io
    import simsearch_wsi.server.paths
    import simsearch_wsi.server.routes.review

    secret = outside / "escape.tiff"
    shutil.copy(slide.path, secret)
    (root / "escape-link.tiff").symlink_to(secret)
    opened: list[Path] = []
    real_open = simsearch_wsi.io.open_image

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).resolve())
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(simsearch_wsi.io, "open_image", spy)
    monkeypatch.setattr(simsearch_wsi.server.paths, "open_image", spy)
    monkeypatch.setattr(simsearch_wsi.server.routes.review, "open_image", spy)
    for n, named in enumerate((secret, root / "escape-link.tiff")):
        folder = root / f"escape {n}"
        session = Session.create(folder)
        session.add_prototypes(slide.path, [Prototype("ring", BoxL0(100, 100, 48, 48))])
        session.save()
        file = folder / "session.json"
        doc = json.loads(file.read_text())
        doc["prototypes"][0]["image"] = str(named)  # as a hand-edited or copied file may
        file.write_text(json.dumps(doc))
        before = _sha(file), _sha(secret)
        requests = [
            client.post(f"{API}/suggest", json={"image": str(slide.path), "session": str(folder)}),
            client.post(
                f"{API}/suggest",
                json={
                    "image": str(slide.path),
                    "session": str(folder),
                    "annotations": _prototypes(slide),
                },
            ),
            client.post(
                f"{API}/background", json={"image": str(slide.path), "session": str(folder)}
            ),
        ]
        for r in requests:
            message = _error(r, 403, "forbidden_path", "outside the folders")
            assert str(secret) in message and f"named by {file}" in message
        assert (_sha(file), _sha(secret)) == before
    assert secret not in opened and slide.path.resolve() not in opened


def test_review_over_http_refuses_a_stray_rectangle(
    client: TestClient, slide: SyntheticSlide, root: Path
) -> None:
    """Issue 31: review saved a rectangle far outside the image as a prototype; now it is
    refused as suggest refuses it, and the session stays byte-identical."""
    folder = root / "stray"
    session = Session.create(folder)
    session.add_prototypes(slide.path, [Prototype("ring", BoxL0(100, 100, 48, 48))])
    session.save()
    file = folder / "session.json"
    before = _sha(file)
    for feature, text in (
        (_box_annotation(50_000, 50_000, 48, "ring"), "is not inside the image (1024x768)"),
        (_box_annotation(1e308, 10, 48, "ring"), "at (1e+308, 10)"),
        (_box_annotation(10, 10, 48, REJECTED_CLASS), "is reserved"),
    ):
        r = client.post(
            f"{API}/review",
            json={
                "image": str(slide.path),
                "session": str(folder),
                "annotations": [_box_annotation(200, 200, 48, "ring"), feature],
            },
        )
        message = _error(r, 400, "ConfigError", text)
        assert message.startswith("annotations: prototype 1") and len(message) < 400
    assert _sha(file) == before


def test_jobs_never_write_over_their_inputs(
    client: TestClient, predict_inputs: tuple[Path, Path], root: Path
) -> None:
    """A predict job whose output folder is its model, or lies inside an OME-Zarr input, is
    refused before it is queued."""
    image, model = predict_inputs
    before = _sha(model), _sha(image)
    r = client.post(
        f"{API}/jobs/predict",
        json={"images": [str(image)], "model": str(model), "out": str(model)},
    )
    _error(r, 400, "OutputOverwritesInputError", f"is the input model {model}")
    r = client.post(
        f"{API}/jobs/predict",
        json={"images": [str(image)], "model": str(model), "out": str(image.parent)},
    )
    assert r.status_code == 202  # the folder holding the inputs is fine: no name clashes
    _wait_job(client, r.json()["job_id"])
    assert (_sha(model), _sha(image)) == before


def test_token(search: SimSearch, root: Path) -> None:
    app = create_app(search, allowed_roots=[root], token="s3cret-token")
    with _client(app, base_url="http://testserver") as client:  # any Host with a token
        health = client.get(f"{API}/health")
        assert health.status_code == 200 and health.json()["auth_required"] is True
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer s3cret-token-and-more"},
            {"Authorization": "Basic s3cret-token"},
            {"Authorization": "s3cret-token"},
        ):
            r = client.get(f"{API}/jobs", headers=headers)
            _error(r, 401, "unauthorized", "Authorization: Bearer")
            assert r.headers["www-authenticate"] == "Bearer"
        _error(client.post(f"{API}/suggest", json={"image": "x"}), 401)
        _error(client.get(f"{API}/openapi.json"), 401)
        ok = {"Authorization": "Bearer s3cret-token"}
        assert client.get(f"{API}/jobs", headers=ok).json() == {"jobs": []}
        assert client.get(f"{API}/openapi.json", headers=ok).status_code == 200


def test_host_header_without_token(client: TestClient) -> None:
    """Without a token only loopback Host headers are answered (DNS rebinding)."""
    r = client.get(f"{API}/health", headers={"Host": "evil.example:8000"})
    _error(r, 403, "host_not_allowed", "evil.example")
    assert client.get(f"{API}/health", headers={"Host": "localhost:1234"}).status_code == 200
    assert client.get(f"{API}/health", headers={"Host": "[::1]:1234"}).status_code == 200


def test_body_size_limit(search: SimSearch, root: Path) -> None:
    app = create_app(search, allowed_roots=[root], max_body_bytes=2048)
    big = json.dumps({"image": "/x", "annotations": {"pad": "x" * 4000}}).encode()

    def chunks(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 512):
            yield data[i : i + 512]

    json_header = {"Content-Type": "application/json"}
    with _client(app) as client:
        r = client.post(f"{API}/suggest", content=big, headers=json_header)
        assert r.request.headers["content-length"] == str(len(big))
        _error(r, 413, "payload_too_large", "2048 bytes")
        r = client.post(f"{API}/suggest", content=chunks(big), headers=json_header)
        assert "content-length" not in r.request.headers  # chunked
        _error(r, 413, "payload_too_large")
        # a small chunked body is read and parsed as usual
        small = json.dumps({"image": str(root / "missing.tiff"), "annotations": []}).encode()
        r = client.post(f"{API}/suggest", content=chunks(small), headers=json_header)
        _error(r, 404, "ImageNotFoundError", "no such file")


def test_protocol_mismatch(client: TestClient) -> None:
    for value in ("2", "0", "one"):
        r = client.post(f"{API}/suggest", json={"image": "/x"}, headers={PROTOCOL_HEADER: value})
        message = _error(
            r, 409, "protocol_mismatch", f"client speaks simsearch-wsi protocol '{value}'"
        )
        assert "server" in message and "protocol 1" in message and "update" in message
    _error(client.get(f"{API}/health", headers={PROTOCOL_HEADER: "2"}), 409)


def test_bad_inputs_are_4xx_with_a_message(
    client: TestClient, slide: SyntheticSlide, root: Path
) -> None:
    image = str(slide.path)
    protos = _prototypes(slide)
    (root / "notes.txt").write_text("not an image at all, but long enough")
    session_less = root / "plain folder"
    session_less.mkdir(exist_ok=True)
    outside_box = {
        "type": "Feature",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[5000, 5000], [5050, 5000], [5050, 5050], [5000, 5050], [5000, 5000]]],
        },
        "properties": {"objectType": "annotation", "classification": "A"},
    }
    bad_geometry = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": "x"}}
    deep_geometry = json.loads(json.dumps(bad_geometry))
    deep_geometry["geometry"]["coordinates"] = json.loads("[" * 500 + "]" * 500)
    post = client.post
    cases: list[tuple[httpx.Response, int, str | None, str]] = [
        # malformed requests
        (
            post(
                f"{API}/suggest",
                content=b'{"image": ',
                headers={"content-type": "application/json"},
            ),
            400,
            "json_invalid",
            "not valid JSON",
        ),
        (
            post(
                f"{API}/suggest",
                content=json.dumps({"image": image}),
                headers={"content-type": "text/plain"},
            ),
            415,
            "unsupported_media_type",
            "application/json",
        ),
        (
            post(f"{API}/suggest", json={"annotations": protos}),
            422,
            "validation_error",
            "image: field required",
        ),
        (post(f"{API}/suggest", json={"imag": image}), 422, None, "imag: extra inputs"),
        (post(f"{API}/suggest", json=[1, 2]), 422, None, "body must be a JSON object"),
        (
            post(
                f"{API}/suggest",
                content=b"[" * 100_000,
                headers={"content-type": "application/json"},
            ),
            400,
            "json_invalid",
            "nested too deeply",
        ),
        (
            post(
                f"{API}/suggest",
                json={"image": image, "annotations": protos, "thresholds": {"ring": "high"}},
            ),
            422,
            None,
            "thresholds.ring",
        ),
        (
            post(
                f"{API}/suggest",
                content=b'{"image": "/x", "thresholds": {"ring": NaN}}',
                headers={"content-type": "application/json"},
            ),
            422,
            None,
            "thresholds.ring",
        ),
        (post(f"{API}/suggest", json={"image": image, "background": -1}), 422, None, "background"),
        (
            post(f"{API}/suggest", json={"image": image, "annotations": "{}"}),
            422,
            None,
            "annotations: must be GeoJSON",
        ),
        (post(f"{API}/suggest", json={"image": ""}), 422, None, "image"),
        (post(f"{API}/suggest", json={"image": "/" + "a" * 5000}), 422, None, "image"),
        # malformed GeoJSON and prototypes
        (
            post(f"{API}/suggest", json={"image": image, "annotations": {"type": "Polygon"}}),
            400,
            "ConfigError",
            "not QuPath GeoJSON",
        ),
        (
            post(f"{API}/suggest", json={"image": image, "annotations": [deep_geometry]}),
            400,
            "ConfigError",
            "feature 0",
        ),
        (
            post(f"{API}/suggest", json={"image": image, "annotations": [bad_geometry]}),
            400,
            "ConfigError",
            "feature 0",
        ),
        (
            post(
                f"{API}/suggest",
                json={"image": image, "annotations": {"type": "FeatureCollection", "features": []}},
            ),
            400,
            "ConfigError",
            "no prototypes found",
        ),
        (
            post(f"{API}/suggest", json={"image": image, "annotations": [outside_box]}),
            400,
            "ConfigError",
            "not inside the image",
        ),
        (post(f"{API}/suggest", json={"image": image}), 400, "ConfigError", "needs 'annotations'"),
        # images
        (
            post(
                f"{API}/suggest", json={"image": str(root / "missing.tiff"), "annotations": protos}
            ),
            404,
            "ImageNotFoundError",
            "no such file",
        ),
        (
            post(f"{API}/suggest", json={"image": str(root / "notes.txt"), "annotations": protos}),
            400,
            "UnsupportedFormatError",
            "notes.txt",
        ),
        (
            post(f"{API}/suggest", json={"image": str(root), "annotations": protos}),
            400,
            "UnsupportedFormatError",
            "not an OME-Zarr",
        ),
        (
            post(f"{API}/suggest", json={"image": str(root / ("a" * 300)), "annotations": protos}),
            400,
            None,
            "",
        ),
        (
            post(f"{API}/suggest", json={"image": "http://example.org/slide.svs"}),
            400,
            "ConfigError",
            "only local files",
        ),
        (
            post(f"{API}/suggest", json={"image": "s3://bucket/slide.svs"}),
            400,
            "ConfigError",
            "only local files",
        ),
        (
            post(f"{API}/suggest", json={"image": slide.path.as_uri() + "#series=2"}),
            400,
            "ConfigError",
            "fragment",
        ),
        (post(f"{API}/suggest", json={"image": "file:///x/%FF.svs"}), 400, "ConfigError", "UTF-8"),
        (post(f"{API}/suggest", json={"image": "file://"}), 400, "ConfigError", "no path"),
        (
            post(f"{API}/suggest", json={"image": "slides/slide.svs"}),
            400,
            "ConfigError",
            "absolute",
        ),
        (post(f"{API}/suggest", json={"image": f"{root}/a\x00b.tiff"}), 400, "ConfigError", "NUL"),
        # sessions
        (
            post(
                f"{API}/review",
                json={"image": image, "annotations": protos, "session": str(session_less)},
            ),
            400,
            "ConfigError",
            "not a review session",
        ),
        (
            post(f"{API}/review", json={"image": image, "session": str(session_less)}),
            422,
            None,
            "annotations",
        ),
        (
            post(f"{API}/background", json={"image": image, "session": str(session_less)}),
            400,
            "ConfigError",
            "not a review session",
        ),
        (
            post(
                f"{API}/suggest",
                json={"image": image, "annotations": protos, "session": str(root / "notes.txt")},
            ),
            400,
            "ConfigError",
            "not a folder",
        ),
        (client.get(f"{API}/session"), 422, None, "dir: field required"),
        (
            client.get(f"{API}/session", params={"dir": str(session_less)}),
            400,
            "ConfigError",
            "not a review session",
        ),
        # jobs
        (post(f"{API}/jobs/embed", json={"images": []}), 422, None, "images"),
        (
            post(f"{API}/jobs/embed", json={"images": [image], "patch_size_px": 0}),
            422,
            None,
            "patch_size_px",
        ),
        (
            post(f"{API}/jobs/embed", json={"images": [str(root / "missing.tiff")]}),
            404,
            "ImageNotFoundError",
            "missing.tiff",
        ),
        # routes
        (client.get(f"{API}/nope"), 404, "not_found", "no such route"),
        (client.get("/"), 404, "not_found", "/api/v1"),
        (client.get(f"{API}/suggest"), 405, "method_not_allowed", "GET"),
    ]
    for r, status, code, text in cases:
        _error(r, status, code, text)
    assert client.get(f"{API}/jobs").json()["jobs"] == []


def test_unexpected_errors_are_500_json(
    search: SimSearch, slide: SyntheticSlide, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(search, "suggest", boom)
    app = create_app(search, allowed_roots=[root])
    with _client(app, raise_server_exceptions=False) as client:
        r = client.post(
            f"{API}/suggest", json={"image": str(slide.path), "annotations": _prototypes(slide)}
        )
    assert r.status_code == 500
    body = r.json()["error"]
    assert body["type"] == "internal_error" and "RuntimeError" in body["message"]
    assert "secret internals" not in body["message"]


def test_create_app_checks_its_arguments(search: SimSearch, root: Path) -> None:
    with pytest.raises(ConfigError, match="at least one"):
        create_app(search, allowed_roots=[])
    with pytest.raises(ConfigError, match="does not exist"):
        create_app(search, allowed_roots=[root / "nope"])
    with pytest.raises(ConfigError, match="token"):
        create_app(search, allowed_roots=[root], token=" ")
    with pytest.raises(ConfigError, match="job_workers"):
        create_app(search, allowed_roots=[root], job_workers=0)


# --- the real HTTP path -------------------------------------------------------------------------
def test_real_uvicorn_server(search: SimSearch, root: Path) -> None:
    app = create_app(search, allowed_roots=[root], token="tok", max_body_bytes=4096)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}{API}"
        with httpx.Client(timeout=10) as http:
            r = http.get(f"{base}/health", headers={PROTOCOL_HEADER: "1"})
            assert r.status_code == 200 and r.json()["protocol"] == PROTOCOL_VERSION
            _error(http.get(f"{base}/jobs"), 401, "unauthorized")
            auth = {"Authorization": "Bearer tok", "Content-Type": "application/json"}
            assert http.get(f"{base}/jobs", headers=auth).json() == {"jobs": []}

            def chunks() -> Iterator[bytes]:
                yield b'{"image": "/x", "pad": "'
                for _ in range(8):
                    yield b"x" * 1024
                yield b'"}'

            r = http.post(f"{base}/suggest", content=chunks(), headers=auth)
            assert r.request.headers.get("transfer-encoding") == "chunked"
            _error(r, 413, "payload_too_large")
    finally:
        server.should_exit = True
        thread.join(20)
    assert not thread.is_alive()
