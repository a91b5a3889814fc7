"""Dataset intensity normalisation (SimSearch's percentile rule) and the channel report.

SimSearch (Gupta et al. 2022) normalises fluorescence data per channel over the whole dataset:

1. for every image, the (5, 95) intensity percentiles of each channel
   (:func:`image_channel_percentiles`);
2. over the dataset, ``low`` = the 0.5th percentile of all images' 5th percentiles and
   ``high`` = the 99.5th percentile of all images' 95th percentiles (:func:`fit_normalization`);
3. every image is rescaled with ``(x - low) / (high - low)`` clipped to [0, 1]
   (:meth:`ChannelNormalization.apply`).

Brightfield RGB stays RGB: a brightfield set gets the fixed range of its dtype (0..255 for
uint8), method ``"fixed-range"``. :func:`channel_correlation` reports the mean inter-channel
Pearson correlation so a user can drop redundant channels (:meth:`ChannelCorrelationReport.
suggest_channels`, :func:`select_channels`).

Which pixels are measured
-------------------------
Statistics are computed on a low-resolution overview of the image, never on level 0 of a large
image: the finest pyramid level that has at most ``max_pixels`` pixels, read whole; when every
level is larger, every f-th pixel of the coarsest level (rows and columns, streamed in bands;
see :func:`simsearch_wsi.features.tiling.read_overview` with ``reduce="sample"``). Pyramid levels
are averages of level-0 pixels, so percentiles of a coarse level are slightly narrower than those of
level 0; use a large ``max_pixels`` to measure closer to full resolution. A foreground mask
restricts the statistics to tissue; when the mask selects no pixel of the overview, the whole
overview is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError, MetadataError
from simsearch_wsi.features.tiling import read_overview
from simsearch_wsi.features.tissue import TissueMask
from simsearch_wsi.io.base import ImageSource, path_identity

METHOD_PERCENTILE = "simsearch-percentile"
METHOD_FIXED = "fixed-range"
_METHODS = (METHOD_PERCENTILE, METHOD_FIXED)
NORMALIZATION_VERSION = 1

DEFAULT_IMAGE_PERCENTILES = (5.0, 95.0)
DEFAULT_DATASET_PERCENTILES = (0.5, 99.5)
DEFAULT_MAX_PIXELS = 2_000_000

ChannelKey = str | int
# suggest_channels: mean |r| values closer than this are a tie.
_TIE_TOLERANCE = 1e-3


# --- channel selection ------------------------------------------------------------------------
def resolve_channels(channel_names: Sequence[str], wanted: Sequence[ChannelKey]) -> list[int]:
    """Indices of the ``wanted`` channels, given by name or by 0-based index.

    A string is matched to a name exactly, then case-insensitively (when that is unambiguous),
    and finally, when it is all digits (as from a command line), read as an index.

    Raises
    ------
    ConfigError
        for an empty selection, an unknown name (the message lists the available names), an
        index out of range, or a channel selected twice.
    """
    names = [str(n) for n in channel_names]
    if isinstance(wanted, str | int):
        raise ConfigError(f"channels must be a list of names or indices, got {wanted!r}")
    if len(wanted) == 0:
        raise ConfigError(f"no channel selected; choose from {names}")
    lowered: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        lowered.setdefault(n.lower(), []).append(i)
    indices: list[int] = []
    for key in wanted:
        if isinstance(key, bool):
            raise ConfigError(
                f"channel {key!r} is neither a name nor an index; choose from {names}"
            )
        if isinstance(key, int | np.integer):
            index = int(key)
            if not 0 <= index < len(names):
                raise ConfigError(
                    f"channel index {index} is out of range; the image has channels "
                    f"0..{len(names) - 1} {names}"
                )
        elif isinstance(key, str):
            if key in names:
                index = names.index(key)
            elif len(lowered.get(key.lower(), [])) == 1:
                index = lowered[key.lower()][0]
            elif key.isdigit() and int(key) < len(names):
                index = int(key)
            else:
                raise ConfigError(f"channel {key!r} is unknown; available channels are {names}")
        else:
            raise ConfigError(
                f"channel {key!r} is neither a name nor an index; choose from {names}"
            )
        if index in indices:
            raise ConfigError(f"channel {key!r} ({names[index]}) is selected twice")
        indices.append(index)
    return indices


def select_channels(
    array_hwc: NDArray[Any],
    channel_names: Sequence[str],
    *,
    wanted: Sequence[ChannelKey],
) -> tuple[NDArray[Any], tuple[str, ...]]:
    """Pick channels of an (H, W, C) (or any (..., C)) array by name or index.

    Parameters
    ----------
    array_hwc
        array whose last axis is the channels, ``C == len(channel_names)``.
    channel_names
        the names of the array's channels.
    wanted
        names and/or 0-based indices, in the order wanted (see :func:`resolve_channels`).

    Returns
    -------
    (array, names)
        (H, W, len(wanted)) array (a copy) and the selected names in that order.
    """
    arr = np.asarray(array_hwc)
    if arr.ndim < 1 or arr.shape[-1] != len(channel_names):
        raise ConfigError(
            f"the array has shape {arr.shape} but {len(channel_names)} channel names were given; "
            "channels must be the last axis"
        )
    indices = resolve_channels(channel_names, wanted)
    return arr[..., indices], tuple(str(channel_names[i]) for i in indices)


# --- per-image statistics ---------------------------------------------------------------------
def _check_percentiles(percentiles: Sequence[float], name: str) -> tuple[float, float]:
    values = tuple(float(p) for p in percentiles)
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{name} must be two numbers (low, high), got {percentiles!r}")
    lo, hi = values
    if not 0.0 <= lo <= hi <= 100.0:
        raise ConfigError(f"{name} must satisfy 0 <= low <= high <= 100, got {percentiles!r}")
    return lo, hi


def _overview_pixels(
    image: ImageSource,
    *,
    max_pixels: int,
    mask: TissueMask | NDArray[np.bool_] | None,
) -> NDArray[np.float64]:
    """(N, C) float64 pixel sample of the image's overview, restricted to ``mask`` if given."""
    arr, _, _ = read_overview(image, max_pixels=max_pixels, reduce="sample")
    h, w, c = arr.shape
    pixels = np.asarray(arr, dtype=np.float64).reshape(h * w, c)
    if mask is None:
        return pixels
    if isinstance(mask, TissueMask):
        if tuple(mask.image_size_l0) != tuple(image.dimensions):
            raise ConfigError(
                f"{image.path}: the mask was made for a {mask.image_size_l0[0]}x"
                f"{mask.image_size_l0[1]} image but this image is {image.dimensions[0]}x"
                f"{image.dimensions[1]}; compute the mask from this image"
            )
        keep = mask.to_level(w, h)
    else:
        keep = _resize_nearest(np.asarray(mask, dtype=bool), h, w)
    selected = pixels[keep.reshape(-1)]
    return selected if selected.shape[0] > 0 else pixels


def _resize_nearest(mask: NDArray[np.bool_], h: int, w: int) -> NDArray[np.bool_]:
    """Nearest-neighbour resize of a 2-D mask that covers the whole image to (h, w)."""
    if mask.ndim != 2 or mask.size == 0:
        raise ConfigError(f"a foreground mask must be a non-empty 2-D array, got {mask.shape}")
    mh, mw = mask.shape
    rows = np.minimum(((np.arange(h) + 0.5) * (mh / h)).astype(np.int64), mh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (mw / w)).astype(np.int64), mw - 1)
    out: NDArray[np.bool_] = mask[rows[:, None], cols[None, :]]
    return out


def image_channel_percentiles(
    image: ImageSource,
    *,
    percentiles: Sequence[float] = DEFAULT_IMAGE_PERCENTILES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mask: TissueMask | NDArray[np.bool_] | None = None,
) -> NDArray[np.float64]:
    """Per-channel intensity percentiles of one image.

    Parameters
    ----------
    image
        the image; measured on its low-resolution overview (see the module docstring).
    percentiles
        (low, high) percentiles in [0, 100]; SimSearch uses (5, 95).
    max_pixels
        pixel budget of the overview.
    mask
        optional foreground mask: a :class:`TissueMask` of this image, or a 2-D bool array
        covering the whole image (resized nearest-neighbour). Non-finite values are ignored.

    Returns
    -------
    NDArray[float64]
        (C, 2): column 0 the low, column 1 the high percentile, in the image's raw units.
    """
    lo, hi = _check_percentiles(percentiles, "percentiles")
    pixels = _overview_pixels(image, max_pixels=max_pixels, mask=mask)
    out = np.empty((pixels.shape[1], 2), dtype=np.float64)
    for c in range(pixels.shape[1]):
        values = pixels[:, c]
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ConfigError(
                f"{image.path}: channel {image.channel_names[c]!r} has no finite pixel value; "
                "drop the channel or the image"
            )
        out[c] = np.percentile(values, [lo, hi])
    return out


# --- the normalisation ------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelNormalization:
    """A per-channel linear rescaling of raw intensities to [0, 1].

    Attributes
    ----------
    low, high
        per channel, in the images' raw units; ``low`` maps to 0 and ``high`` to 1.
    channel_names
        the channels, in order.
    method
        ``"simsearch-percentile"`` (fitted by :func:`fit_normalization`) or ``"fixed-range"``
        (the dtype's range, used for brightfield).
    version
        schema version of :meth:`to_dict`.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    channel_names: tuple[str, ...]
    method: str
    version: int = NORMALIZATION_VERSION

    def __post_init__(self) -> None:
        low = tuple(float(v) for v in self.low)
        high = tuple(float(v) for v in self.high)
        names = tuple(str(n) for n in self.channel_names)
        if not (len(low) == len(high) == len(names)) or not names:
            raise ConfigError(
                f"normalization needs one low, high and name per channel, got {len(low)} low, "
                f"{len(high)} high and {len(names)} names"
            )
        if not all(math.isfinite(v) for v in low + high):
            raise ConfigError(f"normalization low/high must be finite, got {low} and {high}")
        if self.method not in _METHODS:
            raise ConfigError(f"normalization method {self.method!r} is unknown; use {_METHODS}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "channel_names", names)

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    def apply(self, array_hwc: NDArray[Any]) -> NDArray[np.float32]:
        """Rescale raw intensities to [0, 1].

        Parameters
        ----------
        array_hwc
            (H, W, C) (or any (..., C)) array in the raw units, ``C == n_channels``.

        Returns
        -------
        NDArray[float32]
            same shape, ``(x - low) / (high - low)`` clipped to [0, 1]. A channel with
            ``high <= low`` becomes a step: 0 where ``x <= low`` and 1 above. NaN (of a float
            image) becomes 0, +inf 1 and -inf 0, so no non-finite value reaches a network.
        """
        arr = np.asarray(array_hwc)
        if arr.ndim < 1 or arr.shape[-1] != self.n_channels:
            raise ConfigError(
                f"array of shape {arr.shape} does not have the {self.n_channels} channels "
                f"{list(self.channel_names)} of the normalization as its last axis"
            )
        low = np.asarray(self.low, dtype=np.float64)
        span = np.asarray(self.high, dtype=np.float64) - low
        flat = span <= 0
        scale = np.where(flat, 1.0, 1.0 / np.where(flat, 1.0, span))
        shifted = arr.astype(np.float32) - low.astype(np.float32)
        out = shifted * scale.astype(np.float32)
        if flat.any():
            out[..., flat] = (shifted[..., flat] > 0).astype(np.float32)
        np.clip(out, 0.0, 1.0, out=out)
        np.nan_to_num(out, copy=False, nan=0.0)
        result: NDArray[np.float32] = out.astype(np.float32, copy=False)
        return result

    def select(self, channels: Sequence[ChannelKey]) -> ChannelNormalization:
        """The normalization of a subset of channels, by name or index, in the order given."""
        indices = resolve_channels(self.channel_names, channels)
        return ChannelNormalization(
            low=tuple(self.low[i] for i in indices),
            high=tuple(self.high[i] for i in indices),
            channel_names=tuple(self.channel_names[i] for i in indices),
            method=self.method,
            version=self.version,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` reads it back."""
        return {
            "version": self.version,
            "method": self.method,
            "channel_names": list(self.channel_names),
            "low": list(self.low),
            "high": list(self.high),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelNormalization:
        """Read a dict written by :meth:`to_dict`.

        Raises
        ------
        MetadataError
            for an unknown version, a missing key, or inconsistent values.
        """
        if not isinstance(data, Mapping):
            raise MetadataError(f"normalization metadata must be a mapping, got {type(data)}")
        missing = [
            k for k in ("version", "method", "channel_names", "low", "high") if k not in data
        ]
        if missing:
            raise MetadataError(
                f"normalization metadata lacks {missing}; re-fit it with fit_normalization"
            )
        version = data["version"]
        if isinstance(version, bool) or version != NORMALIZATION_VERSION:
            raise MetadataError(
                f"normalization metadata version {version!r} is unknown (this simsearch_wsi "
                f"reads version {NORMALIZATION_VERSION}); upgrade simsearch_wsi or re-fit"
            )
        try:
            return cls(
                low=tuple(float(v) for v in data["low"]),
                high=tuple(float(v) for v in data["high"]),
                channel_names=tuple(str(n) for n in data["channel_names"]),
                method=str(data["method"]),
                version=NORMALIZATION_VERSION,
            )
        except (ConfigError, TypeError, ValueError) as exc:
            raise MetadataError(f"normalization metadata is invalid: {exc}") from exc


def _image_name(image: ImageSource, index: int) -> str:
    return f"image {index} ({image.path})"


def _check_images(images: Sequence[ImageSource]) -> None:
    if len(images) == 0:
        raise ConfigError("no images given; pass at least one image")
    first = images[0]
    for i, img in enumerate(images):
        if img.n_channels != first.n_channels:
            raise ConfigError(
                f"{_image_name(img, i)} has {img.n_channels} channels but "
                f"{_image_name(first, 0)} has {first.n_channels}; all images of a dataset must "
                "have the same channels"
            )


def _check_masks(
    images: Sequence[ImageSource],
    masks: Sequence[TissueMask | NDArray[np.bool_] | None] | None,
) -> Sequence[TissueMask | NDArray[np.bool_] | None]:
    if masks is None:
        return [None] * len(images)
    if len(masks) != len(images):
        raise ConfigError(f"got {len(masks)} masks for {len(images)} images; give one per image")
    return masks


def fixed_range_normalization(image: ImageSource) -> ChannelNormalization:
    """The dtype's range per channel: 0..max for integers, 0..1 for floats (``fixed-range``)."""
    dtype = np.dtype(image.dtype)
    top = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0
    n = image.n_channels
    return ChannelNormalization(
        low=(0.0,) * n,
        high=(top,) * n,
        channel_names=image.channel_names,
        method=METHOD_FIXED,
    )


def fit_normalization(
    images: Sequence[ImageSource],
    *,
    image_percentiles: Sequence[float] = DEFAULT_IMAGE_PERCENTILES,
    dataset_percentiles: Sequence[float] = DEFAULT_DATASET_PERCENTILES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    masks: Sequence[TissueMask | NDArray[np.bool_] | None] | None = None,
    brightfield_fixed_range: bool = True,
) -> ChannelNormalization:
    """Fit SimSearch's two-stage percentile normalization over a set of images.

    Parameters
    ----------
    images
        the dataset; all must have the same number of channels (names are taken from the
        first image).
    image_percentiles
        per-image (low, high) percentiles, (5, 95) in the paper.
    dataset_percentiles
        (low, high) percentiles over images: ``low_c`` is this low percentile of all images'
        low percentiles of channel c, ``high_c`` the high percentile of their high ones;
        (0.5, 99.5) in the paper.
    max_pixels
        overview pixel budget per image (see the module docstring).
    masks
        optional foreground mask per image (``None`` entries measure the whole image).
    brightfield_fixed_range
        when every image is brightfield, return the dtype's fixed range (0..255 for uint8,
        method ``"fixed-range"``) without reading pixels: brightfield stays RGB. ``False``
        fits percentiles on brightfield too.

    Returns
    -------
    ChannelNormalization
    """
    _check_images(images)
    ds_lo, ds_hi = _check_percentiles(dataset_percentiles, "dataset_percentiles")
    _check_percentiles(image_percentiles, "image_percentiles")
    mask_list = _check_masks(images, masks)
    modalities = {img.modality for img in images}
    if brightfield_fixed_range and modalities == {"brightfield"}:
        dtypes = {np.dtype(img.dtype) for img in images}
        if len(dtypes) != 1:
            raise ConfigError(
                f"brightfield images of different dtypes {sorted(str(d) for d in dtypes)} have "
                "no common fixed range; convert them to one dtype"
            )
        return fixed_range_normalization(images[0])
    if len(modalities) > 1:
        raise ConfigError(
            "the images mix brightfield and fluorescence; normalise each modality separately"
        )
    per_image = np.stack(
        [
            image_channel_percentiles(
                img, percentiles=image_percentiles, max_pixels=max_pixels, mask=m
            )
            for img, m in zip(images, mask_list, strict=True)
        ]
    )  # (N, C, 2)
    low = np.percentile(per_image[:, :, 0], ds_lo, axis=0)
    high = np.percentile(per_image[:, :, 1], ds_hi, axis=0)
    return ChannelNormalization(
        low=tuple(float(v) for v in low),
        high=tuple(float(v) for v in high),
        channel_names=images[0].channel_names,
        method=METHOD_PERCENTILE,
    )


# --- what the search normalises with ------------------------------------------------------------
#: how :func:`search_normalization` fits a fluorescence plate field (issue 30): ``"plate"``:
#: the two-stage rule over the fields of its plate, measured on each field's foreground;
#: ``"image"``: the field alone, every pixel (the rule before issue 30, and the rule for
#: images that are no plate field). ``benchmarks/phenotype_plate.py`` compares the two.
SEARCH_NORMALIZATION_SCOPE = "plate"
#: at most this many fields of a plate are measured (evenly spread over the plate)
MAX_PLATE_FIELDS = 24
_MAX_CACHED_PLATES = 8
#: plate normalisations already fitted, by the measured fields' identities (oldest first)
_PLATE_NORMALIZATIONS: dict[str, ChannelNormalization] = {}


def search_normalization(image: ImageSource) -> ChannelNormalization:
    """The channel normalisation the search (and the search head) applies to ``image``.

    Brightfield: the dtype's fixed range. Fluorescence (scope ``"plate"``, the default): the
    paper's two-stage percentile rule over the fields of the image's plate, so that every field
    of a plate is scaled alike and a well without any reporter-positive cell is not stretched
    to look positive; each field measured on its foreground (cells, tissue) when it has one, so
    between them. An image that is no plate field is measured alone, on every pixel (the
    former rule: the benchmark of this choice, docs/evaluation.md "Screening plate", has plate
    fields only).
    """
    if SEARCH_NORMALIZATION_SCOPE == "image" or image.is_brightfield:
        return fit_normalization([image])
    from simsearch_wsi.features.tissue import detect_foreground
    from simsearch_wsi.io.selection import field_of

    found = field_of(image.path)
    if found is None:  # measured only on plates so far: other images keep the former rule
        return fit_normalization([image])
    plate, _ = found
    fields = list(plate.fields())
    if len(fields) > MAX_PLATE_FIELDS:
        picks = np.linspace(0, len(fields) - 1, MAX_PLATE_FIELDS).round().astype(int)
        fields = [fields[i] for i in sorted(set(picks.tolist()))]
    # every field of a plate gets the same answer: fitted once per plate and its fields'
    # identities (a command over many fields, or the server, measures the plate once; the
    # fields are opened only to fit)
    key = "\n".join([str(image.mpp), *(path_identity(f.path) for f in fields)])
    if key not in _PLATE_NORMALIZATIONS:
        opened = [f.open(mpp=image.mpp) for f in fields]
        try:
            fitted = fit_normalization(opened, masks=[detect_foreground(im) for im in opened])
        finally:
            for im in opened:
                im.close()
        if len(_PLATE_NORMALIZATIONS) >= _MAX_CACHED_PLATES:
            _PLATE_NORMALIZATIONS.pop(next(iter(_PLATE_NORMALIZATIONS)))
        _PLATE_NORMALIZATIONS[key] = fitted
    return _PLATE_NORMALIZATIONS[key]


# --- channel correlation report --------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ChannelCorrelationReport:
    """Mean inter-channel Pearson correlation over a set of images.

    Attributes
    ----------
    matrix
        (C, C) float64, the mean over images of each image's Pearson correlation matrix
        (1 on the diagonal; a pair involving a constant channel counts as 0 for that image).
    mean_abs_correlation
        (C,) float64, the mean of ``|matrix[c, j]|`` over the other channels ``j != c``
        (0 for a single channel).
    channel_names
        the channels, in order.
    n_images
        how many images were averaged.
    """

    matrix: NDArray[np.float64]
    mean_abs_correlation: NDArray[np.float64]
    channel_names: tuple[str, ...]
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        return {
            "channel_names": list(self.channel_names),
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "mean_abs_correlation": [float(v) for v in self.mean_abs_correlation],
            "n_images": int(self.n_images),
        }

    def suggest_channels(self, max_mean_abs: float = 0.9) -> tuple[str, ...]:
        """Channels to keep after greedily dropping redundant ones.

        Rule: while two kept channels have ``|matrix[i, j]| > max_mean_abs`` (their mean
        correlation over images), take the most correlated such pair and drop the one of the
        two whose mean ``|r|`` with the other kept channels is larger (on a tie within 0.001,
        the later channel), so the more independent channel of a pair survives and, among
        duplicates, the first listed one.

        Parameters
        ----------
        max_mean_abs
            largest acceptable absolute mean correlation between two kept channels, in [0, 1].

        Returns
        -------
        tuple[str, ...]
            the kept channel names, in their original order.
        """
        limit = float(max_mean_abs)
        if not 0.0 <= limit <= 1.0:
            raise ConfigError(f"max_mean_abs must be in [0, 1], got {max_mean_abs!r}")
        absr = np.abs(self.matrix)
        kept = list(range(len(self.channel_names)))
        while len(kept) > 1:
            sub = absr[np.ix_(kept, kept)].copy()
            np.fill_diagonal(sub, -1.0)
            flat_index = int(np.argmax(sub))
            a, b = divmod(flat_index, len(kept))
            if sub[a, b] <= limit:
                break
            mean_abs = (sub.clip(min=0.0).sum(axis=1)) / (len(kept) - 1)
            # a < b; mean |r| within _TIE_TOLERANCE is a tie, which drops the later channel
            drop = a if mean_abs[a] > mean_abs[b] + _TIE_TOLERANCE else b
            kept.pop(drop)
        return tuple(self.channel_names[i] for i in kept)


def _pearson(pixels: NDArray[np.float64]) -> NDArray[np.float64]:
    """(C, C) Pearson correlation of (N, C) samples; pairs with a constant channel are 0."""
    n_ch = pixels.shape[1]
    finite = np.all(np.isfinite(pixels), axis=1)
    x = pixels[finite]
    r = np.zeros((n_ch, n_ch), dtype=np.float64)
    if x.shape[0] >= 2:
        centred = x - x.mean(axis=0)
        std = np.sqrt((centred * centred).sum(axis=0))
        ok = std > 0
        z = np.zeros_like(centred)
        z[:, ok] = centred[:, ok] / std[ok]
        r = np.clip(z.T @ z, -1.0, 1.0)
    np.fill_diagonal(r, 1.0)
    return r


def channel_correlation(
    images: Sequence[ImageSource],
    *,
    max_pixels: int = 500_000,
    masks: Sequence[TissueMask | NDArray[np.bool_] | None] | None = None,
) -> ChannelCorrelationReport:
    """Mean inter-channel Pearson correlation over images, to help choose channels.

    Parameters
    ----------
    images
        the dataset; all must have the same number of channels (names from the first image).
    max_pixels
        overview pixel budget per image (see the module docstring).
    masks
        optional foreground mask per image, so that the (perfectly correlated) dark background
        does not inflate the correlation.

    Returns
    -------
    ChannelCorrelationReport
    """
    _check_images(images)
    mask_list = _check_masks(images, masks)
    total = np.zeros((images[0].n_channels,) * 2, dtype=np.float64)
    for img, m in zip(images, mask_list, strict=True):
        total += _pearson(_overview_pixels(img, max_pixels=max_pixels, mask=m))
    matrix = total / len(images)
    n_ch = matrix.shape[0]
    if n_ch > 1:
        off = np.abs(matrix) * (1 - np.eye(n_ch))
        mean_abs = off.sum(axis=1) / (n_ch - 1)
    else:
        mean_abs = np.zeros(1, dtype=np.float64)
    return ChannelCorrelationReport(
        matrix=matrix,
        mean_abs_correlation=mean_abs,
        channel_names=images[0].channel_names,
        n_images=len(images),
    )
