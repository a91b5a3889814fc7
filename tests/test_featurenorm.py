"""Feature normalisation options (issue 9): what each does to vectors, and that the search uses
them consistently for the map and the prototypes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.features.norm import (
    FEATURE_NORMS,
    FeatureNormalizer,
    channel_correlation,
    check_feature_norm,
    whitening_transform,
    zca_transform,
)
from simsearch_wsi.io import open_image
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.similarity import Prototype


def test_unknown_option_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="none, standardize, whiten"):
        check_feature_norm("pca")
    with pytest.raises(ConfigError, match="unknown feature normalisation"):
        SearchSettings(feature_norm="zscore")


def test_zca_whitens_a_correlated_cloud() -> None:
    """Without shrinkage the transform maps the correlation matrix to the identity; shrinkage
    damps the weak directions instead of blowing them up."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(6, 6))
    z = rng.normal(size=(20000, 6)) @ mix
    z = (z - z.mean(0)) / z.std(0)
    corr = z.T @ z / len(z)
    w0 = zca_transform(corr, 0.0)
    np.testing.assert_allclose(w0 @ corr @ w0.T, np.eye(6), atol=1e-4)
    np.testing.assert_allclose(w0, w0.T, atol=1e-5)  # ZCA is symmetric
    w = zca_transform(corr, 0.1)
    gains = np.linalg.eigvalsh(w @ corr @ w.T)
    assert gains.max() < 1.0 and gains.min() > 0.0
    assert np.abs(np.linalg.eigvalsh(w)).max() <= 1.0 / np.sqrt(0.1) + 1e-4


def test_normalizer_is_affine_then_unit_length() -> None:
    mean = torch.tensor([1.0, -2.0, 0.5])
    std = torch.tensor([2.0, 1.0, 4.0])
    t = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 2.0]])
    v = torch.tensor([[3.0, 1.0, 2.5], [0.0, 0.0, 0.0]])
    out = FeatureNormalizer(mean, std, t)(v, dim=1)
    expected = ((v - mean) / std) @ t.T
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, expected)
    # channel axis first (D, h, w), as the pooled maps are normalised
    maps = v.T.reshape(3, 1, 2)
    torch.testing.assert_close(
        FeatureNormalizer(mean, std, t)(maps, dim=0).reshape(3, 2).T, expected
    )
    torch.testing.assert_close(
        FeatureNormalizer()(v[:1], dim=1), v[:1] / v[:1].norm()
    )  # none: only unit length


@pytest.fixture(scope="module")
def random_search(tmp_path_factory: pytest.TempPathFactory) -> SimSearch:
    trunk, spec, info = build_trunk(weights="random", seed=0)
    ex = FeatureExtractor(trunk, spec, info, autocast=False)
    return SimSearch(ex, FeatureCache(tmp_path_factory.mktemp("cache")), settings=SearchSettings())


def test_whitening_transform_is_cached_beside_the_entry(
    random_search: SimSearch, synthetic_slide: Any
) -> None:
    with open_image(synthetic_slide.path) as img:
        _, fmap = random_search.embed(img, 48)
    corr = channel_correlation(fmap)
    d = fmap.shape[2]
    assert corr.shape == (d, d)
    diag = np.diag(corr)  # standardised channels: 1, or less for (nearly) dead ReLU channels
    assert np.all(diag <= 1.0 + 1e-3) and np.median(diag) == pytest.approx(1.0, abs=1e-3)
    first = whitening_transform(fmap, 0.1)
    cached = list(Path(fmap.path).parent.glob(f"{fmap.path.name}.zca-*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(whitening_transform(fmap, 0.1), first)
    cached[0].write_bytes(b"garbage")  # an unreadable cache file is recomputed
    np.testing.assert_allclose(whitening_transform(fmap, 0.1), first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", FEATURE_NORMS)
def test_map_and_prototypes_are_normalised_alike(
    norm: str, random_search: SimSearch, synthetic_slide: Any
) -> None:
    """Each option goes through the pooled map and the prototype vectors alike: the map's value
    at the prototype's own window is its cosine with itself (about 1 in bf16), and each option
    has its own pooled cache."""
    search = SimSearch(
        random_search.extractor, random_search.cache, settings=SearchSettings(feature_norm=norm)
    )
    box = synthetic_slide.objects_of("stripes")[0].box
    with open_image(synthetic_slide.path) as img:
        sim = search.similarity(
            img, [Prototype("stripes", box)], patch_size_l0=(box.width_l0, box.height_l0)
        )
        result = search.suggest(img, [Prototype("stripes", box)], thresholds={"stripes": 0.0})
    x_a, y_a, w_a, h_a = sim.spec.scale.box_to_analysis(box)
    i, j = sim.geometry.window_index(x_a + w_a / 2, y_a + h_a / 2)
    assert sim.maps[0, i, j] == pytest.approx(1.0, abs=0.02)
    finite = sim.maps[0][np.isfinite(sim.maps[0])]
    if norm != "none":  # raw random-weight features are all alike (cosine > 0.97)
        assert np.median(finite) < 0.9
    assert result.feature_norm == norm and result.summary()["feature_norm"] == norm
    tag = {"none": "raw", "standardize": "std", "whiten": "zca"}[norm]
    assert list(Path(sim.fmap.path).parent.glob(f"{sim.fmap.path.name}.pooled-*-{tag}*"))


def test_very_wide_maps_are_standardised_only(
    random_search: SimSearch, synthetic_slide: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simsearch_wsi.features import norm as featurenorm

    with open_image(synthetic_slide.path) as img:
        _, fmap = random_search.embed(img, 48)
    assert FeatureNormalizer.of(fmap, "whiten").transform is not None
    monkeypatch.setattr(featurenorm, "WHITEN_MAX_DIM", fmap.shape[2] - 1)
    wide = FeatureNormalizer.of(fmap, "whiten")
    assert wide.transform is None and wide.mean is not None
