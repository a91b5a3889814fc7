"""Search options of issue 18: the object-size rule ``dense="auto"`` and query expansion
(``expand``), on a small seeded field of touching nuclei."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.search.engine import (
    AUTO_DENSE_SIZE_RATIO,
    SearchSettings,
    SimSearch,
    resolve_dense,
)
from simsearch_wsi.search.similarity import Prototype
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
