"""Search options of issue 18: the object-size rule ``dense="auto"`` and query expansion
(``expand``), on a small seeded field of touching nuclei; with a ``floor`` (issue 28), and the
dense rule's background candidates."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import AnalysisScale, FeatureExtractor, FeatureSpec
from simsearch_wsi.io import open_image
from simsearch_wsi.search.engine import (
    AUTO_DENSE_SIZE_RATIO,
    SearchSettings,
    SimSearch,
    resolve_dense,
)
from simsearch_wsi.search.similarity import (
    DENSE_SPACING_FRACTION,
    PatchGeometry,
    Prototype,
    background_candidates,
    windows_near_centres,
)
from simsearch_wsi.synthetic.dense import make_dense_field

CLS = "nucleus"


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    trunk, spec, info = build_trunk("resnet18-l3", "embedded", seed=0)
    return FeatureExtractor(trunk, spec, info, device=torch.device("cpu"), autocast=False)


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("options")
    return make_dense_field(root / "f.tiff", width=128, height=128, spacing=1.0, seed=5)


def _square(side: float, x: float = 10.0) -> Prototype:
    return Prototype("a", BoxL0(x, 10.0, side, side))


def test_resolve_dense_rule() -> None:
    same = [_square(14.0), _square(16.0, x=40.0), _square(15.0, x=70.0)]
    assert resolve_dense("auto", same)
    # cells of 13 to 80 px (a screening plate): no one object size, the patch rule
    mixed = [_square(13.0), _square(80.0, x=40.0)]
    assert not resolve_dense("auto", mixed)
    edge = [_square(10.0), _square(10.0 * AUTO_DENSE_SIZE_RATIO, x=40.0)]
    assert resolve_dense("auto", edge)
    # an elongated box compares its long side with the shortest side of them all
    long_box = [Prototype("a", BoxL0(0, 0, 10.0, 10.0 * AUTO_DENSE_SIZE_RATIO + 1))]
    assert not resolve_dense("auto", long_box)
    assert resolve_dense(True, mixed) and not resolve_dense(False, same)
    with pytest.raises(ConfigError, match="no prototypes"):
        resolve_dense("auto", [])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"dense": "yes"}, "dense"), ({"dense": 1}, "dense"), ({"expand": -1}, "expand")],
)
def test_settings_refuse_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SearchSettings(**kwargs)


@pytest.mark.slow
def test_auto_is_dense_for_objects_of_one_size(
    field: Any, extractor: FeatureExtractor, tmp_path: Any
) -> None:
    protos = [Prototype(CLS, o.box) for o in field.objects[:3]]
    assert resolve_dense("auto", protos)
    runs = {}
    for mode in ("auto", True, False):
        search = SimSearch(extractor, FeatureCache(tmp_path), settings=SearchSettings(dense=mode))
        with open_image(field.path) as img:
            runs[mode] = search.suggest(img, protos, thresholds={CLS: -1.0})
    auto, dense, patch = runs["auto"], runs[True], runs[False]
    assert auto.object_size_l0 == dense.object_size_l0 is not None
    assert patch.object_size_l0 is None
    assert [(s.box, s.similarity) for s in auto.suggestions] == [
        (s.box, s.similarity) for s in dense.suggestions
    ]
    # touching nuclei: half an object apart, more suggestions than a patch apart
    assert len(dense.suggestions) > len(patch.suggestions)


@pytest.mark.slow
def test_expand_adds_the_best_hits_as_prototypes(
    field: Any, extractor: FeatureExtractor, tmp_path: Any
) -> None:
    proto = Prototype(CLS, field.objects[0].box)
    out = {}
    for k in (0, 3):
        search = SimSearch(
            extractor, FeatureCache(tmp_path), settings=SearchSettings(dense=True, expand=k)
        )
        with open_image(field.path) as img:
            out[k] = search.suggest(img, [proto], thresholds={CLS: -1.0})
    first = sorted(out[0].suggestions, key=lambda s: -s.similarity)[:3]
    # the first pass's three best hits now match themselves (similarity ~1) and stay suggested
    for hit in first:
        again = [
            s
            for s in out[3].suggestions
            if np.hypot(*np.subtract(s.box.center_l0, hit.box.center_l0)) < 2.0
        ]
        assert again and max(s.similarity for s in again) > 0.97
    assert not any(s.similarity > 0.97 for s in out[0].suggestions)
    # the prototype itself is still not suggested
    cx, cy = proto.box.center_l0
    assert not any(
        np.hypot(s.box.center_l0[0] - cx, s.box.center_l0[1] - cy) < 2.0 for s in out[3].suggestions
    )


def _spec(scale: AnalysisScale) -> FeatureSpec:
    spec: Any = FeatureSpec.__new__(FeatureSpec)
    object.__setattr__(spec, "scale", scale)
    return spec  # type: ignore[no-any-return]


def test_dense_fine_needs_dense() -> None:
    for mode in (False, "auto"):
        with pytest.raises(ConfigError, match="dense_fine needs dense=True"):
            SearchSettings(dense=mode, dense_fine=True)
    assert SearchSettings(dense=True, dense_fine=True).dense_fine


def test_windows_near_centres_is_the_euclidean_rule() -> None:
    scale = AnalysisScale(level=0, resample=0.25, downsample_x=0.25, downsample_y=0.25)
    geometry = PatchGeometry(32.0, 32.0, 16)
    centres = [(30.0, 41.5), (100.25, 12.0), (-5.0, 200.0)]
    radius_a = 37.0
    near = windows_near_centres(
        (20, 12), centres, geometry=geometry, spec=_spec(scale), radius_a=radius_a
    )
    ii, jj = np.mgrid[0:20, 0:12]
    cx, cy = geometry.window_center_a(ii, jj)  # type: ignore[arg-type]
    want = np.zeros((20, 12), dtype=bool)
    for x_l0, y_l0 in centres:
        want |= np.hypot(cx - x_l0 / 0.25, cy - y_l0 / 0.25) < radius_a
    assert want.any() and not want.all()
    assert np.array_equal(near, want)


def test_dense_background_avoids_suggestion_centres_not_their_boxes() -> None:
    """Object-sized suggestions half an object apart cover every window: avoiding their boxes
    leaves no background candidate, avoiding their centres (by the spacing) leaves some, each
    clear of every centre and of the labelled boxes."""
    scale = AnalysisScale(level=0, resample=0.25, downsample_x=0.25, downsample_y=0.25)
    spec = _spec(scale)
    geometry = PatchGeometry(32.0, 32.0, 16)  # pooled over half an object of 16 level-0 px
    object_a = (64.0, 64.0)
    mean_map = np.random.default_rng(2).uniform(-1, 1, (40, 40)).astype(np.float32)
    size = (168, 168)
    # suggestion centres on a grid 14 level-0 px apart (> 8 = half an object)
    centres = [(float(x), float(y)) for y in range(4, 168, 14) for x in range(4, 168, 14)]
    boxes = [BoxL0(x - 8.0, y - 8.0, 16.0, 16.0) for x, y in centres]
    labelled = [BoxL0(60.0, 60.0, 16.0, 16.0)]
    common: dict[str, Any] = {
        "spec": spec,
        "n_high": 5,
        "n_low": 5,
        "image_size_l0": size,
        "object_size_a": object_a,
    }
    assert background_candidates(mean_map, geometry, avoid=labelled + boxes, **common) == []
    found = background_candidates(
        mean_map, geometry, avoid=labelled, avoid_centres_l0=centres, **common
    )
    assert len(found) >= 4
    radius_l0 = DENSE_SPACING_FRACTION * min(object_a) * 0.25
    snap_l0 = 0.5 * 0.1 * object_a[0] * 0.25 * np.sqrt(2)  # object_box snaps the centre
    for b in found:
        bx, by = b.box.center_l0
        gap = min(np.hypot(bx - x, by - y) for x, y in centres)
        assert gap >= radius_l0 - snap_l0 - 1e-6
        assert not any(b.box.intersects(a) for a in labelled)
    with pytest.raises(ConfigError, match="object size"):
        background_candidates(
            mean_map, geometry, spec=spec, avoid_centres_l0=centres, image_size_l0=size
        )


@pytest.mark.slow
def test_floor_changes_nothing_above_the_thresholds_with_expand(
    field: Any, extractor: FeatureExtractor, tmp_path: Any
) -> None:
    """Expansion takes its hits from the suggestions at or above the thresholds only, and the
    background from those too: a floor adds candidates below and changes nothing else."""
    protos = [Prototype(CLS, o.box) for o in field.objects[:2]]
    one_pass = SimSearch(extractor, FeatureCache(tmp_path), settings=SearchSettings(dense=True))
    search = SimSearch(
        extractor, FeatureCache(tmp_path), settings=SearchSettings(dense=True, expand=3)
    )
    with open_image(field.path) as img:
        probe = one_pass.suggest(img, protos, thresholds={CLS: -1.0})
        # a threshold that keeps 2 first-pass suggestions: fewer than expand's 3 hits
        sims = sorted((s.similarity for s in probe.suggestions), reverse=True)
        t = {CLS: float(sims[1])}
        plain = search.suggest(img, protos, thresholds=t, n_background=3)
        floored = search.suggest(img, protos, thresholds=t, n_background=3, floor=-1.0)
    assert len(floored.suggestions) > len(plain.suggestions)
    above = [(s.box, s.similarity, s.rank) for s in floored.suggestions if s.similarity >= t[CLS]]
    assert above == [(s.box, s.similarity, s.rank) for s in plain.suggestions]
    assert plain.background and [(b.box, b.similarity) for b in floored.background] == [
        (b.box, b.similarity) for b in plain.background
    ]
    assert plain.expand == 3 and plain.summary()["expand"] == 3
    assert any("query expansion: 2 first-pass" in n for n in plain.notes)


@pytest.mark.slow
def test_dense_background_with_suggestions_everywhere(
    field: Any, extractor: FeatureExtractor, tmp_path: Any
) -> None:
    """Threshold -1: object-spaced suggestions cover the field, background candidates remain,
    clear of the prototypes and away from every suggestion centre."""
    protos = [Prototype(CLS, o.box) for o in field.objects[:2]]
    search = SimSearch(extractor, FeatureCache(tmp_path), settings=SearchSettings(dense=True))
    with open_image(field.path) as img:
        result = search.suggest(img, protos, thresholds={CLS: -1.0}, n_background=3)
    assert result.object_size_l0 is not None and result.background
    radius_l0 = DENSE_SPACING_FRACTION * min(result.object_size_l0)
    for b in result.background:
        assert not any(b.box.intersects(p.box) for p in protos)
        bx, by = b.box.center_l0
        gap = min(
            np.hypot(bx - s.box.center_l0[0], by - s.box.center_l0[1]) for s in result.suggestions
        )
        assert gap >= 0.8 * radius_l0
