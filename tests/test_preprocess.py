"""Tests of features.preprocess: percentile normalisation, channel report and selection."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from simsearch_wsi.core.errors import ConfigError, MetadataError
from simsearch_wsi.features.preprocess import (
    ChannelNormalization,
    channel_correlation,
    fit_normalization,
    image_channel_percentiles,
    select_channels,
)
from simsearch_wsi.features.tissue import TissueMask
from simsearch_wsi.io.memory import ArraySource


def _fluo_images(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for i, (h, w) in enumerate([(30, 40), (25, 33), (41, 29), (36, 36), (20, 50)]):
        a = np.empty((h, w, 2), dtype=np.uint16)
        a[..., 0] = rng.integers(100 + 50 * i, 1000 + 300 * i, size=(h, w))
        a[..., 1] = rng.gamma(2.0, 200.0 + 40 * i, size=(h, w)).astype(np.uint16)
        arrays.append(a)
    return arrays


def test_fit_normalization_matches_hand_computation() -> None:
    arrays = _fluo_images(0)
    images = [ArraySource(a, channel_names=("DAPI", "CD3")) for a in arrays]
    norm = fit_normalization(images)

    p5 = np.array([[np.percentile(a[..., c], 5) for c in range(2)] for a in arrays])
    p95 = np.array([[np.percentile(a[..., c], 95) for c in range(2)] for a in arrays])
    expected_low = np.percentile(p5, 0.5, axis=0)
    expected_high = np.percentile(p95, 99.5, axis=0)

    assert norm.method == "simsearch-percentile"
    assert norm.channel_names == ("DAPI", "CD3")
    np.testing.assert_allclose(norm.low, expected_low)
    np.testing.assert_allclose(norm.high, expected_high)
    # the low value sits near the smallest 5th percentile, not at any image's minimum
    assert p5[:, 0].min() <= norm.low[0] < p5[:, 0].max()

    out = norm.apply(arrays[2])
    assert out.dtype == np.float32 and out.shape == arrays[2].shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    manual = np.clip(
        (arrays[2][..., 1] - expected_low[1]) / (expected_high[1] - expected_low[1]), 0, 1
    )
    np.testing.assert_allclose(out[..., 1], manual, rtol=1e-5, atol=1e-6)


def test_image_channel_percentiles_use_mask_and_budget() -> None:
    rng = np.random.default_rng(1)
    arr = rng.random((60, 80, 1)).astype(np.float32)
    arr[:, 40:] += 10.0  # the right half is much brighter
    src = ArraySource(arr)
    whole = image_channel_percentiles(src)
    np.testing.assert_allclose(whole[0], np.percentile(arr[..., 0], [5, 95]))

    mask = np.zeros((6, 8), dtype=bool)
    mask[:, 4:] = True
    tm = TissueMask(mask=mask, downsample_x=10.0, downsample_y=10.0, image_size_l0=(80, 60))
    right = image_channel_percentiles(src, mask=tm, percentiles=(0, 100))
    np.testing.assert_allclose(right[0], [arr[:, 40:, 0].min(), arr[:, 40:, 0].max()])

    # over budget: every f-th pixel of the (single) level is measured
    small = image_channel_percentiles(src, max_pixels=500)
    f = math.ceil(math.sqrt(60 * 80 / 500))
    np.testing.assert_allclose(small[0], np.percentile(arr[::f, ::f, 0], [5, 95]))


def test_brightfield_set_gets_fixed_range() -> None:
    rng = np.random.default_rng(2)
    images = [
        ArraySource(rng.integers(60, 200, size=(20, 20, 3), dtype=np.uint8)) for _ in range(3)
    ]
    norm = fit_normalization(images)
    assert norm.method == "fixed-range"
    assert norm.low == (0.0, 0.0, 0.0) and norm.high == (255.0, 255.0, 255.0)
    assert norm.channel_names == ("R", "G", "B")
    px = np.array([[[0, 128, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(norm.apply(px), [[[0.0, 128 / 255, 1.0]]], rtol=1e-6)


def test_mismatched_channel_counts_name_the_odd_image() -> None:
    rng = np.random.default_rng(3)
    images = [
        ArraySource(rng.random((10, 10, 2)).astype(np.float32), path="a.zarr"),
        ArraySource(rng.random((10, 10, 3)).astype(np.float32), path="odd.zarr"),
    ]
    with pytest.raises(ConfigError, match=r"odd\.zarr"):
        fit_normalization(images)
    with pytest.raises(ConfigError):
        channel_correlation(images)
    with pytest.raises(ConfigError):
        fit_normalization([])


def test_to_dict_from_dict_round_trip_and_errors() -> None:
    norm = ChannelNormalization(
        low=(1.5, 10.0, 0.0),
        high=(300.25, 4000.0, 1.0),
        channel_names=("DAPI", "CD8", "PanCK"),
        method="simsearch-percentile",
    )
    back = ChannelNormalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert back == norm
    bad = norm.to_dict() | {"version": 99}
    with pytest.raises(MetadataError, match="version"):
        ChannelNormalization.from_dict(bad)
    missing = {k: v for k, v in norm.to_dict().items() if k != "high"}
    with pytest.raises(MetadataError, match="high"):
        ChannelNormalization.from_dict(missing)
    with pytest.raises(MetadataError):
        ChannelNormalization.from_dict(norm.to_dict() | {"low": [0.0]})
    with pytest.raises(MetadataError):
        ChannelNormalization.from_dict(norm.to_dict() | {"method": "zscore"})


def test_apply_handles_flat_channel_without_division_by_zero() -> None:
    norm = ChannelNormalization(
        low=(10.0, 5.0), high=(20.0, 5.0), channel_names=("a", "b"), method="fixed-range"
    )
    x = np.array([[[5, 4], [15, 5], [25, 6]]], dtype=np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = norm.apply(x)
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(out[0, :, 1], [0.0, 0.0, 1.0])
    with pytest.raises(ConfigError):
        norm.apply(np.zeros((2, 2, 3)))


def test_normalization_select_by_name_and_index() -> None:
    norm = ChannelNormalization(
        low=(1.0, 2.0, 3.0),
        high=(10.0, 20.0, 30.0),
        channel_names=("A", "B", "C"),
        method="simsearch-percentile",
    )
    sub = norm.select(["C", 0])
    assert sub.channel_names == ("C", "A")
    assert sub.low == (3.0, 1.0) and sub.high == (30.0, 10.0)
    with pytest.raises(ConfigError, match="'A', 'B', 'C'"):
        norm.select(["D"])


def test_channel_correlation_duplicate_vs_independent() -> None:
    rng = np.random.default_rng(4)
    images = []
    for _ in range(3):
        a = rng.normal(size=(64, 64))
        b = rng.normal(size=(64, 64))
        arr = np.stack([a, a * 3.0 + 7.0, b], axis=-1).astype(np.float32)
        images.append(ArraySource(arr, channel_names=("DAPI", "DAPI_copy", "CD20")))
    report = channel_correlation(images)
    assert report.matrix.shape == (3, 3)
    assert report.matrix[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert abs(report.matrix[0, 2]) < 0.05 and abs(report.matrix[1, 2]) < 0.05
    np.testing.assert_allclose(np.diag(report.matrix), 1.0)
    assert report.mean_abs_correlation[0] == pytest.approx(
        (abs(report.matrix[0, 1]) + abs(report.matrix[0, 2])) / 2
    )
    assert report.suggest_channels() == ("DAPI", "CD20")
    assert report.suggest_channels(max_mean_abs=1.0) == ("DAPI", "DAPI_copy", "CD20")
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["channel_names"] == ["DAPI", "DAPI_copy", "CD20"]
    assert as_json["n_images"] == 3


def test_select_channels_by_name_index_and_unknown() -> None:
    rng = np.random.default_rng(5)
    arr = rng.random((4, 5, 3))
    names = ("DAPI", "CD3", "CD8")
    out, got = select_channels(arr, names, wanted=["CD8", 0])
    assert got == ("CD8", "DAPI")
    np.testing.assert_array_equal(out, arr[..., [2, 0]])
    out, got = select_channels(arr, names, wanted=["cd3", "2"])  # case-insensitive, digit string
    assert got == ("CD3", "CD8")
    with pytest.raises(ConfigError, match="CD3"):
        select_channels(arr, names, wanted=["PanCK"])
    with pytest.raises(ConfigError):
        select_channels(arr, names, wanted=[3])
    with pytest.raises(ConfigError):
        select_channels(arr, names, wanted=["DAPI", 0])
    with pytest.raises(ConfigError):
        select_channels(arr[..., :2], names, wanted=["DAPI"])


def test_suggest_channels_drops_the_more_redundant_of_a_pair() -> None:
    from simsearch_wsi.features.preprocess import ChannelCorrelationReport

    matrix = np.array(
        [
            [1.0, 0.95, 0.1, 0.0],
            [0.95, 1.0, 0.6, 0.5],
            [0.1, 0.6, 1.0, 0.2],
            [0.0, 0.5, 0.2, 1.0],
        ]
    )
    report = ChannelCorrelationReport(
        matrix=matrix,
        mean_abs_correlation=(np.abs(matrix).sum(axis=1) - 1) / 3,
        channel_names=("A", "B", "C", "D"),
        n_images=1,
    )
    assert report.suggest_channels(0.9) == ("A", "C", "D")
    assert report.suggest_channels(0.55) == ("A", "C", "D")
    assert report.suggest_channels(0.15) == ("A", "D")
    with pytest.raises(ConfigError):
        report.suggest_channels(1.5)
