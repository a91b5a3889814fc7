"""Tests of features.tiling: grid partition, halos, level-0 round trips, reads, masks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import lvl_to_l0_location
from simsearch_wsi.features.tiling import (
    Tile,
    foreground_tiles,
    read_overview,
    read_tile,
    stitch,
    tile_grid,
)
from simsearch_wsi.features.tissue import TissueMask
from simsearch_wsi.io.memory import ArraySource


def _fluo_source(h: int, w: int, *, n_levels: int = 1, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    arr = rng.integers(1, 4000, size=(h, w, 2), dtype=np.uint16)
    return ArraySource(arr, n_levels=n_levels, mpp=0.5)


def test_tile_grid_partitions_level_exactly() -> None:
    width, height = 103, 57
    tiles = tile_grid(width, height, tile_size=16, halo=5, level=2)
    assert len(tiles) == math.ceil(width / 16) * math.ceil(height / 16)
    assert sum(t.core_area_lvl for t in tiles) == width * height
    cover = np.zeros((height, width), dtype=np.int64)
    for t in tiles:
        cover[t.core_slice_in_level()] += 1
        assert t.level == 2 and t.halo_lvl == 5
    assert np.all(cover == 1)
    # row-major: y outer, x inner
    keys = [(t.y_lvl, t.x_lvl) for t in tiles]
    assert keys == sorted(keys)
    last = tiles[-1]
    assert (last.width_lvl, last.height_lvl) == (103 - 96, 57 - 48)


@pytest.mark.parametrize(("tile_size", "halo"), [(0, 0), (-4, 2), (16, -1), (2.5, 0), (True, 0)])
def test_tile_grid_rejects_bad_arguments(tile_size: Any, halo: Any) -> None:
    with pytest.raises(ConfigError):
        tile_grid(100, 100, tile_size=tile_size, halo=halo)


def test_halo_read_region_and_core_slice() -> None:
    tile = Tile(level=0, x_lvl=32, y_lvl=16, width_lvl=20, height_lvl=10, halo_lvl=4)
    assert (tile.read_x_lvl, tile.read_y_lvl) == (28, 12)
    assert tile.read_size_lvl == (28, 18)
    sy, sx = tile.core_slice_in_read()
    assert (sy.start, sy.stop, sx.start, sx.stop) == (4, 14, 4, 24)
    read = np.zeros((18, 28))
    assert read[sy, sx].shape == (10, 20)


def test_read_tile_equals_array_inside_and_pads_at_borders() -> None:
    src = _fluo_source(96, 80, n_levels=2, seed=1)
    level1 = src.read_level(1)  # (48, 40, 2)
    tiles = tile_grid(40, 48, tile_size=16, halo=3, level=1)
    interior = next(t for t in tiles if (t.x_lvl, t.y_lvl) == (16, 16))
    got = read_tile(src, interior)
    expected = level1[13:35, 13:35]
    np.testing.assert_array_equal(got, expected)

    corner = tiles[0]
    got = read_tile(src, corner)
    assert got.shape == (22, 22, 2)
    assert np.all(got[:3] == 0) and np.all(got[:, :3] == 0)  # fluorescence fill is 0
    np.testing.assert_array_equal(got[3:, 3:], level1[0:19, 0:19])
    np.testing.assert_array_equal(got[corner.core_slice_in_read()], level1[0:16, 0:16])


def test_read_tile_brightfield_border_is_white() -> None:
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 200, size=(40, 40, 3), dtype=np.uint8)
    src = ArraySource(arr)
    tiles = tile_grid(40, 40, tile_size=16, halo=2)
    got = read_tile(src, tiles[-1])  # bottom-right core 8x8 at (32, 32)
    assert got.shape == (12, 12, 3)
    np.testing.assert_array_equal(got[:10, :10], arr[30:40, 30:40])
    assert np.all(got[10:] == 255) and np.all(got[:, 10:] == 255)


@pytest.mark.parametrize("downsample", [1.0, 2.0, 4.016, 8.032, 3.999, 2.5, 1.0001])
def test_lvl_to_l0_location_round_trips(downsample: float) -> None:
    for x_lvl in range(-50, 3000, 7):
        x_l0 = lvl_to_l0_location(x_lvl, downsample)
        assert isinstance(x_l0, int)
        assert math.floor(x_l0 / downsample + 0.5) == x_lvl
        assert abs(x_l0 - x_lvl * downsample) <= downsample / 2 + 1e-9


def test_non_integer_downsample_tiles_read_exact_level_pixels() -> None:
    # 1004 -> 502 -> 251 -> 125: level 3 has downsample 1004 / 125 = 8.032
    src = _fluo_source(1004, 1004, n_levels=4, seed=3)
    lv = src.levels[3]
    assert lv.downsample_x == pytest.approx(8.032)
    level3 = src.read_level(3)
    tiles = tile_grid(lv.width, lv.height, tile_size=24, halo=5, level=3)
    for tile in tiles:
        x_l0, y_l0 = tile.read_location_l0(src)
        assert math.floor(x_l0 / lv.downsample_x + 0.5) == tile.read_x_lvl
        assert math.floor(y_l0 / lv.downsample_y + 0.5) == tile.read_y_lvl
        got = read_tile(src, tile)
        np.testing.assert_array_equal(
            got[tile.core_slice_in_read()], level3[tile.core_slice_in_level()]
        )


def test_foreground_tiles_drops_background_tiles() -> None:
    src = _fluo_source(256, 256, seed=4)
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32, :32] = True  # level-0 [0, 128) x [0, 128)
    mask[40, 60] = True  # one mask pixel = level-0 [240, 244) x [160, 164)
    tm = TissueMask(mask=mask, downsample_x=4.0, downsample_y=4.0, image_size_l0=(256, 256))
    assert len(foreground_tiles(src, level=0, tile_size=64, halo=8)) == 16
    kept = foreground_tiles(src, level=0, tile_size=64, halo=8, mask=tm)
    assert {(t.x_lvl, t.y_lvl) for t in kept} == {(0, 0), (64, 0), (0, 64), (64, 64), (192, 128)}
    # the lone pixel covers 16 / 4096 of its tile: dropped by min_fraction
    kept = foreground_tiles(src, level=0, tile_size=64, halo=8, mask=tm, min_fraction=0.01)
    assert {(t.x_lvl, t.y_lvl) for t in kept} == {(0, 0), (64, 0), (0, 64), (64, 64)}


def test_foreground_tiles_rejects_mask_of_another_image() -> None:
    src = _fluo_source(64, 64)
    tm = TissueMask(np.ones((8, 8), dtype=bool), 16.0, 16.0, (128, 128))
    with pytest.raises(ConfigError):
        foreground_tiles(src, level=0, tile_size=16, halo=0, mask=tm)


def test_stitch_reassembles_the_level() -> None:
    src = _fluo_source(70, 90, seed=5)
    tiles = tile_grid(90, 70, tile_size=32, halo=6)
    arrays = [read_tile(src, t) for t in tiles]
    out = stitch(tiles, arrays, level_width=90, level_height=70)
    np.testing.assert_array_equal(out, src.read_level(0))
    with pytest.raises(ConfigError):
        stitch(tiles, arrays[:-1], level_width=90, level_height=70)


def test_read_overview_picks_finest_level_within_budget() -> None:
    src = _fluo_source(200, 160, n_levels=3, seed=6)  # 32000, 8000, 2000 px
    arr, dsx, dsy = read_overview(src, max_pixels=10_000)
    assert arr.shape == (100, 80, 2) and (dsx, dsy) == (2.0, 2.0)


def test_read_overview_streams_large_single_level() -> None:
    rng = np.random.default_rng(7)
    base: NDArray[np.float32] = rng.random((301, 197, 2)).astype(np.float32)
    src = ArraySource(base)
    arr, dsx, dsy = read_overview(src, max_pixels=1000, reduce="sample")
    f = math.ceil(math.sqrt(301 * 197 / 1000))
    np.testing.assert_array_equal(arr, base[::f, ::f])
    assert (dsx, dsy) == (float(f), float(f))
    mean, _, _ = read_overview(src, max_pixels=1000, reduce="mean")
    assert mean.shape == arr.shape
    np.testing.assert_allclose(mean[0, 0], base[:f, :f].mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(
        mean[-1, -1], base[(301 // f) * f :, (197 // f) * f :].mean(axis=(0, 1)), rtol=1e-5
    )
