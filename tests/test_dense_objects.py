"""Dense small objects (issue 32): touching nuclei and blood cells, each reachable by one
suggestion or detection, none reported twice."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import AnalysisScale, FeatureExtractor, FeatureSpec
from simsearch_wsi.infer.dense import ClassMaps, class_log_odds, detect, ranking_scores, segment
from simsearch_wsi.io import open_image
from simsearch_wsi.search.engine import SearchSettings, SimSearch, object_size_l0
from simsearch_wsi.search.similarity import PatchGeometry, Prototype
from simsearch_wsi.synthetic.dense import make_dense_field

CLS = "nucleus"


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    trunk, spec, info = build_trunk("resnet18-l3", "embedded", seed=0)
    return FeatureExtractor(trunk, spec, info, device=torch.device("cpu"), autocast=False)


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("dense")
    # touching nuclei: centres >= one diameter apart, packed as densely as darts allow
    return make_dense_field(root / "f.tiff", width=160, height=160, spacing=1.0, seed=3)


def _assignment(boxes: list[BoxL0], centres: np.ndarray, radius: float) -> tuple[float, int]:
    """(fraction of objects with a box centre within ``radius``, the most boxes whose nearest
    object is one and the same object, counting only boxes within ``radius`` of it)."""
    xy = np.array([b.center_l0 for b in boxes])
    d, _ = cKDTree(xy).query(centres)
    reached = float(np.mean(d <= radius))
    d2, owner = cKDTree(centres).query(xy)
    owners = owner[d2 <= radius]
    twice = int(np.bincount(owners).max()) if len(owners) else 0
    return reached, twice


def test_dense_field_truth_is_every_object(field: Any) -> None:
    centres = np.array([o.center_l0 for o in field.objects])
    assert len(centres) > 60 and field.classes == (CLS,)
    d, _ = cKDTree(centres).query(centres, k=2)
    # neighbours touch: nearest centres one object diameter (2 x 7 px, +-15 %) apart
    assert d[:, 1].min() >= 14.0 - 1e-9 and np.median(d[:, 1]) < 17.0
    again = make_dense_field(
        field.path.with_name("g.tiff"), width=160, height=160, spacing=1.0, seed=3
    )
    assert again.objects == field.objects
    with pytest.raises(ConfigError, match="spacing"):
        make_dense_field(field.path.with_name("h.tiff"), spacing=0.2)


@pytest.mark.slow
def test_suggest_reaches_every_touching_nucleus_once(
    field: Any, extractor: FeatureExtractor, tmp_path: Path
) -> None:
    centres = np.array([o.center_l0 for o in field.objects])
    # five nuclei outlined tightly, as a user draws them; the widest first, so the first
    # prototype's box (a session's patch size) is not the median box (the object size)
    protos = sorted(
        (Prototype(CLS, o.box) for o in field.objects[:5]), key=lambda p: -p.box.width_l0
    )
    size = object_size_l0(protos)
    first = (protos[0].box.width_l0, protos[0].box.height_l0)
    assert first[0] > size[0] + 0.5
    radius = 0.3 * max(size)  # the paper's match radius with the box as the patch
    # the patch rule, the default before the object rule (what this test compares against)
    before = SimSearch(extractor, FeatureCache(tmp_path), settings=SearchSettings(dense=False))
    dense = SimSearch(extractor, FeatureCache(tmp_path), settings=SearchSettings(dense=True))
    with open_image(field.path) as img:
        old = before.suggest(img, protos, thresholds={CLS: -1.0})
        new = dense.suggest(img, protos, thresholds={CLS: -1.0})
        # a session passes its patch size (the first prototype's box): pooled over half of it,
        # at the scale of the object and with boxes of the object's size all the same
        again = dense.suggest(img, protos, thresholds={CLS: -1.0}, patch_size_l0=first)
    ds = new.scale.downsample_x
    assert again.scale == new.scale
    assert new.geometry.width_a == pytest.approx(0.5 * size[0] / ds)
    assert again.geometry.width_a == pytest.approx(0.5 * first[0] / ds)
    assert again.geometry.height_a == pytest.approx(0.5 * first[1] / ds)
    assert again.object_size_l0 == size and again.suggestions
    for s in again.suggestions:
        assert abs(s.box.width_l0 - size[0]) < 0.5 and abs(s.box.height_l0 - size[1]) < 0.5
    # the old rule keeps suggestions a patch (= a nucleus) apart: touching nuclei hide each other
    reached_old, _ = _assignment([s.box for s in old.suggestions], centres, radius)
    assert reached_old < 0.7
    boxes = [s.box for s in new.suggestions]
    inside = [p.box for p in protos]  # the prototypes themselves are not suggested again
    far = [k for k, c in enumerate(centres) if not any(b.contains_point(*c) for b in inside)]
    reached, twice = _assignment(boxes, centres[far], radius)
    # every other nucleus has a suggestion inside it (a nucleus right beside a prototype can
    # sit on the shoulder of the prototype's self-match and have no maximum of its own)
    reached_far, twice_far = _assignment(boxes, centres[far], 0.5 * min(size))
    assert reached_far >= 0.95, reached_far
    assert reached >= 0.9, reached  # within the paper's radius
    assert twice == 1 and twice_far == 1  # no nucleus reported twice
    # boxes are the object's size (QuPath shows one box per nucleus), not the pooled patch
    for b in boxes:
        assert abs(b.width_l0 - size[0]) < 0.5 and abs(b.height_l0 - size[1]) < 0.5
    assert new.object_size_l0 == size
    assert new.geometry.width_a < old.geometry.width_a  # pooled over part of the object
    assert new.summary()["object_size_l0"] == list(size)


def _peaked_maps(centres_l0: np.ndarray, *, size: int, sigma_l0: float) -> ClassMaps:
    """Two-class (nucleus, background) probability maps with a Gaussian bump per centre, on a
    4x-upsampled analysis grid (4 level-0 px per 16-px feature cell), patch 16 px."""
    scale = AnalysisScale(level=0, resample=0.25, downsample_x=0.25, downsample_y=0.25)
    geometry = PatchGeometry(64.0, 64.0, 16)
    kh, kw = geometry.kernel_hw
    n = size // 4 - kh + 1  # pooled windows per axis
    ii, jj = np.mgrid[0:n, 0:n].astype(np.float64)
    cx = 16 * (jj + kw / 2) * 0.25  # window centres, level-0 px
    cy = 16 * (ii + kh / 2) * 0.25
    bump = np.zeros((n, n))
    for x, y in centres_l0:
        bump = np.maximum(bump, np.exp(-((cx - x) ** 2 + (cy - y) ** 2) / (2 * sigma_l0**2)))
    p = (0.02 + 0.96 * bump).astype(np.float32)
    spec: Any = FeatureSpec.__new__(FeatureSpec)
    object.__setattr__(spec, "scale", scale)
    return ClassMaps(
        probabilities=np.stack([p, 1 - p]),
        classes=(CLS, "background"),
        geometry=geometry,
        spec=spec,
        image_size_l0=(size, size),
        analysis_size=(4 * size, 4 * size),
    )


def test_detect_reaches_every_touching_object_once() -> None:
    rng = np.random.default_rng(0)
    # a jittered grid of objects 16 px wide whose centres are 15-17 px apart (touching)
    g = np.arange(20.0, 180.0, 16.0)
    centres = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) + rng.uniform(-0.5, 0.5, (100, 2))
    maps = _peaked_maps(centres, size=200, sigma_l0=4.0)
    old = detect(maps, {CLS: 0.3})
    reached_old, _ = _assignment([d.box for d in old], centres, 4.8)
    assert reached_old < 0.5  # a patch apart: neighbours suppress each other
    dets = detect(maps, {CLS: 0.3}, object_size_l0=(16.0, 16.0))
    reached, twice = _assignment([d.box for d in dets], centres, 4.8)
    assert reached == 1.0 and twice == 1
    assert len(dets) == len(centres)
    assert all(abs(d.box.width_l0 - 16.0) < 1e-6 for d in dets if d.box.x_l0 > 0)


@pytest.mark.slow
def test_suggest_cli_dense(field: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from simsearch_wsi.cli.main import main

    doc = field.to_geojson()
    doc["features"] = doc["features"][:3]
    protos = tmp_path / "protos.geojson"
    protos.write_text(json.dumps(doc))
    out = tmp_path / "s.geojson"
    common = ["--weights", "random", "--cache", str(tmp_path / "cache")]
    argv = ["suggest", str(field.path), "--annotations", str(protos), "--out", str(out)]
    assert main([*argv, "--threshold", f"{CLS}=-1", "--dense", "--json", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    size = object_size_l0([Prototype(CLS, o.box) for o in field.objects[:3]])
    assert summary["object_size_l0"] == pytest.approx(list(size), abs=0.01)  # GeoJSON rounds
    feats = json.loads(out.read_text())["features"]
    assert len(feats) > 30  # many more than a patch apart would allow on 160 x 160 px
    for f in feats:  # each box is the object's size (QuPath shows one box per nucleus)
        xs = [p[0] for p in f["geometry"]["coordinates"][0]]
        assert max(xs) - min(xs) == pytest.approx(size[0], abs=0.5)


def test_finer_analysis_scale_for_small_objects(field: Any) -> None:
    with open_image(field.path) as img:
        default = AnalysisScale.for_patch(img, 14.0)
        fine = AnalysisScale.for_patch(img, 14.0, target_px=128.0, max_upsample=8.0)
        assert default.resample == 0.25  # at most 4x upsampled by default
        assert fine.resample == 0.125  # 14 px -> 112 analysis px
        with pytest.raises(ConfigError, match="4x upsampling"):
            AnalysisScale.for_level(img, 0, resample=0.125)


# --- review fixes (issue 32 follow-up) --------------------------------------------------------
def test_predict_settings_identity_without_new_options_is_unchanged() -> None:
    """Object ids and completion records are made from ``to_dict()``: options added later and
    left unset must not change it, or every earlier run's ids and records would be lost."""
    from simsearch_wsi.infer.predict import PredictSettings

    before = {  # PredictSettings().to_dict() before object_size_px existed, in field order
        "thresholds": {},
        "simplify_px": 1.0,
        "min_area_um2": 0.0,
        "tile_size": 1024,
        "batch_size": 4,
        "write_zarr": True,
        "write_overlay": True,
        "write_back": False,
    }
    assert PredictSettings().to_dict() == before
    assert str(PredictSettings().to_dict()) == str(before)  # the string the ids are made from
    sized = PredictSettings(object_size_px=14.0).to_dict()
    assert sized == {**before, "object_size_px": 14.0}
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="object size must be > 0"):
            PredictSettings(object_size_px=bad)


def test_predict_object_size_spaces_and_sizes_detections(tmp_path: Path) -> None:
    import json

    from simsearch_wsi.infer.dense import PatchModel, untrained_bundle
    from simsearch_wsi.infer.predict import PredictSettings, expand_inputs, predict_images

    f = make_dense_field(
        tmp_path / "f.tiff", kind="blood", width=96, height=96, spacing=1.0, seed=5
    )
    with open_image(f.path) as img:
        # every class above its threshold somewhere: thresholds low enough for random weights
        model = PatchModel(untrained_bundle([img], patch_size_l0=48.0, threshold=0.05))
    targets = expand_inputs([str(f.path)])
    fast = {"write_zarr": False, "write_overlay": False, "tile_size": 256}

    def boxes(out: Path) -> list[tuple[float, float]]:
        doc = json.loads((out / "f.geojson").read_text())
        sizes = []
        for feat in doc["features"]:
            if feat["properties"]["objectType"] != "detection":
                continue
            xs = [p[0] for p in feat["geometry"]["coordinates"][0]]
            ys = [p[1] for p in feat["geometry"]["coordinates"][0]]
            sizes.append((max(xs) - min(xs), max(ys) - min(ys)))
        return sizes

    plain = predict_images(
        targets,
        model,
        out_dir=tmp_path / "plain",
        open_image=open_image,
        settings=PredictSettings(**fast),  # type: ignore[arg-type]
    )
    sized = predict_images(
        targets,
        model,
        out_dir=tmp_path / "sized",
        open_image=open_image,
        settings=PredictSettings(object_size_px=12.0, **fast),  # type: ignore[arg-type]
    )
    old, new = boxes(tmp_path / "plain"), boxes(tmp_path / "sized")
    assert old and len(new) > len(old)  # half an object apart instead of a patch apart
    assert all(
        w == pytest.approx(12.0, abs=0.01) and h == pytest.approx(12.0, abs=0.01) for w, h in new
    )
    assert max(w for w, _ in old) > 40.0  # the patch's boxes (clipped at the border)
    assert sum(plain[0].n_detections.values()) == len(old)
    assert sum(sized[0].n_detections.values()) == len(new)
    # a run without the option records the same settings as before the option existed
    record = json.loads((tmp_path / "plain" / "f.predict.json").read_text())
    assert "object_size_px" not in record["run"]["settings"]
    with pytest.raises(ConfigError, match="larger than the model's patch") as err:
        predict_images(
            targets,
            model,
            out_dir=tmp_path / "big",
            open_image=open_image,
            settings=PredictSettings(object_size_px=60.0, **fast),  # type: ignore[arg-type]
        )
    assert "\n" not in str(err.value)
    assert not (tmp_path / "big" / "f.geojson").exists()


def test_peak_thresholds_are_strict_as_documented() -> None:
    """local_maxima and spaced_peaks keep maxima strictly above the threshold, compared in the
    map's float32 (what their docstrings say; making them inclusive changes which windows the
    self-learning mines, hence the trained models of other tests)."""
    from simsearch_wsi.search.similarity import local_maxima, spaced_peaks

    m = np.zeros((9, 9), dtype=np.float32)
    m[2, 2], m[6, 6] = 0.5, np.nextafter(np.float32(0.5), np.float32(1))
    m[6, 2] = np.nan
    assert local_maxima(m, threshold=0.5, min_distance_cells=1, max_peaks=10).tolist() == [[6, 6]]
    both = local_maxima(m, threshold=np.nextafter(0.5, -np.inf), min_distance_cells=1, max_peaks=10)
    assert both.tolist() == [[6, 6], [2, 2]]
    geometry = PatchGeometry(32.0, 32.0, 16)
    peaks = spaced_peaks(m, geometry=geometry, threshold=0.5, spacing_a=8.0, max_peaks=10)
    assert [(i, j) for i, j, _, _ in peaks] == [(6, 6)]


def _tiny_spec(scale: AnalysisScale) -> FeatureSpec:
    spec: Any = FeatureSpec.__new__(FeatureSpec)
    object.__setattr__(spec, "scale", scale)
    return spec  # type: ignore[no-any-return]


def test_dense_background_candidates_are_object_sized() -> None:
    from simsearch_wsi.search.similarity import background_candidates

    scale = AnalysisScale(level=0, resample=0.25, downsample_x=0.25, downsample_y=0.25)
    spec = _tiny_spec(scale)
    geometry = PatchGeometry(32.0, 32.0, 16)  # pooled over half an object of 16 level-0 px
    mean_map = np.random.default_rng(1).uniform(-1, 1, (40, 40)).astype(np.float32)
    avoid = [BoxL0(40.0, 40.0, 16.0, 16.0), BoxL0(100.0, 60.0, 16.0, 16.0)]
    size = (168, 168)
    windows = background_candidates(
        mean_map, geometry, spec=spec, n_high=6, n_low=6, avoid=avoid, image_size_l0=size
    )
    assert windows and all(b.box.width_l0 == pytest.approx(8.0) for b in windows)
    dense = background_candidates(
        mean_map,
        geometry,
        spec=spec,
        n_high=6,
        n_low=6,
        avoid=avoid,
        image_size_l0=size,
        object_size_a=(64.0, 64.0),
    )
    assert len(dense) == 12
    for b in dense:  # the object's size, clear of the labelled boxes
        assert b.box.width_l0 == pytest.approx(16.0) and b.box.height_l0 == pytest.approx(16.0)
        assert not any(b.box.intersects(a) for a in avoid)
    for part in (dense[:6], dense[6:]):  # an object apart (less the snapping to 1/10 of it)
        xy = np.array([b.box.center_l0 for b in part])
        gap = np.abs(xy[:, None] - xy[None]).max(-1) + 1e9 * np.eye(len(part))
        assert gap.min() >= 16.0 - 1.6 - 1e-6


def test_object_box_takes_the_window_by_keyword() -> None:
    import inspect

    from simsearch_wsi.search.similarity import object_box

    params = list(inspect.signature(object_box).parameters.values())
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == ["geometry", "spec"]
    scale = AnalysisScale(level=0, resample=0.25, downsample_x=0.25, downsample_y=0.25)
    box = object_box(
        PatchGeometry(32.0, 32.0, 16), _tiny_spec(scale), i=1.0, j=2.0, object_size_a=(80.0, 48.0)
    )
    # window (1, 2) is centred at (16 x (2 + 1), 16 x (1 + 1)) = (48, 32) analysis px, on the
    # snapping grid (a tenth of the object: 8 px)
    assert box == BoxL0(2.0, 2.0, 20.0, 12.0)


def test_dense_fine_scale_and_its_size_guard(extractor: FeatureExtractor, tmp_path: Path) -> None:
    """``dense_fine`` reads a 14-px object 8x upsampled (64 x 64 px -> 32 x 32 feature cells of
    256 channels: 512 KiB in float16) and refuses a map over ``dense_fine_max_bytes`` before
    embedding anything."""
    f = make_dense_field(
        tmp_path / "b.tiff", kind="blood", width=64, height=64, radius=7.0, spacing=1.0, seed=3
    )
    protos = [Prototype("rbc", o.box) for o in f.objects[:3]]
    size = object_size_l0(protos)
    exact = 32 * 32 * 256 * 2

    def search(limit: int) -> SimSearch:
        settings = SearchSettings(
            dense=True,
            dense_fine=True,
            dense_fine_max_bytes=limit,
            feature_norm="standardize",
            tile_size=512,
        )
        return SimSearch(extractor, FeatureCache(tmp_path / "cache"), settings=settings)

    with open_image(f.path) as img:
        with pytest.raises(ConfigError, match="crop the image to a region") as err:
            search(exact - 1).suggest(img, protos, thresholds={"rbc": 0.0})
        assert "\n" not in str(err.value) and "--dense" in str(err.value)
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
        result = search(exact).suggest(img, protos, thresholds={"rbc": 0.0})
    assert result.scale.resample == 0.125 and result.object_size_l0 == size
    assert result.suggestions
    for s in result.suggestions:  # the object's size, not the pooled window's
        assert s.box.width_l0 == pytest.approx(size[0], abs=0.5)
        assert s.box.height_l0 == pytest.approx(size[1], abs=0.5)


def test_search_head_detections_rank_by_their_class_against_the_background() -> None:
    """A search head's object that also looks a little like another class is not ranked below
    one that is half background: the score is ``log p_c - log p_background``. The linear head
    (maps not marked ``rank_against_background``) keeps the log-odds against all others."""
    base = _peaked_maps(np.array([[40.0, 40.0], [140.0, 140.0]]), size=200, sigma_l0=4.0)
    bump = (base.probabilities[0] - 0.02) / 0.96  # (Hp, Wp) 1 at each centre
    n = bump.shape[1]
    left = np.arange(n)[None, :] < n // 2
    # near (40, 40): 0.55 nucleus, 0.44 "other", 0.01 background at the peak
    # near (140, 140): 0.7 nucleus, 0.3 background at the peak
    nucleus = np.where(left, 0.55, 0.7) * bump
    other = np.where(left, 0.44, 0.0) * bump
    background = 1.0 - nucleus - other
    maps = dataclasses.replace(
        base,
        probabilities=np.stack([nucleus, other, background]).astype(np.float32),
        classes=(CLS, "other", "background"),
        rank_against_background=True,
    )
    dets = sorted(
        (d for d in detect(maps, {CLS: 0.5, "other": 0.5}) if d.class_name == CLS),
        key=lambda d: -d.score,
    )
    assert len(dets) == 2
    first, second = dets
    assert first.box.center_l0[0] < 100 < second.box.center_l0[0]
    assert first.score == pytest.approx(np.log(0.55 / 0.01), abs=0.05)
    assert second.score == pytest.approx(np.log(0.7 / 0.3), abs=0.05)
    # the same peaks (placed on the log-odds against all others either way), ranked the other
    # way round for a linear head
    linear = detect(
        dataclasses.replace(maps, rank_against_background=False), {CLS: 0.5, "other": 0.5}
    )
    by_linear = sorted((d for d in linear if d.class_name == CLS), key=lambda d: -d.score)
    assert [d.box for d in by_linear] == [second.box, first.box]
    assert by_linear[1].score == pytest.approx(np.log(0.55 / 0.45), abs=0.05)
    # without a background class the score is the log-odds against every other class
    two = dataclasses.replace(
        maps,
        probabilities=np.stack([nucleus, other + background]).astype(np.float32),
        classes=(CLS, "other"),
    )
    alone = detect(two, {CLS: 0.5, "other": 0.99})
    peak = max((d for d in alone if d.class_name == CLS), key=lambda d: d.probability)
    assert peak.score == pytest.approx(np.log(0.7 / 0.3), abs=0.05)


def test_ranking_scores_against_the_background_and_their_fallback() -> None:
    """``ranking_scores`` (K=3: class, other, background; (1, 4) windows): ``log p_c - log
    p_bg`` with the background's index given by keyword, ordered where ``p_c`` rounds to 1 in
    float32, NaN where the window has no value; without a background index the log-odds
    against all other classes."""
    p = np.array(
        [
            [[0.55, 0.7, 1.0 - 2e-9, np.nan]],  # the class
            [[0.44, 0.0, 1e-9, np.nan]],  # another class
            [[0.01, 0.3, 1e-9, np.nan]],  # background
        ],
        dtype=np.float32,
    )
    assert p[0, 0, 2] == 1.0  # rounded in float32: the probability cannot rank it
    s = ranking_scores(p, 0, background=2)
    assert s.shape == (1, 4) and s.dtype == np.float32
    np.testing.assert_allclose(s[0, :3], np.log([0.55 / 0.01, 0.7 / 0.3, 1.0 / 1e-9]), rtol=1e-5)
    assert np.isnan(s[0, 3])
    np.testing.assert_array_equal(
        ranking_scores(p, 0, background=-1), class_log_odds(p, 0), strict=True
    )
    with pytest.raises(TypeError):
        ranking_scores(p, 0, 2)  # type: ignore[misc]  # keyword-only after two positionals


def test_a_threshold_of_1_turns_a_class_off_where_probabilities_saturate() -> None:
    """A float32 probability rounds to exactly 1 where one class's logit is far above the
    others' (the few-label model does this on CPUs with native bf16/AMX): a threshold of 1
    still detects and segments nothing of that class, and the other class keeps its peak."""
    base = _peaked_maps(np.array([[40.0, 40.0], [140.0, 140.0]]), size=200, sigma_l0=4.0)
    bump = (base.probabilities[0] - 0.02) / 0.96  # (Hp, Wp) 1 at each centre
    n = bump.shape[1]
    left = np.arange(n)[None, :] < n // 2
    saturated = np.minimum(np.where(left, 1.0, 0.0) * bump, 1.0)  # exactly 1.0 at the left peak
    other = np.minimum(np.where(left, 0.0, 0.9) * bump, 0.9)
    background = 1.0 - saturated - other
    maps = dataclasses.replace(
        base,
        probabilities=np.stack([saturated, other, background]).astype(np.float32),
        classes=(CLS, "other", "background"),
    )
    assert float(np.nanmax(maps.probabilities[0])) == 1.0
    found = detect(maps, {CLS: 1.0, "other": 0.5})
    assert [d.class_name for d in found] == ["other"]
    assert [d.class_name for d in detect(maps, {CLS: 0.99, "other": 0.5})].count(CLS) == 1
    labels = segment(maps, {CLS: 1.0, "other": 0.5}).labels
    assert not (labels == 1).any() and (labels == 2).any()
    assert (segment(maps, {CLS: 0.5, "other": 0.5}).labels == 1).any()
