"""Object candidates (``SearchSettings(candidates="objects")``): one candidate per object found
in the image, each embedded at its own size.

The grid rule (``candidates="grid"``) scores every window of one feature map, whose analysis
scale and window are set by the median prototype box: objects much larger or smaller than the
median are seen at the wrong scale (several maxima in one large object, off its centre; small
objects in windows that are mostly background). For separate objects of varying size (cells of a
plate, 13-80 px) this rule finds the objects first and compares each one at its own size:

Detection (:func:`detect_objects`). The image is read whole at a scale where the smallest
prototype side is about :data:`DETECT_MIN_PX` pixels (never upsampled), normalised per channel to
[0, 1] (the search's intensity normalisation), averaged over channels (brightfield: inverted,
objects are darker than the background, whatever channels are read) and smoothed (a Gaussian of
sigma :data:`DETECT_SIGMA_FRACTION` of that side). Foreground is what lies above
``min(Otsu, median + DETECT_NOISE_K x robust noise)`` (median and MAD of the smoothed image: the
faint rim of a cell is kept where Otsu would keep only its bright core); each connected component
whose longer box side is within [smallest prototype side, largest] x :data:`OBJECT_SIZE_RANGE`
is an object, its level-0 bounding box (inside the image) the candidate's box.

Embedding (:func:`embed_boxes`). Each box (a square of its longer side, about its centre) is read
from the coarsest pyramid level that has it at :data:`OBJECT_PX` pixels or more and resampled so
that it is exactly :data:`OBJECT_PX` pixels (4 trunk cells), in a crop of
:data:`OBJECT_CONTEXT_CELLS` cells (the object and 2 cells of context a side; plus
:data:`OBJECT_HALO_PX`, none by default); its vector is the Gaussian pool
(:class:`~simsearch_wsi.search.similarity.PatchGeometry`'s kernel) over the central
:data:`OBJECT_POOL_FRACTION` of the object, normalised with the image's feature-map statistics
(standardised where the search whitens: :data:`OBJECT_FEATURE_NORM`); with several fluorescence
channels each channel's block of dimensions is scaled to unit length on its own, so that every
channel counts equally (:data:`OBJECT_CHANNEL_BLOCKS`). Prototypes are embedded the
same way, over the detected object their box outlines (the object whose centre lies in the box,
nearest its centre; the box itself when none), in the four rotations, so a prototype and a
candidate of the same kind of object give the same vector whatever their sizes.

Suggestions (:class:`ObjectCandidates`). Each object is compared with every prototype vector
(cosine); a class's similarity is the maximum over its prototypes, and the object is suggested
once, for the class it resembles most, centred on it with its box.

``candidates="auto"`` (:meth:`~simsearch_wsi.search.engine.SimSearch.resolve_candidates`): the
object candidates where the prototypes outline separate objects, else the grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0, lvl_to_l0_location
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    FeatureSpec,
    read_analysis_region,
)
from simsearch_wsi.features.norm import FeatureNormalizer
from simsearch_wsi.features.preprocess import ChannelNormalization, resolve_channels
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.search.choices import CANDIDATE_RULES as CANDIDATE_RULES
from simsearch_wsi.search.similarity import PatchGeometry, Prototype, Suggestion

#: an object is embedded at this side (analysis pixels): a patch's (4 trunk cells)
OBJECT_PX = 64.0
#: the crop embedded per object: this many trunk cells a side (the object's 4 and context)
OBJECT_CONTEXT_CELLS = 8
#: context read around the crop beyond its context cells (pixels at the object's OBJECT_PX scale,
#: a multiple of the trunk's stride; at most the trunk's halo). 0: the context cells are the only
#: context (measured on the dev plate: PR-AUC 0.900, against 0.891 with the trunk's 112 px halo,
#: in a third of the time)
OBJECT_HALO_PX = 0
#: an object's vector is pooled over this fraction of its side (centred)
OBJECT_POOL_FRACTION = 0.5
#: object vectors are standardised per image where the search whitens (``feature_norm`` "whiten",
#: the default): the whitening is fitted on every window of the image, mostly background, and
#: was measured worse for objects (dev plate PR-AUC 0.78 vs 0.90; docs/evaluation.md)
OBJECT_FEATURE_NORM = {"whiten": "standardize"}
#: a fluorescence object's vector is made of one block of dimensions per channel (the trunk's
#: features of each channel, concatenated); True: each block is scaled to unit length on its own
#: (then the whole by 1 / sqrt(channels)), so every channel counts equally in the cosine, whatever
#: its share of the standardised vector's norm (six dev plates 0.792 -> 0.868 PR-AUC, held-out
#: plate 0.765 -> 0.896: docs/evaluation.md, "2026-12-07 (later): six dev plates, and every
#: channel counts equally"); False: the vector is scaled as one (the rule before)
OBJECT_CHANNEL_BLOCKS = True
#: ``candidates="auto"``: a prototype outlines an object when the object's longer side is within
#: this factor of the box's (either way)
AUTO_OBJECT_SIZE_RATIO = 2.0
#: ``candidates="auto"``: at least this fraction of each image's foreground must lie in objects of
#: the prototypes' size range (:func:`find_objects`; measured on the search suite's dev cases:
#: 1.0 on the plate and IHC cells, at most 0.52 on touching blood cells, 0.06 on crowded nuclei)
AUTO_MIN_COVERAGE = 0.8
#: objects are kept from the smallest prototype side x the first to the largest x the second
#: (larger objects than the prototypes' are common, specks smaller than them are noise)
OBJECT_SIZE_RANGE = (0.5, 4.0)
#: detection scale: the smallest prototype side lands at about this many pixels (no upsampling)
DETECT_MIN_PX = 16.0
#: detection smoothing: a Gaussian of this fraction of the smallest prototype side
DETECT_SIGMA_FRACTION = 0.1
#: foreground: above the median + this many robust standard deviations (or Otsu, if lower)
DETECT_NOISE_K = 8.0
#: the detection image may have at most this many pixels (a region, a field; not a whole slide)
DETECT_MAX_PIXELS = 64 * 2**20
#: ``candidates="auto"`` takes the grid, without reading it, for an image whose detection image
#: would have more pixels than this (a whole slide)
AUTO_MAX_PIXELS = 16 * 2**20
#: the detection image is resampled from a pyramid level with up to this many times its pixels
#: (a pyramid of factor-2 levels: under (2x)^2); an image without such levels (one flat level,
#: resampled by more) is held to the same read: at most this many times the pixel limit
DETECT_MAX_READ_FACTOR = 4.0
#: channels per pixel the read limits are counted in (an RGB pixel); the read has every
#: channel of the image, so an image of more channels reads proportionally more bytes
DETECT_BASE_CHANNELS = 3


def object_intensity(pixels01: NDArray[np.float32], *, rgb: bool) -> NDArray[np.float32]:
    """(H, W, C) [0, 1] pixels -> (H, W) objectness: the channel mean (fluorescence: objects are
    bright) or one minus it (``rgb``, brightfield: objects are dark, in any of its channels)."""
    mean = pixels01.mean(axis=2, dtype=np.float32)
    out: NDArray[np.float32] = (1.0 - mean) if rgb else mean
    return out.astype(np.float32)


def foreground_threshold(smooth: NDArray[np.float32]) -> float:
    """``min(Otsu, median + DETECT_NOISE_K x 1.4826 x MAD)`` of a smoothed objectness image."""
    from skimage.filters import threshold_otsu

    med = float(np.median(smooth))
    mad = 1.4826 * float(np.median(np.abs(smooth - med)))
    spread = float(np.percentile(smooth, 99.9)) - med
    noise = max(mad, 1e-3 * max(spread, 1e-6))
    if float(smooth.max()) <= float(smooth.min()):
        return math.inf
    return min(float(threshold_otsu(smooth)), med + DETECT_NOISE_K * noise)


def detect_objects(
    image: ImageSource,
    *,
    normalization: ChannelNormalization,
    channels: Sequence[str],
    rgb: bool,
    size_range_l0: tuple[float, float],
) -> list[BoxL0]:
    """Level-0 boxes of the separate objects of ``image`` (module docstring), largest first.

    ``size_range_l0``: (smallest, largest) prototype side in level-0 pixels; ``normalization``
    and ``channels``: the search's (the feature spec's); ``rgb``: objects are darker than the
    background (a brightfield image, also when only some of its channels are read). Raises
    :class:`ConfigError` when the detection image would exceed :data:`DETECT_MAX_PIXELS` (crop
    a region)."""
    return find_objects(
        image,
        normalization=normalization,
        channels=channels,
        rgb=rgb,
        size_range_l0=size_range_l0,
    )[0]


def detection_scale(image: ImageSource, smallest_l0: float) -> AnalysisScale:
    """The scale objects are found at: the smallest prototype side (level-0 pixels) at about
    :data:`DETECT_MIN_PX` pixels, never upsampled."""
    return AnalysisScale.for_patch(image, smallest_l0, target_px=DETECT_MIN_PX, max_upsample=1.0)


def detection_fits(image: ImageSource, scale: AnalysisScale, max_pixels: float) -> bool:
    """Whether reading ``image`` whole at the detection ``scale`` stays within ``max_pixels``
    detection pixels and ``DETECT_MAX_READ_FACTOR x max_pixels`` pixels of the level it is
    resampled from (``scale.resample`` squared times more: large on an image without a
    pyramid). Every channel is read, so a pixel of more than :data:`DETECT_BASE_CHANNELS`
    channels counts as ``channels / DETECT_BASE_CHANNELS`` pixels of the read."""
    width, height = scale.analysis_size(image)
    per_px = max(1.0, len(image.channel_names) / DETECT_BASE_CHANNELS)
    read_px = width * height * max(1.0, scale.resample) ** 2 * per_px
    return width * height <= max_pixels and read_px <= DETECT_MAX_READ_FACTOR * max_pixels


def find_objects(
    image: ImageSource,
    *,
    normalization: ChannelNormalization,
    channels: Sequence[str],
    rgb: bool,
    size_range_l0: tuple[float, float],
) -> tuple[list[BoxL0], float]:
    """:func:`detect_objects`'s boxes and the fraction of the foreground's pixels that lie in
    them (1: every foreground component is an object of the prototypes' size range; low: the
    foreground is mostly merged clumps or specks, not separate objects)."""
    from scipy import ndimage as ndi

    lo_l0, hi_l0 = size_range_l0
    if not (0 < lo_l0 <= hi_l0 and math.isfinite(hi_l0)):
        raise ConfigError(f"object sizes must be 0 < smallest <= largest, got {size_range_l0}")
    scale = detection_scale(image, lo_l0)
    width, height = scale.analysis_size(image)
    if not detection_fits(image, scale, DETECT_MAX_PIXELS):
        raise ConfigError(
            f"{image.path}: object candidates read the image whole, {width}x{height} px at the "
            f"prototypes' scale, resampled by {scale.resample:g} from its level {scale.level} "
            f"(limit {DETECT_MAX_PIXELS} px, {DETECT_MAX_READ_FACTOR:g}x that read); crop a "
            "region, add a pyramid or use the grid rule (--candidates grid)"
        )
    raw = read_analysis_region(image, scale, 0, 0, width, height)
    idx = resolve_channels(image.channel_names, list(channels))
    pixels = normalization.apply(raw[..., idx] if len(idx) != raw.shape[2] else raw)
    side_px = lo_l0 / scale.downsample_x
    smooth = ndi.gaussian_filter(
        object_intensity(pixels, rgb=rgb), sigma=max(0.5, DETECT_SIGMA_FRACTION * side_px)
    )
    labels, n = ndi.label(smooth > foreground_threshold(smooth))
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    boxes: list[BoxL0] = []
    kept = 0
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        ys, xs = sl
        # the detection image is whole analysis pixels (rounded up): its last column and row
        # may reach past the image's edge, which an object cut by the edge must not
        box = scale.box_to_l0(xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start)
        box = box.clipped(*image.dimensions)
        side = max(box.width_l0, box.height_l0)
        if OBJECT_SIZE_RANGE[0] * lo_l0 <= side <= OBJECT_SIZE_RANGE[1] * hi_l0:
            boxes.append(box)
            kept += int(areas[k])
    boxes.sort(key=lambda b: -b.width_l0 * b.height_l0)
    total = int(areas[1:].sum())
    return boxes, kept / total if total else 0.0


def snap_to_objects(boxes: Sequence[BoxL0], objects: Sequence[BoxL0]) -> list[BoxL0]:
    """Each box replaced by the object whose centre lies inside it, nearest its centre (the box
    itself when none does): a prototype outlines an object, embedded as the candidates are."""
    out = []
    for b in boxes:
        cx, cy = b.center_l0
        inside = [o for o in objects if b.contains_point(*o.center_l0)]
        out.append(
            min(inside, key=lambda o: (o.center_l0[0] - cx) ** 2 + (o.center_l0[1] - cy) ** 2)
            if inside
            else b
        )
    return out


def outline_objects(boxes: Sequence[BoxL0], objects: Sequence[BoxL0]) -> bool:
    """Whether every box outlines an object (:func:`snap_to_objects`: one whose centre it holds)
    whose longer side is within :data:`AUTO_OBJECT_SIZE_RATIO` of the box's, no two boxes the
    same object."""
    snapped = snap_to_objects(boxes, objects)
    if len(set(snapped)) < len(snapped):
        return False
    for box, obj in zip(boxes, snapped, strict=True):
        if obj == box and obj not in objects:
            return False
        ratio = max(obj.width_l0, obj.height_l0) / max(box.width_l0, box.height_l0, 1e-9)
        if not 1 / AUTO_OBJECT_SIZE_RATIO <= ratio <= AUTO_OBJECT_SIZE_RATIO:
            return False
    return True


def _object_crop(
    image: ImageSource, box: BoxL0, *, stride: int, halo: int, idx: list[int]
) -> NDArray[np.float32]:
    """(S, S, C) raw float32 pixels: the box's square about its centre resampled to
    :data:`OBJECT_PX` from the coarsest pyramid level that has it at that size or more, with
    context to :data:`OBJECT_CONTEXT_CELLS` cells and the halo (S = cells x stride + 2 halo)."""
    side_l0 = max(box.width_l0, box.height_l0, 1.0)
    # the coarsest pyramid level at which the object still has OBJECT_PX pixels or more
    level = image.get_best_level_for_downsample(side_l0 / OBJECT_PX)
    lv = image.levels[level]
    out_px = OBJECT_CONTEXT_CELLS * stride + 2 * halo
    a_per_out = (side_l0 / lv.downsample_x) / OBJECT_PX  # level px per output px
    span = out_px * a_per_out
    cx_l0, cy_l0 = box.center_l0
    cx_a, cy_a = cx_l0 / lv.downsample_x, cy_l0 / lv.downsample_y
    x0, y0 = math.floor(cx_a - span / 2), math.floor(cy_a - span / 2)
    n = max(1, math.ceil(span) + 1)
    loc = (lvl_to_l0_location(x0, lv.downsample_x), lvl_to_l0_location(y0, lv.downsample_y))
    raw = image.read_region(loc, level, (n, n))
    raw = raw[..., idx] if len(idx) != raw.shape[2] else raw
    t = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).permute(2, 0, 1)[None]
    # crop [cx - span/2, cx + span/2) of the read (fractional) by an affine resampling grid
    lin = torch.linspace(0.5, out_px - 0.5, out_px, dtype=torch.float32) * a_per_out
    gx = (cx_a - span / 2 - x0 + lin) / n * 2 - 1
    gy = (cy_a - span / 2 - y0 + lin) / n * 2 - 1
    if a_per_out > 1:  # antialias: blur by the shrink factor first
        t = _blur(t, 0.5 * a_per_out)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
    result: NDArray[np.float32] = out[0].permute(1, 2, 0).numpy()
    return result


def _blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1, C, H, W) smoothed by a separable Gaussian of ``sigma`` pixels (edges replicated)."""
    r = max(1, math.ceil(2 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    c = t.shape[1]
    gx, gy = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), gx, groups=c)
    out: torch.Tensor = F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), gy, groups=c)
    return out


def embed_boxes(
    image: ImageSource,
    extractor: FeatureExtractor,
    *,
    spec: FeatureSpec,
    boxes: Sequence[BoxL0],
    normalizer: FeatureNormalizer,
    pool_fraction: float,
    rotations: int = 1,
    batch_size: int = 16,
) -> torch.Tensor:
    """(N x rotations, D) unit vectors, box by box (rotations 0, 90, ... degrees of each box
    in turn): each box embedded at its own size (module docstring) with the spec's channels,
    intensity normalisation and trunk, pooled over ``pool_fraction`` of the object; with
    several fluorescence channels, each channel's block of dimensions of unit length on its own
    (:data:`OBJECT_CHANNEL_BLOCKS`, :func:`channel_blocks_unit`)."""
    if rotations not in (1, 4):
        raise ConfigError(f"rotations must be 1 or 4, got {rotations}")
    s = extractor.stride
    halo = min(spec.halo, OBJECT_HALO_PX) // s * s
    idx = resolve_channels(image.channel_names, list(spec.channels))
    k = OBJECT_CONTEXT_CELLS
    kp = max(1, round(pool_fraction * OBJECT_PX / s))
    if (k - kp) % 2:
        kp += 1
    o = (k - kp) // 2
    kernel = PatchGeometry(float(kp * s), float(kp * s), s).kernel()
    c = halo // s
    crops: list[NDArray[np.float32]] = []
    for box in boxes:
        crop = _object_crop(image, box, stride=s, halo=halo, idx=idx)
        crops += [np.ascontiguousarray(np.rot90(crop, k=r, axes=(0, 1))) for r in range(rotations)]
    d = extractor.out_dim(len(spec.channels), spec.rgb)
    if not crops:
        return torch.zeros((0, d), dtype=torch.float32)
    parts = []
    for b0 in range(0, len(crops), batch_size):
        feats = extractor(
            np.stack(crops[b0 : b0 + batch_size]), rgb=spec.rgb, normalization=spec.normalization
        )
        window = feats[:, :, c + o : c + o + kp, c + o : c + o + kp]
        parts.append((window * kernel[None, None]).sum(dim=(2, 3)))
    vecs: torch.Tensor = normalizer(torch.cat(parts), dim=1)
    n_blocks = 1 if spec.rgb else len(spec.channels)
    return channel_blocks_unit(vecs, n_blocks) if OBJECT_CHANNEL_BLOCKS else vecs


def channel_blocks_unit(vectors: torch.Tensor, n_channels: int) -> torch.Tensor:
    """(N, D) vectors -> (N, D) unit vectors whose ``n_channels`` blocks of ``D / n_channels``
    dimensions (channel-major, :func:`~simsearch_wsi.features.extractor.merge_channel_features`)
    each have length ``1 / sqrt(n_channels)``: their cosine is the mean of the channels'
    cosines. One channel: the vectors scaled to unit length."""
    n, d = vectors.shape
    if n_channels < 1 or d % n_channels:
        raise ConfigError(f"{d} dimensions do not split into {n_channels} channel blocks")
    blocks = F.normalize(vectors.reshape(n, n_channels, d // n_channels), dim=2)
    out: torch.Tensor = blocks.reshape(n, d) / math.sqrt(n_channels)
    return out


@dataclass(frozen=True)
class ObjectCandidates:
    """The objects of one image and what they are compared with: ``boxes`` (N level-0 boxes),
    ``candidate_vectors`` (N, D) unit vectors, ``vectors`` (P, D) the prototypes' unit vectors
    (four rotations each) with ``class_index`` (P,) into ``classes``."""

    boxes: tuple[BoxL0, ...]
    candidate_vectors: torch.Tensor
    vectors: torch.Tensor
    class_index: torch.Tensor
    classes: tuple[str, ...]

    def expanded(self, hits: Sequence[Prototype]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototype vectors and class indices with those of ``hits`` (suggestions of this
        image, by box) added: query expansion."""
        rows = [self.boxes.index(h.box) for h in hits]
        owners = [self.classes.index(h.class_name) for h in hits]
        return (
            torch.cat([self.vectors, self.candidate_vectors[rows]]),
            torch.cat([self.class_index, torch.tensor(owners, dtype=torch.long)]),
        )

    def class_similarity(self, vectors: tuple[torch.Tensor, torch.Tensor]) -> NDArray[np.float32]:
        """(N, K) cosine similarity of each object to each class: the maximum over the class's
        prototype vectors (``-inf`` for a class without one)."""
        vecs, owners = vectors
        sims = (self.candidate_vectors @ vecs.T).numpy()  # (N, P)
        out = np.full((len(self.boxes), len(self.classes)), -np.inf, dtype=np.float32)
        for c in range(len(self.classes)):
            cols = (owners == c).numpy()
            if cols.any() and len(self.boxes):
                out[:, c] = sims[:, cols].max(axis=1)
        return out

    def similarity_maps(
        self,
        vectors: tuple[torch.Tensor, torch.Tensor],
        *,
        geometry: PatchGeometry,
        scale: AnalysisScale,
        shape_hw: tuple[int, int],
    ) -> NDArray[np.float32]:
        """(K, H, W) class similarities on the grid of pooled windows ``geometry`` has on
        ``scale`` (H x W windows, as the search's maps), for a heat map on the same scale as the
        object suggestions: a window whose centre lies in an object's box takes that object's
        similarity to each class (:meth:`class_similarity`; the largest where boxes overlap),
        and an object smaller than a window's pitch marks at least the window nearest its
        centre. NaN elsewhere: no candidate there."""
        h, w = shape_hw
        out = np.full((len(self.classes), h, w), -np.inf, dtype=np.float32)
        if len(self.boxes):
            sim = self.class_similarity(vectors)
            kh, kw = geometry.kernel_hw  # window centres as PatchGeometry.window_center_a
            x_l0 = geometry.stride * (np.arange(w) + kw / 2) * scale.downsample_x  # (W,)
            y_l0 = geometry.stride * (np.arange(h) + kh / 2) * scale.downsample_y  # (H,)
            for n, box in enumerate(self.boxes):
                j0, j1 = np.searchsorted(x_l0, [box.x_l0, box.x1_l0], side="left")
                i0, i1 = np.searchsorted(y_l0, [box.y_l0, box.y1_l0], side="left")
                if j0 >= j1 or i0 >= i1:  # no centre inside: the window nearest the object's
                    cx, cy = box.center_l0
                    i, j = geometry.window_index(cx / scale.downsample_x, cy / scale.downsample_y)
                    # by the image's edge the nearest window is the first or last one
                    i, j = min(max(i, 0), h - 1), min(max(j, 0), w - 1)
                    i0, i1, j0, j1 = i, i + 1, j, j + 1
                block = out[:, i0:i1, j0:j1]
                np.maximum(block, sim[n][:, None, None], out=block)
        out[np.isneginf(out)] = np.nan
        return out

    def suggestions(
        self,
        vectors: tuple[torch.Tensor, torch.Tensor],
        *,
        thresholds: dict[str, float],
        floor: float | None = None,
        exclude: Sequence[Prototype] = (),
        max_per_class: int = 500,
    ) -> list[Suggestion]:
        """One suggestion per object, for the class it resembles most (with one class: that
        class), at or above the class's threshold (or ``floor`` when lower), most similar first
        and ranked per class, at most ``max_per_class`` a class; an object centred inside a
        prototype box of its class (``exclude``) is left out."""
        sim = self.class_similarity(vectors)
        best = sim.argmax(axis=1) if len(self.boxes) else np.zeros(0, dtype=np.int64)
        found: dict[str, list[tuple[float, BoxL0]]] = {c: [] for c in self.classes}
        for n, box in enumerate(self.boxes):
            name = self.classes[int(best[n])]
            value = float(sim[n, best[n]])
            low = thresholds[name] if floor is None else min(thresholds[name], floor)
            if not value >= low:
                continue
            if any(p.class_name == name and p.box.contains_point(*box.center_l0) for p in exclude):
                continue
            found[name].append((value, box))
        out: list[Suggestion] = []
        for name in self.classes:
            ranked = sorted(found[name], key=lambda t: -t[0])[:max_per_class]
            out += [Suggestion(name, box, v, rank + 1) for rank, (v, box) in enumerate(ranked)]
        return out
