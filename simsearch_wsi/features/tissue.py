"""A low-resolution foreground (tissue / cell) mask for brightfield and fluorescence images.

:func:`detect_foreground` works on a thumbnail of at most ``max_side_px`` pixels on its long
side and never reads full-resolution pixels of a large image. The result, a
:class:`TissueMask`, knows its own frame (level-0 pixels per mask pixel along each axis), so it
can answer "how much of this level-0 box is foreground?" (:meth:`TissueMask.fraction_in_box`,
used by :func:`simsearch_wsi.features.tiling.foreground_tiles`) and be resampled onto any
level's grid.

Algorithm
---------
1. A foreground signal ``s`` per thumbnail pixel, larger on foreground:

   * brightfield: ``s = 1 - min(R, G, B)`` with intensities scaled to [0, 1] by the white
     level of the dtype (255 for uint8; the effective bit depth for other integers), smoothed
     by a Gaussian of sigma 1 mask pixel. White glass is ~0; stained tissue is darker and/or
     more saturated, so at least one channel drops. Single-channel brightfield uses
     ``1 - mean``.
   * fluorescence: each channel is smoothed by a Gaussian of sigma 8 um (clamped to 1..16 mask
     pixels; 1 mask pixel when the pixel size is unknown), so that a tissue region populated
     by resolved nuclei reads as one region, then scaled to [0, 1] between its 0.5th and
     99.9th percentiles; ``s`` is the mean over channels (flat channels are skipped).
   * fluorescence, separate objects (issue 30): a sparse field of single cells smoothed at
     8 um reads as faint blurs, so each channel is also looked at in full detail (smoothed by
     1 mask pixel). A channel is *structured* when its maximum stands more than 8 robust
     standard deviations (MAD) above its median; a channel of noise alone (a reporter that no
     cell of the field carries) is left out of ``s``, since scaled to its percentiles its
     noise would read as foreground.

2. A global threshold ``t`` on ``s`` (Otsu by default, or the triangle method). Separate
   objects: in each structured channel, the pixels above the lower of Otsu's threshold and
   the channel's median plus ``max(6 sd, 0.1 x (max - median))`` (dim cells sit below Otsu's
   split between the background and the brightest cells); none when they would cover more
   than half of the image (no dark background between objects).
3. Guards against images that have no background:

   * brightfield: the pixels at or below ``t`` form the "background" class with median ``b``.
     If ``b > 0.2`` (the class is not near-white glass: a crop inside tissue) **everything is
     foreground**; otherwise the threshold is ``max(t, b + 0.05)``, so bare glass with noise
     gets no foreground instead of half of its noise. A flat image is foreground unless it is
     near-white.
   * fluorescence: the dimmer class counts as dark background only when its mean summed raw
     intensity (zero-referenced) is at most 0.4 of the brighter class's; otherwise (a
     confluent well, a crop inside tissue, or featureless noise) **everything is
     foreground**. The threshold is then ``max(t, b + 0.1)``. A flat image is foreground
     unless it is black.

   When in doubt the rules prefer foreground: a mask is used to skip work, and skipping tissue
   is worse than processing some glass.
4. Clean-up in mask pixels: remove connected objects (8-connected) smaller than the minimum
   object area, fill holes (4-connected background not touching the border) smaller than the
   same area, then dilate by ``dilate_px`` mask pixels (a disk) to keep the tissue border. The
   minimum area is ``min_object_um2`` converted with the image's pixel size; by default it is
   5000 um^2 (about a 70 um square), capped at 0.1% of the mask's pixels so that small images
   keep their content; when the pixel size is unknown the default is 0.1% of the mask's pixels.
   Fluorescence: the separate objects join the cleaned mask of ``s``; they are kept down to
   the size of a small nucleus, 10 um^2 (24 level-0 pixels when the pixel size is unknown),
   so that a field of separate cells keeps every cell instead of losing them as specks of
   tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from simsearch_wsi.core.errors import ConfigError, CorruptImageError

if TYPE_CHECKING:
    from simsearch_wsi.io.base import ImageSource

ForegroundMethod = Literal["auto", "brightfield", "fluorescence"]
ThresholdMethod = Literal["otsu", "triangle"]

# Brightfield signal 1 - min(R, G, B): glass is ~0.0-0.1, pale tissue >= ~0.2.
_BF_BACKGROUND_MAX = 0.2
_BF_MIN_CONTRAST = 0.05
# Fluorescence: channels smoothed by a Gaussian of _FL_SMOOTH_UM (when the pixel size is known),
# scaled between their _FL_LOW / _FL_HIGH percentiles; background is "dark" when its summed raw
# intensity is at most _FL_MAX_BACKGROUND_RATIO of the foreground's.
_FL_SMOOTH_UM = 8.0
_FL_MAX_SIGMA_PX = 16.0
_FL_LOW_PERCENTILE = 0.5
_FL_HIGH_PERCENTILE = 99.9
_FL_MAX_BACKGROUND_RATIO = 0.4
_FL_MIN_CONTRAST = 0.1
_SMOOTH_SIGMA_PX = 1.0
_DEFAULT_MIN_OBJECT_UM2 = 5000.0
_DEFAULT_MIN_OBJECT_FRACTION = 1e-3
# Separate fluorescent objects smaller than a small nucleus are noise (issue 30): about 10 um^2,
# or 24 level-0 pixels (a disc of 5.5 px) when the pixel size is unknown.
_FL_MIN_CELL_UM2 = 10.0
_FL_MIN_CELL_PX_L0 = 24.0
_FL_NOISE_SIGMAS = 6.0
_FL_STRUCTURE_SIGMAS = 8.0


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean foreground mask of an image at low resolution, with its frame.

    Attributes
    ----------
    mask
        (h, w) bool, True on foreground, in the mask frame: mask pixel (i, j) covers level-0
        ``x in [j * downsample_x, (j + 1) * downsample_x)``,
        ``y in [i * downsample_y, (i + 1) * downsample_y)``. Stored read-only.
    downsample_x, downsample_y
        level-0 pixels per mask pixel along x and y.
    image_size_l0
        (width, height) of the image's level 0 in pixels.
    """

    mask: NDArray[np.bool_]
    downsample_x: float
    downsample_y: float
    image_size_l0: tuple[int, int]

    def __post_init__(self) -> None:
        arr = np.array(self.mask, dtype=bool, copy=True)
        if arr.ndim != 2 or arr.size == 0:
            raise ConfigError(f"TissueMask.mask must be a non-empty 2-D array, got {arr.shape}")
        arr.setflags(write=False)
        object.__setattr__(self, "mask", arr)
        for name in ("downsample_x", "downsample_y"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"TissueMask.{name} must be a positive number, got {value!r}")
            object.__setattr__(self, name, value)
        size = tuple(int(v) for v in self.image_size_l0)
        if len(size) != 2 or min(size) <= 0:
            raise ConfigError(
                f"TissueMask.image_size_l0 must be (width, height) > 0, got {self.image_size_l0!r}"
            )
        object.__setattr__(self, "image_size_l0", (size[0], size[1]))

    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the mask."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def area_fraction(self) -> float:
        """Fraction of the mask's pixels that are foreground, in [0, 1]."""
        return float(self.mask.mean())

    def fractions_in_boxes(
        self,
        x_l0: NDArray[np.floating[Any]] | NDArray[np.integer[Any]],
        y_l0: NDArray[np.floating[Any]] | NDArray[np.integer[Any]],
        width_l0: NDArray[np.floating[Any]] | NDArray[np.integer[Any]],
        height_l0: NDArray[np.floating[Any]] | NDArray[np.integer[Any]],
    ) -> NDArray[np.float64]:
        """Vectorised :meth:`fraction_in_box`: (N,) level-0 boxes -> (N,) fractions in [0, 1].

        The mask is treated as a piecewise-constant function (each mask pixel a rectangle in
        level-0 pixels), so partial pixel overlaps are counted exactly by area. Parts of a box
        outside the mask count as background.
        """
        x0 = np.asarray(x_l0, dtype=np.float64) / self.downsample_x
        y0 = np.asarray(y_l0, dtype=np.float64) / self.downsample_y
        w = np.asarray(width_l0, dtype=np.float64) / self.downsample_x
        h = np.asarray(height_l0, dtype=np.float64) / self.downsample_y
        if not (
            np.all(np.isfinite(w)) and np.all(np.isfinite(h)) and np.all(w > 0) and np.all(h > 0)
        ):
            raise ConfigError("box width_l0 and height_l0 must be positive finite numbers")
        if not (np.all(np.isfinite(x0)) and np.all(np.isfinite(y0))):
            raise ConfigError("box x_l0 and y_l0 must be finite numbers")
        integral = self._integral()
        inside = (
            _bilinear(integral, x0 + w, y0 + h)
            - _bilinear(integral, x0, y0 + h)
            - _bilinear(integral, x0 + w, y0)
            + _bilinear(integral, x0, y0)
        )
        fractions: NDArray[np.float64] = np.clip(inside / (w * h), 0.0, 1.0)
        return fractions

    def fraction_in_box(self, x_l0: float, y_l0: float, width_l0: float, height_l0: float) -> float:
        """Fraction of a level-0 box covered by foreground, in [0, 1].

        Parameters
        ----------
        x_l0, y_l0
            top-left corner of the box in level-0 pixels.
        width_l0, height_l0
            size of the box in level-0 pixels (> 0).

        The fraction is of the whole box's area: parts outside the image count as background,
        and a box entirely outside the image gives 0.
        """
        result = self.fractions_in_boxes(
            np.array([x_l0], dtype=np.float64),
            np.array([y_l0], dtype=np.float64),
            np.array([width_l0], dtype=np.float64),
            np.array([height_l0], dtype=np.float64),
        )
        return float(result[0])

    def to_level(self, level_width: int, level_height: int) -> NDArray[np.bool_]:
        """Resample the mask onto another level's pixel grid (nearest neighbour).

        Parameters
        ----------
        level_width, level_height
            size of the target level in its own pixels; its downsample along each axis is taken
            as ``image_size_l0 / (level_width, level_height)``.

        Returns
        -------
        NDArray[bool]
            (level_height, level_width); each level pixel takes the mask pixel under its centre
            (False where the centre falls outside the mask).
        """
        if level_width <= 0 or level_height <= 0:
            raise ConfigError(f"level size must be positive, got {level_width}x{level_height}")
        w0, h0 = self.image_size_l0
        h, w = self.shape
        cx_l0 = (np.arange(level_width, dtype=np.float64) + 0.5) * (w0 / level_width)
        cy_l0 = (np.arange(level_height, dtype=np.float64) + 0.5) * (h0 / level_height)
        cols = np.minimum(np.floor(cx_l0 / self.downsample_x).astype(np.int64), w)
        rows = np.minimum(np.floor(cy_l0 / self.downsample_y).astype(np.int64), h)
        padded = np.zeros((h + 1, w + 1), dtype=bool)
        padded[:h, :w] = self.mask
        out: NDArray[np.bool_] = padded[rows[:, None], cols[None, :]]
        return out

    def save_png(self, path: str | Path) -> Path:
        """Write the mask as an 8-bit PNG (255 = foreground) and return its path."""
        from PIL import Image

        target = Path(path)
        Image.fromarray(self.mask.astype(np.uint8) * 255).save(target, format="PNG")
        return target

    def _integral(self) -> NDArray[np.float64]:
        h, w = self.shape
        integral = np.zeros((h + 1, w + 1), dtype=np.float64)
        integral[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1)
        return integral


def _bilinear(
    integral: NDArray[np.float64], x: NDArray[np.float64], y: NDArray[np.float64]
) -> NDArray[np.float64]:
    """The mask's area integral over [0, x) x [0, y) (mask pixels), exact for any real x, y.

    ``integral`` is the (h + 1, w + 1) summed-area table; the integral of a piecewise-constant
    function is bilinear inside each pixel, so bilinear interpolation of the table is exact.
    """
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    xc = np.clip(x, 0.0, float(w))
    yc = np.clip(y, 0.0, float(h))
    j = np.clip(np.floor(xc).astype(np.int64), 0, w - 1)
    i = np.clip(np.floor(yc).astype(np.int64), 0, h - 1)
    fx = xc - j
    fy = yc - i
    value: NDArray[np.float64] = (
        integral[i, j] * (1 - fx) * (1 - fy)
        + integral[i, j + 1] * fx * (1 - fy)
        + integral[i + 1, j] * (1 - fx) * fy
        + integral[i + 1, j + 1] * fx * fy
    )
    return value


def detect_foreground(
    image: ImageSource,
    *,
    max_side_px: int = 1024,
    min_object_um2: float | None = None,
    method: ForegroundMethod = "auto",
    threshold: ThresholdMethod = "otsu",
    dilate_px: int = 1,
) -> TissueMask:
    """Detect the foreground (tissue, cells) of an image on a thumbnail.

    Parameters
    ----------
    image
        any :class:`ImageSource`; only a thumbnail is read (see the module docstring).
    max_side_px
        long side of the thumbnail, i.e. of the mask, in pixels (>= 8).
    min_object_um2
        objects and holes smaller than this area are removed / filled; needs the image's pixel
        size. ``None`` uses the default rule of the module docstring.
    method
        ``"auto"`` follows ``image.modality``; ``"brightfield"`` (dark on white) or
        ``"fluorescence"`` (bright on dark) force one.
    threshold
        ``"otsu"`` or ``"triangle"`` (better when the foreground is a small fraction).
    dilate_px
        radius in mask pixels of the final dilation (>= 0).

    Returns
    -------
    TissueMask
        the (h, w) mask with ``max(h, w) <= max_side_px`` and its per-axis downsample.
    """
    if isinstance(max_side_px, bool) or not isinstance(max_side_px, int) or max_side_px < 8:
        raise ConfigError(f"max_side_px must be an integer >= 8, got {max_side_px!r}")
    if method not in ("auto", "brightfield", "fluorescence"):
        raise ConfigError(
            f"foreground method {method!r} is unknown; use 'auto', 'brightfield' or 'fluorescence'"
        )
    if threshold not in ("otsu", "triangle"):
        raise ConfigError(f"threshold {threshold!r} is unknown; use 'otsu' or 'triangle'")
    if isinstance(dilate_px, bool) or not isinstance(dilate_px, int) or dilate_px < 0:
        raise ConfigError(f"dilate_px must be an integer >= 0, got {dilate_px!r}")
    if min_object_um2 is not None:
        if not math.isfinite(float(min_object_um2)) or float(min_object_um2) < 0:
            raise ConfigError(f"min_object_um2 must be >= 0, got {min_object_um2!r}")
        if image.mpp is None:
            raise ConfigError(
                f"{image.path}: min_object_um2 needs the pixel size, which is unknown; pass the "
                "pixel size when opening the image (mpp=...) or leave min_object_um2 unset"
            )
    modality = image.modality if method == "auto" else method

    thumb, ds_x, ds_y = _read_thumbnail(image, max_side_px)
    if not np.isfinite(thumb).any():
        raise CorruptImageError(
            f"{image.path}: every pixel of the image's overview is NaN or infinite, so there is "
            "nothing to detect; check how the image was exported (float images need finite "
            "intensities)"
        )
    if modality == "brightfield":
        raw = _brightfield_foreground(thumb, image.dtype, threshold)
    else:
        sigma_px = _SMOOTH_SIGMA_PX
        if image.mpp is not None:
            sigma_um_px = _FL_SMOOTH_UM / (image.mpp * math.sqrt(ds_x * ds_y))
            sigma_px = min(max(sigma_px, sigma_um_px), _FL_MAX_SIGMA_PX)
        detail = ndimage.gaussian_filter(
            _fill_non_finite_dark(thumb),
            sigma=(_SMOOTH_SIGMA_PX, _SMOOTH_SIGMA_PX, 0.0),
            mode="nearest",
        )
        structured = _structured_channels(detail)
        raw = _fluorescence_foreground(thumb, sigma_px, threshold, structured)
    min_px = _min_object_px(image.mpp, min_object_um2, ds_x, ds_y, raw.size)
    if modality == "brightfield" or raw.all():
        cleaned = _clean(raw, min_px, dilate_px)
    else:
        # tissue-scale regions, plus every separate cell seen at full detail (issue 30)
        cells = _fluorescence_objects(detail, structured, threshold)
        cell_px = (
            min_px if min_object_um2 is not None else _min_cell_px(image.mpp, ds_x, ds_y, raw.size)
        )
        cleaned = _clean(_clean(raw, min_px, 0) | _clean(cells, cell_px, 0), cell_px, dilate_px)
    return TissueMask(
        mask=cleaned, downsample_x=ds_x, downsample_y=ds_y, image_size_l0=image.dimensions
    )


def no_foreground_error(image: ImageSource) -> ConfigError:
    """The error of a command that found no foreground to work on in ``image``: one line that
    names the option embedding every tile instead."""
    return ConfigError(
        f"{image.path}: no foreground (tissue or cells) found to embed; check the image (channels, "
        "exposure), or embed every tile with --all-tiles (the server: serve --all-tiles)"
    )


def _read_thumbnail(
    image: ImageSource, max_side_px: int
) -> tuple[NDArray[np.float64], float, float]:
    """(h, w, C) float64 overview of about ``max_side_px**2`` pixels and its per-axis downsample.

    Never reads a huge level whole: see :func:`simsearch_wsi.features.tiling.read_overview`.
    """
    from simsearch_wsi.features.tiling import read_overview

    arr, ds_x, ds_y = read_overview(image, max_pixels=max_side_px * max_side_px, reduce="mean")
    return np.asarray(arr, dtype=np.float64), ds_x, ds_y


def _white_level(values: NDArray[np.float64], dtype: np.dtype[Any]) -> float:
    """The intensity of white glass: full scale of the data's effective bit depth."""
    top = float(np.nanmax(values)) if values.size else 0.0
    if dtype == np.uint8:
        return 255.0
    if dtype.kind in "ui":
        return float(2 ** max(1, int(top).bit_length()) - 1)
    if top <= 1.0:
        return 1.0
    return 255.0 if top <= 255.0 else top


def _brightfield_foreground(
    thumb: NDArray[np.float64], dtype: np.dtype[Any], threshold: ThresholdMethod
) -> NDArray[np.bool_]:
    """(h, w) raw brightfield foreground of an (h, w, C) thumbnail (module docstring, 1-3).

    Non-finite values (NaN, inf of float images) are white glass: background.
    """
    finite = np.isfinite(thumb)
    white = _white_level(thumb[finite], dtype)
    x = np.where(finite, np.clip(np.where(finite, thumb, 0.0) / white, 0.0, 1.0), 1.0)
    if x.shape[2] >= 3:
        signal: NDArray[np.float64] = 1.0 - x[:, :, :3].min(axis=2)
    else:
        signal = 1.0 - x.mean(axis=2)
    signal = ndimage.gaussian_filter(signal, sigma=_SMOOTH_SIGMA_PX, mode="nearest")
    if float(signal.max() - signal.min()) < 1e-6:
        flat: NDArray[np.bool_] = np.full(signal.shape, float(signal.mean()) > _BF_BACKGROUND_MAX)
        return flat
    t = _global_threshold(signal, threshold)
    below = signal[signal <= t]
    background = float(np.median(below)) if below.size else float(signal.min())
    if background > _BF_BACKGROUND_MAX:  # the darker-than-glass class is not glass
        return np.ones(signal.shape, dtype=bool)
    foreground: NDArray[np.bool_] = signal > max(t, background + _BF_MIN_CONTRAST)
    return foreground


def _fluorescence_foreground(
    thumb: NDArray[np.float64],
    sigma_px: float,
    threshold: ThresholdMethod,
    structured: list[bool] | None = None,
) -> NDArray[np.bool_]:
    """(h, w) raw fluorescence foreground of an (h, w, C) thumbnail (module docstring, 1-3).

    Non-finite values (NaN, inf of float images) are background: the channel's darkest finite
    value (0 for a channel without any).
    """
    x = _fill_non_finite_dark(thumb)
    x = ndimage.gaussian_filter(x, sigma=(sigma_px, sigma_px, 0.0), mode="nearest")
    signal = np.zeros(x.shape[:2], dtype=np.float64)
    used = 0
    for c in range(x.shape[2]):
        if structured is not None and not structured[c]:
            continue  # noise alone (module docstring, step 1)
        low, high = np.percentile(x[:, :, c], [_FL_LOW_PERCENTILE, _FL_HIGH_PERCENTILE])
        if high - low <= 1e-12 * max(abs(float(high)), 1.0):
            continue
        signal += np.clip((x[:, :, c] - low) / (high - low), 0.0, 1.0)
        used += 1
    if used == 0:  # every channel is flat: foreground unless the image is black
        flat: NDArray[np.bool_] = np.full(signal.shape, bool(np.any(x > 0)))
        return flat
    signal /= used
    t = _global_threshold(signal, threshold)
    bg = signal <= t
    fg = ~bg
    brightness = x.sum(axis=2)  # zero-referenced, in the image's raw units
    bg_level = float(brightness[bg].mean()) if bg.any() else 0.0
    fg_level = float(brightness[fg].mean()) if fg.any() else 0.0
    if fg_level <= 0 or bg_level > _FL_MAX_BACKGROUND_RATIO * fg_level:
        # the dimmer class is not dark next to the brighter one: no background at all
        return np.ones(signal.shape, dtype=bool)
    background = float(np.median(signal[bg]))
    foreground: NDArray[np.bool_] = signal > max(t, background + _FL_MIN_CONTRAST)
    return foreground


def _channel_noise(x: NDArray[np.float64]) -> tuple[float, float, float]:
    """(median, robust standard deviation (MAD), maximum) of one (h, w) channel."""
    med = float(np.median(x))
    sd = 1.4826 * float(np.median(np.abs(x - med)))
    return med, sd, float(x.max())


def _structured_channels(detail: NDArray[np.float64]) -> list[bool]:
    """Per channel of an (h, w, C) thumbnail smoothed by 1 mask pixel: does anything stand
    clearly above the channel's own noise (``max > median + 8 sd``)? A channel of noise alone
    (a reporter no cell of the field carries) has no object to find, and scaled to its
    percentiles it would turn its noise into foreground."""
    out = []
    for c in range(detail.shape[2]):
        med, sd, top = _channel_noise(detail[:, :, c])
        out.append(top - med > max(_FL_STRUCTURE_SIGMAS * sd, 1e-12 * max(abs(top), 1.0)))
    return out


def _fluorescence_objects(
    detail: NDArray[np.float64], structured: list[bool], threshold: ThresholdMethod
) -> NDArray[np.bool_]:
    """(h, w) separate bright objects (cells, nuclei) of an (h, w, C) fluorescence thumbnail
    smoothed by 1 mask pixel (module docstring, steps 1-2): per structured channel, pixels above
    the lower of Otsu's threshold and the background's median plus ``max(6 sd, 0.1 x`` its
    range); empty when they would cover most of the image (no dark background: the
    tissue-scale mask decides)."""
    objects: NDArray[np.bool_] = np.zeros(detail.shape[:2], dtype=bool)
    for c in range(detail.shape[2]):
        if not structured[c]:
            continue
        x = detail[:, :, c]
        med, sd, top = _channel_noise(x)
        floor = med + max(_FL_NOISE_SIGMAS * sd, _FL_MIN_CONTRAST * (top - med))
        objects |= x > min(_global_threshold(x, threshold), floor)
    if objects.mean() > 0.5:
        return np.zeros(detail.shape[:2], dtype=bool)
    return objects


def _min_cell_px(mpp: float | None, ds_x: float, ds_y: float, n_pixels: int) -> float:
    """Smallest separate fluorescence object kept, in mask pixels (module docstring, step 4):
    a small nucleus, :data:`_FL_MIN_CELL_UM2` or :data:`_FL_MIN_CELL_PX_L0` level-0 pixels
    without a pixel size, never more than the tissue rule's cap."""
    area_l0 = _FL_MIN_CELL_PX_L0 if mpp is None else _FL_MIN_CELL_UM2 / (mpp * mpp)
    return min(area_l0 / (ds_x * ds_y), _DEFAULT_MIN_OBJECT_FRACTION * n_pixels)


def _fill_non_finite_dark(thumb: NDArray[np.float64]) -> NDArray[np.float64]:
    """``thumb`` with each channel's NaN and inf replaced by its smallest finite value."""
    finite = np.isfinite(thumb)
    if finite.all():
        return thumb
    out = thumb.copy()
    for c in range(thumb.shape[2]):
        ok = finite[:, :, c]
        dark = float(thumb[:, :, c][ok].min()) if ok.any() else 0.0
        out[:, :, c][~ok] = dark
    return out


def _global_threshold(signal: NDArray[np.float64], threshold: ThresholdMethod) -> float:
    from skimage.filters import threshold_otsu, threshold_triangle

    thresholder = threshold_otsu if threshold == "otsu" else threshold_triangle
    return float(thresholder(signal))  # type: ignore[no-untyped-call]


def _min_object_px(
    mpp: float | None, min_object_um2: float | None, ds_x: float, ds_y: float, n_pixels: int
) -> float:
    """Minimum object / hole area in mask pixels (see the module docstring)."""
    cap = _DEFAULT_MIN_OBJECT_FRACTION * n_pixels
    if mpp is None:
        return cap
    pixel_um2 = mpp * mpp * ds_x * ds_y
    if min_object_um2 is not None:
        return float(min_object_um2) / pixel_um2
    return min(_DEFAULT_MIN_OBJECT_UM2 / pixel_um2, cap)


def _clean(mask: NDArray[np.bool_], min_px: float, dilate_px: int) -> NDArray[np.bool_]:
    """Remove small objects, fill small holes, then dilate by a disk of ``dilate_px``."""
    out = mask.copy()
    if min_px > 1:
        labels, n = ndimage.label(out, structure=np.ones((3, 3), dtype=bool))
        if n:
            sizes = np.bincount(labels.ravel())
            small = sizes < min_px
            small[0] = False
            out[small[labels]] = False
        holes, n_holes = ndimage.label(~out)
        if n_holes:
            sizes = np.bincount(holes.ravel())
            border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
            fill = sizes < min_px
            fill[0] = False
            fill[border] = False
            out[fill[holes]] = True
    if dilate_px > 0 and out.any():
        r = dilate_px
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        disk = (xx * xx + yy * yy) <= r * r
        out = ndimage.binary_dilation(out, structure=disk)
    result: NDArray[np.bool_] = np.asarray(out, dtype=bool)
    return result
