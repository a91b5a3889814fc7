"""Dense small objects (issue 32): touching nuclei and blood cells, each reachable by one
suggestion or detection, none reported twice."""

from __future__ import annotations

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
from simsearch_wsi.infer.dense import ClassMaps, detect
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
    # five nuclei outlined tightly, as a user draws them
    protos = [Prototype(CLS, o.box) for o in field.objects[:5]]
    size = object_size_l0(protos)
    radius = 0.3 * max(size)  # the paper's match radius with the box as the patch
    before = SimSearch(extractor, FeatureCache(tmp_path), settings=SearchSettings())
    dense = SimSearch(extractor, FeatureCache(tmp_path), settings=SearchSettings(dense=True))
    with open_image(field.path) as img:
        old = before.suggest(img, protos, thresholds={CLS: -1.0})
        new = dense.suggest(img, protos, thresholds={CLS: -1.0})
        # a session passes its patch size (the object's): pooled over half of it all the same
        again = dense.suggest(img, protos, thresholds={CLS: -1.0}, patch_size_l0=size)
    assert again.geometry == new.geometry and again.suggestions == new.suggestions
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
