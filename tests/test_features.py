"""Dense features: seam-free tiling, analysis scale, channels, cache reuse/invalidation/resume."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from simsearch_wsi.core.errors import ConfigError, CorruptImageError
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    embed_region,
    make_feature_spec,
)
from simsearch_wsi.features.preprocess import fit_normalization
from simsearch_wsi.io import ArraySource, open_image


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    trunk, spec, info = build_trunk(weights="random", seed=0)
    return FeatureExtractor(trunk, spec, info, autocast=False)


@pytest.fixture(scope="module")
def he_crop(synthetic_slide: Any) -> ArraySource:
    """A 640 x 512 crop of the synthetic H&E slide, in memory."""
    with open_image(synthetic_slide.path) as img:
        arr = img.read_region((256, 256), 0, (640, 512))
    return ArraySource(arr, n_levels=2, mpp=0.5, path="he_crop")


def test_tiled_map_equals_single_pass(
    he_crop: ArraySource, extractor: FeatureExtractor, tmp_path: Path
) -> None:
    """Issue 3: stitched tiles equal one pass over the region, away from the image border."""
    scale = AnalysisScale.for_level(he_crop, 0)
    spec = make_feature_spec(
        he_crop, extractor, scale=scale, normalization=fit_normalization([he_crop]), tile_size=128
    )
    fmap = FeatureCache(tmp_path).get_or_compute(he_crop, extractor, spec=spec)
    assert fmap.shape == (512 // 16, 640 // 16, 256)
    assert fmap.computed.all()
    # one pass over an interior region far from the border (>= halo from every edge); with
    # 128-px tiles (8 cells) the region's cells 8..32 x 8..24 span several tile seams
    single = embed_region(he_crop, extractor, spec, 128, 128, 384, 256)
    tiled = torch.from_numpy(fmap.read_cells(8, 24, 8, 32).astype(np.float32)).permute(2, 0, 1)
    scale_ref = single.abs().max().item()
    assert (single - tiled).abs().max().item() < 2e-3 * scale_ref + 1e-2  # float16 storage


def test_analysis_scale_for_patch(synthetic_slide: Any) -> None:
    """Patches land at 54-76 analysis px; nearby sizes share a scale; resample is k/16."""
    with open_image(synthetic_slide.path) as img:  # levels with downsample 1, 2, 4
        big = AnalysisScale.for_patch(img, 256)  # wants 4 -> level 2 as is
        assert (big.level, big.resample) == (2, 1.0)
        mid = AnalysisScale.for_patch(img, 96)  # wants 1.5 -> sqrt(2) -> level 0, 23/16
        assert mid.level == 0 and mid.resample == 23 / 16
        small = AnalysisScale.for_patch(img, 32)  # wants 0.5 -> level 0 upsampled 2x
        assert small.level == 0 and small.resample == 0.5
        assert AnalysisScale.for_patch(img, 70) == AnalysisScale.for_patch(img, 60)  # one cache
        for patch in (20, 39, 48, 64, 80, 128, 200, 400):
            scale = AnalysisScale.for_patch(img, patch)
            assert (scale.resample * 16).is_integer()
            if patch >= 32:
                assert 54 <= patch / scale.downsample_x <= 76
        with pytest.raises(ConfigError, match="patch size must be > 0"):
            AnalysisScale.for_patch(img, 0)
        with pytest.raises(ConfigError, match="larger than the image"):
            AnalysisScale.for_patch(img, 5000)


def test_resampled_features_match_the_pyramid_level(
    synthetic_slide: Any, extractor: FeatureExtractor
) -> None:
    """Level 0 resampled by 2 approximates level 1 cell by cell: after per-channel
    standardisation, matching cells agree far better than shifted (unrelated) cells."""
    with open_image(synthetic_slide.path) as img:
        norm = fit_normalization([img])
        s_level = make_feature_spec(
            img, extractor, scale=AnalysisScale.for_level(img, 1), normalization=norm
        )
        s_resampled = make_feature_spec(
            img, extractor, scale=AnalysisScale.for_level(img, 0, resample=2.0), normalization=norm
        )
        a = embed_region(img, extractor, s_level, 256, 256, 256, 256).flatten(1)
        b = embed_region(img, extractor, s_resampled, 256, 256, 256, 256).flatten(1)

        def standardise(x: torch.Tensor) -> torch.Tensor:
            return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + 1e-6)

        a, b = standardise(a), standardise(b)
        same = torch.nn.functional.cosine_similarity(a, b, dim=0).mean().item()
        shifted = torch.nn.functional.cosine_similarity(a, b.roll(37, dims=1), dim=0)
        assert same > 0.8
        assert same > shifted.mean().item() + 0.3


def test_stitching_with_fractional_resample(
    he_crop: ArraySource, extractor: FeatureExtractor, tmp_path: Path
) -> None:
    """Resample 23/16: tiles still stitch like one pass (origins land on whole pixels)."""
    scale = AnalysisScale.for_level(he_crop, 0, resample=23 / 16)
    spec = make_feature_spec(
        he_crop, extractor, scale=scale, normalization=fit_normalization([he_crop]), tile_size=128
    )
    fmap = FeatureCache(tmp_path).get_or_compute(he_crop, extractor, spec=spec)
    single = embed_region(he_crop, extractor, spec, 128, 128, 160, 96)
    tiled = torch.from_numpy(fmap.read_cells(8, 14, 8, 18).astype(np.float32)).permute(2, 0, 1)
    assert (single - tiled).abs().max().item() < 2e-3 * single.abs().max().item() + 1e-2


def test_fluorescence_channels_share_the_trunk(
    fluorescence_slide: Any, extractor: FeatureExtractor
) -> None:
    with open_image(fluorescence_slide.path) as img:
        norm = fit_normalization([img])
        scale = AnalysisScale.for_level(img, 0)
        spec_all = make_feature_spec(img, extractor, scale=scale, normalization=norm)
        assert not spec_all.rgb and spec_all.channels == ("DAPI", "GFP", "Cy5")
        f_all = embed_region(img, extractor, spec_all, 256, 256, 128, 128)
        assert f_all.shape[0] == 3 * 256
        spec_gfp = make_feature_spec(
            img, extractor, scale=scale, normalization=norm, channels=["GFP"]
        )
        f_gfp = embed_region(img, extractor, spec_gfp, 256, 256, 128, 128)
        assert f_gfp.shape[0] == 256
        # per-channel encoding: the GFP block of the full map is the GFP-only map
        torch.testing.assert_close(f_all[256:512], f_gfp, atol=1e-4, rtol=1e-4)
        with pytest.raises(ConfigError, match=r"channel 'FITC' is unknown; available channels are"):
            make_feature_spec(img, extractor, scale=scale, normalization=norm, channels=["FITC"])


def test_brightfield_rgb_is_one_trunk_pass(
    he_crop: ArraySource, extractor: FeatureExtractor
) -> None:
    spec = make_feature_spec(
        he_crop,
        extractor,
        scale=AnalysisScale.for_level(he_crop, 0),
        normalization=fit_normalization([he_crop]),
    )
    assert spec.rgb and spec.channels == ("R", "G", "B")
    assert embed_region(he_crop, extractor, spec, 0, 0, 64, 64).shape == (256, 4, 4)


class _CountingExtractor(FeatureExtractor):
    calls = 0

    def __call__(
        self, batch: Any, *, rgb: bool, normalization: Any = None, **kw: Any
    ) -> torch.Tensor:
        type(self).calls += len(batch)
        return super().__call__(batch, rgb=rgb, normalization=normalization, **kw)


def test_cache_reuse_invalidation_and_resume(he_crop: ArraySource, tmp_path: Path) -> None:
    trunk, spec_b, info = build_trunk(weights="random", seed=0)
    ex = _CountingExtractor(trunk, spec_b, info, autocast=False)
    cache = FeatureCache(tmp_path)
    norm = fit_normalization([he_crop])
    spec = make_feature_spec(
        he_crop, ex, scale=AnalysisScale.for_level(he_crop, 0), normalization=norm, tile_size=256
    )
    first = cache.get_or_compute(he_crop, ex, spec=spec)
    n_tiles = first.computed.size
    assert _CountingExtractor.calls == n_tiles == 6
    again = cache.get_or_compute(he_crop, ex, spec=spec)  # reused: no trunk call
    assert _CountingExtractor.calls == n_tiles and again.path == first.path
    # another process sees the same entry (keyed by content for in-memory images)
    assert FeatureCache(tmp_path).contains(
        ArraySource(he_crop.read_level(0), n_levels=2, mpp=0.5, path="he_crop"), spec
    )
    # invalidated when a key part changes: level, weights, normalisation
    other_level = make_feature_spec(
        he_crop, ex, scale=AnalysisScale.for_level(he_crop, 1), normalization=norm, tile_size=256
    )
    assert not cache.contains(he_crop, other_level)
    trunk2, spec2, info2 = build_trunk(weights="random", seed=5)
    ex2 = FeatureExtractor(trunk2, spec2, info2, autocast=False)
    assert not cache.contains(
        he_crop,
        make_feature_spec(
            he_crop,
            ex2,
            scale=AnalysisScale.for_level(he_crop, 0),
            normalization=norm,
            tile_size=256,
        ),
    )
    # resume: an interrupted run keeps its finished tiles
    spec_r = make_feature_spec(
        he_crop, ex, scale=AnalysisScale.for_level(he_crop, 0), normalization=norm, tile_size=128
    )
    before = _CountingExtractor.calls

    def stop_after_two(stage: str, done: int, total: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(he_crop, ex, spec=spec_r, batch_size=4, progress=stop_after_two)
    assert not cache.contains(he_crop, spec_r)  # nothing complete under the final name
    done_first = _CountingExtractor.calls - before
    resumed = cache.get_or_compute(he_crop, ex, spec=spec_r, batch_size=4)
    total = resumed.computed.size
    assert _CountingExtractor.calls - before == total  # no tile embedded twice
    assert done_first == 8 < total
    fresh = FeatureCache(tmp_path / "fresh").get_or_compute(he_crop, ex, spec=spec_r)
    np.testing.assert_array_equal(resumed.read(), fresh.read())
    # and the same statistics, to the byte (a resumed run writes what a fresh one does)
    np.testing.assert_array_equal(resumed.channel_mean, fresh.channel_mean)
    np.testing.assert_array_equal(resumed.channel_std, fresh.channel_std)


def test_cache_invalidated_when_file_changes(tmp_path: Path, extractor: FeatureExtractor) -> None:
    from simsearch_wsi.synthetic import make_synthetic_slide

    path = tmp_path / "s.tiff"
    make_synthetic_slide(path, width=512, height=384, n_per_class=1, seed=0)
    cache = FeatureCache(tmp_path / "cache")
    with open_image(path) as img:
        spec = make_feature_spec(
            img,
            extractor,
            scale=AnalysisScale.for_level(img, 1),
            normalization=fit_normalization([img]),
            tile_size=256,
        )
        cache.get_or_compute(img, extractor, spec=spec)
        assert cache.contains(img, spec)
    make_synthetic_slide(path, width=512, height=384, n_per_class=1, seed=1)
    with open_image(path) as img:
        assert not cache.contains(img, spec)


def test_foreground_only_tiles(
    synthetic_slide: Any, extractor: FeatureExtractor, tmp_path: Path
) -> None:
    with open_image(synthetic_slide.path) as img:
        norm = fit_normalization([img])
        scale = AnalysisScale.for_level(img, 2)
        spec = make_feature_spec(
            img, extractor, scale=scale, normalization=norm, tile_size=64, tiles="foreground"
        )
        all_tiles = make_feature_spec(img, extractor, scale=scale, normalization=norm, tile_size=64)
        assert spec.key(img.identity()) != all_tiles.key(img.identity())  # mask is in the key
        fmap = FeatureCache(tmp_path).get_or_compute(img, extractor, spec=spec)
        assert 0 < fmap.computed.sum() < fmap.computed.size
        skipped = np.argwhere(~fmap.computed)[0]
        block = fmap.read_cells(
            skipped[0] * 4, skipped[0] * 4 + 4, skipped[1] * 4, skipped[1] * 4 + 4
        )
        assert not block.any()  # never written


@pytest.fixture()
def force_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU bf16 autocast even where this CPU only emulates bf16 (slow, numerically the same)."""
    monkeypatch.setattr(
        "simsearch_wsi.features.extractor.autocast_pays_off", lambda device, dtype=None: True
    )


def test_bf16_autocast_preserves_rankings(he_crop: ArraySource, force_bf16: None) -> None:
    """bf16 autocast (the default on CPUs with native bf16) ranks windows like fp32 (Spearman
    on pooled cosines)."""
    from scipy.stats import spearmanr

    trunk, spec_b, info = build_trunk(weights="random", seed=0)
    fp32 = FeatureExtractor(trunk, spec_b, info, autocast=False)
    bf16 = FeatureExtractor(trunk, spec_b, info, autocast=True)
    norm = fit_normalization([he_crop])
    spec = make_feature_spec(
        he_crop, fp32, scale=AnalysisScale.for_level(he_crop, 0), normalization=norm
    )
    a = embed_region(he_crop, fp32, spec, 0, 0, 640, 512).flatten(1)
    b = embed_region(he_crop, bf16, spec, 0, 0, 640, 512).flatten(1)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    query = a[:, 200]
    rho = spearmanr((a * query[:, None]).sum(0).numpy(), (b * query[:, None]).sum(0).numpy())
    assert rho.statistic > 0.98


def test_precision_is_part_of_the_key(he_crop: ArraySource, force_bf16: None) -> None:
    trunk, spec_b, info = build_trunk(weights="random", seed=0)
    fp32 = FeatureExtractor(trunk, spec_b, info, autocast=False)
    bf16 = FeatureExtractor(trunk, spec_b, info, autocast=True)
    assert (fp32.precision, bf16.precision) == ("cpu-fp32", "cpu-bf16")
    norm = fit_normalization([he_crop])
    scale = AnalysisScale.for_level(he_crop, 0)
    a = make_feature_spec(he_crop, fp32, scale=scale, normalization=norm)
    b = make_feature_spec(he_crop, bf16, scale=scale, normalization=norm)
    assert a.key(he_crop.identity()) != b.key(he_crop.identity())


def test_autocast_only_where_it_pays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without native bf16 runs fp32 even when autocast is asked for (emulated bf16 was
    7x slower than fp32); CUDA always autocasts."""
    from simsearch_wsi.features import precision

    assert precision.autocast_pays_off("cuda", torch.float16) is True
    assert precision.autocast_pays_off("cpu") is precision.cpu_has_native_bf16()
    assert precision.autocast_pays_off("meta") is False
    trunk, spec_b, info = build_trunk(weights="random", seed=0)
    monkeypatch.setattr(
        "simsearch_wsi.features.extractor.autocast_pays_off", lambda device, dtype=None: False
    )
    assert FeatureExtractor(trunk, spec_b, info, autocast=True).precision == "cpu-fp32"
    monkeypatch.setattr(
        "simsearch_wsi.features.extractor.autocast_pays_off", lambda device, dtype=None: True
    )
    assert FeatureExtractor(trunk, spec_b, info, autocast=True).precision == "cpu-bf16"


def test_bad_batch_size_and_no_foreground(extractor: FeatureExtractor, tmp_path: Path) -> None:
    glass = ArraySource(np.full((256, 256, 3), 245, np.uint8), mpp=0.5, path="glass")
    spec = make_feature_spec(
        glass,
        extractor,
        scale=AnalysisScale.for_level(glass, 0),
        normalization=fit_normalization([glass]),
        tile_size=128,
        tiles="foreground",
    )
    cache = FeatureCache(tmp_path)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="batch size must be a positive integer"):
            cache.get_or_compute(glass, extractor, spec=spec, batch_size=bad)
    with pytest.raises(ConfigError, match="no foreground"):
        cache.get_or_compute(glass, extractor, spec=spec)
    assert not any(tmp_path.iterdir())  # nothing cached for an empty run


def test_resume_after_crash_before_rename_and_corrupt_partial(
    he_crop: ArraySource,
    extractor: FeatureExtractor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from simsearch_wsi.features import cache as featurecache

    cache = FeatureCache(tmp_path)
    spec = make_feature_spec(
        he_crop,
        extractor,
        scale=AnalysisScale.for_level(he_crop, 0),
        normalization=fit_normalization([he_crop]),
        tile_size=256,
    )
    final = cache.entry_path(he_crop, spec)
    partial = final.with_name(final.name + ".partial")
    real_rename = Path.rename

    def crash(self: Path, target: Any) -> Any:
        if self == partial:
            raise KeyboardInterrupt  # killed after the statistics were written
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(he_crop, extractor, spec=spec)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert partial.is_dir() and not final.exists()
    done = cache.get_or_compute(he_crop, extractor, spec=spec)  # resumes, rewrites the statistics
    assert done.computed.all() and done.channel_std.shape == (256,)
    # statistics summed while embedding (a fresh entry) == read back from the store (the resumed
    # entry, every tile from the interrupted run) == recomputed from the stored features, to the
    # byte (the sums run in the same order), so a resumed run writes what a fresh one does
    fresh = FeatureCache(tmp_path / "fresh").get_or_compute(he_crop, extractor, spec=spec)
    mean, std = featurecache._channel_stats(fresh.array, fresh.computed, 256 // extractor.stride)
    np.testing.assert_array_equal(np.asarray(done.array[:]), np.asarray(fresh.array[:]))
    for fmap in (fresh, done):
        np.testing.assert_array_equal(fmap.channel_mean, mean)
        np.testing.assert_array_equal(fmap.channel_std, std)
    assert fresh.array.compressors[0].level == 1  # zstd level 1 (issue 24)
    # a partial folder that is not a readable store is discarded and recomputed
    spec2 = make_feature_spec(
        he_crop,
        extractor,
        scale=AnalysisScale.for_level(he_crop, 1),
        normalization=fit_normalization([he_crop]),
        tile_size=256,
    )
    broken = cache.entry_path(he_crop, spec2)
    broken = broken.with_name(broken.name + ".partial")
    broken.mkdir(parents=True)
    (broken / "zarr.json").write_text("{not json")
    assert featurecache._open_partial(broken, "k") is None and not broken.exists()
    assert cache.get_or_compute(he_crop, extractor, spec=spec2).computed.all()


# --- issue 31: a failed tile read stops the reads around it -------------------------------------
def test_prefetch_stops_after_a_failed_read() -> None:
    """A read that fails is raised once, and nothing is read after it."""
    from simsearch_wsi.features.extractor import prefetched

    seen: list[int] = []

    def read(i: int) -> int:
        seen.append(i)
        if i == 2:
            raise CorruptImageError(f"tile {i} is corrupt")
        return i

    got: list[int] = []
    with pytest.raises(CorruptImageError, match="tile 2 is corrupt"):
        for value in prefetched(read, list(range(10))):
            got.append(value)
    assert got == [0, 1] and seen == [0, 1, 2]


def test_prefetch_waits_for_the_read_ahead_when_the_caller_fails() -> None:
    """The consumer's own error (e.g. the trunk failing) submits nothing more, and the read
    already running ahead is finished before the error leaves the loop (no read outlives it)."""
    import threading
    import time

    from simsearch_wsi.features.extractor import prefetched

    started: list[int] = []
    finished: list[int] = []
    running = threading.Event()

    def read(i: int) -> int:
        started.append(i)
        if i == 1:
            running.set()
            time.sleep(0.2)
        finished.append(i)
        return i

    gen = cast(Generator[int, None, None], prefetched(read, list(range(5))))
    assert next(gen) == 0
    assert running.wait(5)  # read 1 runs in the background
    with pytest.raises(RuntimeError, match="consumer failed"):
        gen.throw(RuntimeError("consumer failed"))
    assert started == [0, 1] and finished == [0, 1]


def test_nan_pixels_give_finite_features(extractor: FeatureExtractor) -> None:
    """Issue 31: NaN/inf of a float image must not reach the trunk (NaN similarity)."""
    rng = np.random.default_rng(8)
    arr = rng.random((96, 96, 2)).astype(np.float32)
    arr[10:30, 10:30, 0] = np.nan
    arr[50:60, :, 1] = np.inf
    arr[70:75, :, 1] = -np.inf
    img = ArraySource(arr, path="nan.tif", mpp=0.5)
    clean = arr.copy()
    clean[~np.isfinite(clean)] = 0.0
    spec = make_feature_spec(
        img,
        extractor,
        scale=AnalysisScale.for_level(img, 0),
        normalization=fit_normalization([ArraySource(clean)]),
    )
    feats = embed_region(img, extractor, spec, 0, 0, 96, 96)
    assert torch.isfinite(feats).all()


def test_fused_uint8_rgb_input_equals_the_step_by_step_one(extractor: FeatureExtractor) -> None:
    """Issue 24: uint8 RGB is rescaled, clamped and standardised in one fused pass; it must equal
    the step-by-step path (any dtype) up to float32 rounding, clamping included (values below
    low and above high), and a flat channel must take the step-by-step path."""
    from simsearch_wsi.features.preprocess import ChannelNormalization

    rng = np.random.default_rng(24)
    pixels = rng.integers(0, 256, (2, 3, 40, 48), dtype=np.uint8)
    x = torch.from_numpy(pixels)
    norm = ChannelNormalization(
        low=(20.0, 35.0, 0.0),
        high=(230.0, 200.0, 255.0),
        channel_names=("R", "G", "B"),
        method="fixed-range",
    )
    fused = extractor._fused_rgb_input(x, norm)
    steps = extractor._normalised_input(x, np.uint8, norm, rgb=True)
    assert fused is not None and fused.dtype == torch.float32
    torch.testing.assert_close(fused, steps, atol=2e-6, rtol=0)
    # the clamps are reached on both sides in every channel
    for c in range(3):
        assert torch.isclose(steps[:, c], steps[:, c].min()).sum() > 1
        assert torch.isclose(steps[:, c], steps[:, c].max()).sum() > 1
    flat = ChannelNormalization(
        low=(20.0, 35.0, 7.0),
        high=(230.0, 200.0, 7.0),
        channel_names=("R", "G", "B"),
        method="fixed-range",
    )
    assert extractor._fused_rgb_input(x, flat) is None
    assert extractor._fused_rgb_input(x.float(), norm) is None  # float pixels: step by step
    # the extractor's features from uint8 + normalisation match those of the [0, 1] pixels
    nhwc = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
    via_fused = extractor(nhwc, rgb=True, normalization=norm)
    via_apply = extractor(norm.apply(nhwc.astype(np.float32)), rgb=True)
    torch.testing.assert_close(via_fused, via_apply, atol=1e-3, rtol=1e-3)


def test_uint8_rgb_input_on_a_cpu_is_a_lookup_of_the_affine_pass(
    extractor: FeatureExtractor,
) -> None:
    """Issue 24: on a CPU the fused uint8 input is gathered from a (3, 256) table of the affine
    pass (multiply-add + clamp) of each value: every pixel takes its own channel's entry, the
    result is channels-last, and it is the affine pass over the pixels up to its rounding."""
    from simsearch_wsi.features.preprocess import ChannelNormalization

    pixels = np.random.default_rng(25).integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
    norm = ChannelNormalization(
        low=(20.0, 35.0, 0.0),
        high=(230.0, 200.0, 255.0),
        channel_names=("R", "G", "B"),
        method="fixed-range",
    )
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # channels-last, as prepare() sends it
    looked_up = extractor._fused_rgb_input(x, norm)
    assert looked_up is not None and looked_up.is_contiguous(memory_format=torch.channels_last)
    table = extractor._input_table(norm)
    assert table is not None and table.shape == (3, 256)
    expected = np.stack([table[c][pixels[..., c]] for c in range(3)], axis=1)  # (N, 3, H, W)
    np.testing.assert_array_equal(looked_up.numpy(), expected)
    per_pixel = extractor._affine_rgb_input(x, norm)
    assert per_pixel is not None
    torch.testing.assert_close(looked_up, per_pixel, atol=1e-6, rtol=0)
    # NCHW input gives the same values
    torch.testing.assert_close(
        extractor._fused_rgb_input(x.contiguous(), norm), looked_up, atol=0, rtol=0
    )


def test_tile_features_from_two_reused_input_buffers_equal_fresh_ones(
    he_crop: ArraySource, extractor: FeatureExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24: on a CPU iter_tile_features writes the trunk input of batch i into the
    buffer i % 2 (no new memory per batch) while the trunk runs on the batch before; the
    features equal those of a fresh input per batch, and the two buffers alternate."""
    from simsearch_wsi.features.extractor import analysis_tiles, iter_tile_features

    spec = make_feature_spec(
        he_crop,
        extractor,
        scale=AnalysisScale.for_level(he_crop, 0),
        normalization=fit_normalization([he_crop]),
        tile_size=128,
    )
    tiles, _, _ = analysis_tiles(he_crop, spec)
    assert len(tiles) >= 7
    real_prepare = extractor.prepare
    storage: list[int] = []

    def run(*, reuse: bool) -> list[torch.Tensor]:
        def prepare(batch: Any, **kw: Any) -> Any:
            if not reuse:
                kw["buffer"] = None
            prepared = real_prepare(batch, **kw)
            storage.append(prepared.x.untyped_storage().data_ptr())
            return prepared

        storage.clear()
        with monkeypatch.context() as mp:
            mp.setattr(extractor, "prepare", prepare)
            return [
                f.clone()
                for _, f in iter_tile_features(
                    he_crop, extractor, spec=spec, tiles=tiles, batch_size=2
                )
            ]

    reused = run(reuse=True)
    assert len(set(storage)) == 2 and storage[0::2] == [storage[0]] * len(storage[0::2])
    fresh = run(reuse=False)
    assert len(reused) == len(fresh) == len(tiles)
    for a, b in zip(reused, fresh, strict=True):
        assert torch.equal(a, b)


def test_cache_block_writes_keep_zarrs_bytes(tmp_path: Path) -> None:
    """Issue 24: the cache writes with zarr's all-fill test off and tests the bits itself; the
    store holds the same chunk files with the same bytes as zarr's default (a block of +0 is
    not written; -0, NaN and any other value are)."""
    import zarr
    from zarr.codecs import ZstdCodec

    from simsearch_wsi.features.cache import _write_block

    rng = np.random.default_rng(3)
    blocks = [
        rng.random((4, 4, 8)).astype(np.float16),
        np.zeros((4, 4, 8), np.float16),
        np.where(rng.random((4, 4, 8)) < 0.5, -0.0, 0.0).astype(np.float16),
        np.zeros((4, 4, 8), np.float16),
        rng.random((2, 4, 8)).astype(np.float16),  # the array's last, cut row of chunks
    ]
    blocks[3][1, 2, 3] = np.nan
    stores = {}
    for name, own in (("zarr", False), ("cache", True)):
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        arr = group.create_array(
            "f",
            shape=(10, 8, 8),
            chunks=(4, 4, 8),
            dtype="float16",
            fill_value=0,
            compressors=ZstdCodec(level=1),
        )
        if own:
            arr = arr.with_config({"write_empty_chunks": True})
        for (y0, x0), block in zip([(0, 0), (0, 4), (4, 0), (4, 4), (8, 0)], blocks, strict=True):
            if own:
                _write_block(arr, y0, x0, block)
            else:
                arr[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block
        root = tmp_path / f"{name}.zarr" / "f"
        stores[name] = {
            str(f.relative_to(root)): f.read_bytes()
            for f in sorted(root.rglob("*"))
            if f.is_file() and f.name != "zarr.json"
        }
    assert len(stores["zarr"]) == 4  # the block of +0 is not stored
    assert stores["cache"] == stores["zarr"]


def test_fused_input_matches_the_step_by_step_one_under_bf16_autocast(
    extractor: FeatureExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 24: the fused uint8 input is float32 on both precision paths; under the
    CPU's bf16 autocast the features of the fused and the step-by-step input differ by no more
    than bf16 itself moves them from float32 (the trunk rounds both inputs alike)."""
    from simsearch_wsi.features.preprocess import ChannelNormalization

    pixels = np.random.default_rng(7).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    norm = ChannelNormalization(
        low=(20.0, 35.0, 0.0),
        high=(230.0, 200.0, 255.0),
        channel_names=("R", "G", "B"),
        method="fixed-range",
    )
    assert extractor.autocast_dtype == torch.bfloat16  # the CPU's autocast type

    def features(*, bf16: bool, fused: bool) -> torch.Tensor:
        with monkeypatch.context() as mp:
            mp.setattr(extractor, "autocast", bf16)
            if not fused:
                mp.setattr(extractor, "_fused_rgb_input", lambda x, n, **kw: None)
            prepared = extractor.prepare(pixels, rgb=True, normalization=norm)
            assert prepared.x.dtype == torch.float32  # autocast starts at the trunk
            return extractor(prepared, rgb=True)

    fp32_fused, fp32_steps = features(bf16=False, fused=True), features(bf16=False, fused=False)
    torch.testing.assert_close(fp32_fused, fp32_steps, atol=1e-4, rtol=1e-4)
    bf16_fused, bf16_steps = features(bf16=True, fused=True), features(bf16=True, fused=False)
    bf16_error = (bf16_steps - fp32_steps).abs().max().item()
    assert bf16_error > 0  # autocast really ran in bf16
    assert (bf16_fused - bf16_steps).abs().max().item() <= bf16_error
    assert (bf16_fused - fp32_fused).abs().max().item() <= 2 * bf16_error


def test_a_failed_cache_write_stops_the_run_and_keeps_the_tiles_written_before(
    he_crop: ArraySource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiles are stored by a writer thread while the trunk runs on: a write error still
    reaches the caller, nothing is finalised, and a rerun embeds only the tiles not stored."""
    import simsearch_wsi.features.cache as cache_mod

    trunk, spec_b, info = build_trunk(weights="random", seed=0)
    ex = _CountingExtractor(trunk, spec_b, info, autocast=False)
    norm = fit_normalization([he_crop])
    spec = make_feature_spec(
        he_crop, ex, scale=AnalysisScale.for_level(he_crop, 0), normalization=norm, tile_size=128
    )
    real_add = cache_mod._ChannelSums.add
    stored = []

    def failing_add(self: Any, block: Any) -> None:
        if len(stored) == 5:
            raise OSError("disk full")
        stored.append(1)
        real_add(self, block)

    monkeypatch.setattr(cache_mod._ChannelSums, "add", failing_add)
    cache = FeatureCache(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_compute(he_crop, ex, spec=spec, batch_size=4)
    assert not cache.contains(he_crop, spec)
    monkeypatch.setattr(cache_mod._ChannelSums, "add", real_add)
    before = _CountingExtractor.calls
    resumed = cache.get_or_compute(he_crop, ex, spec=spec, batch_size=4)
    total = resumed.computed.size
    assert _CountingExtractor.calls - before == total - 5  # the 5 stored tiles are kept
    fresh = FeatureCache(tmp_path / "fresh").get_or_compute(he_crop, ex, spec=spec)
    np.testing.assert_array_equal(resumed.read(), fresh.read())
