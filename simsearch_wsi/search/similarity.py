"""Similarity search over a cached feature map (SimSearch's Iterative Patch Selection engine).

Pooling. A patch of ``(width_a, height_a)`` analysis pixels is summarised by a convolution of
``(kh, kw) = (round(height_a/s), round(width_a/s))`` feature cells (``s`` = trunk stride)
initialised with a centre-focused Gaussian (sigma = a quarter of the kernel size per axis,
weights summing to 1). Pooled position ``(i, j)`` is the window whose top-left feature cell is
``(i, j)``; its centre is at analysis pixel ``(s*(j + kw/2), s*(i + kh/2))``.

Prototypes. A prototype box is snapped to the nearest window of the grid; its crop (the window's
cells plus the trunk's halo, squared) is embedded in the four rotations 0/90/180/270 degrees, each
pooled at the centre: four unit vectors per prototype. Rotation 0 equals the cached map's vector.

Normalisation. Before the cosine, pooled vectors go through the search's feature normalisation
(:mod:`simsearch_wsi.features.norm`: none, per-image standardisation, or per-image whitening), each
image with its own statistics. Because the pooling kernel sums to 1 this equals normalising the
feature map before pooling.

Similarity. Cosine similarity of every pooled window to every prototype vector; a class's map is
the maximum over its prototypes and rotations. The pooled, normalised, unit-length window vectors
are computed once per patch geometry (tile by tile) and cached beside the feature entry, so each
query is one matrix product per tile; no window is ever cropped or re-embedded.

Suggestions. Local maxima of a class map above the class threshold, at least ``min_distance``
apart, each refined below the feature stride by a parabola through its neighbours and snapped to a
grid of ``0.1 x patch width`` (the paper's sliding-window stride; the trunk's stride is 16 px, so
positions in between are interpolated). The similarity reported is the value at the maximum cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from simsearch_wsi.core.atomic import atomic_path
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.cache import FeatureMap
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    FeatureSpec,
    prepare_pixels,
    read_analysis_region,
)
from simsearch_wsi.features.norm import (
    DEFAULT_FEATURE_NORM,
    FeatureNormalizer,
    feature_norm_tag,
)
from simsearch_wsi.features.preprocess import resolve_channels
from simsearch_wsi.io.base import ImageSource

WINDOW_STRIDE_FRACTION = 0.1
#: objects smaller than the patch (dense mode): candidates of a class are kept this fraction of
#: the object's shorter side apart (between refined centres), so touching objects stay apart
DENSE_SPACING_FRACTION = 0.5
#: dense mode: features are pooled over this fraction of the object box (measured: a window of
#: half a nucleus places the maxima nearer the centres than a window of the whole nucleus)
DENSE_POOL_FRACTION = 0.5


@dataclass(frozen=True)
class PatchGeometry:
    """The patch size of an experiment (fixed by its first prototype) on the analysis grid."""

    width_a: float
    height_a: float
    stride: int

    @classmethod
    def from_l0(
        cls, width_l0: float, height_l0: float, *, scale: AnalysisScale, stride: int
    ) -> PatchGeometry:
        """The patch of a level-0 size on ``scale``'s analysis grid."""
        _, _, width_a, height_a = scale.box_to_analysis(BoxL0(0, 0, width_l0, height_l0))
        return cls(width_a, height_a, stride)

    @property
    def kernel_hw(self) -> tuple[int, int]:
        s = self.stride
        return (max(1, round(self.height_a / s)), max(1, round(self.width_a / s)))

    @property
    def window_stride_a(self) -> float:
        return WINDOW_STRIDE_FRACTION * self.width_a

    def kernel(self) -> torch.Tensor:
        """(kh, kw) Gaussian pooling weights summing to 1."""
        kh, kw = self.kernel_hw
        ys = torch.arange(kh, dtype=torch.float32) - (kh - 1) / 2
        xs = torch.arange(kw, dtype=torch.float32) - (kw - 1) / 2
        gy = torch.exp(-0.5 * (ys / max(kh / 4, 0.5)) ** 2)
        gx = torch.exp(-0.5 * (xs / max(kw / 4, 0.5)) ** 2)
        k = gy[:, None] * gx[None, :]
        return k / k.sum()

    def window_center_a(self, i: float, j: float) -> tuple[float, float]:
        """Analysis-pixel centre (x, y) of pooled window (i, j) (fractional allowed)."""
        kh, kw = self.kernel_hw
        return (self.stride * (j + kw / 2), self.stride * (i + kh / 2))

    def window_index(self, cx_a: float, cy_a: float) -> tuple[int, int]:
        """The pooled window (i, j) whose centre is nearest to analysis point (cx_a, cy_a)."""
        kh, kw = self.kernel_hw
        return (round(cy_a / self.stride - kh / 2), round(cx_a / self.stride - kw / 2))

    def to_dict(self) -> dict[str, Any]:
        return {"width_a": self.width_a, "height_a": self.height_a, "stride": self.stride}


def pool(features_dhw: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(D, h, w) -> (D, h-kh+1, w-kw+1): the same Gaussian for every channel ("valid").

    A depthwise convolution (groups = D), much faster on CPU than treating channels as a batch.
    """
    d = features_dhw.shape[0]
    weight = kernel.expand(d, 1, *kernel.shape).contiguous()
    out: torch.Tensor = F.conv2d(features_dhw[None], weight, groups=d)[0]
    return out


@dataclass(frozen=True)
class Prototype:
    """A user's example: a class name and a level-0 box on an image.

    ``image`` is the path of the image it was drawn on; ``None`` means the image being searched.
    """

    class_name: str
    box: BoxL0
    image: str | None = None


@dataclass(frozen=True)
class PrototypeVectors:
    """Unit vectors (P, D) with their class index (P,), 4 rotations per prototype."""

    vectors: torch.Tensor
    class_index: torch.Tensor
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def mean_vector(self) -> torch.Tensor:
        """Unit mean of all prototype vectors (D,): for background candidates."""
        m = self.vectors.mean(dim=0)
        unit: torch.Tensor = m / m.norm().clamp_min(1e-12)
        return unit


def embed_prototypes(
    image: ImageSource,
    extractor: FeatureExtractor,
    *,
    spec: FeatureSpec,
    geometry: PatchGeometry,
    prototypes: Sequence[Prototype],
    classes: Sequence[str],
    normalizer: FeatureNormalizer | None = None,
) -> PrototypeVectors:
    """Four rotation vectors per prototype (see module docstring), normalised with
    ``normalizer`` (built from the statistics of the prototypes' image) and scaled to unit
    length."""
    s, halo = geometry.stride, spec.halo
    kh, kw = geometry.kernel_hw
    k = max(kh, kw)
    oy, ox = (k - kh) // 2, (k - kw) // 2
    kernel = geometry.kernel()
    idx = resolve_channels(image.channel_names, list(spec.channels))
    crops, owners = [], []
    for proto in prototypes:
        if proto.class_name not in classes:
            raise ConfigError(f"prototype class {proto.class_name!r} is not one of {list(classes)}")
        x_a, y_a, w_a, h_a = spec.scale.box_to_analysis(proto.box)
        i, j = geometry.window_index(x_a + w_a / 2, y_a + h_a / 2)
        # a square crop of k x k cells (plus halo) with the window at its centre, so that the
        # rotations turn about the window's centre and rotation 0 is the cached map's window
        x0, y0 = (j - ox) * s - halo, (i - oy) * s - halo
        side = k * s + 2 * halo
        raw = read_analysis_region(image, spec.scale, x0, y0, side, side)
        norm = prepare_pixels(raw, spec, idx=idx)
        for r in range(4):
            crops.append(np.ascontiguousarray(np.rot90(norm, k=r, axes=(0, 1))))
            owners.append(list(classes).index(proto.class_name))
    if not crops:
        raise ConfigError("no prototypes given: draw at least one classified rectangle")
    feats = extractor(
        np.stack(crops), rgb=spec.rgb, normalization=spec.normalization
    )  # (4P, D, k + 2c, k + 2c)
    c = halo // s
    core = feats[:, :, c : c + k, c : c + k]
    window = core[:, :, oy : oy + kh, ox : ox + kw]
    vecs = (window * kernel[None, None]).sum(dim=(2, 3))
    vecs = (normalizer or FeatureNormalizer())(vecs, dim=1)
    return PrototypeVectors(vecs, torch.tensor(owners, dtype=torch.long), tuple(classes))


@dataclass
class PooledMap:
    """Pooled, normalised, unit-length window vectors of a feature map for one patch geometry.

    ``array`` is a Zarr (Hp, Wp, D) uint16 array holding **bfloat16 bit patterns** (read with
    :func:`as_bf16`), uncompressed, chunked like the feature map (one chunk per feature tile:
    windows whose top-left cell lies in that tile). Uncompressed bf16 makes a query read and
    multiply without any decoding (the chunk is viewed as a bf16 tensor in place); it costs
    ``2 * D`` bytes per window on disk. ``computed`` marks the chunks written; ``valid``
    (Hp, Wp) marks windows whose centre cell was embedded. Known limit: a window whose top-left
    cell lies in a tile that was not embedded is not scored even if its centre is embedded (a
    band of ``kernel // 2`` cells, at most 2 at the usual patch sizes, along the top and left
    edges of embedded regions, which border tissue-free tiles).
    """

    path: Path
    array: Any
    computed: NDArray[np.bool_]
    valid: NDArray[np.bool_]
    tile_cells: int


def pooled_hw(fmap: FeatureMap, geometry: PatchGeometry) -> tuple[int, int]:
    """(Hp, Wp): the pooled windows of ``fmap`` for ``geometry`` ("valid" pooling); a
    :class:`ConfigError` when the image is smaller than one patch."""
    kh, kw = geometry.kernel_hw
    hf, wf, _ = fmap.shape
    hp, wp = hf - kh + 1, wf - kw + 1
    if hp <= 0 or wp <= 0:
        raise ConfigError(
            f"the image is smaller than one patch ({wf}x{hf} cells < {kw}x{kh}); use a smaller "
            "patch or a finer level"
        )
    return hp, wp


def valid_windows(fmap: FeatureMap, geometry: PatchGeometry) -> NDArray[np.bool_]:
    """(Hp, Wp) bool: windows whose centre cell was embedded."""
    kh, kw = geometry.kernel_hw
    hp, wp = pooled_hw(fmap, geometry)
    return fmap.computed_cells()[kh // 2 : kh // 2 + hp, kw // 2 : kw // 2 + wp]


def iter_pooled_blocks(
    fmap: FeatureMap,
    geometry: PatchGeometry,
    *,
    normalizer: FeatureNormalizer,
    progress: Callable[[str, int, int], None] | None = None,
    what: str = "pooling windows",
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Normalised unit window vectors of every embedded tile, one tile at a time:
    ``(y0, x0, vectors)`` with ``vectors`` (D, h, w) float32 for windows ``[y0:y0+h,
    x0:x0+w]`` (whose top-left cell lies in the tile). Reads one band of tile rows (plus the
    kernel's overlap) at a time."""
    kh, kw = geometry.kernel_hw
    hf, wf, _ = fmap.shape
    hp, wp = pooled_hw(fmap, geometry)
    kernel = geometry.kernel()
    tc = fmap.tile_cells
    tiles = list(zip(*np.nonzero(fmap.computed), strict=True))
    band_y, band = -1, None
    for n, (ty, tx) in enumerate(tiles):
        y0, x0 = int(ty) * tc, int(tx) * tc
        if y0 >= hp or x0 >= wp:
            continue
        if band is None or band_y != y0:
            band_y = y0
            band = fmap.read_cells(y0, min(y0 + tc + kh - 1, hf), 0, wf)
        x1 = min(x0 + tc + kw - 1, wf)
        block = torch.from_numpy(band[:, x0:x1].astype(np.float32)).permute(2, 0, 1)
        vectors = normalizer(pool(block, kernel), dim=0)  # (D, h', w')
        h2, w2 = min(tc, vectors.shape[1]), min(tc, vectors.shape[2])
        yield y0, x0, vectors[:, :h2, :w2]
        if progress is not None:
            progress(what, n + 1, len(tiles))


def pooled_map(
    fmap: FeatureMap,
    geometry: PatchGeometry,
    *,
    norm: str = DEFAULT_FEATURE_NORM,
    progress: Callable[[str, int, int], None] | None = None,
) -> PooledMap:
    """The pooled map for ``geometry``: cached beside the feature entry (computed once per
    experiment patch size, written under a temporary name and renamed when complete)."""
    import zarr

    kh, kw = geometry.kernel_hw
    d = fmap.shape[2]
    hp, wp = pooled_hw(fmap, geometry)
    tc = fmap.tile_cells
    valid = valid_windows(fmap, geometry)
    path = fmap.path.with_name(f"{fmap.path.name}.pooled-{kh}x{kw}-{feature_norm_tag(norm)}")
    if not path.is_dir():
        with atomic_path(path) as tmp:
            group: Any = zarr.open_group(str(tmp), mode="w")
            arr = group.create_array(
                "pooled",
                shape=(hp, wp, d),
                chunks=(tc, tc, d),
                dtype="uint16",
                fill_value=0,
                compressors=None,
            )
            normalizer = FeatureNormalizer.of(fmap, norm)
            for y0, x0, vectors in iter_pooled_blocks(
                fmap, geometry, normalizer=normalizer, progress=progress
            ):
                _, h2, w2 = vectors.shape
                bf16 = vectors.permute(1, 2, 0).contiguous().to(torch.bfloat16)
                arr[y0 : y0 + h2, x0 : x0 + w2] = bf16.view(torch.int16).numpy().view(np.uint16)
    group = zarr.open_group(str(path), mode="r")
    return PooledMap(path, group["pooled"], fmap.computed, valid, tc)


def as_bf16(bits: NDArray[Any]) -> torch.Tensor:
    """View uint16 bfloat16 bit patterns as a bf16 tensor (no copy)."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def similarity_maps(
    fmap: FeatureMap,
    geometry: PatchGeometry,
    *,
    prototypes: PrototypeVectors,
    extra_vectors: torch.Tensor | None = None,
    norm: str = DEFAULT_FEATURE_NORM,
    precision: str = "bf16",
    progress: Callable[[str, int, int], None] | None = None,
) -> NDArray[np.float32]:
    """Per-class cosine-similarity maps over every pooled window: (n_classes [+ E], Hp, Wp).

    ``Hp = H_f - kh + 1``, ``Wp = W_f - kw + 1``. Windows whose centre cell was not embedded
    (background tiles) are NaN. ``extra_vectors`` (E, D) add one map each (e.g. the mean
    prototype for background candidates). ``norm`` is the feature normalisation with the map's own
    statistics (module docstring); prototypes must have been normalised the same way.
    ``precision``: ``"bf16"`` (default; 5x faster matrix products on CPUs with AVX-512 BF16) or
    ``"fp32"`` products. The pooled vectors are stored in bf16 either way (similarities within
    about 0.02 of float32, rankings preserved; see tests/test_similarity.py).
    """
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    d = fmap.shape[2]
    if prototypes.vectors.shape[1] != d:
        raise ConfigError(
            f"prototype vectors have {prototypes.vectors.shape[1]} dims, the feature map {d}; "
            "they come from different backbones or channel selections"
        )
    pm = pooled_map(fmap, geometry, norm=norm, progress=progress)
    hp, wp, _ = pm.array.shape
    n_cls = prototypes.n_classes
    # order vectors by class so each class's maximum is over a contiguous block of columns
    order = torch.argsort(prototypes.class_index, stable=True)
    vecs = prototypes.vectors[order]
    counts = torch.bincount(prototypes.class_index, minlength=n_cls).tolist()
    bounds = [0, *np.cumsum(counts).tolist()]
    n_extra = 0 if extra_vectors is None else int(extra_vectors.shape[0])
    all_vecs = vecs if extra_vectors is None else torch.cat([vecs, extra_vectors])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mat = all_vecs.T.contiguous().to(dtype)  # (D, P + E)
    out = np.full((n_cls + n_extra, hp, wp), np.nan, dtype=np.float32)
    n_vec = len(vecs)
    tc = pm.tile_cells
    for ty, tx in zip(*np.nonzero(pm.computed), strict=True):
        y0, x0 = int(ty) * tc, int(tx) * tc
        if y0 >= hp or x0 >= wp:
            continue
        block = np.asarray(pm.array[y0 : y0 + tc, x0 : x0 + tc])
        h2, w2 = block.shape[:2]
        flat = as_bf16(block.reshape(-1, d)).to(dtype)
        sims = (flat @ mat).float()  # (h2*w2, P + E)
        tile_out = out[:, y0 : y0 + h2, x0 : x0 + w2]
        for c in range(n_cls):
            if counts[c]:
                tile_out[c] = sims[:, bounds[c] : bounds[c + 1]].amax(dim=1).reshape(h2, w2)
        for e in range(n_extra):
            tile_out[n_cls + e] = sims[:, n_vec + e].reshape(h2, w2)
    out[:, ~pm.valid] = np.nan
    return out


@dataclass(frozen=True)
class Suggestion:
    """A suggested patch: class, level-0 box, cosine similarity, rank in its class (1 = best)."""

    class_name: str
    box: BoxL0
    similarity: float
    rank: int


def refine_peak(m: NDArray[np.float32], i: int, j: int) -> tuple[float, float]:
    """Sub-cell offset (di, dj) in [-0.5, 0.5] from a parabola through the neighbours."""

    def offset(a: float, b: float, c: float) -> float:
        den = a - 2 * b + c
        if not np.isfinite(den) or den >= 0:
            return 0.0
        return float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))

    h, w = m.shape
    di = offset(m[i - 1, j], m[i, j], m[i + 1, j]) if 0 < i < h - 1 else 0.0
    dj = offset(m[i, j - 1], m[i, j], m[i, j + 1]) if 0 < j < w - 1 else 0.0
    return di, dj


def local_maxima(
    m: NDArray[np.float32], *, threshold: float, min_distance_cells: int, max_peaks: int
) -> NDArray[np.int64]:
    """(n, 2) (i, j) of local maxima strictly above ``threshold``, strongest first, NaN
    ignored (compared in the map's float32)."""
    from skimage.feature import peak_local_max

    finite = np.isfinite(m)
    if not finite.any():
        return np.zeros((0, 2), dtype=np.int64)
    peaks = peak_local_max(
        np.where(finite, m, np.float32(-1e9)).astype(np.float32),
        min_distance=max(1, min_distance_cells),
        threshold_abs=threshold,
        exclude_border=False,
        num_peaks=max_peaks,
    )
    return np.asarray(peaks, dtype=np.int64)


def spaced_peaks(
    m: NDArray[np.float32],
    *,
    geometry: PatchGeometry,
    threshold: float,
    spacing_a: float,
    max_peaks: int,
) -> list[tuple[int, int, float, float]]:
    """Candidates of a map (Hp, Wp) for objects that may be closer than a patch: every local
    maximum of its 3 x 3 cells above ``threshold`` (NaN ignored), placed below the cell
    by :func:`refine_peak`, then kept strongest first unless within ``spacing_a`` analysis
    pixels (Euclidean, between refined centres) of a stronger kept one. Returns at most
    ``max_peaks`` ``(i, j, di, dj)``: the maximum's cell and its sub-cell offset."""
    cand = local_maxima(m, threshold=threshold, min_distance_cells=1, max_peaks=10 * max_peaks)
    s = float(geometry.stride)
    r = max(float(spacing_a), 1e-6)
    kept: list[tuple[int, int, float, float]] = []
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}  # kept centres by r-sized bin
    for i, j in cand:  # strongest first
        di, dj = refine_peak(m, int(i), int(j))
        x, y = s * (j + dj), s * (i + di)
        bx, by = math.floor(x / r), math.floor(y / r)
        near = (
            (x - kx) ** 2 + (y - ky) ** 2 < r * r
            for gx in (bx - 1, bx, bx + 1)
            for gy in (by - 1, by, by + 1)
            for kx, ky in grid.get((gx, gy), ())
        )
        if any(near):
            continue
        kept.append((int(i), int(j), di, dj))
        grid.setdefault((bx, by), []).append((x, y))
        if len(kept) == max_peaks:
            break
    return kept


def object_box(
    geometry: PatchGeometry,
    spec: FeatureSpec,
    *,
    i: float,
    j: float,
    object_size_a: tuple[float, float] | None = None,
) -> BoxL0:
    """The level-0 box of an object of ``object_size_a`` (width, height) analysis pixels
    (default: the patch) centred on pooled window (i, j) (fractional), snapped to a tenth of
    the object's width (for the patch: the sliding-window stride)."""
    cx_a, cy_a = geometry.window_center_a(i, j)
    w_a, h_a = object_size_a or (geometry.width_a, geometry.height_a)
    step = WINDOW_STRIDE_FRACTION * w_a
    cx_a, cy_a = round(cx_a / step) * step, round(cy_a / step) * step
    return spec.scale.box_to_l0(cx_a - w_a / 2, cy_a - h_a / 2, w_a, h_a)


def _inside(box: BoxL0, image_size_l0: tuple[int, int] | None) -> BoxL0:
    """Shift a box (not larger than the image) so it lies inside the image."""
    if image_size_l0 is None:
        return box
    w0, h0 = image_size_l0
    x = min(max(box.x_l0, 0.0), max(w0 - box.width_l0, 0.0))
    y = min(max(box.y_l0, 0.0), max(h0 - box.height_l0, 0.0))
    return BoxL0(x, y, box.width_l0, box.height_l0)


def _contains(box: BoxL0, point: tuple[float, float]) -> bool:
    return box.x_l0 <= point[0] <= box.x1_l0 and box.y_l0 <= point[1] <= box.y1_l0


def _iou(a: BoxL0, b: BoxL0) -> float:
    ix = max(0.0, min(a.x1_l0, b.x1_l0) - max(a.x_l0, b.x_l0))
    iy = max(0.0, min(a.y1_l0, b.y1_l0) - max(a.y_l0, b.y_l0))
    inter = ix * iy
    union = a.width_l0 * a.height_l0 + b.width_l0 * b.height_l0 - inter
    return inter / union if union > 0 else 0.0


def extract_suggestions(
    maps: NDArray[np.float32],
    classes: Sequence[str],
    *,
    geometry: PatchGeometry,
    spec: FeatureSpec,
    thresholds: dict[str, float],
    min_distance_a: float | None = None,
    max_per_class: int = 500,
    exclude: Sequence[Prototype] = (),
    competitive: bool = True,
    image_size_l0: tuple[int, int] | None = None,
    object_size_a: tuple[float, float] | None = None,
    floor: float | None = None,
    inclusive: bool = True,
) -> list[Suggestion]:
    """Suggestions per class from :func:`similarity_maps` output (module docstring).

    ``thresholds`` maps class -> minimum similarity (a suggestion is at or above it: ``>=``,
    the rule of the review and the QuPath panel too; ``inclusive=False``: strictly above it,
    the rule self-learning mines its noisy patches with, kept because the trained models were
    measured with it); ``floor`` (optional) lowers that minimum
    to ``floor`` for classes whose threshold is higher, so a viewer can move the threshold down
    to the floor without asking again: peaks are found strongest first and spaced greedily, so
    the candidates at or above a class's threshold are exactly the ones found without a floor
    (up to ``max_per_class``), ranks included; only the overlap between classes is then resolved
    among all candidates down to the floor. ``min_distance_a`` defaults to half the
    patch width; suggestions of a class centred inside an ``exclude`` box of the same class
    (the prototypes themselves) are dropped. With ``competitive`` (default) a window can only be
    suggested for the class whose prototypes it resembles most: each class map is masked where
    another class scores higher, so one motif is not suggested under several classes.

    ``object_size_a`` (width, height of the objects in analysis pixels, when they differ from
    the patch): candidates are found by :func:`spaced_peaks` (``min_distance_a`` apart between
    refined centres, default :data:`DENSE_SPACING_FRACTION` of the object's shorter side) and
    boxes are the object's size (:func:`object_box`). Without it, the patch's rule: local
    maxima ``min_distance_a`` apart on the cell grid, boxes of the patch.
    """
    min_dist = 0.5 * geometry.width_a if min_distance_a is None else min_distance_a
    min_cells = max(1, math.floor(min_dist / geometry.stride))
    if object_size_a is not None and min_distance_a is None:
        min_dist = DENSE_SPACING_FRACTION * min(object_size_a)
    out: list[Suggestion] = []
    class_maps = maps[: len(classes)]
    best = np.nanargmax(np.where(np.isfinite(class_maps), class_maps, -np.inf), axis=0)
    for c, name in enumerate(classes):
        m = class_maps[c]
        if competitive and len(classes) > 1:
            m = np.where(best == c, m, np.nan).astype(np.float32)
        threshold = thresholds[name] if floor is None else min(thresholds[name], floor)
        if inclusive:  # at or above it, in the map's float32
            threshold = _float32_below(threshold)
        if object_size_a is None:
            peaks = [
                (int(i), int(j), *refine_peak(m, int(i), int(j)))
                for i, j in local_maxima(
                    m,
                    threshold=threshold,
                    min_distance_cells=min_cells,
                    max_peaks=max_per_class + len(exclude),
                )
            ]
        else:
            peaks = spaced_peaks(
                m,
                geometry=geometry,
                threshold=threshold,
                spacing_a=min_dist,
                max_peaks=max_per_class + len(exclude),
            )
        found: list[tuple[float, BoxL0]] = []
        for i, j, di, dj in peaks:
            box = _inside(
                object_box(geometry, spec, i=i + di, j=j + dj, object_size_a=object_size_a),
                image_size_l0,
            )
            if any(p.class_name == name and _contains(p.box, box.center_l0) for p in exclude):
                continue
            found.append((float(m[i, j]), box))
        found.sort(key=lambda t: -t[0])
        out += [
            Suggestion(name, box, sim, rank + 1)
            for rank, (sim, box) in enumerate(found[:max_per_class])
        ]
    if competitive and len(classes) > 1:
        out = _suppress_across_classes(out, iou_max=0.3, thresholds=thresholds)
    return out


def _float32_below(value: float) -> float:
    """The float32 just below the smallest float32 >= ``value``: a float32 map value is strictly
    above it exactly when it is at or above ``value`` (:func:`local_maxima` keeps values strictly
    above its threshold, compared in float32)."""
    v32 = np.float32(value)
    if float(v32) < value:
        v32 = np.nextafter(v32, np.float32(np.inf))
    return float(np.nextafter(v32, np.float32(-np.inf)))


def _suppress_across_classes(
    suggestions: list[Suggestion], *, iou_max: float, thresholds: dict[str, float]
) -> list[Suggestion]:
    """Greedy non-maximum suppression across classes: of overlapping suggestions of different
    classes (IoU > ``iou_max``) only the first is kept; ranks are renumbered per class.

    The suggestions at or above their class's threshold come first (most similar first), then
    the ones below (the floor's): a candidate below its threshold never removes one above its
    own, so the suggestions above the thresholds are the same with or without a floor."""
    kept: list[Suggestion] = []
    order = sorted(
        suggestions, key=lambda g: (g.similarity < thresholds[g.class_name], -g.similarity)
    )
    for sug in order:
        if all(k.class_name == sug.class_name or _iou(k.box, sug.box) <= iou_max for k in kept):
            kept.append(sug)
    ranks: dict[str, int] = {}
    out = []
    for sug in sorted(kept, key=lambda g: (g.class_name, -g.similarity)):
        ranks[sug.class_name] = ranks.get(sug.class_name, 0) + 1
        out.append(Suggestion(sug.class_name, sug.box, sug.similarity, ranks[sug.class_name]))
    return out


def windows_near(
    shape: tuple[int, ...], boxes: Sequence[BoxL0], *, geometry: PatchGeometry, spec: FeatureSpec
) -> NDArray[np.bool_]:
    """(Hp, Wp) mask of the pooled windows (map ``shape``) that overlap any of ``boxes``."""
    near = np.zeros(shape[-2:], dtype=bool)
    s = geometry.stride
    for b in boxes:
        bx, by, bw, bh = spec.scale.box_to_analysis(b)
        j0 = max(0, math.floor((bx - geometry.width_a) / s))
        i0 = max(0, math.floor((by - geometry.height_a) / s))
        j1, i1 = max(0, math.ceil((bx + bw) / s)), max(0, math.ceil((by + bh) / s))
        near[i0:i1, j0:j1] = True
    return near


def windows_near_centres(
    shape: tuple[int, ...],
    centres_l0: Sequence[tuple[float, float]],
    *,
    geometry: PatchGeometry,
    spec: FeatureSpec,
    radius_a: float,
) -> NDArray[np.bool_]:
    """(Hp, Wp) mask of the pooled windows (map ``shape``) whose centre is closer than
    ``radius_a`` analysis pixels (Euclidean) to any of ``centres_l0`` (level-0 (x, y))."""
    hp, wp = shape[-2:]
    near = np.zeros((hp, wp), dtype=bool)
    if not centres_l0 or hp == 0 or wp == 0:
        return near
    x0_a, y0_a = geometry.window_center_a(0.0, 0.0)
    s = float(geometry.stride)
    sx, sy = spec.scale.downsample_x, spec.scale.downsample_y
    reach = math.ceil(radius_a / s) + 1
    for x_l0, y_l0 in centres_l0:
        cx_a, cy_a = x_l0 / sx, y_l0 / sy
        jc, ic = round((cx_a - x0_a) / s), round((cy_a - y0_a) / s)
        i0, i1 = max(0, ic - reach), min(hp, ic + reach + 1)
        j0, j1 = max(0, jc - reach), min(wp, jc + reach + 1)
        if i0 >= i1 or j0 >= j1:
            continue
        wy = y0_a + s * np.arange(i0, i1)[:, None] - cy_a
        wx = x0_a + s * np.arange(j0, j1)[None, :] - cx_a
        near[i0:i1, j0:j1] |= wx * wx + wy * wy < radius_a * radius_a
    return near


def background_candidates(
    mean_map: NDArray[np.float32],
    geometry: PatchGeometry,
    *,
    spec: FeatureSpec,
    n_high: int = 10,
    n_low: int = 10,
    avoid: Sequence[BoxL0] = (),
    avoid_centres_l0: Sequence[tuple[float, float]] = (),
    image_size_l0: tuple[int, int] | None = None,
    object_size_a: tuple[float, float] | None = None,
) -> list[Suggestion]:
    """Windows most and least similar to the mean of all prototypes, away from labelled boxes.

    The highest-similarity unlabelled windows are the hard cases (look-alikes), the lowest are
    easy background; both go to the user to confirm. Returned with class ``"background"``,
    ranked high-to-low then low-to-high; ``similarity`` is to the mean prototype.

    ``object_size_a`` (width, height in analysis pixels; dense objects, as in
    :func:`extract_suggestions`): each candidate is a box of the object's size centred on its
    window (:func:`object_box`), the boxes are kept an object apart and clear of ``avoid``.
    Without it, the boxes are the pooled windows, a window apart.

    ``avoid_centres_l0`` ((x, y) level-0 points; with ``object_size_a`` only): no candidate is
    centred closer than :data:`DENSE_SPACING_FRACTION` of the object's shorter side to one of
    them, the distance at which :func:`spaced_peaks` keeps two objects apart. This is how
    object-spaced suggestions are avoided: their boxes overlap and may cover every window, but
    a candidate that far from every suggestion centre is not one of them.
    """
    m = mean_map.copy()
    kh, kw = geometry.kernel_hw
    min_cells = max(kh, kw)
    if object_size_a is not None:
        # the object's box reaches past its window by (object - window) / 2 on each side, and
        # by up to half a snapping step more (object_box)
        snap_a = 0.5 * WINDOW_STRIDE_FRACTION * object_size_a[0]
        pad_x_a = max(0.0, object_size_a[0] - geometry.width_a) / 2 + snap_a
        pad_y_a = max(0.0, object_size_a[1] - geometry.height_a) / 2 + snap_a
        pad_x, pad_y = pad_x_a * spec.scale.downsample_x, pad_y_a * spec.scale.downsample_y
        avoid = [
            BoxL0(b.x_l0 - pad_x, b.y_l0 - pad_y, b.width_l0 + 2 * pad_x, b.height_l0 + 2 * pad_y)
            for b in avoid
        ]
        min_cells = max(1, math.ceil(max(object_size_a) / geometry.stride))
    if avoid_centres_l0 and object_size_a is None:
        raise ConfigError("background candidates avoid centres only with an object size")
    near_labelled = windows_near(m.shape, avoid, geometry=geometry, spec=spec)
    m[near_labelled] = np.nan  # away from labelled patches
    if avoid_centres_l0 and object_size_a is not None:
        m[
            windows_near_centres(
                m.shape,
                avoid_centres_l0,
                geometry=geometry,
                spec=spec,
                radius_a=DENSE_SPACING_FRACTION * min(object_size_a),
            )
        ] = np.nan
    high = local_maxima(m, threshold=-1.0, min_distance_cells=min_cells, max_peaks=n_high)
    low = local_maxima(-m, threshold=-1.0, min_distance_cells=min_cells, max_peaks=n_low)
    return [
        Suggestion(
            "background",
            _inside(
                object_box(geometry, spec, i=float(i), j=float(j), object_size_a=object_size_a),
                image_size_l0,
            ),
            float(m[i, j]),
            rank,
        )
        for rank, (i, j) in enumerate([*high, *low], start=1)
    ]
