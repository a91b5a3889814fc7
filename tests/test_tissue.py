"""Tests of features.tissue: brightfield / fluorescence foreground masks and their frame."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.tissue import TissueMask, detect_foreground
from simsearch_wsi.io.memory import ArraySource


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> NDArray[np.bool_]:
    yy, xx = np.mgrid[0:h, 0:w]
    inside: NDArray[np.bool_] = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r
    return inside


def _truth_on_mask_grid(tm: TissueMask, cy_l0: float, cx_l0: float, r_l0: float) -> Any:
    """The disk sampled at the centres of the mask's pixels (level-0 frame)."""
    h, w = tm.shape
    yy = (np.arange(h) + 0.5) * tm.downsample_y
    xx = (np.arange(w) + 0.5) * tm.downsample_x
    return (yy[:, None] - cy_l0) ** 2 + (xx[None, :] - cx_l0) ** 2 <= r_l0**2


def _iou(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    return float((a & b).sum() / (a | b).sum())


def _brightfield_blob(seed: int) -> tuple[ArraySource, tuple[float, float, float]]:
    rng = np.random.default_rng(seed)
    h, w = 512, 640
    glass = np.array([246.0, 244.0, 247.0])
    pink = np.array([222.0, 150.0, 196.0])
    img = np.broadcast_to(glass, (h, w, 3)) + rng.normal(0, 3, (h, w, 3))
    blob = _disk(h, w, 250, 300, 150)
    img[blob] = pink + rng.normal(0, 12, (int(blob.sum()), 3))
    src = ArraySource(np.clip(img, 0, 255).astype(np.uint8), n_levels=3, mpp=0.5)
    return src, (250.0, 300.0, 150.0)


def test_brightfield_pink_blob_on_glass_is_recovered() -> None:
    src, (cy, cx, r) = _brightfield_blob(0)
    tm = detect_foreground(src, max_side_px=160)
    assert max(tm.shape) <= 160
    assert tm.image_size_l0 == (640, 512)
    assert tm.downsample_x == pytest.approx(640 / tm.shape[1])
    assert _iou(tm.mask, _truth_on_mask_grid(tm, cy, cx, r)) > 0.9


def test_fluorescence_bright_blob_on_dark_is_recovered() -> None:
    rng = np.random.default_rng(1)
    h, w = 400, 400
    img = rng.normal(100, 10, (h, w, 2))
    blob = _disk(h, w, 180, 220, 110)
    img[blob, 0] = rng.normal(2500, 300, int(blob.sum()))
    img[blob, 1] = rng.normal(900, 150, int(blob.sum()))
    src = ArraySource(np.clip(img, 0, None).astype(np.uint16), n_levels=2)
    assert src.modality == "fluorescence"
    tm = detect_foreground(src, max_side_px=200)
    assert _iou(tm.mask, _truth_on_mask_grid(tm, 180, 220, 110)) > 0.9


def test_all_tissue_brightfield_crop_is_all_foreground() -> None:
    rng = np.random.default_rng(2)
    h, w = 256, 256
    # pale pink stroma with purple nuclei everywhere; no glass at all
    img = np.broadcast_to(np.array([225.0, 165.0, 205.0]), (h, w, 3)) + rng.normal(0, 8, (h, w, 3))
    nuclei = rng.random((h // 8, w // 8)) < 0.35
    nuclei_full = np.kron(nuclei, np.ones((8, 8), dtype=bool)).astype(bool)
    img[nuclei_full] = np.array([110.0, 60.0, 150.0])
    src = ArraySource(np.clip(img, 0, 255).astype(np.uint8), n_levels=2)
    tm = detect_foreground(src, max_side_px=128)
    assert tm.area_fraction > 0.98


def test_bare_glass_has_no_foreground() -> None:
    rng = np.random.default_rng(3)
    img = np.clip(rng.normal(244, 3, (200, 200, 3)), 0, 255).astype(np.uint8)
    tm = detect_foreground(ArraySource(img), max_side_px=100)
    assert tm.area_fraction < 0.01


def test_confluent_fluorescence_is_all_foreground() -> None:
    rng = np.random.default_rng(4)
    h, w = 240, 240
    # cytoplasm everywhere with brighter nuclei: no dark background anywhere
    img = rng.normal(1500, 100, (h, w, 1))
    nuclei = np.kron(rng.random((h // 6, w // 6)) < 0.3, np.ones((6, 6))).astype(bool)
    img[nuclei] = 3200.0
    tm = detect_foreground(ArraySource(img.astype(np.uint16)), max_side_px=120)
    assert tm.area_fraction > 0.98


def test_featureless_dark_noise_is_kept_rather_than_split() -> None:
    # With no absolute dark reference, an image of noise only is ambiguous; the rule prefers
    # foreground over cutting the noise in two halves at its median.
    rng = np.random.default_rng(8)
    img = rng.normal(0.02, 0.01, (200, 200, 1)).clip(0, None).astype(np.float32)
    tm = detect_foreground(ArraySource(img), max_side_px=100)
    assert tm.area_fraction > 0.95


def test_detect_foreground_never_reads_level_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = _brightfield_blob(5)
    read_levels: list[int] = []
    original = src._read_window

    def spy(level: int, x0: int, y0: int, x1: int, y1: int) -> Any:
        read_levels.append(level)
        return original(level, x0, y0, x1, y1)

    monkeypatch.setattr(src, "_read_window", spy)
    detect_foreground(src, max_side_px=160)
    assert read_levels and 0 not in read_levels
    assert set(read_levels) == {2}


def test_small_objects_removed_by_area_in_um2() -> None:
    rng = np.random.default_rng(6)
    img = np.clip(rng.normal(245, 2, (256, 256, 3)), 0, 255)
    img[_disk(256, 256, 128, 128, 60)] = (200, 120, 180)
    img[_disk(256, 256, 30, 30, 6)] = (200, 120, 180)  # ~113 px = 28 um2 at 0.5 um/px
    src = ArraySource(img.astype(np.uint8), mpp=0.5)
    kept = detect_foreground(src, max_side_px=256, min_object_um2=1.0)
    dropped = detect_foreground(src, max_side_px=256, min_object_um2=100.0)
    assert kept.mask[30, 30] and not dropped.mask[30, 30]
    assert kept.mask[128, 128] and dropped.mask[128, 128]
    with pytest.raises(ConfigError):
        detect_foreground(ArraySource(img.astype(np.uint8)), min_object_um2=100.0)


def test_bad_arguments_raise_config_error() -> None:
    src, _ = _brightfield_blob(7)
    with pytest.raises(ConfigError):
        detect_foreground(src, method="phase")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        detect_foreground(src, max_side_px=0)


def test_fraction_in_box_exact_areas() -> None:
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:6, 4:8] = True  # level-0 x [16, 32), y [8, 24) at downsample 4
    tm = TissueMask(mask=mask, downsample_x=4.0, downsample_y=4.0, image_size_l0=(80, 40))
    assert tm.area_fraction == pytest.approx(16 / 200)
    assert tm.fraction_in_box(16, 8, 16, 16) == pytest.approx(1.0)
    assert tm.fraction_in_box(0, 0, 80, 40) == pytest.approx(256 / 3200)
    assert tm.fraction_in_box(24, 8, 16, 16) == pytest.approx(0.5)
    assert tm.fraction_in_box(17, 9, 2, 2) == pytest.approx(1.0)  # inside one mask pixel
    assert tm.fraction_in_box(14, 8, 4, 4) == pytest.approx(0.5)  # half a pixel column
    assert tm.fraction_in_box(200, 200, 10, 10) == 0.0
    assert tm.fraction_in_box(-16, -8, 48, 32) == pytest.approx(256 / 1536)
    with pytest.raises(ConfigError):
        tm.fraction_in_box(0, 0, 0, 5)


def test_to_level_nearest_neighbour_and_png(tmp_path: Path) -> None:
    mask = np.zeros((4, 6), dtype=bool)
    mask[1, 2] = True
    tm = TissueMask(mask=mask, downsample_x=10.0, downsample_y=10.0, image_size_l0=(60, 40))
    up = tm.to_level(12, 8)
    assert up.shape == (8, 12)
    expected = np.zeros((8, 12), dtype=bool)
    expected[2:4, 4:6] = True
    np.testing.assert_array_equal(up, expected)
    np.testing.assert_array_equal(tm.to_level(6, 4), mask)
    path = tm.save_png(tmp_path / "mask.png")
    back = np.asarray(Image.open(path))
    np.testing.assert_array_equal(back > 0, mask)
    assert not tm.mask.flags.writeable


def test_huge_single_level_is_streamed_not_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("simsearch_wsi.features.tiling._BAND_PIXELS", 20_000)
    src, (cy, cx, r) = _brightfield_blob(9)
    single = ArraySource(src.read_level(0), mpp=0.5)
    windows: list[tuple[int, int, int, int]] = []
    original = single._read_window

    def spy(level: int, x0: int, y0: int, x1: int, y1: int) -> Any:
        windows.append((x0, y0, x1, y1))
        return original(level, x0, y0, x1, y1)

    monkeypatch.setattr(single, "_read_window", spy)
    tm = detect_foreground(single, max_side_px=160)
    assert len(windows) > 1
    assert all((x1 - x0) * (y1 - y0) < 640 * 512 for x0, y0, x1, y1 in windows)
    assert max(tm.shape) <= 160
    assert _iou(tm.mask, _truth_on_mask_grid(tm, cy, cx, r)) > 0.9


def test_fluorescence_region_of_resolved_nuclei_is_one_region() -> None:
    # full-resolution field: a disk populated by separate nuclei on a dark background; with the
    # pixel size known the nuclei are merged into the tissue region they populate
    rng = np.random.default_rng(10)
    h, w = 240, 240
    region = _disk(h, w, 120, 120, 85)
    img = rng.normal(300, 40, (h, w, 2))  # no autofluorescence: only the nuclei show tissue
    nuclei = np.zeros((h, w), dtype=bool)
    for cy in range(6, h, 14):
        for cx in range(6, w, 14):
            y, x = cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)
            if region[y, x]:
                nuclei |= _disk(h, w, y + 0.5, x + 0.5, 4)
    img[nuclei, 0] += 6000
    src = ArraySource(img.clip(0, None).astype(np.uint16), mpp=0.65)
    tm = detect_foreground(src, max_side_px=240)
    truth = _truth_on_mask_grid(tm, 120, 120, 85)
    assert _iou(tm.mask, truth) > 0.85
