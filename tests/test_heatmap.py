"""Heat maps line up with the slide; a floor keeps what the thresholds would have given; the
thresholds a review ends at are saved (issue 28: the interactive loop)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from simsearch_wsi.cli.main import main
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.qupath.geojson import read_features
from simsearch_wsi.review.session import Session, suggest_with_session
from simsearch_wsi.search.engine import SearchSettings, SimSearch, SuggestResult
from simsearch_wsi.search.heatmap import heatmap_png
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.synthetic import SyntheticSlide, make_synthetic_slide


@dataclass
class World:
    root: Path
    slide: SyntheticSlide
    protos_file: Path
    protos: list[Prototype]
    search: SimSearch
    result: SuggestResult  # heatmap=True, no floor


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("heatmap")
    slide = make_synthetic_slide(root / "s.tiff", width=1024, height=768, n_per_class=3, seed=0)
    features, seen = [], set()
    for f in slide.to_geojson()["features"]:
        name = f["properties"]["classification"]["name"]
        if name not in seen:
            seen.add(name)
            features.append(f)
    protos_file = root / "protos.geojson"
    protos_file.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    trunk, spec, info = build_trunk(weights="random", seed=0)
    search = SimSearch(
        FeatureExtractor(trunk, spec, info, autocast=False),
        FeatureCache(root / "cache"),
        settings=SearchSettings(tile_size=512),
    )
    with open_image(slide.path) as img:
        from simsearch_wsi.search.engine import prototypes_from_annotations

        protos = prototypes_from_annotations(
            read_features({"type": "FeatureCollection", "features": features}, where="t"),
            img,
            where="t",
        )
        result = search.suggest(img, protos, heatmap=True)
    yield World(root, slide, protos_file, protos, search, result)


def test_heatmap_maxima_lie_on_the_prototypes_and_its_class_objects(world: World) -> None:
    hm = world.result.heatmap
    assert hm is not None and hm.classes == world.result.classes
    w, h = world.slide.width, world.slide.height
    assert hm.values.shape[1:] == (-(-h // hm.downsample), -(-w // hm.downsample))
    # the default grid is the windows' pitch on level 0
    assert hm.downsample == world.result.geometry.stride * world.result.scale.downsample_x
    for proto in world.protos:
        v = hm.of(proto.class_name)
        y, x = np.unravel_index(np.nanargmax(v), v.shape)
        cx, cy = (x + 0.5) * hm.downsample, (y + 0.5) * hm.downsample  # level-0 centre
        b = proto.box
        # a prototype is most similar to itself: the maximum is on it, within half a pixel
        assert b.x_l0 - hm.downsample / 2 <= cx <= b.x1_l0 + hm.downsample / 2
        assert b.y_l0 - hm.downsample / 2 <= cy <= b.y1_l0 + hm.downsample / 2
        # the class's other true objects are brighter than the other classes' objects
        mine = [o for o in world.slide.objects if o.class_name == proto.class_name]
        mine = [o for o in mine if not b.x_l0 <= o.center_l0[0] <= b.x1_l0]
        others = [o for o in world.slide.objects if o.class_name != proto.class_name]
        on_mine = np.mean([hm.value_at_l0(proto.class_name, *o.center_l0) for o in mine])
        on_others = np.mean([hm.value_at_l0(proto.class_name, *o.center_l0) for o in others])
        assert on_mine > on_others + 0.1, (proto.class_name, on_mine, on_others)


def test_every_suggestion_sits_on_its_heatmap_peak(world: World) -> None:
    hm = world.result.heatmap
    assert hm is not None and world.result.suggestions
    d = hm.downsample
    for s in world.result.suggestions:
        v = hm.of(s.class_name)
        u0, v0 = int(s.box.x_l0 // d), int(s.box.y_l0 // d)
        u1, v1 = int(np.ceil(s.box.x1_l0 / d)), int(np.ceil(s.box.y1_l0 / d))
        assert np.nanmax(v[v0:v1, u0:u1]) == pytest.approx(s.similarity, abs=1e-5)


def test_heatmap_png_is_the_heatmap(world: World) -> None:
    hm = world.result.heatmap
    assert hm is not None
    values = hm.of(world.result.classes[0]).copy()
    values[0, 0] = np.nan
    img = np.asarray(Image.open(io.BytesIO(heatmap_png(values))))
    assert img.shape == (*values.shape, 2) and img.dtype == np.uint8
    assert img[0, 0, 1] == 0 and (img[1:, 1:, 1] == 255).all()
    expected = np.rint(255 * np.clip(values[1:, 1:], 0, 1))
    assert np.array_equal(img[1:, 1:, 0], expected.astype(np.uint8))


def test_floor_keeps_the_thresholded_suggestions_and_adds_ranked_candidates(
    world: World,
) -> None:
    with open_image(world.slide.path) as img:
        floored = world.search.suggest(img, world.protos, floor=0.0)
    base = world.result
    above = [s for s in floored.suggestions if s.similarity > floored.thresholds[s.class_name]]
    assert [(s.class_name, s.box, s.similarity, s.rank) for s in above] == [
        (s.class_name, s.box, s.similarity, s.rank) for s in base.suggestions
    ]
    assert len(floored.suggestions) > len(base.suggestions)
    assert all(s.similarity > 0.0 for s in floored.suggestions)
    for name in floored.classes:  # ranked by similarity within each class
        sims = [s.similarity for s in floored.suggestions if s.class_name == name]
        ranks = [s.rank for s in floored.suggestions if s.class_name == name]
        assert sims == sorted(sims, reverse=True) and ranks == list(range(1, len(sims) + 1))
    summary = floored.summary()
    assert summary["floor"] == 0.0
    assert summary["above_threshold_per_class"] == base.summary()["suggestions_per_class"]


def test_review_saves_the_thresholds_it_ends_at(world: World, tmp_path: Path) -> None:
    session = Session.create(tmp_path / "session")
    with open_image(world.slide.path) as img:
        annotations = read_features(json.loads(world.protos_file.read_text()), where="t")
        result = suggest_with_session(
            world.search, img, session=session, annotations=annotations, where="t",
            thresholds={}, floor=0.0,
        )  # fmt: skip
    name = result.classes[0]
    mine = [(sid, s) for sid, s in result.all_suggestions() if s.class_name == name]
    # the user lowered the threshold to just under the 3rd candidate and kept those three
    threshold = mine[2][1].similarity - 1e-4
    kept = [
        {
            "type": "Feature",
            "id": sid,
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [
                        [s.box.x_l0, s.box.y_l0],
                        [s.box.x1_l0, s.box.y_l0],
                        [s.box.x1_l0, s.box.y1_l0],
                        [s.box.x_l0, s.box.y1_l0],
                        [s.box.x_l0, s.box.y_l0],
                    ]
                ],
            },
            "properties": {
                "objectType": "detection",
                "classification": {"name": name},
                "measurements": {"similarity": s.similarity},
            },
        }
        for sid, s in mine[:3]
    ]
    with open_image(world.slide.path) as img:
        report = session.ingest_review(
            img.path,
            read_features(kept, where="t"),
            source="test",
            image_size_l0=img.dimensions,
            thresholds={name: threshold},
        )
    assert report.approved == 3 and report.below_threshold == 0
    # the hidden candidates (below their class's threshold) are not "unreviewed"
    shown = sum(
        1
        for _, s in result.all_suggestions()
        if s.similarity >= (threshold if s.class_name == name else 0.5)
    )
    assert report.unreviewed == shown - 3
    session.save()
    assert Session.open(session.root).thresholds[name] == pytest.approx(threshold)
    with pytest.raises(Exception, match="unknown class"):
        session.ingest_review(img.path, [], source="t", thresholds={"nope": 0.2})


def test_cli_suggest_heatmap_and_review_threshold(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--weights", "random", "--cache", str(world.root / "cache"), "--tile-size", "512"]
    out = tmp_path / "sug.geojson"
    heat = tmp_path / "heat.png"
    session = tmp_path / "session"
    args = ["suggest", str(world.slide.path), "--annotations", str(world.protos_file)]
    args += ["--out", str(out), "--heatmap", str(heat), "--floor", "0.1", "--session"]
    assert main([*args, str(session), "--json", *common]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out)
    meta = summary["heatmap"]
    hm = world.result.heatmap
    assert hm is not None and meta["downsample"] == hm.downsample
    assert meta["pixel_size_um"] == pytest.approx(world.slide.mpp * hm.downsample)
    assert set(meta["files"]) == set(world.result.classes)
    for name, path in meta["files"].items():
        assert Path(path).name == f"heat_{name}.png"
        img = np.asarray(Image.open(path))
        assert img.shape[:2] == hm.of(name).shape
        proto = next(p for p in world.protos if p.class_name == name)
        y, x = np.unravel_index(np.argmax(img[..., 0]), img.shape[:2])
        assert (
            proto.box.x_l0 - hm.downsample
            <= (x + 0.5) * hm.downsample
            <= proto.box.x1_l0 + hm.downsample
        )
        assert (
            proto.box.y_l0 - hm.downsample
            <= (y + 0.5) * hm.downsample
            <= proto.box.y1_l0 + hm.downsample
        )
    assert summary["floor"] == 0.1
    name = world.result.classes[0]
    assert main(["review", str(world.slide.path), "--annotations", str(out), "--session",
                 str(session), "--threshold", f"{name}=0.37", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["approved"] > 0
    assert Session.open(session).thresholds[name] == pytest.approx(0.37)
