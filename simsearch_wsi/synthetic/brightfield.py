"""Synthetic H&E-like brightfield slides: motifs of known classes stamped inside irregular
tissue, written as a pyramidal TIFF (:func:`make_synthetic_slide`) or as an OME-Zarr image
(:func:`make_synthetic_omezarr_slide`, NGFF 0.4 or 0.5) with the same pixels.

Independent parts of a scene (tissue shape, texture, placement, motif shapes) draw from
independent child streams of ``np.random.SeedSequence(seed)``, so changing e.g. ``n_per_class``
keeps the tissue where it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.ngff import NgffVersion, ngff_format
from simsearch_wsi.io.omezarr_writer import write_ome_zarr_image
from simsearch_wsi.io.pyramid import check_n_levels
from simsearch_wsi.io.tiff_writer import (
    Compression,
    check_compression,
    check_tile_size,
    write_pyramidal_tiff,
)
from simsearch_wsi.synthetic._common import (
    canvas_grid,
    check_classes,
    child_rngs,
    rgba_canvas,
    smooth_noise,
    soft_disc,
    tissue_layer,
)
from simsearch_wsi.synthetic.motifs import MOTIF_PAINTERS
from simsearch_wsi.synthetic.truth import SyntheticObject, SyntheticSlide

__all__ = ["make_synthetic_omezarr_slide", "make_synthetic_slide"]

_GLASS_RGB = (240.0, 240.0, 240.0)
_EOSIN_RGB = (234.0, 156.0, 194.0)
_NUCLEUS_TEXTURE_RGB = (150.0, 100.0, 165.0)
_MOTIF_MAX_SCALE = 1.1  # motif sizes are jittered within +-10 %
_MOTIF_MAX_ROTATION_DEG = 15.0
_STAIN_STREAM = 0x57A  # child stream for the per-slide stain strength


# --- placement ------------------------------------------------------------------------------
def _place_centers(
    rng: np.random.Generator,
    mask: NDArray[np.bool_],
    n: int,
    half_box: int,
    min_spacing: float,
    what: str,
) -> NDArray[np.int64]:
    """Random (n, 2) integer (x, y) centres whose whole box lies in ``mask``, pairwise spaced.

    The box of a centre is ``[c - half_box, c + half_box)`` on both axes. Raises
    :class:`ConfigError` when greedy random placement cannot fit ``n`` of them.
    """
    height, width = mask.shape
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    side = 2 * half_box
    if side > width or side > height:
        raise ConfigError(
            f"cannot place {what}: a {side}px box does not fit a {width}x{height} image"
        )
    integral = np.zeros((height + 1, width + 1), dtype=np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=integral[1:, 1:])
    n_cand = max(4000, 200 * n)
    cx = rng.integers(half_box, width - half_box + 1, n_cand)
    cy = rng.integers(half_box, height - half_box + 1, n_cand)
    x0, y0, x1, y1 = cx - half_box, cy - half_box, cx + half_box, cy + half_box
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    ok = inside == side * side
    cx, cy = cx[ok], cy[ok]
    accepted = np.empty((n, 2), dtype=np.float64)
    k = 0
    spacing2 = float(min_spacing) ** 2
    for x, y in zip(cx.tolist(), cy.tolist(), strict=True):
        if k:
            d2 = (accepted[:k, 0] - x) ** 2 + (accepted[:k, 1] - y) ** 2
            if d2.min() < spacing2:
                continue
        accepted[k] = (x, y)
        k += 1
        if k == n:
            return accepted.astype(np.int64)
    raise ConfigError(
        f"cannot place {n} {what} (box {side}px, spacing {min_spacing:g}px) inside the tissue "
        f"of a {width}x{height} image (placed {k}); lower n_per_class or the motif size, or "
        "enlarge the image"
    )


def _rotate_premultiplied(rgba: NDArray[np.float32], angle_deg: float) -> NDArray[np.float32]:
    """Rotate a straight-alpha RGBA canvas; returns premultiplied RGB + alpha, same size."""
    pm = rgba.copy()
    pm[..., :3] *= rgba[..., 3:4]
    out = ndimage.rotate(pm, angle_deg, axes=(1, 0), reshape=False, order=1, mode="constant")
    out = np.asarray(out, dtype=np.float32)
    np.clip(out[..., 3], 0.0, 1.0, out=out[..., 3])
    np.clip(out[..., :3], 0.0, 255.0, out=out[..., :3])
    return out


def _composite(out: NDArray[np.uint8], x0: int, y0: int, pm: NDArray[np.float32]) -> None:
    """Alpha-composite a premultiplied RGBA patch onto ``out`` (H, W, 3) at (x0, y0), in place."""
    s_h, s_w = pm.shape[:2]
    region = out[y0 : y0 + s_h, x0 : x0 + s_w]
    a = pm[..., 3:4]
    blended = region.astype(np.float32) * (1.0 - a) + pm[..., :3]
    region[...] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# --- brightfield renderer -------------------------------------------------------------------
def _render_brightfield(
    *,
    width: int,
    height: int,
    classes: Sequence[str],
    n_per_class: int,
    motif_size_l0: int,
    seed: int,
    stain_jitter: float = 0.0,
) -> tuple[NDArray[np.uint8], tuple[SyntheticObject, ...], NDArray[np.bool_]]:
    """Render the H&E-like scene at level 0 (``stain_jitter``: see :func:`make_synthetic_slide`).

    Returns
    -------
    rgb_hwc
        (height, width, 3) uint8 RGB level-0 pixels.
    objects
        the motifs' tight bounding boxes (alpha > 0.1) in level-0 pixels.
    tissue_mask
        (height, width) bool, True on tissue.
    """
    width = check_positive_int("width", width)
    height = check_positive_int("height", height)
    classes = check_classes(classes, tuple(MOTIF_PAINTERS), what="motif")
    n_per_class = check_positive_int("n_per_class", n_per_class, minimum=0)
    motif_size = check_positive_int("motif_size_l0", motif_size_l0, minimum=8)
    rng_tissue, rng_texture, rng_place, rng_motif, rng_dots, rng_noise = child_rngs(seed, 6)

    weight, tissue_mask = tissue_layer(rng_tissue, (height, width))

    # placement first: it only needs the mask
    max_side = math.ceil(motif_size * _MOTIF_MAX_SCALE) + 2
    half_box = (max_side + 1) // 2
    n_total = n_per_class * len(classes)
    centers = _place_centers(rng_place, tissue_mask, n_total, half_box, 2.0 * motif_size, "motifs")
    labels = np.repeat(np.arange(len(classes)), n_per_class)
    rng_place.shuffle(labels)

    # background: glass and eosin-pink tissue with low-frequency and fibrous texture
    low = smooth_noise(
        rng_texture, (height, width), cell_px=max(16, motif_size * 2), sigma_cells=1.0
    )
    fib = smooth_noise(rng_texture, (height, width), cell_px=4, sigma_cells=0.8)
    shade = 1.0 + 0.045 * low + 0.05 * fib  # (H, W) float32
    noise = rng_noise.standard_normal((height, width), dtype=np.float32)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    for ch in range(3):
        tissue_c = _EOSIN_RGB[ch] * shade + 3.0 * noise
        glass_c = _GLASS_RGB[ch] + 1.5 * noise
        plane = glass_c + weight * (tissue_c - glass_c)
        rgb[..., ch] = np.clip(np.rint(plane), 0, 255).astype(np.uint8)
    del low, fib, shade, noise

    # sparse pale nuclei as tissue texture, kept out of the motif boxes
    n_dots = int(tissue_mask.sum() // 1100)
    dx = rng_dots.integers(4, max(5, width - 4), n_dots)
    dy = rng_dots.integers(4, max(5, height - 4), n_dots)
    keep = tissue_mask[np.minimum(dy, height - 1), np.minimum(dx, width - 1)]
    if n_total:
        near = (np.abs(dx[:, None] - centers[None, :, 0]) < half_box + 4) & (
            np.abs(dy[:, None] - centers[None, :, 1]) < half_box + 4
        )
        keep &= ~near.any(axis=1)
    kernels = []
    kyy, kxx = canvas_grid(9)
    for _ in range(8):
        radii = (rng_dots.uniform(1.4, 2.6), rng_dots.uniform(1.4, 2.6))
        a = soft_disc(kyy, kxx, center=(4.0, 4.0), radii=radii)
        kernel = rgba_canvas(a * rng_dots.uniform(0.35, 0.6), _NUCLEUS_TEXTURE_RGB)
        kernel[..., :3] *= kernel[..., 3:4]
        kernels.append(kernel)
    kidx = rng_dots.integers(0, len(kernels), n_dots)
    for x, y, k in zip(dx[keep].tolist(), dy[keep].tolist(), kidx[keep].tolist(), strict=True):
        if x - 4 >= 0 and x + 5 <= width and y - 4 >= 0 and y + 5 <= height:
            _composite(rgb, x - 4, y - 4, kernels[k])

    # motifs
    objects: list[SyntheticObject] = []
    for (cx, cy), label in zip(centers.tolist(), labels.tolist(), strict=True):
        name = classes[label]
        size = max(8, round(motif_size * rng_motif.uniform(0.9, 1.1)))
        canvas = np.asarray(MOTIF_PAINTERS[name](rng_motif, size), dtype=np.float32)
        if canvas.shape != (size, size, 4):
            raise ConfigError(
                f"motif painter for {name!r} returned shape {canvas.shape}, "
                f"expected ({size}, {size}, 4)"
            )
        canvas[..., :3] *= rng_motif.uniform(0.92, 1.08, 3).astype(np.float32)
        angle = rng_motif.uniform(-_MOTIF_MAX_ROTATION_DEG, _MOTIF_MAX_ROTATION_DEG)
        pm = _rotate_premultiplied(canvas, angle)
        x0, y0 = cx - size // 2, cy - size // 2
        _composite(rgb, x0, y0, pm)
        ys, xs = np.nonzero(pm[..., 3] > 0.1)
        if ys.size == 0:
            raise ConfigError(f"motif painter for {name!r} drew nothing at size {size}px")
        objects.append(
            SyntheticObject(
                class_name=name,
                x_l0=float(x0 + xs.min()),
                y_l0=float(y0 + ys.min()),
                width_l0=float(xs.max() - xs.min() + 1),
                height_l0=float(ys.max() - ys.min() + 1),
            )
        )
    if stain_jitter:
        rgb = _jitter_stain(rgb, seed, stain_jitter)
    return rgb, tuple(objects), tissue_mask


def _jitter_stain(rgb: NDArray[np.uint8], seed: int, amount: float) -> NDArray[np.uint8]:
    """Scale each channel's optical density by a per-slide factor in ``1 +- amount`` (stain
    strength and scanner colour differ between slides)."""
    if not 0 <= amount < 1:
        raise ConfigError(f"stain_jitter must be in [0, 1), got {amount}")
    gains = np.random.default_rng([seed, _STAIN_STREAM]).uniform(1 - amount, 1 + amount, 3)
    lut = np.empty((3, 256), dtype=np.uint8)
    od = -np.log(np.maximum(np.arange(256, dtype=np.float64), 0.5) / 255.0)
    for ch in range(3):
        lut[ch] = np.clip(np.rint(255.0 * np.exp(-od * gains[ch])), 0, 255).astype(np.uint8)
    out = np.empty_like(rgb)
    for ch in range(3):
        out[..., ch] = lut[ch][rgb[..., ch]]
    return out


def make_synthetic_slide(
    path: str | Path,
    *,
    width: int = 2048,
    height: int = 1536,
    classes: Sequence[str] = ("ring", "cluster", "stripes"),
    n_per_class: int = 8,
    motif_size_l0: int = 48,
    mpp: float = 0.5,
    n_levels: int = 3,
    tile_size: int = 256,
    seed: int = 0,
    compression: Compression = "zlib",
    stain_jitter: float = 0.0,
) -> SyntheticSlide:
    """Write an H&E-like brightfield pyramidal TIFF with motifs of known classes.

    Parameters
    ----------
    path
        the TIFF file to write (overwritten).
    width, height
        level-0 size in pixels.
    classes
        motif classes, keys of :data:`~simsearch_wsi.synthetic.motifs.MOTIF_PAINTERS`
        (``ring``, ``cluster``, ``stripes``).
    n_per_class
        motifs per class; each is stamped fully inside tissue, centres at least
        ``2 * motif_size_l0`` apart.
    motif_size_l0
        nominal motif canvas side in level-0 pixels (jittered by +-10 %).
    mpp
        level-0 micrometres per pixel.
    n_levels
        pyramid levels, downsamples 1, 2, 4, ... (2x2 area averages, floor size).
    tile_size
        TIFF tile side, a multiple of 16.
    seed
        seeds everything.
    compression
        ``"zlib"`` (lossless, default), ``"jpeg"`` (quality 90, YCbCr) or ``None``.
    stain_jitter
        per-slide stain variation: each channel's optical density is scaled by a factor drawn
        from ``1 +- stain_jitter`` (seeded); 0 (default) leaves the colours as painted.

    Returns
    -------
    SyntheticSlide
        with ``tissue_mask`` at level 0.

    Notes
    -----
    Level 0 is the first page; levels 1.. are its SubIFDs (``subfiletype=1``), so tifffile
    reads one series with ``n_levels`` levels and tiffslide reports ``level_count == n_levels``.
    The pixel size is written as TIFF ``XResolution``/``YResolution`` in pixels per centimetre
    (``ResolutionUnit = CENTIMETER``, ``1e4 / mpp`` at level 0 and ``1e4 / (mpp * 2**k)`` at
    level ``k``), which tiffslide reads back as ``tiffslide.mpp-x`` / ``tiffslide.mpp-y``.
    """
    mpp = validate_mpp(mpp, source="make_synthetic_slide")
    tile = check_tile_size(tile_size)
    check_compression(compression)
    n_levels = check_n_levels(n_levels, width=width, height=height)
    rgb, objects, mask = _render_brightfield(
        width=width,
        height=height,
        classes=classes,
        n_per_class=n_per_class,
        motif_size_l0=motif_size_l0,
        seed=seed,
        stain_jitter=stain_jitter,
    )
    out = write_pyramidal_tiff(
        path, rgb, mpp=mpp, n_levels=n_levels, tile_size=tile, compression=compression
    )
    return SyntheticSlide(
        path=out,
        objects=objects,
        classes=tuple(classes) if not isinstance(classes, str) else (classes,),
        mpp=mpp,
        width=int(width),
        height=int(height),
        tissue_mask=mask,
        seed=int(seed),
        channel_names=("R", "G", "B"),
        n_levels=n_levels,
        format="tiff",
    )


def make_synthetic_omezarr_slide(
    path: str | Path,
    *,
    version: NgffVersion = "0.4",
    width: int = 2048,
    height: int = 1536,
    classes: Sequence[str] = ("ring", "cluster", "stripes"),
    n_per_class: int = 8,
    motif_size_l0: int = 48,
    mpp: float = 0.5,
    n_levels: int = 3,
    chunk: int = 256,
    seed: int = 0,
) -> SyntheticSlide:
    """The brightfield scene of :func:`make_synthetic_slide` as an OME-Zarr image.

    Same seed and parameters give the same level-0 pixels and ground truth as the TIFF
    (uncompressed or zlib). Axes c, y, x; 3 uint8 channels labelled R, G, B. See
    :func:`~simsearch_wsi.io.omezarr_writer.write_ome_zarr_image` for the layout of each
    version.
    """
    fmt = ngff_format(version)
    mpp = validate_mpp(mpp, source="make_synthetic_omezarr_slide")
    n_levels = check_n_levels(n_levels, width=width, height=height)
    rgb, objects, mask = _render_brightfield(
        width=width,
        height=height,
        classes=classes,
        n_per_class=n_per_class,
        motif_size_l0=motif_size_l0,
        seed=seed,
    )
    out = write_ome_zarr_image(
        path,
        np.ascontiguousarray(np.moveaxis(rgb, 2, 0)),
        mpp=mpp,
        channel_names=("R", "G", "B"),
        version=fmt.version,
        n_levels=n_levels,
        chunk=chunk,
    )
    return SyntheticSlide(
        path=out,
        objects=objects,
        classes=tuple(classes) if not isinstance(classes, str) else (classes,),
        mpp=mpp,
        width=int(width),
        height=int(height),
        tissue_mask=mask,
        seed=int(seed),
        channel_names=("R", "G", "B"),
        n_levels=n_levels,
        format=f"ome-zarr-{fmt.version}",
    )
