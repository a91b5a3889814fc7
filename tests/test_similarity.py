"""Similarity search: pooling, rotations, suggestions on synthetic slides, background."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import ArraySource, open_image
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.similarity import PatchGeometry, Prototype, Suggestion, pool


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> SimSearch:
    trunk, spec, info = build_trunk(weights="random", seed=0)
    ex = FeatureExtractor(trunk, spec, info, autocast=False)
    # pinned to per-image standardisation and the patch rule: the numbers below were measured
    # with them (issue 3), and three tests check what the patch rule guarantees (one suggestion
    # per rotated copy a patch apart, background boxes clear of every suggestion box); the
    # default normalisation and search rule are tested in test_default_features.py, the object
    # rule in test_dense_objects.py and test_search_options.py. With this random-weight trunk
    # the object rule does not reach test_one_prototype_finds_its_class's bars (cluster recall
    # 4/7 at the default threshold)
    return SimSearch(
        ex,
        FeatureCache(tmp_path_factory.mktemp("cache")),
        settings=SearchSettings(tile_size=512, feature_norm="standardize", dense=False),
    )


def test_gaussian_pooling_kernel() -> None:
    geo = PatchGeometry(width_a=64, height_a=48, stride=16)
    k = geo.kernel()
    assert k.shape == (3, 4) and torch.isclose(k.sum(), torch.tensor(1.0))
    assert k[1, 1] > k[0, 0]  # centre-focused
    feats = torch.ones(5, 10, 12)
    pooled = pool(feats, k)
    assert pooled.shape == (5, 8, 9)
    torch.testing.assert_close(pooled, torch.ones_like(pooled))  # weights sum to 1
    assert geo.window_stride_a == pytest.approx(6.4)
    i, j = geo.window_index(*geo.window_center_a(5, 7))
    assert (i, j) == (5, 7)


def _match(suggestions: list[Suggestion], truth: list[tuple[float, float]], radius: float) -> int:
    used: set[int] = set()
    tp = 0
    for s in sorted(suggestions, key=lambda g: -g.similarity):
        cx, cy = s.box.center_l0
        d = [np.hypot(cx - t[0], cy - t[1]) for t in truth]
        k = int(np.argmin(d)) if d else -1
        if k >= 0 and d[k] <= radius and k not in used:
            used.add(k)
            tp += 1
    return tp


def test_one_prototype_finds_its_class(synthetic_slide: Any, search: SimSearch) -> None:
    """Issue 3: one prototype per class (random-weight trunk) finds same-class motifs.

    Measured on this slide (seed 0): recall 0.86 / 0.86 / 1.0 and precision 0.60 / 0.86 / 0.09
    for ring / cluster / stripes at the default threshold 0.5 (pooled ring + cluster: recall
    12/14 = 0.86, precision 12/17 = 0.71); the faint stripes motif matches tissue texture with
    random weights. Asserted a little below, so that one motif more or less on another CPU does
    not fail the test.
    """
    protos = [Prototype(c, synthetic_slide.objects_of(c)[0].box) for c in synthetic_slide.classes]
    with open_image(synthetic_slide.path) as img:
        result = search.suggest(img, protos)
    assert result.seconds_query < 60
    tp_total = n_total = truth_total = 0
    recalls = {}
    for c in synthetic_slide.classes:
        truth = [o.center_l0 for o in synthetic_slide.objects_of(c)[1:]]
        mine = [s for s in result.suggestions if s.class_name == c]
        tp = _match(mine, truth, radius=24)
        recalls[c] = tp / len(truth)
        if c in ("ring", "cluster"):
            tp_total, n_total, truth_total = (
                tp_total + tp,
                n_total + len(mine),
                truth_total + len(truth),
            )
    assert tp_total / truth_total >= 0.75, recalls
    assert tp_total / n_total >= 0.6
    assert recalls["stripes"] >= 0.8
    ranks = [s.rank for s in result.suggestions if s.class_name == "ring"]
    assert ranks == list(range(1, len(ranks) + 1))
    # the prototypes themselves are not suggested back
    for p in protos:
        assert not any(
            s.class_name == p.class_name
            and s.box.intersects(p.box)
            and abs(s.box.center_l0[0] - p.box.center_l0[0]) < 8
            for s in result.suggestions
        )


def test_thresholds_filter_and_validate(synthetic_slide: Any, search: SimSearch) -> None:
    protos = [Prototype("ring", synthetic_slide.objects_of("ring")[0].box)]
    with open_image(synthetic_slide.path) as img:
        low = search.suggest(img, protos, thresholds={"ring": 0.3})
        high = search.suggest(img, protos, thresholds={"ring": 0.8})
        assert len(high.suggestions) < len(low.suggestions)
        assert all(s.similarity >= 0.8 for s in high.suggestions)
        assert high.seconds_embed < 5  # the second query reuses the cached map
        with pytest.raises(ConfigError, match=r"unknown class\(es\) \['Tumor'\]"):
            search.suggest(img, protos, thresholds={"Tumor": 0.5})
        with pytest.raises(ConfigError, match="reserved"):
            search.suggest(img, [Prototype("background", protos[0].box)])


def _l_shape(size: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[4:-4, 4:12] = True
    m[-12:-4, 4:-4] = True
    return m


def test_rotated_copies_are_found(search: SimSearch) -> None:
    """A prototype matches its 90/180/270-degree rotations as well as a copy of itself."""
    rng = np.random.default_rng(0)
    img = np.full((512, 512, 3), 225, np.uint8) + rng.integers(0, 20, (512, 512, 3), np.uint8)
    shape = _l_shape(48)
    spots = {
        "proto": (64, 64),
        "copy": (320, 64),
        "rot90": (64, 320),
        "rot180": (320, 320),
        "rot270": (192, 192),
    }
    for name, (y, x) in spots.items():
        k = {"proto": 0, "copy": 0, "rot90": 1, "rot180": 2, "rot270": 3}[name]
        img[y : y + 48, x : x + 48][np.rot90(shape, k)] = (90, 30, 120)
    src = ArraySource(img, mpp=0.5, path="l_shapes")
    proto = Prototype("L", BoxL0(64, 64, 48, 48))
    result = search.suggest(src, [proto], thresholds={"L": 0.0})
    # the 4 best suggestions are one per copy (each nearest a different copy, within 2/3 of
    # a patch: the L's mass is off-centre, so rotated copies peak a little off their centre)
    best = result.suggestions[:4]
    nearest = []
    for s in best:
        cx, cy = s.box.center_l0
        dist = {n: float(np.hypot(cx - (x + 24), cy - (y + 24))) for n, (y, x) in spots.items()}
        name = min(dist, key=lambda n: dist[n])
        assert dist[name] <= 32, (name, dist[name])
        nearest.append(name)
    assert sorted(nearest) == sorted(["copy", "rot90", "rot180", "rot270"])
    assert min(s.similarity for s in best) > 0.5
    assert all(s.similarity < 0.3 for s in result.suggestions[4:])  # a clear margin


def test_background_candidates(synthetic_slide: Any, search: SimSearch) -> None:
    protos = [Prototype(c, synthetic_slide.objects_of(c)[0].box) for c in synthetic_slide.classes]
    with open_image(synthetic_slide.path) as img:
        result = search.suggest(img, protos, n_background=5)
    bg = result.background
    assert len(bg) == 10
    sims = [b.similarity for b in bg]
    assert sims[:5] == sorted(sims[:5], reverse=True)
    assert min(sims[:5]) > max(sims[5:])  # 5 most, then 5 least similar
    labelled = [p.box for p in protos] + [s.box for s in result.suggestions]
    assert not any(b.box.intersects(lb) for b in bg for lb in labelled)


def test_bad_prototypes(search: SimSearch) -> None:
    from simsearch_wsi.qupath.geojson import Annotation
    from simsearch_wsi.search.engine import prototypes_from_annotations

    src = ArraySource(np.full((256, 256, 3), 200, np.uint8), mpp=0.5)
    with pytest.raises(ConfigError, match="no prototypes"):
        search.suggest(src, [])

    def ann(box: BoxL0, rect: bool = True, cls: str | None = "A") -> Annotation:
        return Annotation(cls, box, rect, "annotation")

    with pytest.raises(ConfigError, match="no prototypes found"):
        prototypes_from_annotations(
            [ann(BoxL0(0, 0, 10, 10), rect=False), ann(BoxL0(0, 0, 10, 10), cls=None)],
            src,
            where="in.geojson",
        )
    with pytest.raises(ConfigError, match="prototype 0 \\(A\\) has zero area"):
        prototypes_from_annotations([ann(BoxL0(5, 5, 0, 10))], src, where="in.geojson")
    with pytest.raises(ConfigError, match=r"not inside the image .*another image"):
        prototypes_from_annotations([ann(BoxL0(300, 5, 20, 20))], src, where="in.geojson")
    good = prototypes_from_annotations([ann(BoxL0(5, 5, 20, 20))], src, where="in.geojson")
    assert good == [Prototype("A", BoxL0(5, 5, 20, 20))]


def test_geojson_output_is_valid_qupath(
    synthetic_slide: Any, search: SimSearch, tmp_path: Path
) -> None:
    import json
    import uuid

    from simsearch_wsi.qupath.geojson import (
        read_annotations,
        validate_feature_collection,
        write_feature_collection,
    )

    protos = [Prototype("ring", synthetic_slide.objects_of("ring")[0].box)]
    with open_image(synthetic_slide.path) as img:
        result = search.suggest(img, protos, n_background=2)
    out = write_feature_collection(tmp_path / "s.geojson", result.geojson_features())
    validate_feature_collection(out, image_size_l0=(synthetic_slide.width, synthetic_slide.height))
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and doc["features"]
    for f in doc["features"]:
        uuid.UUID(f["id"])
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert set(props["classification"]) == {"name", "color"}
        assert len(props["classification"]["color"]) == 3
        assert all(np.isfinite(v) for v in props["measurements"].values())
        assert set(props["measurements"]) == {"similarity", "rank"}
    back = read_annotations(out)
    assert all(a.is_rectangle and a.object_type == "detection" for a in back)
    assert {a.class_name for a in back} == {"ring", "background"}


def test_non_square_prototype_rotation0_is_the_cached_window(search: SimSearch) -> None:
    """Issue-3 review: a non-square prototype's rotation-0 vector equals the pooled map's
    vector of its window (it was embedded off-centre before)."""
    from simsearch_wsi.features.norm import FeatureNormalizer
    from simsearch_wsi.search.similarity import embed_prototypes, pooled_map

    rng = np.random.default_rng(3)
    img = rng.integers(60, 230, (384, 384, 3), dtype=np.uint8)
    src = ArraySource(img, mpp=0.5, path="noise")
    for w, h in ((128, 64), (64, 128)):
        spec, fmap = search.embed(src, max(w, h))
        geo = PatchGeometry(w / spec.scale.downsample_x, h / spec.scale.downsample_y, 16)
        proto = Prototype("A", BoxL0(96, 128, w, h))
        vecs = embed_prototypes(
            src,
            search.extractor,
            spec=spec,
            geometry=geo,
            prototypes=[proto],
            classes=["A"],
            normalizer=FeatureNormalizer.of(fmap),
        )
        x_a, y_a = (96 + w / 2) / spec.scale.downsample_x, (128 + h / 2) / spec.scale.downsample_y
        i, j = geo.window_index(x_a, y_a)
        pm = pooled_map(fmap, geo)
        from simsearch_wsi.search.similarity import as_bf16

        cached = as_bf16(np.asarray(pm.array[i, j])).float()
        cos = float(torch.dot(vecs.vectors[0], cached) / cached.norm())
        assert cos > 0.99, (w, h, cos)


def test_bf16_query_ranks_like_fp32(synthetic_slide: Any, search: SimSearch) -> None:
    from scipy.stats import spearmanr

    from simsearch_wsi.features.norm import FeatureNormalizer
    from simsearch_wsi.search.similarity import embed_prototypes, similarity_maps

    proto = Prototype("ring", synthetic_slide.objects_of("ring")[0].box)
    with open_image(synthetic_slide.path) as img:
        spec, fmap = search.embed(img, max(proto.box.width_l0, proto.box.height_l0))
        geo = PatchGeometry(
            proto.box.width_l0 / spec.scale.downsample_x,
            proto.box.height_l0 / spec.scale.downsample_y,
            16,
        )
        vecs = embed_prototypes(
            img,
            search.extractor,
            spec=spec,
            geometry=geo,
            prototypes=[proto],
            classes=["ring"],
            normalizer=FeatureNormalizer.of(fmap),
        )
    bf = similarity_maps(fmap, geo, prototypes=vecs, precision="bf16")[0]
    fp = similarity_maps(fmap, geo, prototypes=vecs, precision="fp32")[0]
    ok = np.isfinite(fp)
    assert np.array_equal(ok, np.isfinite(bf))
    assert np.abs(bf[ok] - fp[ok]).max() < 0.02
    assert spearmanr(bf[ok], fp[ok]).statistic > 0.999


def test_normalisation_is_fitted_once_per_image(
    search: SimSearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeated queries on a fluorescence image read no pixels for the normalisation."""
    import simsearch_wsi.search.engine as search_module

    calls: list[int] = []
    real = search_module.search_normalization

    def counting(image: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(image, **kw)

    monkeypatch.setattr(search_module, "search_normalization", counting)
    rng = np.random.default_rng(5)
    src = ArraySource(rng.integers(0, 4000, (128, 128, 2), dtype=np.uint16), mpp=0.5, path="fluo")
    first = search.normalization_for(src)
    assert search.normalization_for(src) is first
    assert len(calls) == 1
