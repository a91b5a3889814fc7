"""Segmentation outputs as OME-Zarr label images that QuPath (0.6+) and napari open.

Two ways to write a class mask:

:func:`write_label_image`
    a new, self-contained ``.ome.zarr`` folder: NGFF 0.4 on Zarr v2 (Blosc-lz4, numeric level
    paths ``"0"``, ``"1"``, ..., ``"/"`` chunk keys). The root is a (c, y, x) uint8 multiscales
    image of the class probabilities (one channel per class, ``omero`` channel names and colours)
    or, without probabilities, one channel of the label mask scaled to 0..255 for display; the
    mask itself is the label image ``labels/<name>`` with ``image-label`` colours and class
    names.
:func:`add_labels_to_ome_zarr`
    a label image ``labels/<name>`` added to an existing OME-Zarr *input* image (NGFF 0.4 on
    Zarr v2 or 0.5 on Zarr v3, possibly inside a bioformats2raw layout), with the image's level
    shapes and physical scales, in the image's own NGFF version.

:func:`validate_label_store` checks either kind with ``ome-zarr-models`` and checks that every
label value present in the mask has a colour.

Layout written by :func:`write_label_image`::

    out.ome.zarr/
        .zgroup .zattrs          multiscales (c, y, x) + omero
        0/ 1/ ...                uint8 (C, H >> k, W >> k)
        labels/
            .zgroup .zattrs      {"labels": [name]}
            <name>/
                .zgroup .zattrs  multiscales (y, x) + image-label
                0/ 1/ ...        uint8 or uint16 (H >> k, W >> k)

What differs between NGFF 0.4 and 0.5 (Zarr format, codecs, where the metadata lives) comes from
:mod:`simsearch_wsi.io.ngff`.

Why the metadata is written with zarr's API rather than ``ome_zarr.writer``: ome-zarr 0.18's
``write_multiscale`` / ``write_multiscale_labels`` name the levels ``s0``, ``s1``, ... (QuPath
and this project want numeric paths) and, with zarr 3, default to zarr's ``Zstd`` codec for
Zarr v2 arrays, which QuPath's reader rejects. The structure and metadata follow what
ome-zarr-py writes (``image-label.version``, ``source.image = "../../"``); ome-zarr-py's
``Reader`` and ``ome-zarr-models`` read the result back in the tests.

Writes are atomic: everything goes to a temporary sibling that is renamed into place
(:func:`simsearch_wsi.core.atomic.atomic_path`), so an error never leaves a half-written store.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.atomic import atomic_path, write_json_atomic
from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError, MetadataError, UnsupportedFormatError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.ngff import NGFF_FORMATS, NgffFormat, ngff_format
from simsearch_wsi.io.pyramid import check_n_levels

__all__ = [
    "add_labels_to_ome_zarr",
    "validate_label_store",
    "write_label_image",
]

# A new pyramid level is added while the smaller side of the last level is at least this.
_MIN_LEVEL_SIDE = 256
# Largest number of classes: label values must fit in uint16.
_MAX_CLASSES = 65535
# Tolerance for probabilities slightly outside [0, 1] from floating-point error.
_PROB_TOL = 1e-6
# The multiscales "metadata.description" of every image and label image written here.
_DESCRIPTION = "simsearch_wsi.io.labels"
# write_label_image writes NGFF 0.4 (QuPath 0.6 reads it).
_NEW_STORE_FORMAT = ngff_format("0.4")


# --- argument checks --------------------------------------------------------------------------
def _check_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\")
    ):
        raise ConfigError(
            f"label name {name!r} must be a non-empty folder name without '/', '\\' or a leading "
            "'.', e.g. 'simsearch'"
        )
    return name


def _check_classes(
    classes: Sequence[str], colors: Mapping[str, tuple[int, int, int]]
) -> tuple[tuple[str, ...], list[tuple[int, int, int]]]:
    """Class names as a tuple and their RGB colours, in label-value order."""
    names = (classes,) if isinstance(classes, str) else tuple(classes)
    if not names:
        raise ConfigError("classes is empty; pass one class name per label value 1..K")
    if len(names) > _MAX_CLASSES:
        raise ConfigError(f"{len(names)} classes; at most {_MAX_CLASSES} are supported")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ConfigError(f"class names must be non-empty strings, got {bad[:3]!r}")
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        raise ConfigError(f"class names must be unique; repeated: {dupes[:5]!r}")
    missing = [n for n in names if n not in colors]
    if missing:
        raise ConfigError(
            f"colors has no entry for class(es) {missing[:5]!r}; pass an (r, g, b) colour for "
            "every class"
        )
    rgb: list[tuple[int, int, int]] = []
    for n in names:
        c = colors[n]
        try:
            values = tuple(int(v) for v in c)
            ok = len(values) == 3 and all(
                0 <= v <= 255 and v == v_ for v, v_ in zip(values, c, strict=True)
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"colour of class {n!r} must be 3 integers 0..255 (r, g, b), got {c!r}"
            )
        rgb.append((values[0], values[1], values[2]))
    return names, rgb


def _label_dtype(n_classes: int) -> np.dtype[Any]:
    return np.dtype(np.uint8) if n_classes <= 254 else np.dtype(np.uint16)


def _check_labels(labels: NDArray[Any], n_classes: int) -> NDArray[Any]:
    """The mask as a C-contiguous uint8/uint16 (H, W) array with values 0..K."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ConfigError(f"labels must be a non-empty 2-D (H, W) array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(
            f"labels must be an integer array (0 = unclassified, k = classes[k-1]), got dtype "
            f"{arr.dtype}; convert with labels.astype(np.uint16)"
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > n_classes:
        raise ConfigError(
            f"label values must lie in 0..{n_classes} (0 = unclassified, k = classes[k-1]), "
            f"found {lo}..{hi}; pass one class name per label value"
        )
    return np.ascontiguousarray(arr, dtype=_label_dtype(n_classes))


def _check_probabilities(
    probabilities: NDArray[Any], n_classes: int, shape: tuple[int, int]
) -> NDArray[np.float32]:
    p = np.asarray(probabilities)
    if p.ndim != 3 or p.shape != (n_classes, *shape):
        raise ConfigError(
            f"probabilities must have shape (K, H, W) = ({n_classes}, {shape[0]}, {shape[1]}) "
            f"to match classes and labels, got {p.shape}"
        )
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
        raise ConfigError(f"probabilities must be a float array in [0, 1], got dtype {p.dtype}")
    p32 = p.astype(np.float32, copy=False)
    lo, hi = float(p32.min()), float(p32.max())  # NaN propagates; no (K, H, W) temporaries
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError("probabilities contain NaN or infinity; pass values in [0, 1]")
    if lo < -_PROB_TOL or hi > 1.0 + _PROB_TOL:
        raise ConfigError(
            f"probabilities must lie in [0, 1], found {lo:.4g}..{hi:.4g}; apply softmax/sigmoid "
            "first"
        )
    return np.clip(p32, 0.0, 1.0) if lo < 0.0 or hi > 1.0 else p32


def _check_pixel_size(pixel_size_um: tuple[float, float] | None) -> tuple[float, float] | None:
    if pixel_size_um is None:
        return None
    try:
        sy, sx = pixel_size_um
    except (TypeError, ValueError):
        raise ConfigError(
            f"pixel_size_um must be (y, x) micrometres per pixel, got {pixel_size_um!r}"
        ) from None
    return (
        validate_mpp(sy, source="pixel_size_um[0] (y)"),
        validate_mpp(sx, source="pixel_size_um[1] (x)"),
    )


def _n_levels(n_levels: int | None, height: int, width: int) -> int:
    """Default: halve until the smaller side of the last level is below 256 px."""
    if n_levels is None:
        n = 1
        while min(height, width) >> (n - 1) >= _MIN_LEVEL_SIDE and min(height, width) >> n >= 1:
            n += 1
        return n
    return check_n_levels(n_levels, width=width, height=height, what="mask")


# --- pyramids -------------------------------------------------------------------------------
def _label_pyramid(labels: NDArray[Any], n_levels: int) -> list[NDArray[Any]]:
    """Level k is the top-left pixel of every 2**k x 2**k block (size ``H >> k, W >> k``).

    Subsampling, not a mode or mean: it never invents label values and keeps thin structures'
    class rather than blending them.
    """
    h, w = labels.shape
    return [
        np.ascontiguousarray(labels[: (h >> k) << k : 1 << k, : (w >> k) << k : 1 << k])
        for k in range(n_levels)
    ]


def _uint8_mean_pyramid(prob: NDArray[np.float32], n_levels: int) -> list[NDArray[np.uint8]]:
    """(K, H, W) level 0 plus successive 2x2 means (floor size), each stored as
    ``round(255 * p)``; the means are taken in float32 and only one float level is kept."""
    out = [_to_uint8(prob)]
    a = prob
    for _ in range(n_levels - 1):
        h, w = a.shape[1] // 2, a.shape[2] // 2
        s = a[:, 0 : 2 * h : 2, 0 : 2 * w : 2] + a[:, 1 : 2 * h : 2, 0 : 2 * w : 2]
        s += a[:, 0 : 2 * h : 2, 1 : 2 * w : 2]
        s += a[:, 1 : 2 * h : 2, 1 : 2 * w : 2]
        s *= 0.25
        out.append(_to_uint8(s))
        a = s
    return out


def _to_uint8(prob: NDArray[np.float32]) -> NDArray[np.uint8]:
    """``round(255 * p)`` as uint8, one channel at a time (one float plane of temporaries)."""
    out = np.empty(prob.shape, dtype=np.uint8)
    plane = np.empty(prob.shape[1:], dtype=np.float32)
    for c in range(prob.shape[0]):
        np.multiply(prob[c], 255.0, out=plane)
        np.rint(plane, out=plane)
        out[c] = plane
    return out


def _nearest_resample(
    labels: NDArray[Any], shape: tuple[int, int], factor: tuple[float, float]
) -> NDArray[Any]:
    """Nearest-neighbour resample: output pixel (i, j) takes level-0 pixel
    ``(floor(i * fy), floor(j * fx))`` (clipped), ``factor = (fy, fx)`` the level's downsample."""
    h0, w0 = labels.shape
    iy = np.minimum(np.floor(np.arange(shape[0]) * factor[0] + 1e-6).astype(np.intp), h0 - 1)
    ix = np.minimum(np.floor(np.arange(shape[1]) * factor[1] + 1e-6).astype(np.intp), w0 - 1)
    return np.ascontiguousarray(labels[iy[:, None], ix[None, :]])


# --- zarr writing ---------------------------------------------------------------------------
def _write_array(
    fmt: NgffFormat,
    group: Any,
    key: str,
    data: NDArray[Any],
    *,
    chunks: tuple[int, ...],
    dimension_names: tuple[str, ...],
) -> None:
    """Every array of this module is written here (one place to fail in the atomicity tests)."""
    fmt.write_array(group, key, data=data, chunks=chunks, dimension_names=dimension_names)


def _multiscales(
    fmt: NgffFormat,
    *,
    name: str,
    axes: list[dict[str, Any]],
    transforms: list[list[dict[str, Any]]],
    method: str,
) -> list[dict[str, Any]]:
    return [
        fmt.multiscale(
            name=name,
            axes=axes,
            transforms=transforms,
            type_=method,
            metadata={"method": method, "description": _DESCRIPTION},
        )
    ]


def _image_label(
    fmt: NgffFormat, classes: Sequence[str], rgb: Sequence[tuple[int, int, int]]
) -> dict[str, Any]:
    return fmt.image_label(
        {
            "colors": [
                {"label-value": k, "rgba": [r, g, b, 255]} for k, (r, g, b) in enumerate(rgb, 1)
            ],
            "properties": [{"label-value": k, "class": c} for k, c in enumerate(classes, 1)],
            "source": {"image": "../../"},
        }
    )


def _write_label_group(
    group: Any,
    name: str,
    levels: Sequence[NDArray[Any]],
    *,
    fmt: NgffFormat,
    axes: list[dict[str, Any]],
    transforms: list[list[dict[str, Any]]],
    classes: Sequence[str],
    rgb: Sequence[tuple[int, int, int]],
    chunk: int,
) -> None:
    """Write ``levels`` (y, x) and the label metadata into the (new, empty) label ``group``."""
    for k, lvl in enumerate(levels):
        _write_array(fmt, group, str(k), lvl, chunks=(chunk, chunk), dimension_names=("y", "x"))
    attrs = {
        "multiscales": _multiscales(
            fmt, name=name, axes=axes, transforms=transforms, method="nearest"
        ),
        "image-label": _image_label(fmt, classes, rgb),
    }
    fmt.write_attrs(group, attrs)


def _space_axes(unit: str | None) -> list[dict[str, Any]]:
    return [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in ("y", "x")]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "{:02X}{:02X}{:02X}".format(*rgb)


def _omero(
    fmt: NgffFormat, channel_names: Sequence[str], rgb: Sequence[tuple[int, int, int]], name: str
) -> dict[str, Any]:
    content = {
        "channels": [
            {
                "label": ch,
                "color": _hex(c),
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
                "window": {"min": 0.0, "max": 255.0, "start": 0.0, "end": 255.0},
            }
            for ch, c in zip(channel_names, rgb, strict=True)
        ],
        "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0},
    }
    return {"name": name, **fmt.omero(content)}


def _refuse_existing(path: Path, overwrite: bool, what: str) -> None:
    """Refuse an existing ``path`` unless ``overwrite``; never replace a non-Zarr folder."""
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise ConfigError(
            f"{path}: {what} already exists; choose a new path or pass overwrite=True to replace it"
        )
    if path.is_symlink() or not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder; remove it or choose a new path")
    if not ((path / ".zgroup").is_file() or (path / "zarr.json").is_file()):
        raise ConfigError(
            f"{path}: exists and is not a Zarr folder; refusing to replace it even with "
            "overwrite=True; choose a new path"
        )


# --- public API -----------------------------------------------------------------------------
def write_label_image(
    path: str | os.PathLike[str],
    labels: NDArray[np.integer[Any]],
    *,
    classes: Sequence[str],
    colors: Mapping[str, tuple[int, int, int]],
    probabilities: NDArray[np.floating[Any]] | None = None,
    pixel_size_um: tuple[float, float] | None = None,
    name: str = "simsearch",
    n_levels: int | None = None,
    chunk: int = 512,
    overwrite: bool = False,
) -> Path:
    """Write a class mask (and optional class probabilities) as a new OME-Zarr folder.

    The store is NGFF 0.4 on Zarr v2 with Blosc-lz4 compression, numeric level paths and
    ``"/"`` chunk keys, so QuPath 0.6+ and napari (napari-ome-zarr) open it. See the module
    docstring for the layout.

    Parameters
    ----------
    path
        the new ``.ome.zarr`` folder for this image's outputs.
    labels
        (H, W) integer label mask at level-0 resolution of the output grid; 0 = unclassified,
        value k (1..K) = ``classes[k - 1]``. Written as uint8 (uint16 when K > 254) to
        ``labels/<name>``.
    classes
        K class names, in label-value order.
    colors
        (r, g, b) 0..255 per class name; every class needs one. Written as the label image's
        ``image-label.colors`` (alpha 255) and as the probability channels' ``omero`` colours.
    probabilities
        optional (K, H, W) float class probabilities in [0, 1] on the same grid. The root image
        is then (K, H, W) uint8 ``round(255 * p)``, one channel per class named after it.
        Without it, the root image is (1, H, W) uint8 ``round(255 * label / K)`` for display.
    pixel_size_um
        (y, x) micrometres per pixel of this grid. Level k gets scale ``2**k`` times it with
        axis unit ``"micrometer"``; ``None`` writes unitless scales ``2**k``.
    name
        label image name, under ``labels/<name>``.
    n_levels
        pyramid levels at paths ``"0"``, ``"1"``, ...; level k is (H >> k, W >> k): labels are
        subsampled (the top-left pixel of each 2**k block), probabilities 2x2-averaged.
        Default: halve until the smaller side is below 256 px.
    chunk
        chunk side in y and x (one channel per chunk).
    overwrite
        replace an existing ``path`` (atomically: the old folder is removed only after the new
        one is in place). Without it an existing ``path`` raises :class:`ConfigError`.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        on invalid inputs (shapes, label values > K, missing colours, ...) or an existing
        ``path`` without ``overwrite``.
    """
    out = Path(path)
    names, rgb = _check_classes(classes, colors)
    k_classes = len(names)
    mask = _check_labels(labels, k_classes)
    h, w = mask.shape
    prob = None if probabilities is None else _check_probabilities(probabilities, k_classes, (h, w))
    pixel = _check_pixel_size(pixel_size_um)
    name = _check_name(name)
    n = _n_levels(n_levels, h, w)
    chunk = check_positive_int("chunk", chunk)
    _refuse_existing(out, overwrite, "output OME-Zarr")

    label_levels = _label_pyramid(mask, n)
    if prob is not None:
        image_levels = _uint8_mean_pyramid(prob, n)
        channel_names: tuple[str, ...] = names
        channel_rgb = rgb
        method = "mean"
    else:
        image_levels = [
            np.rint(lvl[None].astype(np.float32) * (255.0 / k_classes)).astype(np.uint8)
            for lvl in label_levels
        ]
        channel_names = (f"{name} class index (255 * label / {k_classes})",)
        channel_rgb = [(255, 255, 255)]
        method = "nearest"

    unit = "micrometer" if pixel is not None else None
    sy, sx = pixel if pixel is not None else (1.0, 1.0)
    yx_transforms = [[{"type": "scale", "scale": [sy * 2**k, sx * 2**k]}] for k in range(n)]
    cyx_transforms = [[{"type": "scale", "scale": [1.0, sy * 2**k, sx * 2**k]}] for k in range(n)]
    image_name = out.name
    fmt = _NEW_STORE_FORMAT
    with atomic_path(out) as tmp:
        root = fmt.create_group(tmp)
        for k, lvl in enumerate(image_levels):
            _write_array(
                fmt, root, str(k), lvl, chunks=(1, chunk, chunk), dimension_names=("c", "y", "x")
            )
        fmt.write_attrs(
            root,
            {
                "multiscales": _multiscales(
                    fmt,
                    name=image_name,
                    axes=[{"name": "c", "type": "channel"}, *_space_axes(unit)],
                    transforms=cyx_transforms,
                    method=method,
                ),
                "omero": _omero(fmt, channel_names, channel_rgb, image_name),
            },
        )
        labels_group = root.create_group("labels")
        _write_label_group(
            labels_group.create_group(name),
            name,
            label_levels,
            fmt=fmt,
            axes=_space_axes(unit),
            transforms=yx_transforms,
            classes=names,
            rgb=rgb,
            chunk=chunk,
        )
        fmt.write_attrs(labels_group, {"labels": [name]})
    return out


def _ngff_format_of(group: Any, where: Path) -> tuple[NgffFormat, dict[str, Any]]:
    """The image group's NGFF format (0.4 or 0.5) and its NGFF attributes."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    ngff: dict[str, Any] = ome if isinstance(ome, dict) else attrs
    ms = ngff.get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise UnsupportedFormatError(
            f"{where}: Zarr group has no OME-Zarr 'multiscales' metadata; pass the folder of an "
            "OME-Zarr image (for a plate, one field image, e.g. plate.zarr/A/1/0)"
        )
    version = str(ome.get("version") if isinstance(ome, dict) else ms[0].get("version"))
    zarr_format = int(group.metadata.zarr_format)
    fmt = NGFF_FORMATS.get(version)
    if fmt is not None and fmt.zarr_format == zarr_format:
        return fmt, ngff
    raise MetadataError(
        f"{where}: OME-Zarr version {version!r} on Zarr v{zarr_format} is not supported for "
        "adding labels (supported: NGFF 0.4 on Zarr v2, 0.5 on Zarr v3); convert the image "
        "first, e.g. with bioformats2raw or ome2024-ngff-challenge"
    )


def _open_image_group(image_path: Path) -> tuple[Path, Any]:
    """Open the image group at ``image_path``, or series 0 of a bioformats2raw layout."""
    from simsearch_wsi.io.omezarr import ngff_attrs_kind, open_zarr_group

    if not image_path.is_dir():
        raise ConfigError(f"{image_path}: not an OME-Zarr image folder; pass an existing image")
    group = open_zarr_group(image_path)
    kind = ngff_attrs_kind(dict(group.attrs))
    if kind == "bioformats2raw":
        if "0" not in group:
            raise MetadataError(f"{image_path}: bioformats2raw layout without image series '0'")
        return image_path / "0", group["0"]
    if kind in ("plate", "well"):
        raise UnsupportedFormatError(
            f"{image_path}: is an OME-Zarr HCS {kind}, not an image; pass one field image "
            "folder, e.g. plate.zarr/A/1/0"
        )
    return image_path, group


def _transform_of(transforms: Any, kind: str, n_axes: int) -> list[float] | None:
    if not isinstance(transforms, list):
        return None
    for t in transforms:
        if isinstance(t, dict) and t.get("type") == kind and isinstance(t.get(kind), list):
            values = [float(v) for v in t[kind]]
            return values if len(values) == n_axes else None
    return None


def _image_levels(
    group: Any, ngff: dict[str, Any], where: Path
) -> tuple[list[tuple[int, int]], list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Per level: (height, width), label coordinate transforms (y, x); and the y, x axes."""
    ms = ngff["multiscales"][0]
    axes_raw = ms.get("axes")
    if not isinstance(axes_raw, list):
        raise MetadataError(f"{where}: OME-Zarr multiscales has no axes list")
    axes = [a if isinstance(a, dict) else {"name": str(a)} for a in axes_raw]
    names = [str(a.get("name")) for a in axes]
    if "y" not in names or "x" not in names:
        raise MetadataError(f"{where}: OME-Zarr axes {names} have no 'y' and 'x'")
    iy, ix = names.index("y"), names.index("x")
    datasets = ms.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise MetadataError(f"{where}: OME-Zarr multiscales has no datasets")
    g_scale = _transform_of(ms.get("coordinateTransformations"), "scale", len(axes))
    g_trans = _transform_of(ms.get("coordinateTransformations"), "translation", len(axes))
    shapes: list[tuple[int, int]] = []
    transforms: list[list[dict[str, Any]]] = []
    for ds in datasets:
        try:
            shape = group[str(ds["path"])].shape
        except (KeyError, TypeError) as exc:
            raise MetadataError(f"{where}: multiscales dataset {ds!r} is missing") from exc
        shapes.append((int(shape[iy]), int(shape[ix])))
        ct = ds.get("coordinateTransformations")
        scale = _transform_of(ct, "scale", len(axes))
        trans = _transform_of(ct, "translation", len(axes))
        if scale is None:  # NGFF < 0.4 or missing: infer from shapes
            sy, sx = shapes[0][0] / shapes[-1][0], shapes[0][1] / shapes[-1][1]
        else:
            sy, sx = scale[iy], scale[ix]
        ty, tx = (trans[iy], trans[ix]) if trans is not None else (0.0, 0.0)
        if g_scale is not None:
            sy, sx, ty, tx = sy * g_scale[iy], sx * g_scale[ix], ty * g_scale[iy], tx * g_scale[ix]
        if g_trans is not None:
            ty, tx = ty + g_trans[iy], tx + g_trans[ix]
        level_t: list[dict[str, Any]] = [{"type": "scale", "scale": [sy, sx]}]
        if ty != 0.0 or tx != 0.0:
            level_t.append({"type": "translation", "translation": [ty, tx]})
        transforms.append(level_t)
    yx_axes = []
    for i in (iy, ix):
        ax: dict[str, Any] = {"name": names[i], "type": "space"}
        unit = axes[i].get("unit")
        if isinstance(unit, str) and unit:
            ax["unit"] = unit
        yx_axes.append(ax)
    return shapes, transforms, yx_axes


def _read_labels_list(labels_dir: Path, fmt: NgffFormat) -> list[str]:
    """The ``labels`` list of an existing labels group (MetadataError if not a Zarr group)."""
    if not fmt.group_file(labels_dir).is_file():
        raise MetadataError(
            f"{labels_dir}: exists but is not a Zarr v{fmt.zarr_format} group; "
            "move it away before adding labels"
        )
    attrs_file = fmt.attrs_file(labels_dir)
    doc: dict[str, Any] = (
        json.loads(attrs_file.read_text(encoding="utf-8")) if attrs_file.is_file() else {}
    )
    found = fmt.document_ngff(doc).get("labels", [])
    if not isinstance(found, list):
        raise MetadataError(f"{labels_dir}: 'labels' metadata is not a list")
    return [str(x) for x in found]


def _append_label_name(labels_dir: Path, fmt: NgffFormat, name: str) -> None:
    """Add ``name`` to the labels group's ``labels`` list (atomic rewrite of its metadata)."""
    attrs_file = fmt.attrs_file(labels_dir)
    doc: dict[str, Any] = (
        json.loads(attrs_file.read_text(encoding="utf-8")) if attrs_file.is_file() else {}
    )
    target = fmt.editable_document_ngff(doc)
    names = list(target.get("labels", []))
    if name not in names:
        names.append(name)
    target["labels"] = names
    write_json_atomic(attrs_file, doc)


def add_labels_to_ome_zarr(
    image_path: str | os.PathLike[str],
    labels: NDArray[np.integer[Any]],
    *,
    classes: Sequence[str],
    colors: Mapping[str, tuple[int, int, int]],
    name: str = "simsearch",
    overwrite: bool = False,
    chunk: int = 512,
) -> Path:
    """Add a class mask as ``labels/<name>`` of an existing OME-Zarr image.

    The label image gets the image's number of levels and each level's (y, x) shape, the
    image's y/x scales (and translations) and units, and the image's NGFF version: NGFF 0.4 on
    Zarr v2 (``.zattrs``) or 0.5 on Zarr v3 (metadata under ``ome`` in ``zarr.json``).
    Existing labels are kept; ``labels/.zattrs`` (or ``zarr.json``) gets ``name`` appended.

    Parameters
    ----------
    image_path
        an OME-Zarr image folder (NGFF 0.4 or 0.5), or a bioformats2raw layout (series 0 gets
        the labels).
    labels
        (H, W) integer mask at the image's level-0 (y, x) size; 0 = unclassified, k =
        ``classes[k - 1]``. Level k is a nearest-neighbour subsample to that level's shape.
    classes, colors
        as in :func:`write_label_image`.
    name
        label image name.
    overwrite
        replace an existing label image of that name (atomically); otherwise it raises
        :class:`ConfigError`.
    chunk
        chunk side in y and x.

    Returns
    -------
    Path
        the written label group, ``<image>/labels/<name>``.

    Raises
    ------
    ConfigError
        invalid inputs, a mask of the wrong shape, or an existing label without ``overwrite``.
    MetadataError
        an NGFF version other than 0.4/0.5, or malformed image metadata.
    UnsupportedFormatError
        ``image_path`` is not an OME-Zarr image (e.g. a plate).
    """
    names, rgb = _check_classes(classes, colors)
    mask = _check_labels(labels, len(names))
    name = _check_name(name)
    chunk = check_positive_int("chunk", chunk)
    img_dir, group = _open_image_group(Path(image_path))
    fmt, ngff = _ngff_format_of(group, img_dir)
    shapes, transforms, yx_axes = _image_levels(group, ngff, img_dir)
    if mask.shape != shapes[0]:
        raise ConfigError(
            f"labels shape {mask.shape} does not match the image's level-0 (y, x) size "
            f"{shapes[0]} of {img_dir}; pass a mask at full image resolution"
        )
    h0, w0 = shapes[0]
    levels = [
        mask
        if k == 0
        else _nearest_resample(
            mask, shape, _level_factor(transforms[0], transforms[k], (h0 / shape[0], w0 / shape[1]))
        )
        for k, shape in enumerate(shapes)
    ]
    labels_dir = img_dir / "labels"
    label_dir = labels_dir / name
    write_kwargs: dict[str, Any] = {
        "fmt": fmt,
        "axes": yx_axes,
        "transforms": transforms,
        "classes": names,
        "rgb": rgb,
        "chunk": chunk,
    }
    if not labels_dir.exists():
        with atomic_path(labels_dir) as tmp:
            lg = fmt.create_group(tmp)
            _write_label_group(lg.create_group(name), name, levels, **write_kwargs)
            fmt.write_attrs(lg, {"labels": [name]})
        return label_dir
    if name in _read_labels_list(labels_dir, fmt) and not overwrite:
        raise ConfigError(
            f"{label_dir}: label {name!r} already exists; pass another name or overwrite=True "
            "to replace it"
        )
    _refuse_existing(label_dir, overwrite, f"label {name!r}")
    with atomic_path(label_dir) as tmp:
        # a standalone group in ``tmp``; the rename makes it the child ``name`` of labels/
        label_group = fmt.create_group(tmp)
        _write_label_group(label_group, name, levels, **write_kwargs)
    _append_label_name(labels_dir, fmt, name)
    return label_dir


def _level_factor(
    t0: list[dict[str, Any]], tk: list[dict[str, Any]], fallback: tuple[float, float]
) -> tuple[float, float]:
    """Downsample of a level vs level 0 from its scales (``fallback``: from the shapes)."""
    s0, sk = t0[0]["scale"], tk[0]["scale"]
    if all(v > 0 and math.isfinite(v) for v in (*s0, *sk)):
        return (sk[0] / s0[0], sk[1] / s0[1])
    return fallback


# --- validation -----------------------------------------------------------------------------
def _first_message(exc: BaseException) -> str:
    """The first error of a pydantic ValidationError (location: message), else the first line."""
    from pydantic import ValidationError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ValidationError) and e.errors():
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            return f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", ""))
        e = e.__cause__
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _present_values(arr: Any, max_value_hint: int = 1 << 16) -> set[int]:
    """Distinct values of a 2-D (or N-D) zarr array, read in row bands of its chunks."""
    shape = tuple(int(s) for s in arr.shape)
    if not shape or 0 in shape:
        return set()
    band = int(arr.chunks[0]) if arr.chunks else shape[0]
    dtype = np.dtype(arr.dtype)
    small = dtype.kind == "u" and dtype.itemsize <= 2
    present = np.zeros(max_value_hint, dtype=bool) if small else None
    values: set[int] = set()
    for y0 in range(0, shape[0], max(1, band)):
        block = np.asarray(arr[y0 : y0 + band])
        if present is not None:
            present |= np.bincount(block.ravel(), minlength=max_value_hint).astype(bool)
        else:
            values.update(int(v) for v in np.unique(block))
    if present is not None:
        values.update(int(v) for v in np.flatnonzero(present))
    return values


def validate_label_store(path: str | os.PathLike[str]) -> None:
    """Validate an OME-Zarr image and its label images; raise :class:`MetadataError` if bad.

    Works on stores written by :func:`write_label_image` and on images labelled by
    :func:`add_labels_to_ome_zarr` (NGFF 0.4 or 0.5; series 0 of a bioformats2raw layout).

    Checks, in order: the image against ``ome_zarr_models`` (``v04.Image`` or ``v05.Image``,
    including its ``labels`` group); each label image listed in ``labels`` against
    ``ImageLabel`` (multiscales + ``image-label``); that it has ``image-label`` metadata; that
    its level-0 (y, x) size equals the image's; and that every label value present in its
    level 0 (except 0) has a colour in ``image-label.colors``.

    Raises
    ------
    MetadataError
        with the validator's first message (location: message) on the first failure.
    UnsupportedFormatError
        ``path`` is not an OME-Zarr image.
    """
    img_dir, group = _open_image_group(Path(path))
    fmt, ngff = _ngff_format_of(group, img_dir)
    version = fmt.version
    models: Any = fmt.validation_models()
    try:
        models.Image.from_zarr(group)
    except Exception as exc:  # pydantic and zarr raise several types
        raise MetadataError(
            f"{img_dir}: not a valid OME-Zarr {version} image: {_first_message(exc)}"
        ) from exc
    if "labels" not in group:
        return
    labels_group = group["labels"]
    try:
        models.Labels.from_zarr(labels_group)
    except Exception as exc:
        raise MetadataError(
            f"{img_dir / 'labels'}: not a valid OME-Zarr {version} labels group: "
            f"{_first_message(exc)}"
        ) from exc
    label_ngff = fmt.ngff_attrs(dict(labels_group.attrs))
    image_shapes, _, _ = _image_levels(group, ngff, img_dir)
    for label_name in label_ngff.get("labels", []):
        where = img_dir / "labels" / str(label_name)
        if str(label_name) not in labels_group:
            raise MetadataError(f"{where}: listed in labels/ metadata but missing")
        lg = labels_group[str(label_name)]
        try:
            models.ImageLabel.from_zarr(lg)
        except Exception as exc:
            raise MetadataError(
                f"{where}: not a valid OME-Zarr {version} label image: {_first_message(exc)}"
            ) from exc
        lngff = fmt.ngff_attrs(dict(lg.attrs))
        image_label = lngff.get("image-label")
        if not isinstance(image_label, dict):
            raise MetadataError(f"{where}: has no 'image-label' metadata")
        shapes, _, _ = _image_levels(lg, lngff, where)
        if shapes[0] != image_shapes[0]:
            raise MetadataError(
                f"{where}: level-0 (y, x) size {shapes[0]} differs from the image's "
                f"{image_shapes[0]}"
            )
        colored = {
            int(c["label-value"])
            for c in image_label.get("colors") or []
            if isinstance(c, dict) and c.get("rgba") is not None
        }
        level0 = lg[str(lngff["multiscales"][0]["datasets"][0]["path"])]
        uncolored = sorted(_present_values(level0) - colored - {0})
        if uncolored:
            raise MetadataError(
                f"{where}: label value(s) {uncolored[:10]} occur in level 0 but have no colour "
                "in image-label.colors"
            )
