"""Synthetic multichannel fluorescence slides: cells whose reporter channel is nuclear or
cytoplasmic, written as a pyramidal OME-TIFF (:func:`make_fluorescence_slide`)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import DTypeLike, NDArray

from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.pyramid import area_pyramid, check_n_levels
from simsearch_wsi.io.tiff_writer import check_tile_size
from simsearch_wsi.synthetic._cells import (
    background_planes,
    cell_grid,
    full_scale,
    stamp_cell,
    to_dtype,
)
from simsearch_wsi.synthetic._common import check_classes, child_rngs, tissue_layer
from simsearch_wsi.synthetic.truth import SyntheticObject, SyntheticSlide

__all__ = ["FLUORESCENCE_CLASSES", "make_fluorescence_slide"]

# Reporter patterns make_fluorescence_slide knows.
FLUORESCENCE_CLASSES: tuple[str, ...] = ("nuclear_gfp", "cytoplasmic_gfp")


def _write_ome_tiff(
    path: Path,
    levels: list[NDArray[Any]],
    *,
    mpp: float,
    channel_names: Sequence[str],
    tile: int,
    file_uuid: str,
) -> None:
    """One OME series, axes CYX, one tiled zlib page per channel; levels 1.. as SubIFDs."""
    import tifffile

    metadata: dict[str, Any] = {
        "UUID": f"urn:uuid:{file_uuid}",  # tifffile's default is a time-based uuid1
        "axes": "CYX",
        "Channel": {"Name": list(channel_names)},
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
    }
    n_levels = len(levels)
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tw:
        for k, lvl in enumerate(levels):
            res = 1e4 / (mpp * 2**k)
            tw.write(
                lvl,
                subifds=(n_levels - 1) if k == 0 and n_levels > 1 else None,
                subfiletype=1 if k else 0,
                metadata=metadata if k == 0 else None,
                photometric="minisblack",
                tile=(tile, tile),
                compression="zlib",
                compressionargs={"level": 6},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )


def make_fluorescence_slide(
    path: str | Path,
    *,
    width: int = 1024,
    height: int = 768,
    channels: Sequence[str] = ("DAPI", "GFP", "Cy5"),
    classes: Sequence[str] = ("nuclear_gfp", "cytoplasmic_gfp"),
    n_per_class: int = 8,
    mpp: float = 0.65,
    n_levels: int = 2,
    dtype: DTypeLike = np.uint16,
    seed: int = 0,
    tile_size: int = 256,
) -> SyntheticSlide:
    """Write a multichannel fluorescence OME-TIFF with cells whose reporter is localised.

    Channel roles are positional: ``channels[0]`` holds the nuclei (DAPI-like) of every cell in
    the tissue region, ``channels[1]`` the reporter (GFP-like), any further channels a weak
    membrane stain (Cy5-like). Only the objects carry reporter signal: ``nuclear_gfp`` cells
    have it on the nucleus, ``cytoplasmic_gfp`` cells in a ring around it. Each object's box
    is its cell (nucleus plus cytoplasm). Intensities are fractions of the dtype's full scale
    (background ~1.5 %, nuclei 35-60 %).

    The file holds one OME series, axes ``CYX`` (one tiled zlib page per channel), levels
    1.. as SubIFDs (2x2 area averages). The OME-XML carries the channel names and
    ``PhysicalSizeX/Y`` (µm); the TIFF resolution tags carry the pixel size too (pixels per
    centimetre), which is what tiffslide reads.
    """
    out = Path(path)
    mpp = validate_mpp(mpp, source="make_fluorescence_slide")
    width = check_positive_int("width", width)
    height = check_positive_int("height", height)
    n_levels = check_n_levels(n_levels, width=width, height=height)
    tile = check_tile_size(tile_size)
    channel_names = (channels,) if isinstance(channels, str) else tuple(channels)
    if len(channel_names) < 2 or len(set(channel_names)) != len(channel_names):
        raise ConfigError(
            f"channels must be at least 2 distinct names (nuclei, reporter, ...), got "
            f"{channel_names}"
        )
    classes = check_classes(classes, FLUORESCENCE_CLASSES, what="fluorescence")
    n_per_class = check_positive_int("n_per_class", n_per_class, minimum=0)
    np_dtype = np.dtype(dtype)
    full_scale(np_dtype)  # rejects non-numeric dtypes before any work
    rng_tissue, rng_cells, rng_pick, rng_paint, rng_noise = child_rngs(seed, 5)

    weight, mask = tissue_layer(rng_tissue, (height, width))
    r_nuc, r_cell = 6.0, 11.0
    pitch = 2.0 * r_cell + 4.0
    pts = cell_grid(rng_cells, (height, width), pitch=pitch, margin=r_cell + 2)
    pts_i = np.rint(pts).astype(np.int64)
    in_tissue = mask[pts_i[:, 1], pts_i[:, 0]]
    pts = pts[in_tissue]

    # choose the objects among the cells, spaced by two cell boxes
    n_total = n_per_class * len(classes)
    box = 2 * math.ceil(r_cell) + 2
    order = rng_pick.permutation(len(pts))
    chosen: list[int] = []
    for i in order.tolist():
        if len(chosen) == n_total:
            break
        if all(np.hypot(*(pts[i] - pts[j])) >= 2 * box for j in chosen):
            chosen.append(i)
    if len(chosen) < n_total:
        raise ConfigError(
            f"cannot place {n_total} fluorescence objects (cell box {box}px, spacing {2 * box}px) "
            f"among {len(pts)} cells of a {width}x{height} image (placed {len(chosen)}); lower "
            "n_per_class or enlarge the image"
        )
    labels = np.repeat(np.arange(len(classes)), n_per_class)
    rng_pick.shuffle(labels)
    reporter_of = dict(zip(chosen, labels.tolist(), strict=True))

    planes = background_planes(rng_noise, (len(channel_names), height, width), level=0.012)
    planes[1:] += 0.006 * weight  # weak tissue autofluorescence
    objects: list[SyntheticObject] = []
    for i, (cx, cy) in enumerate(pts.tolist()):
        label = reporter_of.get(i)
        mode: Literal["none", "nuclear", "cytoplasmic"] = "none"
        if label is not None:
            mode = "nuclear" if classes[label] == "nuclear_gfp" else "cytoplasmic"
            bx0, by0 = math.floor(cx - r_cell), math.floor(cy - r_cell)
            objects.append(
                SyntheticObject(
                    class_name=classes[label],
                    x_l0=float(bx0),
                    y_l0=float(by0),
                    width_l0=float(math.ceil(cx + r_cell) - bx0),
                    height_l0=float(math.ceil(cy + r_cell) - by0),
                )
            )
        stamp_cell(planes, (cx, cy), r_nuc=r_nuc, r_cell=r_cell, rng=rng_paint, reporter=mode)
    data = to_dtype(planes, np_dtype)
    del planes
    _write_ome_tiff(
        out,
        area_pyramid(data, n_levels, y_axis=1),
        mpp=mpp,
        channel_names=channel_names,
        tile=tile,
        file_uuid=str(uuid.UUID(bytes=rng_pick.bytes(16), version=4)),
    )
    return SyntheticSlide(
        path=out,
        objects=tuple(objects),
        classes=classes,
        mpp=mpp,
        width=width,
        height=height,
        tissue_mask=mask,
        seed=int(seed),
        channel_names=channel_names,
        n_levels=n_levels,
        format="ome-tiff",
    )
