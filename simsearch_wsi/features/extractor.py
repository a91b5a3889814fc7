"""Dense feature maps: the trunk run once, fully convolutionally, over tiles of an image.

Frames. Features live on the **analysis grid**: pixels of pyramid level ``scale.level`` further
downsampled by ``scale.resample`` (1 when the level is used as is). Feature cell ``(i, j)``
(row, column) covers analysis pixels ``[stride*i, stride*(i+1)) x [stride*j, stride*(j+1))``;
``x_l0 = x_analysis * scale.downsample_x``.

Tiling. Tile cores are ``tile_size`` analysis pixels (a multiple of the stride) starting at
multiples of the stride, read with a halo of at least half the trunk's receptive field, so the
stitched map equals one pass over the whole image away from the image border (tested). Every tile
is read at full size (outside the image is padded by the reader), so tiles batch together.

Channels. Brightfield RGB goes through the trunk as RGB. Any other channel count (1..N
fluorescence channels) is encoded channel by channel with the same trunk (each channel as a grey
image) and the per-channel features are concatenated, ``D = 256 * n_channels``: the Microsnoop idea
of one shared encoder for any channel count, keeping which channel a pattern appeared in.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from simsearch_wsi.core.errors import ConfigError, MetadataError
from simsearch_wsi.core.geometry import BoxL0, lvl_to_l0_location
from simsearch_wsi.features.backbones import BackboneSpec, WeightsInfo
from simsearch_wsi.features.precision import autocast_pays_off
from simsearch_wsi.features.preprocess import ChannelNormalization, resolve_channels
from simsearch_wsi.features.tissue import TissueMask
from simsearch_wsi.io.base import ImageSource

ProgressFn = Callable[[str, int, int], None]
T = TypeVar("T")
R = TypeVar("R")

FEATURE_FORMAT_VERSION = 1

# The paper's patches were 48-72 px at the analysis scale; aim for the middle.
TARGET_PATCH_PX = 64.0
MAX_TILE_SIZE = 4096
# Resampling factors are multiples of 1/RESAMPLE_DENOMINATOR so that tile origins (multiples of
# the 16-px stride) land on whole level pixels, and tiles stitch exactly.
RESAMPLE_DENOMINATOR = 16
MAX_RESAMPLE = 8.0
#: the most a level-0 image is upsampled by default (resample >= 1 / MAX_UPSAMPLE)
MAX_UPSAMPLE = 4.0


@dataclass(frozen=True)
class AnalysisScale:
    """Which pyramid level is read, and the extra resampling applied after reading."""

    level: int
    resample: float
    downsample_x: float
    downsample_y: float

    @classmethod
    def for_level(
        cls,
        image: ImageSource,
        level: int = 0,
        *,
        resample: float = 1.0,
        max_upsample: float = MAX_UPSAMPLE,
    ) -> AnalysisScale:
        if not 0 <= level < image.level_count:
            raise ConfigError(
                f"{image.path}: level {level} does not exist (0..{image.level_count - 1})"
            )
        if not resample >= 1.0 / max_upsample:
            raise ConfigError(
                f"resample must be >= {1.0 / max_upsample:g} ({max_upsample:g}x upsampling), "
                f"got {resample}"
            )
        lv = image.levels[level]
        return cls(level, float(resample), lv.downsample_x * resample, lv.downsample_y * resample)

    @classmethod
    def for_patch(
        cls,
        image: ImageSource,
        patch_size_l0: float,
        *,
        target_px: float = TARGET_PATCH_PX,
        max_upsample: float = MAX_UPSAMPLE,
    ) -> AnalysisScale:
        """Scale at which a patch of ``patch_size_l0`` level-0 pixels (its longer side) lands at
        about ``target_px`` analysis pixels.

        The wanted downsample ``patch_size_l0 / target_px`` is quantised to powers of sqrt(2),
        so patches land at 54-76 analysis pixels (the paper used 48-72) and nearby patch sizes
        share one scale, hence one cached feature map. The coarsest pyramid level not coarser
        than that is read, and resampled by a multiple of 1/16 (so tile origins land on whole
        level pixels and tiles stitch exactly). Patches smaller than ``target_px`` are
        upsampled from level 0 (at most ``max_upsample``, default 4x): the trunk's 16-px stride
        is coarse for them.
        """
        if not patch_size_l0 > 0 or not math.isfinite(patch_size_l0):
            raise ConfigError(f"patch size must be > 0 level-0 pixels, got {patch_size_l0}")
        w0, h0 = image.dimensions
        if patch_size_l0 > min(w0, h0):
            raise ConfigError(
                f"{image.path}: a patch of {patch_size_l0:.0f} px is larger than the image "
                f"({w0}x{h0}); draw smaller prototypes"
            )
        wanted = max(1.0 / max_upsample, patch_size_l0 / target_px)
        quantised = 2.0 ** (round(2.0 * math.log2(wanted)) / 2.0)
        level = image.get_best_level_for_downsample(max(quantised, 1.0))
        d = RESAMPLE_DENOMINATOR
        finest = math.ceil(d / max_upsample)
        resample = max(finest, round(quantised / image.levels[level].downsample * d)) / d
        if resample > MAX_RESAMPLE:
            raise ConfigError(
                f"{image.path}: a patch of {patch_size_l0:.0f} px needs a downsample of "
                f"{quantised:.0f} but the coarsest level is {image.levels[-1].downsample:.0f}; "
                "add pyramid levels to the file (e.g. convert it to a pyramidal TIFF)"
            )
        return cls.for_level(image, level, resample=resample, max_upsample=max_upsample)

    def box_to_analysis(self, box: BoxL0) -> tuple[float, float, float, float]:
        """(x_a, y_a, width_a, height_a) of a level-0 box on the analysis grid."""
        sx, sy = self.downsample_x, self.downsample_y
        return (box.x_l0 / sx, box.y_l0 / sy, box.width_l0 / sx, box.height_l0 / sy)

    def box_to_l0(self, x_a: float, y_a: float, width_a: float, height_a: float) -> BoxL0:
        """The level-0 box of an analysis-grid box."""
        sx, sy = self.downsample_x, self.downsample_y
        return BoxL0(x_a * sx, y_a * sy, width_a * sx, height_a * sy)

    def analysis_size(self, image: ImageSource) -> tuple[int, int]:
        """(width, height) of the whole image on the analysis grid, in analysis pixels."""
        lv = image.levels[self.level]
        return (math.ceil(lv.width / self.resample), math.ceil(lv.height / self.resample))

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "resample": self.resample,
            "downsample_x": self.downsample_x,
            "downsample_y": self.downsample_y,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisScale:
        try:
            return cls(
                int(d["level"]),
                float(d["resample"]),
                float(d["downsample_x"]),
                float(d["downsample_y"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"analysis scale record is incomplete: {d!r}") from exc


def read_analysis_region(
    image: ImageSource, scale: AnalysisScale, x_a: int, y_a: int, width_a: int, height_a: int
) -> NDArray[Any]:
    """Read analysis pixels ``[y_a, y_a+height_a) x [x_a, x_a+width_a)`` as (H, W, C).

    Outside the image is padded by the reader. With ``resample > 1`` the covering level region
    is read and resized with antialiasing (float32 result); otherwise the file's dtype.
    """
    lv = image.levels[scale.level]
    r = scale.resample
    if r == 1.0:
        loc = (lvl_to_l0_location(x_a, lv.downsample_x), lvl_to_l0_location(y_a, lv.downsample_y))
        return image.read_region(loc, scale.level, (width_a, height_a))
    x0, y0 = math.floor(x_a * r), math.floor(y_a * r)
    x1, y1 = math.ceil((x_a + width_a) * r), math.ceil((y_a + height_a) * r)
    loc = (lvl_to_l0_location(x0, lv.downsample_x), lvl_to_l0_location(y0, lv.downsample_y))
    raw = image.read_region(loc, scale.level, (x1 - x0, y1 - y0))
    t = torch.from_numpy(raw.astype(np.float32)).permute(2, 0, 1)[None]
    small = F.interpolate(
        t, size=(height_a, width_a), mode="bilinear", antialias=True, align_corners=False
    )
    return small[0].permute(1, 2, 0).numpy()


def trunk_input(x01: torch.Tensor, spec: BackboneSpec, *, rgb: bool) -> torch.Tensor:
    """What the trunk sees: (N, C, H, W) [0, 1] pixels -> (N', 3, H, W) normalised input.

    RGB (``C == 3``, ``N' = N``) is normalised with the backbone's mean and std; any other
    channel count is sent channel by channel as grey images (``N' = N * C``, channel-major per
    sample), to be merged back by :func:`merge_channel_features`. Differentiable: training and
    inference share it.
    """
    n, c, h, w = x01.shape
    mean = torch.tensor(spec.input_mean, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.input_std, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    if rgb:
        if c != 3:
            raise ConfigError(f"RGB input needs 3 channels, got {c}")
        return (x01 - mean) / std
    grey = (x01.reshape(n * c, 1, h, w) - mean.mean()) / std.mean()
    return grey.expand(n * c, 3, h, w)


def merge_channel_features(f: torch.Tensor, n: int) -> torch.Tensor:
    """(N * C, d, h, w) per-channel trunk features -> (N, C * d, h, w), channel-major."""
    nc, d, h, w = f.shape
    return f.reshape(n, (nc // n) * d, h, w)


class FeatureExtractor:
    """A trunk on a device, turning [0, 1] (N, H, W, C) batches into (N, D, H/s, W/s) features.

    Parameters
    ----------
    trunk, spec, weights
        from :func:`simsearch_wsi.features.backbones.build_trunk`.
    device
        where to run; the caller decides (the CLI's ``--device``).
    autocast
        run in bfloat16 (CPU) / float16 (CUDA) autocast where that is faster
        (:func:`~simsearch_wsi.features.precision.autocast_pays_off`: CUDA, or a CPU with native
        bf16; elsewhere fp32). On an AVX-512 BF16 CPU bf16 was measured 1.9x faster than fp32 for
        this trunk and rank-preserving (docs/benchmarks.md).
    """

    def __init__(
        self,
        trunk: nn.Module,
        spec: BackboneSpec,
        weights: WeightsInfo,
        *,
        device: torch.device | str = "cpu",
        autocast: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.spec = spec
        self.weights = weights
        #: bf16 on a CPU, fp16 on CUDA; used only where it pays off
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        self.autocast = autocast and autocast_pays_off(self.device, self.autocast_dtype)
        self.channels_last = channels_last
        self._input_tables: dict[tuple[tuple[float, ...], tuple[float, ...]], Any] = {}
        self.trunk = trunk.to(self.device).eval()
        if channels_last:
            self.trunk = self.trunk.to(memory_format=torch.channels_last)

    @property
    def stride(self) -> int:
        return self.spec.stride

    @property
    def precision(self) -> str:
        """What the trunk computes in (part of the cache key): e.g. ``cpu-bf16``, ``cuda-fp16``."""
        if not self.autocast:
            return f"{self.device.type}-fp32"
        return f"{self.device.type}-{'bf16' if self.autocast_dtype == torch.bfloat16 else 'fp16'}"

    def out_dim(self, n_channels: int, rgb: bool) -> int:
        return self.spec.out_channels * (1 if rgb else n_channels)

    @torch.inference_mode()
    def __call__(
        self,
        batch_nhwc: NDArray[Any] | PreparedBatch,
        *,
        rgb: bool,
        normalization: ChannelNormalization | None = None,
        float32: bool = True,
    ) -> torch.Tensor:
        """(N, H, W, C) pixels -> (N, D, H/stride, W/stride) float32 on the CPU (with
        ``float32=False``: float16, what the feature cache stores, in the trunk's memory layout,
        e.g. channels-last: no full-size float32 copy, no transposing copy before the caller's
        HWC copy, and the conversion made here by the trunk's own threads, where a torch op in
        the caller's writer thread would start a second OpenMP team next to the trunk's).

        With ``normalization`` the batch holds raw intensities (any dtype, sent to the device
        as they are: uint8 moves 4x fewer bytes than float32) and is rescaled to [0, 1] there,
        as :meth:`ChannelNormalization.apply` (uint8 RGB in one fused pass, equal up to float32
        rounding: :meth:`_fused_rgb_input`); without it the batch is already [0, 1]. A
        :class:`PreparedBatch` (from :meth:`prepare`, with the same ``rgb`` and
        ``normalization``) goes to the trunk as it is.
        """
        prepared = (
            batch_nhwc
            if isinstance(batch_nhwc, PreparedBatch)
            else self.prepare(batch_nhwc, rgb=rgb, normalization=normalization)
        )
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast):
            f = self.trunk(prepared.x)
        if float32 or not rgb:
            f = f.float()
        if not rgb:
            f = merge_channel_features(f, prepared.n)
        # bf16 or float32 -> float16 rounds as float32 -> float16 (bf16 -> float32 is exact)
        f = f.contiguous() if float32 else f.to(torch.float16)
        out: torch.Tensor = f.cpu()
        return out

    @torch.inference_mode()
    def prepare(
        self,
        batch_nhwc: NDArray[Any],
        *,
        rgb: bool,
        normalization: ChannelNormalization | None = None,
        buffer: torch.Tensor | None = None,
    ) -> PreparedBatch:
        """The trunk input of an (N, H, W, C) batch on the extractor's device, as
        :meth:`__call__` makes it: callable from another thread (e.g. a read-ahead thread, so
        that this work overlaps the trunk on a CPU).

        ``buffer``: a channels-last float32 (M >= N, 3, H, W) CPU tensor that uint8 RGB input
        is written into on a CPU (the result is then a view of it), instead of new memory for
        each batch (whose page faults cost about as much system time as the look-up itself);
        the caller must not reuse it while the result is in use. Ignored elsewhere.
        """
        x = torch.from_numpy(np.ascontiguousarray(batch_nhwc)).to(self.device)
        x = x.permute(0, 3, 1, 2)  # N, C, H, W (channels-last strides)
        n = x.shape[0]
        fused = self._fused_rgb_input(x, normalization, buffer=buffer) if rgb else None
        if fused is not None:
            x = fused
        else:
            x = self._normalised_input(x, batch_nhwc.dtype, normalization, rgb=rgb)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return PreparedBatch(x, n)

    def _fused_rgb_input(
        self,
        x: torch.Tensor,
        normalization: ChannelNormalization | None,
        *,
        buffer: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The trunk input of uint8 RGB pixels (N, 3, H, W) as one affine map per channel and
        a clamp, or None where this does not apply (other dtypes, no normalisation, a flat
        channel). The result is channels-last on a CPU.

        Equal to :meth:`_normalised_input` up to float32 rounding (< 1e-6): the rescaling to
        [0, 1], its clamp and the backbone's mean/std are one affine map per channel, and the
        clamp to [0, 1] becomes a clamp to the images of 0 and 1 (std > 0 keeps the order). The
        separate passes cost about 15 % of the trunk time on a 2-core CPU
        (``benchmarks/bench_embed_stages.py``). uint8 only: its values are small, so the folded
        offset cannot cancel catastrophically as it could for large float intensities.

        On a CPU the map is a look-up of the 256 values of each channel (:meth:`_input_table`,
        one ``torch.addcmul`` + clamp of those values), gathered into a channels-last float32
        (``buffer``, else new) tensor: half the CPU time of the multiply-add and clamp over
        every pixel (issue 24). Where torch computes a value alike in both passes (it did on
        the x86 machine of docs/benchmarks.md: the feature cache's bytes were unchanged), the
        floats are the same; at most float32 rounding (< 1e-6) apart anyway.
        """
        if normalization is None or x.dtype != torch.uint8 or x.shape[1] != 3:
            return None
        if x.device.type == "cpu":
            table = self._input_table(normalization)
            if table is None:
                return None
            pixels = x.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3), a view where channels-last
            n, h, w, _ = pixels.shape
            if (
                buffer is not None
                and buffer.device.type == "cpu"
                and buffer.dtype == torch.float32
                and buffer.shape[0] >= n
                and tuple(buffer.shape[1:]) == (3, h, w)
                and buffer.is_contiguous(memory_format=torch.channels_last)
            ):
                result = buffer[:n]
            else:
                result = torch.empty((n, 3, h, w), memory_format=torch.channels_last)
            out = result.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) view of the result
            for c in range(3):
                out[..., c] = table[c].take(pixels[..., c])
            return result
        return self._affine_rgb_input(x, normalization)

    def _affine_rgb_input(
        self, x: torch.Tensor, normalization: ChannelNormalization
    ) -> torch.Tensor | None:
        """uint8 (N, 3, H, W) -> the trunk input by one ``torch.addcmul`` and one per-channel
        clamp over every pixel on ``x``'s device; None for a flat channel (high <= low)."""
        low = torch.tensor(normalization.low, dtype=torch.float32, device=x.device)
        span = torch.tensor(normalization.high, dtype=torch.float32, device=x.device) - low
        if not bool((span > 0).all()):
            return None
        mean = torch.tensor(self.spec.input_mean, dtype=torch.float32, device=x.device)
        std = torch.tensor(self.spec.input_std, dtype=torch.float32, device=x.device)
        a = (1.0 / span / std).view(1, 3, 1, 1)
        b = ((-low / span - mean) / std).view(1, 3, 1, 1)
        lo, hi = (-mean / std).view(1, 3, 1, 1), ((1.0 - mean) / std).view(1, 3, 1, 1)
        return torch.addcmul(b, x, a).clamp_(min=lo, max=hi)

    def _input_table(self, normalization: ChannelNormalization) -> NDArray[np.float32] | None:
        """(3, 256) float32: the trunk input of each uint8 value of each channel, made by
        :meth:`_affine_rgb_input` on the CPU; None for a flat channel. Kept per normalisation."""
        key = (normalization.low, normalization.high)
        table = self._input_tables.get(key)
        if table is None:
            values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
            mapped = self._affine_rgb_input(values.contiguous(), normalization)
            if mapped is None:
                return None
            table = np.ascontiguousarray(mapped[0, :, 0, :].numpy())
            self._input_tables[key] = table
        return table

    def _normalised_input(
        self,
        x: torch.Tensor,
        dtype: Any,
        normalization: ChannelNormalization | None,
        *,
        rgb: bool,
    ) -> torch.Tensor:
        """(N, C, H, W) raw pixels -> the trunk input, step by step (any dtype and channels)."""
        x = x.float()
        if normalization is not None:
            low = torch.tensor(normalization.low, dtype=torch.float32, device=self.device)
            span = torch.tensor(normalization.high, dtype=torch.float32, device=self.device) - low
            # a flat channel (high <= low) becomes a step at low, as in apply()
            scale = torch.where(span > 0, 1.0 / span.clamp_min(1e-30), torch.full_like(span, 1e30))
            x = ((x - low.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)).clamp_(0.0, 1.0)
        if np.dtype(dtype).kind == "f":  # NaN/inf of float images: as apply()
            x = x.nan_to_num_(nan=0.0, posinf=1.0, neginf=0.0)
        return trunk_input(x, self.spec, rgb=rgb)


@dataclass(frozen=True)
class PreparedBatch:
    """A batch ready for the trunk (:meth:`FeatureExtractor.prepare`): ``x`` (N', 3, H, W) on
    the device (N' = N for RGB, N * C channel by channel) for ``n`` (N) images."""

    x: torch.Tensor
    n: int

    def __len__(self) -> int:
        return self.n


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that determines a feature map besides the pixels: the cache key's parts."""

    backbone: str
    weights_identity: str
    scale: AnalysisScale
    normalization: ChannelNormalization
    channels: tuple[str, ...]
    rgb: bool
    tile_size: int
    halo: int
    precision: str = "fp32"
    tiles: str = "all"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FEATURE_FORMAT_VERSION,
            "backbone": self.backbone,
            "weights": self.weights_identity,
            "scale": self.scale.to_dict(),
            "normalization": self.normalization.to_dict(),
            "channels": list(self.channels),
            "rgb": self.rgb,
            "tile_size": self.tile_size,
            "halo": self.halo,
            "precision": self.precision,
            "tiles": self.tiles,
        }

    def key(self, image_identity: str) -> str:
        blob = json.dumps({"image": image_identity, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def make_feature_spec(
    image: ImageSource,
    extractor: FeatureExtractor,
    *,
    scale: AnalysisScale,
    normalization: ChannelNormalization,
    channels: Sequence[str | int] | None = None,
    tile_size: int = 1024,
    tiles: str = "all",
) -> FeatureSpec:
    """Validate and freeze the parameters of a feature map for ``image``.

    ``tiles``: ``"all"`` embeds every tile; ``"foreground"`` only tiles touching the tissue /
    foreground mask of :func:`simsearch_wsi.features.tissue.detect_foreground` (part of the cache
    key).
    """
    stride = extractor.stride
    if tile_size <= 0 or tile_size % stride or tile_size > MAX_TILE_SIZE:
        raise ConfigError(
            f"tile size must be a positive multiple of {stride} up to {MAX_TILE_SIZE}, "
            f"got {tile_size}"
        )
    if tiles not in ("all", "foreground"):
        raise ConfigError(f"tiles must be 'all' or 'foreground', got {tiles!r}")
    names = image.channel_names
    idx = list(range(len(names))) if channels is None else resolve_channels(names, channels)
    if normalization.n_channels != len(names):
        raise ConfigError(
            f"{image.path}: normalisation has {normalization.n_channels} channels, the image "
            f"{len(names)}; fit it on images of this kind"
        )
    picked = tuple(names[i] for i in idx)
    rgb = image.is_brightfield and len(idx) == 3
    return FeatureSpec(
        backbone=extractor.spec.name,
        weights_identity=extractor.weights.identity,
        scale=scale,
        normalization=normalization.select(idx),
        channels=picked,
        rgb=rgb,
        tile_size=tile_size,
        halo=extractor.spec.halo,
        precision=extractor.precision,
        tiles=tiles,
    )


@dataclass(frozen=True)
class GridTile:
    """One tile on the analysis grid: core origin and size in analysis pixels."""

    index_y: int
    index_x: int
    x_a: int
    y_a: int
    width_a: int
    height_a: int


def analysis_tiles(
    image: ImageSource, spec: FeatureSpec, *, mask: TissueMask | None = None
) -> tuple[list[GridTile], int, int]:
    """Tiles of the analysis grid whose core touches the foreground, and the grid's tile counts
    (n_tiles_y, n_tiles_x). Without a mask every tile is kept."""
    width_a, height_a = spec.scale.analysis_size(image)
    t = spec.tile_size
    ny, nx = -(-height_a // t), -(-width_a // t)
    tiles = [
        GridTile(iy, ix, ix * t, iy * t, min(t, width_a - ix * t), min(t, height_a - iy * t))
        for iy in range(ny)
        for ix in range(nx)
    ]
    if mask is not None and tiles:  # one vectorised query for every tile
        boxes = [spec.scale.box_to_l0(g.x_a, g.y_a, g.width_a, g.height_a) for g in tiles]
        fractions = mask.fractions_in_boxes(
            np.array([b.x_l0 for b in boxes]),
            np.array([b.y_l0 for b in boxes]),
            np.array([b.width_l0 for b in boxes]),
            np.array([b.height_l0 for b in boxes]),
        )
        tiles = [g for g, f in zip(tiles, fractions, strict=True) if f > 0]
    return tiles, ny, nx


def prepare_pixels(raw: NDArray[Any], spec: FeatureSpec, *, idx: list[int]) -> NDArray[Any]:
    """Select the spec's channels of an (H, W, C) read, keeping the raw dtype; the extractor
    normalises on the device (pass ``normalization=spec.normalization``)."""
    return raw[..., idx] if len(idx) != raw.shape[2] else raw


def embed_region(
    image: ImageSource,
    extractor: FeatureExtractor,
    spec: FeatureSpec,
    x_a: int,
    y_a: int,
    width_a: int,
    height_a: int,
) -> torch.Tensor:
    """Features of one analysis region (sizes multiples of the stride) in a single pass,
    read with the spec's halo: (D, height_a/stride, width_a/stride) float32."""
    s, halo = extractor.stride, spec.halo
    idx = resolve_channels(image.channel_names, list(spec.channels))
    raw = read_analysis_region(
        image, spec.scale, x_a - halo, y_a - halo, width_a + 2 * halo, height_a + 2 * halo
    )
    feats = extractor(
        prepare_pixels(raw, spec, idx=idx)[None], rgb=spec.rgb, normalization=spec.normalization
    )[0]
    c = halo // s
    return feats[:, c : c + height_a // s, c : c + width_a // s]


def iter_tile_features(
    image: ImageSource,
    extractor: FeatureExtractor,
    *,
    spec: FeatureSpec,
    tiles: Sequence[GridTile],
    batch_size: int = 4,
    progress: ProgressFn | None = None,
    float32: bool = True,
) -> Iterator[tuple[GridTile, torch.Tensor]]:
    """Yield ``(tile, features)`` with features (D, ceil(h/stride), ceil(w/stride)) float32 for
    each tile's core (``float32=False``: float16, as :meth:`FeatureExtractor.__call__` with
    it), computed in batches of full-size tiles.

    The next batch is read in a background thread while the trunk runs on the current one
    (decoders and torch release the GIL), so reading overlaps compute; on a CPU that thread
    also makes the trunk input (:meth:`FeatureExtractor.prepare`).
    """
    s, halo, t = extractor.stride, spec.halo, spec.tile_size
    idx = resolve_channels(image.channel_names, list(spec.channels))
    c0 = halo // s
    side = t + 2 * halo

    # On a CPU the trunk input is made in the read-ahead thread too, overlapping the trunk; on
    # an accelerator the raw batch goes there (fewer bytes) and is normalised on the device.
    on_cpu = extractor.device.type == "cpu"
    # There the trunk input of batch i goes into buffers[i % 2]: prefetched() runs one batch
    # ahead, so batch i + 2 is made only after the trunk is done with batch i.
    buffers: list[torch.Tensor] = []

    def load(item: tuple[int, Sequence[GridTile]]) -> NDArray[Any] | PreparedBatch:
        i, chunk = item
        batch = np.stack(
            [
                prepare_pixels(
                    read_analysis_region(
                        image, spec.scale, tl.x_a - halo, tl.y_a - halo, side, side
                    ),
                    spec,
                    idx=idx,
                )
                for tl in chunk
            ]
        )
        if not on_cpu:
            return batch
        if spec.rgb and batch.dtype == np.uint8 and not buffers:
            shape = (min(batch_size, len(tiles)), 3, side, side)
            buffers.extend(torch.empty(shape, memory_format=torch.channels_last) for _ in range(2))
        return extractor.prepare(
            batch,
            rgb=spec.rgb,
            normalization=spec.normalization,
            buffer=buffers[i % 2] if buffers else None,
        )

    batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]
    done = 0
    items = list(enumerate(batches))
    for chunk, batch in zip(batches, prefetched(load, items), strict=True):
        feats = extractor(batch, rgb=spec.rgb, normalization=spec.normalization, float32=float32)
        for tl, f in zip(chunk, feats, strict=True):
            hc, wc = -(-tl.height_a // s), -(-tl.width_a // s)
            yield tl, f[:, c0 : c0 + hc, c0 : c0 + wc]
        done += len(chunk)
        if progress is not None:
            progress("embedding tiles", done, len(tiles))


def prefetched(fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    """``fn(item)`` for each item, the next one computed in a background thread while the caller
    works on the current one (image decoders and torch release the GIL).

    At most one call runs ahead. When a call raises, its error is raised here and nothing more
    is submitted; when the caller stops iterating (an error of its own, or ``close()``), the
    read ahead is cancelled, or waited for if it has already started.
    """
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = pool.submit(fn, items[0])
        try:
            for n in range(len(items)):
                result = pending.result()
                if n + 1 < len(items):
                    pending = pool.submit(fn, items[n + 1])
                yield result
        finally:
            # the caller failed or stopped early: drop the read ahead if it has not started
            # (the pool's exit waits for one that has, so no read outlives the source)
            pending.cancel()
