"""Heat maps line up with the slide; a floor keeps what the thresholds would have given; the
thresholds a review ends at are saved (issue 28: the interactive loop).

The alignment, PNG, size cap and floor rules are checked on hand-made similarity maps (no
trunk, fast); the end-to-end checks on a synthetic slide embed once and are marked slow."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from simsearch_wsi.cli.main import main
from simsearch_wsi.cli.suggest import heatmap_targets
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.extractor import AnalysisScale, FeatureSpec
from simsearch_wsi.features.preprocess import ChannelNormalization
from simsearch_wsi.io import open_image
from simsearch_wsi.qupath.geojson import read_features
from simsearch_wsi.review.session import Session, suggest_with_session
from simsearch_wsi.search.engine import SearchSettings, SimSearch, SuggestResult
from simsearch_wsi.search.heatmap import heatmap_l0, heatmap_png
from simsearch_wsi.search.similarity import PatchGeometry, Prototype, extract_suggestions
from simsearch_wsi.synthetic import SyntheticSlide, make_synthetic_slide


def _spec(downsample: float) -> FeatureSpec:
    """A feature spec whose analysis grid is ``downsample`` level-0 pixels per pixel."""
    return FeatureSpec(
        backbone="hand-made",
        weights_identity="none",
        scale=AnalysisScale(0, downsample, downsample, downsample),
        normalization=ChannelNormalization((0.0,), (1.0,), ("c",), "fixed-range"),
        channels=("c",),
        rgb=False,
        tile_size=512,
        halo=0,
    )


# --- hand-made maps (fast) ------------------------------------------------------------------


def test_a_floor_never_hides_a_suggestion_above_its_threshold() -> None:
    # A peaks at 0.55 (its threshold 0.6: hidden), B at 0.50 one cell away (threshold 0.45:
    # shown); the boxes overlap (IoU 0.6), so only one survives the competition between classes
    geo, spec = PatchGeometry(64, 64, 16), _spec(1.0)
    maps = np.zeros((2, 12, 12), dtype=np.float32)
    maps[0, 5, 5], maps[1, 5, 6] = 0.55, 0.50
    thresholds = {"A": 0.6, "B": 0.45}

    def run(floor: float | None) -> list[tuple[str, float, int]]:
        found = extract_suggestions(
            maps, ["A", "B"], geometry=geo, spec=spec, thresholds=thresholds, floor=floor
        )
        return [(s.class_name, round(s.similarity, 6), s.rank) for s in found]

    assert run(None) == [("B", 0.5, 1)]
    floored = run(0.2)
    above = [t for t in floored if t[1] >= thresholds[t[0]]]
    assert above == run(None)  # same suggestions, same ranks
    assert ("A", 0.55, 1) not in floored  # the floor candidate overlapping B lost to it


def test_floor_candidates_keep_the_ranks_of_the_suggestions_above() -> None:
    geo, spec = PatchGeometry(64, 64, 16), _spec(1.0)
    rng = np.random.default_rng(0)
    maps = rng.uniform(-0.2, 0.9, size=(3, 30, 40)).astype(np.float32)
    thresholds = {"A": 0.7, "B": 0.5, "C": 0.8}
    args: dict[str, Any] = {"geometry": geo, "spec": spec, "thresholds": thresholds}
    base = extract_suggestions(maps, ["A", "B", "C"], **args)
    floored = extract_suggestions(maps, ["A", "B", "C"], floor=0.1, **args)
    above = [s for s in floored if s.similarity >= thresholds[s.class_name]]
    assert above == base and len(floored) > len(base)


def test_a_suggestion_at_its_threshold_is_kept() -> None:
    # one rule everywhere: at or above the threshold (the panel and the review use >= too)
    geo, spec = PatchGeometry(64, 64, 16), _spec(1.0)
    maps = np.zeros((1, 12, 12), dtype=np.float32)
    maps[0, 5, 5] = 0.5
    args: dict[str, Any] = {"geometry": geo, "spec": spec}
    assert len(extract_suggestions(maps, ["A"], thresholds={"A": 0.5}, **args)) == 1
    assert extract_suggestions(maps, ["A"], thresholds={"A": 0.5001}, **args) == []


@pytest.mark.parametrize("downsample", [1.0, 2.0, 3.0])
def test_heatmap_value_at_a_windows_centre_is_that_window(downsample: float) -> None:
    geo = PatchGeometry(64, 64, 16)  # even kernel: 4 x 4 cells, pitch 16 analysis px
    spec = _spec(downsample)
    maps = np.full((1, 20, 30), 0.1, dtype=np.float32)
    i, j = 3, 7
    maps[0, i, j] = 0.9
    cx_a, cy_a = geo.window_center_a(i, j)
    x_l0, y_l0 = cx_a * downsample, cy_a * downsample  # e.g. (144, 80) at downsample 1
    hm = heatmap_l0(maps, ["A"], geometry=geo, spec=spec, image_size_l0=(480, 320))
    d = hm.downsample
    assert d == 16 * downsample and hm.values.shape == (1, 20, 30)
    assert hm.value_at_l0("A", x_l0, y_l0) == pytest.approx(0.9)
    # one window per pixel: the pixel's centre is the window's centre, exactly
    u, v = int((x_l0 - hm.origin_l0[0]) // d), int((y_l0 - hm.origin_l0[1]) // d)
    assert (u, v) == (j, i)
    assert hm.origin_l0[0] + (u + 0.5) * d == pytest.approx(x_l0)
    assert hm.origin_l0[1] + (v + 0.5) * d == pytest.approx(y_l0)
    # the neighbouring windows' centres land on their own pixels
    assert hm.value_at_l0("A", x_l0 + d, y_l0) == pytest.approx(0.1)
    assert hm.value_at_l0("A", x_l0, y_l0 - d) == pytest.approx(0.1)
    assert hm.metadata()["origin_l0"] == list(hm.origin_l0)


def test_coarser_heatmaps_keep_the_peak_by_block_maximum() -> None:
    geo, spec = PatchGeometry(64, 64, 16), _spec(2.0)  # pitch 32 level-0 px
    maps = np.zeros((2, 50, 90), dtype=np.float32)
    maps[0, 21, 44] = 0.8
    maps[1, :, :10] = np.nan  # not embedded
    cx_a, cy_a = geo.window_center_a(21, 44)
    # asked for 80 level-0 px: rounded up to whole windows (3 windows = 96 px)
    hm = heatmap_l0(maps, ["A", "B"], geometry=geo, spec=spec, image_size_l0=(2900, 1700),
                    downsample=80)  # fmt: skip
    assert hm.downsample == 96 and hm.values.shape == (2, 17, 30)
    assert hm.value_at_l0("A", 2 * cx_a, 2 * cy_a) == pytest.approx(0.8)
    assert np.nanmax(hm.values[0]) == pytest.approx(0.8)
    assert np.isnan(hm.values[1][:, :3]).all() and np.isfinite(hm.values[1][:, 4:]).all()
    # a display cap: never refused for its size, coarsened (block maximum) to fit
    capped = heatmap_l0(maps, ["A", "B"], geometry=geo, spec=spec, image_size_l0=(2900, 1700),
                        max_side_px=16)  # fmt: skip
    assert max(capped.values.shape[1:]) <= 16 and capped.downsample == 6 * 32
    assert capped.value_at_l0("A", 2 * cx_a, 2 * cy_a) == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="downsample"):
        heatmap_l0(maps, ["A"], geometry=geo, spec=spec, image_size_l0=(1, 1), downsample=0)


def test_heatmap_png_is_the_heatmap() -> None:
    values = np.linspace(-0.5, 1.2, 24, dtype=np.float32).reshape(4, 6)
    values[0, 0] = np.nan
    img = np.asarray(Image.open(io.BytesIO(heatmap_png(values))))
    assert img.shape == (4, 6, 2) and img.dtype == np.uint8
    assert img[0, 0, 1] == 0 and (img[..., 1].ravel()[1:] == 255).all()
    expected = np.rint(255 * np.clip(np.nan_to_num(values), 0, 1)).astype(np.uint8)
    assert np.array_equal(img[..., 0].ravel()[1:], expected.ravel()[1:])


def test_heatmap_file_names_are_refused_when_two_classes_share_one(tmp_path: Path) -> None:
    out = str(tmp_path / "heat.png")
    assert heatmap_targets(out, ["Tumor"]) == {"Tumor": tmp_path / "heat.png"}
    assert heatmap_targets(out, ["A b", "C"])["A b"] == tmp_path / "heat_A_b.png"
    with pytest.raises(ConfigError, match="'A b' and 'A/b'"):
        heatmap_targets(out, ["A b", "A/b"])


# --- a synthetic slide, one embedding (slow) ----------------------------------------------


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
    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor

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


@pytest.mark.slow
def test_heatmap_maxima_lie_on_the_prototypes_and_its_class_objects(world: World) -> None:
    hm = world.result.heatmap
    assert hm is not None and hm.classes == world.result.classes
    # the default grid is the windows' pitch on level 0, the heat map spans the slide
    assert hm.downsample == world.result.geometry.stride * world.result.scale.downsample_x
    (x0, y0), d = hm.origin_l0, hm.downsample
    assert 0 <= x0 < d * 4 and world.slide.width - d * 4 < x0 + hm.values.shape[2] * d
    for proto in world.protos:
        v = hm.of(proto.class_name)
        y, x = np.unravel_index(np.nanargmax(v), v.shape)
        cx, cy = x0 + (x + 0.5) * d, y0 + (y + 0.5) * d  # level-0 centre
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


@pytest.mark.slow
def test_every_suggestion_sits_on_its_heatmap_peak(world: World) -> None:
    hm = world.result.heatmap
    assert hm is not None and world.result.suggestions
    d, (x0, y0) = hm.downsample, hm.origin_l0
    for s in world.result.suggestions:
        v = hm.of(s.class_name)
        u0, v0 = max(0, int((s.box.x_l0 - x0) // d)), max(0, int((s.box.y_l0 - y0) // d))
        u1, v1 = int(np.ceil((s.box.x1_l0 - x0) / d)), int(np.ceil((s.box.y1_l0 - y0) / d))
        assert np.nanmax(v[v0:v1, u0:u1]) == pytest.approx(s.similarity, abs=1e-5)


@pytest.mark.slow
def test_floor_keeps_the_thresholded_suggestions_and_adds_ranked_candidates(
    world: World,
) -> None:
    with open_image(world.slide.path) as img:
        floored = world.search.suggest(img, world.protos, floor=0.0)
    base = world.result
    above = [s for s in floored.suggestions if s.similarity >= floored.thresholds[s.class_name]]
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


@pytest.mark.slow
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
    before = Session.open(session.root).thresholds
    with pytest.raises(ConfigError, match="unknown class"):
        session.ingest_review(img.path, [], source="t", thresholds={name: 0.9, "nope": 0.2})
    assert session.thresholds == before  # the known class's threshold is unchanged too


@pytest.mark.slow
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
        x0, y0 = meta["origin_l0"]
        d = hm.downsample
        assert proto.box.x_l0 - d <= x0 + (x + 0.5) * d <= proto.box.x1_l0 + d
        assert proto.box.y_l0 - d <= y0 + (y + 0.5) * d <= proto.box.y1_l0 + d
    assert summary["floor"] == 0.1
    name = world.result.classes[0]
    assert main(["review", str(world.slide.path), "--annotations", str(out), "--session",
                 str(session), "--threshold", f"{name}=0.37", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["approved"] > 0
    assert Session.open(session).thresholds[name] == pytest.approx(0.37)
