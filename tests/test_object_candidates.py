"""Object candidates (``SearchSettings(candidates="objects")``, issue 18): one suggestion per
separate object, centred on it and of its size, whatever its size; the ``--candidates`` engine
option, the server's ``candidates`` field and a review session's record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.cli.engine import build_search
from simsearch_wsi.cli.main import build_parser, main
from simsearch_wsi.core.errors import ConfigError, MetadataError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.review.session import SESSION_FILE, Session, suggest_with_session
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.objects import detect_objects, snap_to_objects
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.server.schemas import BackgroundRequest, SuggestRequest

#: (cx, cy, diameter) of the field's cells: three large, four small, all apart
CELLS = [(45, 45, 40), (140, 50, 36), (50, 140, 38), (130, 130, 14), (170, 100, 12)]
CELLS += [(100, 175, 13), (165, 165, 14)]
SIZE = 192


def _write_field(path: Path, seed: int) -> Path:
    """A 2-channel uint8 OME-TIFF (GFP body, DNA nucleus) of separate round cells of two sizes
    on a dark, noisy background."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    gfp = np.zeros((SIZE, SIZE), np.float32)
    dna = np.zeros((SIZE, SIZE), np.float32)
    for cx, cy, d in CELLS:
        r = np.hypot(xx - cx, yy - cy)
        gfp += 140.0 * np.clip(d / 2 - r + 0.5, 0, 1)
        dna += 160.0 * np.clip(0.45 * d / 2 - r + 0.5, 0, 1)
    data = np.stack([gfp, dna]) + 8.0 + rng.normal(0, 2.0, (2, SIZE, SIZE))
    data = np.clip(data, 0, 255).astype(np.uint8)
    tifffile.imwrite(
        path, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["GFP", "DNA"]}}
    )
    return path


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_field(tmp_path_factory.mktemp("objects") / "cells.ome.tiff", seed=3)


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> SimSearch:
    trunk, spec, info = build_trunk("resnet18-l3", "embedded", seed=0)
    extractor = FeatureExtractor(trunk, spec, info, device=torch.device("cpu"), autocast=False)
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    return SimSearch(extractor, cache, settings=SearchSettings(candidates="objects"))


def _box(k: int) -> BoxL0:
    cx, cy, d = CELLS[k]
    return BoxL0(cx - d / 2, cy - d / 2, d, d)


def _nearest(point: tuple[float, float]) -> tuple[int, float]:
    dist = [float(np.hypot(point[0] - cx, point[1] - cy)) for cx, cy, _ in CELLS]
    k = int(np.argmin(dist))
    return k, dist[k]


def test_detection_finds_each_cell_once_at_its_size(field: Path, search: SimSearch) -> None:
    with open_image(field) as img:
        norm = search.normalization_for(img)
        boxes = detect_objects(
            img, normalization=norm, channels=("GFP", "DNA"), rgb=False, size_range_l0=(14, 40)
        )
    assert len(boxes) == len(CELLS)
    found = sorted(_nearest(b.center_l0)[0] for b in boxes)
    assert found == list(range(len(CELLS)))
    for b in boxes:
        k, dist = _nearest(b.center_l0)
        assert dist < 2.0
        assert abs(max(b.width_l0, b.height_l0) - CELLS[k][2]) <= 0.25 * CELLS[k][2] + 2
    # a prototype box outlines the object whose centre it holds
    snapped = snap_to_objects([BoxL0(20, 20, 55, 55), BoxL0(0, 180, 10, 10)], boxes)
    assert _nearest(snapped[0].center_l0) == (0, pytest.approx(0.0, abs=2.0))
    assert snapped[1] == BoxL0(0, 180, 10, 10)  # nothing there: the box itself


def test_one_centred_suggestion_per_object_of_either_size(field: Path, search: SimSearch) -> None:
    protos = [Prototype("cell", _box(k)) for k in (0, 1, 3)]
    with open_image(field) as img:
        result = search.suggest(img, protos, thresholds={"cell": -1.0})
    assert result.candidates == "objects"
    assert result.summary()["candidates"] == "objects"
    # every cell but the prototypes', once each, centred, with the cell's box
    hits = [_nearest(s.box.center_l0) for s in result.suggestions]
    assert sorted(k for k, _ in hits) == [2, 4, 5, 6]
    assert all(dist < 2.0 for _, dist in hits)
    for s, (k, _) in zip(result.suggestions, hits, strict=True):
        assert abs(max(s.box.width_l0, s.box.height_l0) - CELLS[k][2]) <= 0.25 * CELLS[k][2] + 2
    assert [s.rank for s in result.suggestions] == [1, 2, 3, 4]
    assert result.suggestions == sorted(result.suggestions, key=lambda s: -s.similarity)


def test_auto_takes_objects_only_where_the_prototypes_outline_separate_objects(
    field: Path, search: SimSearch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simsearch_wsi.synthetic.dense import make_dense_field

    auto = search.with_settings(candidates="auto")
    with open_image(field) as img:
        assert auto.resolve_candidates(img, [Prototype("cell", _box(0))]) == "objects"
        # a box around two cells, or of another size than the cell it holds: the grid
        assert auto.resolve_candidates(img, [Prototype("cell", BoxL0(120, 90, 60, 50))]) == "grid"
        # and says why (what suggest's notes carry)
        assert auto.explain_candidates(img, [Prototype("cell", _box(0))]) == (
            "objects",
            "the prototype boxes outline separate objects",
        )
        mode, why = auto.explain_candidates(img, [Prototype("cell", BoxL0(120, 90, 60, 50))])
        assert mode == "grid" and why.startswith(
            ("on the image", "the prototype boxes on the image")
        ), why
        assert search.with_settings(candidates="grid").explain_candidates(img, []) == ("grid", "")
        assert auto.resolve_candidates(img, [Prototype("cell", BoxL0(120, 120, 20, 20))]) == (
            "objects"
        )
        assert auto.resolve_candidates(img, [Prototype("cell", BoxL0(110, 110, 40, 40))]) == "grid"
        assert (
            auto.with_settings(dense=False).resolve_candidates(img, [Prototype("cell", _box(0))])
            == "grid"
        )
        # an image too large to be read whole (a slide): the grid, nothing read
        monkeypatch.setattr("simsearch_wsi.search.objects.AUTO_MAX_PIXELS", 100)
        mode, why = auto.explain_candidates(img, [Prototype("cell", _box(0))])
        assert (mode, why) == ("grid", "the image is too large to be read whole (a slide)")
        monkeypatch.undo()
    crowded = make_dense_field(tmp_path / "n.tiff", width=128, height=128, spacing=1.0, seed=5)
    with open_image(crowded.path) as img:
        protos = [Prototype("nucleus", o.box) for o in crowded.objects[:3]]
        assert auto.resolve_candidates(img, protos) == "grid"
        result = auto.suggest(img, protos)
        (note,) = [n for n in result.notes if n.startswith("candidates auto: ")]
        assert note.startswith("candidates auto: the grid, on the image ") and "% of the" in note


def test_candidates_option_reaches_the_settings(tmp_path: Path) -> None:
    parser = build_parser()
    common = ["--weights", "embedded", "--device", "cpu", "--cache", str(tmp_path)]
    for flags, expected in (([], "auto"), (["--candidates", "objects"], "objects")):
        args = parser.parse_args(["serve", *common, *flags])
        assert build_search(args).settings.candidates == expected
    for command in ("suggest", "background", "serve"):
        args = parser.parse_args([command, *_positional(command, tmp_path), "--candidates", "grid"])
        assert args.candidates == "grid"


def _positional(command: str, tmp_path: Path) -> list[str]:
    if command == "suggest":
        return [str(tmp_path / "x.tiff"), "--out", str(tmp_path / "o.geojson")]
    if command == "background":
        return [str(tmp_path / "x.tiff"), "--session", str(tmp_path), "--out", "o.geojson"]
    return []


def test_server_requests_take_the_candidates() -> None:
    assert SuggestRequest(image="/x.tiff").candidates is None
    assert SuggestRequest(image="/x.tiff", candidates="objects").candidates == "objects"
    assert BackgroundRequest(image="/x.tiff", session="/s", candidates="grid").candidates == "grid"
    with pytest.raises(ValueError, match="candidates"):
        SuggestRequest(image="/x.tiff", candidates="blobs")  # type: ignore[arg-type]


def test_bad_candidates_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="candidates must be one of grid, objects"):
        SearchSettings(candidates="blobs")
    with pytest.raises(ConfigError, match="needs dense=True"):
        SearchSettings(candidates="objects", dense=False)
    out = tmp_path / "o.geojson"
    argv = ["suggest", str(tmp_path / "x.tiff"), "--session", str(tmp_path / "s"), "--out"]
    assert main([*argv, str(out), "--candidates", "objects", "--no-dense"]) != 0
    err = capsys.readouterr().err
    assert "candidates" in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_session_keeps_its_candidates(field: Path, search: SimSearch, tmp_path: Path) -> None:
    root = tmp_path / "s"
    session = Session.create(root)
    assert session.candidates is None
    grid = search.with_settings(candidates="grid")
    with open_image(field) as img:
        session.add_prototypes(img.path, [Prototype("cell", _box(0))])
        session.save()

        def run(candidates: str | None = None) -> Any:
            result = suggest_with_session(
                grid,
                img,
                session=Session.open(root),
                annotations=None,
                where="test",
                thresholds={"cell": -1.0},
                candidates=candidates,
            )
            return result, Session.open(root)

        first, after = run("objects")
        assert first.candidates == "objects" and after.candidates == "objects"
        assert json.loads((root / SESSION_FILE).read_text())["candidates"] == "objects"
        again, after = run()  # not given: the session's
        assert again.candidates == "objects"
        # a session file from before candidates were recorded, with suggestions: the grid
        doc = json.loads((root / SESSION_FILE).read_text())
        del doc["candidates"]
        (root / SESSION_FILE).write_text(json.dumps(doc))
        assert Session.open(root).candidates == "grid"
        old, after = run()
        assert old.candidates == "grid" and after.candidates == "grid"
    doc["candidates"] = "blobs"
    (root / SESSION_FILE).write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match="candidates must be one of"):
        Session.open(root)


def test_auto_keeps_the_grid_with_dense_fine(
    field: Path, search: SimSearch, tmp_path: Path
) -> None:
    """``dense_fine`` is a form of the grid (objects refuse it): ``auto`` must not trade it for
    object candidates, nor a session's recorded ``objects`` turn it into an error."""
    from simsearch_wsi.review.session import with_rule

    fine = search.with_settings(candidates="auto", dense=True, dense_fine=True)
    with open_image(field) as img:
        assert (
            search.with_settings(candidates="auto").resolve_candidates(
                img, [Prototype("cell", _box(0))]
            )
            == "objects"
        )
        assert fine.resolve_candidates(img, [Prototype("cell", _box(0))]) == "grid"
    session = Session.create(tmp_path / "s")
    session.dense, session.candidates = True, "objects"
    kept = with_rule(fine, None, session)
    assert kept.settings.dense_fine and kept.settings.candidates == "auto"
    # without dense_fine the session's record still applies
    assert with_rule(
        search.with_settings(candidates="auto"), None, session
    ).settings.candidates == ("objects")


def test_server_takes_auto_like_the_cli() -> None:
    from typing import get_args

    from simsearch_wsi.search.choices import CANDIDATE_RULES
    from simsearch_wsi.server.schemas import Candidates

    assert set(get_args(Candidates)) == set(CANDIDATE_RULES)
    assert SuggestRequest(image="/x.tiff", candidates="auto").candidates == "auto"


def test_detection_refuses_a_flat_image_it_would_read_far_larger(
    tmp_path: Path, search: SimSearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One level, large prototypes: the detection image is small but read from level 0 whole
    (resample 8: 64x its pixels); refused (objects) or the grid (auto) before any read."""
    from simsearch_wsi.search import objects as object_rule

    path = _flat_image(tmp_path)

    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("read the image")

    auto = search.with_settings(candidates="auto")
    with open_image(path) as img:
        monkeypatch.setattr(object_rule, "read_analysis_region", no_read)
        monkeypatch.setattr(object_rule, "DETECT_MAX_PIXELS", 20_000)
        monkeypatch.setattr(object_rule, "AUTO_MAX_PIXELS", 20_000)
        scale = object_rule.detection_scale(img, 128.0)
        w, h = scale.analysis_size(img)
        assert w * h <= 20_000 and scale.resample == 8  # the old guard let it through
        with pytest.raises(ConfigError, match="read the image whole"):
            object_rule.find_objects(
                img,
                normalization=search.normalization_for(img),
                channels=list(img.channel_names),
                rgb=False,
                size_range_l0=(128.0, 128.0),
            )
        assert auto.resolve_candidates(img, [Prototype("cell", BoxL0(9, 9, 128, 128))]) == "grid"


def _flat_image(tmp_path: Path) -> Path:
    """A 1024 px square, one-level, one-channel uint8 TIFF (no pyramid)."""
    import tifffile

    path = tmp_path / "flat.tiff"
    tifffile.imwrite(path, np.zeros((1024, 1024), np.uint8))
    return path


def test_auto_takes_the_grid_where_objects_are_too_large_to_detect(
    tmp_path: Path, search: SimSearch
) -> None:
    """Prototypes too large to detect on an image without a pyramid (resample > 8): auto takes
    the grid (which works there), not a ConfigError asking for pyramid levels."""
    auto = search.with_settings(candidates="auto")
    with open_image(_flat_image(tmp_path)) as img:
        protos = [Prototype("cell", BoxL0(100, 100, 256, 256))]
        assert auto.resolve_candidates(img, protos) == "grid"
        # the note says why, in the words of the error the detection would have raised
        mode, why = auto.explain_candidates(img, protos)
        assert mode == "grid" and why.startswith("objects cannot be found on the image (")
        assert "add pyramid levels" in why


def test_detection_counts_every_channel_it_reads() -> None:
    """The detection read has every channel: a 40-channel field reads 13x the bytes of an RGB
    one of the same size, so it is held to the limit sooner (an RGB field of the same pixels
    fits)."""
    from types import SimpleNamespace

    from simsearch_wsi.search import objects as object_rule

    scale: Any = SimpleNamespace(analysis_size=lambda image: (2000, 2000), resample=1.0)
    limit = 2000 * 2000 * 1.5  # the detection image fits; the read limit is 4x that
    rgb: Any = SimpleNamespace(channel_names=["R", "G", "B"])
    many: Any = SimpleNamespace(channel_names=[f"c{k}" for k in range(40)])
    assert object_rule.detection_fits(rgb, scale, limit)
    assert not object_rule.detection_fits(many, scale, limit)
    # 2 channels count as 3 (the base): no looser than RGB
    two: Any = SimpleNamespace(channel_names=["GFP", "DNA"])
    assert object_rule.detection_fits(two, scale, limit)


def test_objects_are_detected_once_per_image(
    field: Path, search: SimSearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The searched image's objects serve its candidates and its prototypes' boxes: one
    detection, not one per use (a whole read of the image each)."""
    from simsearch_wsi.search import engine

    calls: list[str] = []
    real = engine.detect_objects

    def counted(src: Any, **kwargs: Any) -> Any:
        calls.append(str(src.path))
        return real(src, **kwargs)

    monkeypatch.setattr(engine, "detect_objects", counted)
    with open_image(field) as img:
        result = search.suggest(img, [Prototype("cell", _box(0)), Prototype("cell", _box(3))])
    assert result.candidates == "objects" and result.suggestions
    assert calls == [str(field)]
    # auto: the objects its decision found are the ones the candidates use
    real_find = engine.find_objects

    def counted_find(src: Any, **kwargs: Any) -> Any:
        calls.append(str(src.path))
        return real_find(src, **kwargs)

    monkeypatch.setattr(engine, "find_objects", counted_find)
    calls.clear()
    auto = search.with_settings(candidates="auto")
    with open_image(field) as img:
        again = auto.suggest(img, [Prototype("cell", _box(0)), Prototype("cell", _box(3))])
    assert again.candidates == "objects"
    assert [(s.box, s.similarity) for s in again.suggestions] == [
        (s.box, s.similarity) for s in result.suggestions
    ]
    assert calls == [str(field)]


def test_heatmap_of_object_candidates_is_on_the_suggestions_scale(
    field: Path, search: SimSearch
) -> None:
    protos = [Prototype("cell", _box(k)) for k in (0, 1, 3)]
    with open_image(field) as img:
        result = search.suggest(img, protos, thresholds={"cell": -1.0}, heatmap=True)
    hm = result.heatmap
    assert hm is not None and result.candidates == "objects"
    # every suggestion's similarity is its heat map's value at its centre
    for s in result.suggestions:
        assert hm.value_at_l0("cell", *s.box.center_l0) == pytest.approx(s.similarity, abs=1e-6)
    # nothing outside the objects: the field's empty corner is not a candidate
    assert np.isnan(hm.value_at_l0("cell", 95.0, 95.0))
    # ... and the prototypes' own cells are the most similar (each matches itself)
    for k in (0, 1, 3):
        assert (
            hm.value_at_l0("cell", CELLS[k][0], CELLS[k][1])
            > max(s.similarity for s in result.suggestions) - 1e-6
        )


def test_objects_touching_the_border_keep_their_boxes_inside_the_image(tmp_path: Path) -> None:
    """The detection image is whole analysis pixels (rounded up): a box of an object cut by the
    right or bottom edge must still end at the image's edge, not up to a pixel of the detection
    scale beyond it (the grid's suggestions are kept inside; a box outside fails check_box when
    it comes back as a prototype)."""
    import tifffile

    from simsearch_wsi.features.preprocess import ChannelNormalization
    from simsearch_wsi.search import objects as object_rule

    width, height = 200, 120  # not multiples of the detection downsample, width != height
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width]
    data = 8.0 + rng.normal(0, 2.0, (height, width))
    for cx, cy, d in ((60, 50, 44), (190, 50, 44), (120, 112, 40)):  # two cut by an edge
        data[np.hypot(xx - cx, yy - cy) < d / 2] = 200.0
    path = tmp_path / "edge.tiff"
    tifffile.imwrite(path, np.clip(data, 0, 255).astype(np.uint8))
    with open_image(path) as img:
        scale = object_rule.detection_scale(img, 40.0)
        w_a, h_a = scale.analysis_size(img)
        # the case: the detection grid reaches past both edges
        assert w_a * scale.downsample_x > width + 0.5 and h_a * scale.downsample_y > height + 0.5
        boxes = detect_objects(
            img,
            normalization=ChannelNormalization((0.0,), (255.0,), img.channel_names, "fixed-range"),
            channels=img.channel_names,
            rgb=False,
            size_range_l0=(40.0, 44.0),
        )
    assert len(boxes) == 3
    for b in boxes:
        assert b.x_l0 >= 0 and b.x1_l0 <= width and b.y_l0 >= 0 and b.y1_l0 <= height, b
    assert max(b.x1_l0 for b in boxes) == width and max(b.y1_l0 for b in boxes) == height


def test_session_records_auto_not_what_it_resolved_to(
    field: Path, search: SimSearch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session run with the default ``auto`` records ``auto``: resumed, each image is decided
    again. Recording what ``auto`` resolved to pinned the session to it: object candidates on
    an image too large to detect on (a ConfigError where ``auto`` takes the grid), or the grid
    for good after one patch-rule run."""
    from simsearch_wsi.review.session import candidates_asked, with_rule
    from simsearch_wsi.search import objects as object_rule

    root = tmp_path / "s"
    auto = search.with_settings(candidates="auto")
    session = Session.create(root)

    def run(**kwargs: Any) -> Any:
        return suggest_with_session(
            auto,
            img,
            session=Session.open(root),
            annotations=None,
            where="test",
            thresholds={"cell": 0.99},
            **kwargs,
        )

    with open_image(field) as img:
        session.add_prototypes(img.path, [Prototype("cell", _box(0))])
        session.save()
        assert run().candidates == "objects"
        assert Session.open(root).candidates == "auto"
        # the same session on an image too large to read whole: auto takes the grid
        monkeypatch.setattr(object_rule, "AUTO_MAX_PIXELS", 100)
        monkeypatch.setattr(object_rule, "DETECT_MAX_PIXELS", 100)
        assert run().candidates == "grid"
        monkeypatch.undo()
    after = Session.open(root)
    assert after.candidates == "auto"
    # a patch-rule run is held to the grid (with_rule) but records what was asked: back on
    # the object rule, the session's auto applies again
    assert with_rule(auto, False, after).settings.candidates == "grid"
    assert candidates_asked(auto, after) == "auto"
    assert with_rule(auto, True, after).settings.candidates == "auto"


def test_brightfield_objects_are_dark_whatever_channels_the_search_uses(
    tmp_path: Path, search: SimSearch
) -> None:
    """Brightfield cells are darker than the glass also when the search reads one of its
    channels (``--channels G``: not RGB to the trunk): detection looked for bright objects
    there, found the glass, and ``auto`` fell back to the grid."""
    import tifffile

    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.full((SIZE, SIZE, 3), 235.0) + rng.normal(0, 2.0, (SIZE, SIZE, 3))
    for cx, cy, d in CELLS:
        rgb[np.hypot(xx - cx, yy - cy) < d / 2] = (120.0, 60.0, 150.0)
    path = tmp_path / "bf.tiff"
    tifffile.imwrite(path, np.clip(rgb, 0, 255).astype(np.uint8), photometric="rgb")
    with open_image(path) as img:
        assert img.is_brightfield
        for channels in (None, ("G",)):
            auto = search.with_settings(candidates="auto", channels=channels)
            assert auto.explain_candidates(img, [Prototype("cell", _box(0))]) == (
                "objects",
                "the prototype boxes outline separate objects",
            ), channels


def test_heatmap_marks_a_small_object_at_the_image_corner() -> None:
    """An object smaller than the windows' pitch marks the window nearest its centre, also in
    the image's first pixels, where the nearest window centre is the first one (its index was
    rounded to -1 and the object left off the heat map, though it is a suggestion)."""
    from simsearch_wsi.features.extractor import AnalysisScale
    from simsearch_wsi.search.objects import ObjectCandidates
    from simsearch_wsi.search.similarity import PatchGeometry

    unit = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    found = ObjectCandidates(
        boxes=(BoxL0(0, 0, 6, 6), BoxL0(100, 60, 6, 6)),
        candidate_vectors=unit,
        vectors=torch.tensor([[1.0, 0.0]]),
        class_index=torch.tensor([0]),
        classes=("cell",),
    )
    geometry = PatchGeometry(32.0, 32.0, 16)  # 2 x 2 cells: centres at 16, 32, ... px
    scale = AnalysisScale(0, 1.0, 1.0, 1.0)
    maps = found.similarity_maps(
        (found.vectors, found.class_index), geometry=geometry, scale=scale, shape_hw=(5, 7)
    )
    assert maps.shape == (1, 5, 7)
    assert maps[0, 0, 0] == pytest.approx(1.0)  # the corner object, in the first window
    assert maps[0, 3, 5] == pytest.approx(0.6)  # centre (103, 63): window (3, 5) at (96, 64)
    assert np.isnan(maps).sum() == 5 * 7 - 2


def test_channel_blocks_count_every_channel_equally() -> None:
    """Each channel's block of an object vector has length 1 / sqrt(channels): the cosine of two
    vectors is the mean of their channels' cosines, however unequal the blocks were."""
    import torch.nn.functional as F

    from simsearch_wsi.search.objects import channel_blocks_unit

    g = torch.Generator().manual_seed(0)
    raw = torch.randn(5, 2, 8, generator=g)
    raw[:, 1] *= 10.0  # the second channel dominates the raw vectors
    flat = raw.reshape(5, 16)
    out = channel_blocks_unit(flat, 2)
    assert out.shape == (5, 16)
    assert torch.allclose(out.reshape(5, 2, 8).norm(dim=2), torch.full((5, 2), 0.5**0.5))
    per_channel = [F.normalize(raw[:, c], dim=1) for c in range(2)]
    expected = (per_channel[0] @ per_channel[0].T + per_channel[1] @ per_channel[1].T) / 2
    assert torch.allclose(out @ out.T, expected, atol=1e-6)
    # the plain cosine is the dominant channel's
    plain = F.normalize(flat, dim=1)
    assert not torch.allclose(plain @ plain.T, expected, atol=0.05)
    assert torch.allclose(channel_blocks_unit(flat, 1), plain)
    with pytest.raises(ConfigError, match="channel blocks"):
        channel_blocks_unit(flat, 3)


@pytest.mark.parametrize("blocks", [True, False])
def test_object_vectors_have_a_block_per_channel(
    field: Path, search: SimSearch, monkeypatch: pytest.MonkeyPatch, blocks: bool
) -> None:
    """The object vectors of a 2-channel field: each channel's block of length 1 / sqrt(2)
    with ``OBJECT_CHANNEL_BLOCKS`` (the default), unequal blocks without it; unit length both
    ways."""
    from simsearch_wsi.features.norm import FeatureNormalizer
    from simsearch_wsi.search import objects as object_rule

    assert object_rule.OBJECT_CHANNEL_BLOCKS is True
    monkeypatch.setattr(object_rule, "OBJECT_CHANNEL_BLOCKS", blocks)
    boxes = [_box(k) for k in range(len(CELLS))]
    with open_image(field) as img:
        spec, fmap = search.embed(img, 40.0)
        vecs = object_rule.embed_boxes(
            img,
            search.extractor,
            spec=spec,
            boxes=boxes,
            normalizer=FeatureNormalizer.of(fmap, "standardize"),
            pool_fraction=0.5,
        )
    assert len(spec.channels) == 2 and not spec.rgb
    assert vecs.shape[0] == len(CELLS)
    assert torch.allclose(vecs.norm(dim=1), torch.ones(len(CELLS)), atol=1e-5)
    norms = vecs.reshape(len(CELLS), 2, -1).norm(dim=2)
    if blocks:
        assert torch.allclose(norms, torch.full_like(norms, 0.5**0.5), atol=1e-5)
    else:
        assert float((norms[:, 0] - norms[:, 1]).abs().max()) > 0.05
