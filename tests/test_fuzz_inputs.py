"""Fuzz suite of damaged inputs through the command line (issues 31 and 24) and the server.

Every case is a damaged file (or folder) given to ``simsearch-wsi info``, ``simsearch-wsi
suggest ... --weights random`` (as the image, the weights or the GeoJSON prototypes) or
``simsearch-wsi quantify --manifest``. Each must end with exit code 1 and exactly one line on
stderr that names the input, with no traceback and no asyncio / logging noise, must leave every
input byte-identical, and must leave no output and no half-written temporary file. A few
damaged-but-usable inputs (a Z stack, NaN pixels) must instead succeed. The damaged images and
prototypes also go through the HTTP server (``test_server_refuses_damaged_inputs``): a 4xx with a
one-line JSON error, nothing half-written in its cache.

The cases run in **one** child interpreter per part (``python -c`` calling ``simsearch_wsi.cli``'s
main per case with stdout/stderr redirected): stderr there is the real stderr a user sees, with no
pytest logging capture in between, and torch is imported once. The default part runs every case
at least once; ``-m slow`` adds ``suggest`` on the images ``info`` already refuses, ``suggest`` on
the usable inputs (:func:`_is_slow`). Grow the suite by adding a case to
``CASES`` (or ``USABLE``): a builder that writes the input under a folder and returns its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

Builder = Callable[[Path], Path]

# The prototype every suggest run uses: a 32 x 32 px box, inside every image of the suite.
_PROTOTYPE = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[8, 8], [40, 8], [40, 40], [8, 40], [8, 8]]],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "A", "color": [200, 0, 0]},
            },
        }
    ],
}


# --- builders -----------------------------------------------------------------------------------
def _rgb(size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _tiled_tiff(path: Path, size: int = 64) -> Path:
    tifffile.imwrite(path, _rgb(size), tile=(16, 16), compression="zlib")
    return path


def zero_byte_file(d: Path) -> Path:
    (d / "empty.tif").write_bytes(b"")
    return d / "empty.tif"


def unknown_bytes(d: Path) -> Path:
    (d / "notes.svs").write_bytes(b"this is not a slide\n" * 20)
    return d / "notes.svs"


def truncated_tiff(d: Path) -> Path:
    full = _tiled_tiff(d / "full.tif")
    data = full.read_bytes()
    full.unlink()
    (d / "truncated.tif").write_bytes(data[: len(data) // 2])
    return d / "truncated.tif"


def garbled_tiff_header(d: Path) -> Path:
    """Random bytes over the first IFD (tags, offsets): fails when the file is opened."""
    path = _tiled_tiff(d / "garbled_header.tif")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        ifd = tf.pages[0].offset  # type: ignore[union-attr]
    rng = np.random.default_rng(31)
    data[ifd + 2 : ifd + 120] = rng.integers(0, 256, 118, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def garbled_tiff_pixels(d: Path) -> Path:
    """Random bytes over the compressed tiles: opens, fails when its pixels are decoded."""
    path = _tiled_tiff(d / "garbled_pixels.tif")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        start = int(min(page.dataoffsets))  # type: ignore[union-attr]
        end = int(max(o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)))  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(32)
    data[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def many_corrupt_tiles(d: Path) -> Path:
    """Every third tile of a 256 x 256 tiled TIFF overwritten: zarr reads them concurrently."""
    path = d / "corrupt_tiles.tif"
    tifffile.imwrite(path, _rgb(256), tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    for i, (offset, count) in enumerate(spans):
        if i % 3 == 0:
            data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return path


def zero_size_tiff(d: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile: writing zero-size array
        tifffile.imwrite(d / "zero.tif", np.zeros((0, 64), np.uint8))
    return d / "zero.tif"


def truncated_png(d: Path) -> Path:
    from PIL import Image

    Image.fromarray(_rgb()).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "full.png").unlink()
    (d / "cut.png").write_bytes(data[:300])
    return d / "cut.png"


def all_nan_float_tiff(d: Path) -> Path:
    tifffile.imwrite(d / "all_nan.tif", np.full((64, 64), np.nan, np.float32))
    return d / "all_nan.tif"


def all_inf_float_rgb(d: Path) -> Path:
    arr = np.full((64, 64, 3), np.inf, np.float32)
    arr[::2] = -np.inf
    tifffile.imwrite(d / "all_inf.tif", arr, photometric="rgb")
    return d / "all_inf.tif"


_AXES = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x"}]


def _zarr(
    d: Path,
    name: str,
    attrs: Any,
    *,
    shape: tuple[int, ...] = (1, 64, 64),
    dtype: str = "uint8",
) -> Path:
    import zarr

    path = d / name
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    array = group.create_array("0", shape=shape, dtype=dtype, chunks=(1, 32, 32))
    if 0 not in shape and dtype == "uint8":
        array[:] = 128
    group.attrs["multiscales"] = attrs
    return path


def _image_attrs(**changes: Any) -> list[dict[str, Any]]:
    ms: dict[str, Any] = {"version": "0.4", "axes": _AXES, "datasets": [{"path": "0"}]}
    ms.update(changes)
    return [ms]


def zarr_without_metadata(d: Path) -> Path:
    (d / "empty.zarr").mkdir()
    (d / "empty.zarr" / "README.txt").write_text("no zarr here\n")
    return d / "empty.zarr"


def zarr_attrs_not_json(d: Path) -> Path:
    path = _zarr(d, "not_json.zarr", _image_attrs())
    (path / ".zattrs").write_text('{"multiscales": [{"version": "0.4",')
    return path


def zarr_v3_metadata_not_json(d: Path) -> Path:
    (d / "v3.zarr").mkdir()
    (d / "v3.zarr" / "zarr.json").write_text("zarr_format: 3\n")
    return d / "v3.zarr"


def zero_size_zarr(d: Path) -> Path:
    return _zarr(d, "zero.zarr", _image_attrs(), shape=(1, 0, 64))


def multiscales_object(d: Path) -> Path:
    return _zarr(d, "ms_object.zarr", _image_attrs()[0])


def multiscales_strings(d: Path) -> Path:
    return _zarr(d, "ms_strings.zarr", ["0", "1"])


def axes_do_not_match_array(d: Path) -> Path:
    return _zarr(d, "axes.zarr", _image_attrs(axes=_AXES[1:]))


def dataset_without_path(d: Path) -> Path:
    return _zarr(d, "no_path.zarr", _image_attrs(datasets=[{"coordinateTransformations": []}]))


def dataset_array_missing(d: Path) -> Path:
    return _zarr(d, "missing.zarr", _image_attrs(datasets=[{"path": "0"}, {"path": "1"}]))


def dataset_of_strings(d: Path) -> Path:
    return _zarr(d, "strings.zarr", _image_attrs(), dtype="<U8")


def scale_of_strings(d: Path) -> Path:
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": "1,1,1"}]}]
    path = _zarr(d, "scale.zarr", _image_attrs(datasets=datasets))
    # a scale that is a string is skipped (no pixel size); one of strings is an error
    datasets[0]["coordinateTransformations"] = [{"type": "scale", "scale": ["a", "b", "c"]}]
    (path / ".zattrs").write_text(json.dumps({"multiscales": _image_attrs(datasets=datasets)}))
    return path


def weights_not_weights(d: Path) -> Path:
    """A pickle torch only loads with weights_only=False (its 4-line advice before issue 31)."""
    import argparse

    import torch

    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1)}, d / "checkpoint.pth")
    return d / "checkpoint.pth"


def weights_text_file(d: Path) -> Path:
    (d / "weights.pth").write_text("not a checkpoint\n")
    return d / "weights.pth"


def ome_tiff_z_stack(d: Path) -> Path:
    data = np.stack([_rgb(seed=z) for z in range(3)])
    tifffile.imwrite(
        d / "stack.ome.tif", data, ome=True, photometric="rgb", metadata={"axes": "ZYXS"}
    )
    return d / "stack.ome.tif"


def ome_tiff_time_series(d: Path) -> Path:
    data = np.random.default_rng(3).integers(0, 4000, (2, 2, 2, 64, 64), dtype=np.uint16)
    tifffile.imwrite(d / "tzc.ome.tif", data, ome=True, metadata={"axes": "TZCYX"})
    return d / "tzc.ome.tif"


def float_with_nan_and_inf(d: Path) -> Path:
    arr = np.random.default_rng(4).random((64, 64, 2)).astype(np.float32)
    arr[4:12, :, 0] = np.nan
    arr[20:24, :, 1] = np.inf
    arr[30:33, 10:50, :] = -np.inf
    tifffile.imwrite(d / "nan.tif", arr, planarconfig="contig")
    return d / "nan.tif"


def good_tiff(d: Path) -> Path:
    return _tiled_tiff(d / "good.tif")


# --- issue 24: pyramids whose structure lies, tiles without data, damaged chunks ---------------
def _jpeg_pyramid(path: Path) -> Path:
    """A 256 x 256 JPEG-tiled pyramid (tiles 64 px, levels 256/128/64 in SubIFDs)."""
    from simsearch_wsi.io.tiff_writer import write_pyramidal_tiff

    return write_pyramidal_tiff(
        path, _rgb(256, seed=24), mpp=0.5, n_levels=3, tile_size=64, compression="jpeg"
    )


def _cut(path: Path, n_bytes: int, name: str) -> Path:
    data = path.read_bytes()
    path.unlink()
    (path.parent / name).write_bytes(data[:n_bytes])
    return path.parent / name


def pyramid_cut_to_20kb(d: Path) -> Path:
    """The issue's report: `info` on a pyramid cut to its first 20 kB printed every level."""
    return _cut(_jpeg_pyramid(d / "full.tif"), 20_000, "first20kb.tif")


def pyramid_levels_cut_off(d: Path) -> Path:
    """Level 0 whole, cut inside the IFD of level 1: tifffile dropped the levels it could not
    read and the file opened as a one-level image."""
    path = _jpeg_pyramid(d / "full.tif")
    with tifffile.TiffFile(path) as tf:
        ifd = tf.series[0].levels[1].pages[0].offset  # type: ignore[union-attr]
    return _cut(path, ifd + 8, "levels_cut.tif")


def _overwrite_tag(path: Path, tag: str, change: Callable[[list[int]], Any]) -> Path:
    with tifffile.TiffFile(path, mode="r+") as tf:
        values = tf.pages[0].tags[tag].value  # type: ignore[union-attr]
        tf.pages[0].tags[tag].overwrite(
            change(list(values) if isinstance(values, tuple) else values)
        )  # type: ignore[union-attr]
    return path


def tile_without_data(d: Path) -> Path:
    """A tile listed with byte count 0: read as a silent black tile before issue 24."""

    def drop(counts: list[int]) -> list[int]:
        counts[1] = 0
        return counts

    return _overwrite_tag(_jpeg_pyramid(d / "sparse.tif"), "TileByteCounts", drop)


def tile_offset_past_end(d: Path) -> Path:
    def move(offsets: list[int]) -> list[int]:
        offsets[2] = 10**9
        return offsets

    return _overwrite_tag(_jpeg_pyramid(d / "far.tif"), "TileOffsets", move)


def size_needs_more_tiles(d: Path) -> Path:
    """ImageWidth 2**31 - 1 with the 16 tiles of a 64 px wide image."""
    return _overwrite_tag(_tiled_tiff(d / "wide.tif"), "ImageWidth", lambda _: 2**31 - 1)


def garbled_jpeg_tile(d: Path) -> Path:
    """Random bytes inside one JPEG tile of level 0: the error names the tile."""
    path = _jpeg_pyramid(d / "jpeg_tile.tif")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offset, count = int(page.dataoffsets[5]), int(page.databytecounts[5])  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    mid = offset + count // 2
    data[mid : mid + 400] = np.random.default_rng(24).integers(0, 256, 400, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def complex_tiff(d: Path) -> Path:
    tifffile.imwrite(d / "complex.tif", np.zeros((64, 64), np.complex64))
    return d / "complex.tif"


def unknown_compression(d: Path) -> Path:
    return _overwrite_tag(_tiled_tiff(d / "codec.tif"), "Compression", lambda _: 60000)


def _edit_zarray(d: Path, name: str, **changes: Any) -> Path:
    path = _zarr(d, name, _image_attrs())
    meta = json.loads((path / "0" / ".zarray").read_text())
    meta.update(changes)
    (path / "0" / ".zarray").write_text(json.dumps(meta))
    return path


def zarray_not_json(d: Path) -> Path:
    path = _zarr(d, "zarray.zarr", _image_attrs())
    (path / "0" / ".zarray").write_text('{"shape": [1, 64')
    return path


def zarray_negative_shape(d: Path) -> Path:
    return _edit_zarray(d, "negative.zarr", shape=[1, -64, 64])


def zarray_zero_chunks(d: Path) -> Path:
    return _edit_zarray(d, "chunks0.zarr", chunks=[1, 0, 32])


def zarray_unknown_dtype(d: Path) -> Path:
    return _edit_zarray(d, "dtype.zarr", dtype="<q9")


def zarray_unknown_codec(d: Path) -> Path:
    return _edit_zarray(d, "codec.zarr", compressor={"id": "no-such-codec"})


def dataset_path_escapes(d: Path) -> Path:
    return _zarr(d, "escape.zarr", _image_attrs(datasets=[{"path": "../../.."}]))


def zarr_of_complex(d: Path) -> Path:
    return _zarr(d, "complex.zarr", _image_attrs(), dtype="complex64")


def _random_zarr(d: Path, name: str) -> Path:
    import zarr

    path = _zarr(d, name, _image_attrs())
    zarr.open_array(str(path / "0"), mode="r+")[:] = _rgb(64)[..., 0][None]
    return path


def zarr_chunk_truncated(d: Path) -> Path:
    """A Blosc chunk cut to 20 bytes: numcodecs decoded it into noise without an error."""
    path = _random_zarr(d, "chunk_cut.zarr")
    chunk = path / "0" / "0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    return path


def zarr_chunks_garbled(d: Path) -> Path:
    path = _random_zarr(d, "chunk_garbage.zarr")
    for key in ("0.0.0", "0.0.1", "0.1.1"):
        (path / "0" / key).write_bytes(b"not a chunk " * 6)
    return path


# GeoJSON prototypes (suggest on a good image with these as --annotations)
def _features(d: Path, doc: Any, name: str = "prototypes_bad.geojson") -> Path:
    (d / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return d / name


def _one(geometry: Any, classification: Any = None) -> dict[str, Any]:
    props = {"objectType": "annotation", "classification": classification or {"name": "A"}}
    return {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": geometry, "properties": props}],
    }


def _poly(ring: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [ring]}


_BOX = [[8, 8], [40, 8], [40, 40], [8, 40], [8, 8]]


def geojson_binary(d: Path) -> Path:
    (d / "binary.geojson").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" * 8)
    return d / "binary.geojson"


def geojson_not_features(d: Path) -> Path:
    return _features(d, {"type": "Polygon", "coordinates": [_BOX]})


def geojson_nan_coordinates(d: Path) -> Path:
    text = json.dumps(_one(_poly([[-1.0, 8], [40, 8], [40, 40], [8, 40], [-1.0, 8]])))
    return _features(d, text.replace("-1.0", "NaN"))


def geojson_huge_coordinates(d: Path) -> Path:
    big = 1e15
    return _features(
        d, _one(_poly([[-big, -big], [big, -big], [big, big], [-big, big], [-big, -big]]))
    )


def geojson_overflowing_coordinates(d: Path) -> Path:
    return _features(d, _one(_poly([[1e300, 8], [1e308, 8], [1e308, 1e300], [1e300, 8]])))


def geojson_two_point_polygon(d: Path) -> Path:
    return _features(d, _one(_poly([[8, 8], [40, 8]])))


def geojson_zero_area(d: Path) -> Path:
    return _features(d, _one(_poly([[8, 8], [40, 8], [40, 8], [8, 8], [8, 8]])))


def geojson_outside_image(d: Path) -> Path:
    return _features(d, _one(_poly([[-40, -40], [-8, -40], [-8, -8], [-40, -8], [-40, -40]])))


def geojson_class_not_text(d: Path) -> Path:
    return _features(d, _one(_poly(_BOX), classification={"name": 5}))


def geojson_class_empty(d: Path) -> Path:
    return _features(d, _one(_poly(_BOX), classification={"name": ""}))


def geojson_properties_list(d: Path) -> Path:
    doc = _one(_poly(_BOX))
    doc["features"][0]["properties"] = [1, 2]
    return _features(d, doc)


# --threshold naming a class the prototypes do not have (a good GeoJSON)
def geojson_good(d: Path) -> Path:
    return _features(d, _PROTOTYPE, "prototypes_ok.geojson")


# CSV manifests (quantify --manifest; cohort reads them the same way)
def _manifest(d: Path, data: bytes) -> Path:
    _tiled_tiff(d / "slide.tif")
    (d / "manifest.csv").write_bytes(data)
    return d / "manifest.csv"


def manifest_binary(d: Path) -> Path:
    return _manifest(d, b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage")


def manifest_latin1(d: Path) -> Path:
    return _manifest(d, "path,stain\nslide.tif,H\xe9E\n".encode("latin-1"))


def manifest_utf16(d: Path) -> Path:
    return _manifest(d, "path\nslide.tif\n".encode("utf-16"))


def manifest_huge_field(d: Path) -> Path:
    return _manifest(d, b"path,note\nslide.tif," + b"x" * 200_000 + b"\n")


def manifest_without_path_column(d: Path) -> Path:
    return _manifest(d, b"image,stain\nslide.tif,HE\n")


def manifest_empty(d: Path) -> Path:
    return _manifest(d, b"")


def manifest_header_only(d: Path) -> Path:
    return _manifest(d, b"path,stain\n")


def manifest_nul_in_path(d: Path) -> Path:
    return _manifest(d, b"path,stain\nslide.tif\x00,HE\n")


def manifest_missing_image(d: Path) -> Path:
    return _manifest(d, b"path\nno_such_slide.tif\n")


# --- cases --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A damaged input, the commands that must refuse it, and a part of the expected message.

    ``role`` says where the input goes: ``image`` (the positional image of info/suggest),
    ``weights`` (``suggest --weights PATH`` on a good image), ``annotations`` (``suggest
    --annotations PATH`` on a good image) or ``manifest`` (``quantify --manifest PATH``).
    ``extra`` is appended to the command line. ``subject_in_message`` is False where the message
    names an argument, not the file.
    """

    name: str
    build: Builder
    commands: tuple[str, ...]
    message: str
    role: str = "image"
    extra: tuple[str, ...] = ()
    subject_in_message: bool = True


BOTH = ("info", "suggest")
SUGGEST = ("suggest",)
QUANTIFY = ("quantify",)

CASES = [
    Case("zero-byte-file", zero_byte_file, BOTH, "empty or truncated"),
    Case("unknown-bytes", unknown_bytes, BOTH, "unrecognised file format"),
    Case("truncated-tiff", truncated_tiff, BOTH, "truncated or corrupt"),
    Case("garbled-tiff-header", garbled_tiff_header, BOTH, "corrupt"),
    Case("garbled-tiff-pixels", garbled_tiff_pixels, SUGGEST, "could not decode"),
    Case("many-corrupt-tiles", many_corrupt_tiles, SUGGEST, "could not decode level 0"),
    Case("zero-size-tiff", zero_size_tiff, BOTH, "TIFF image has no pixels"),
    Case("truncated-png", truncated_png, BOTH, "cut.png"),
    Case("all-nan-float", all_nan_float_tiff, SUGGEST, "no finite pixel value"),
    Case("all-inf-float-rgb", all_inf_float_rgb, SUGGEST, "no finite pixel value"),
    Case("zarr-without-metadata", zarr_without_metadata, BOTH, "not an OME-Zarr image"),
    Case("zattrs-not-json", zarr_attrs_not_json, BOTH, ".zattrs is not valid JSON"),
    Case("zarr-json-not-json", zarr_v3_metadata_not_json, BOTH, "zarr.json is not valid JSON"),
    Case("zero-size-zarr", zero_size_zarr, BOTH, "image has no pixels"),
    Case("multiscales-object", multiscales_object, BOTH, "must be a list of objects"),
    Case("multiscales-strings", multiscales_strings, BOTH, "must be a list of objects"),
    Case("axes-vs-array", axes_do_not_match_array, BOTH, "name 2 dimensions but dataset"),
    Case("dataset-without-path", dataset_without_path, BOTH, "dataset 0 has no 'path'"),
    Case("dataset-array-missing", dataset_array_missing, BOTH, "dataset '1' is missing"),
    Case("dataset-of-strings", dataset_of_strings, BOTH, "not pixel intensities"),
    Case("scale-of-strings", scale_of_strings, BOTH, "is not a list of numbers"),
    Case("weights-pickle", weights_not_weights, SUGGEST, "not a PyTorch weights file", "weights"),
    Case("weights-text", weights_text_file, SUGGEST, "not a PyTorch weights file", "weights"),
    # issue 24
    Case("pyramid-cut-to-20kB", pyramid_cut_to_20kb, BOTH, "file is truncated"),
    Case("pyramid-levels-cut-off", pyramid_levels_cut_off, BOTH, "TIFF structure is damaged"),
    # a sparse TIFF opens (info works); reading the tile without data is refused, naming it
    Case(
        "tile-without-data",
        tile_without_data,
        SUGGEST,
        "tile (row 0, column 1) of level 0 at x=64..128, y=0..64 has no data",
    ),
    Case("tile-offset-past-end", tile_offset_past_end, BOTH, "tile or strip 2 of 16 lies past"),
    Case("size-needs-more-tiles", size_needs_more_tiles, BOTH, "which needs 536870912 tiles"),
    Case("garbled-jpeg-tile", garbled_jpeg_tile, SUGGEST, "tile (row 1, column 1) of level 0"),
    Case("complex-tiff", complex_tiff, BOTH, "pixel type complex64 is not supported"),
    Case("unknown-compression", unknown_compression, SUGGEST, "60000 is not a known COMPRESSION"),
    Case("zarray-not-json", zarray_not_json, BOTH, "dataset '0' cannot be opened"),
    Case("zarray-negative-shape", zarray_negative_shape, BOTH, "dataset '0' cannot be opened"),
    Case("zarray-zero-chunks", zarray_zero_chunks, BOTH, "every chunk side must be positive"),
    Case("zarray-unknown-dtype", zarray_unknown_dtype, BOTH, "dataset '0' cannot be opened"),
    Case("zarray-unknown-codec", zarray_unknown_codec, BOTH, "dataset '0' cannot be opened"),
    Case("dataset-path-escapes", dataset_path_escapes, BOTH, "dataset '../../..' cannot be"),
    Case("zarr-of-complex", zarr_of_complex, BOTH, "not pixel intensities"),
    Case("zarr-chunk-truncated", zarr_chunk_truncated, SUGGEST, "its Blosc header says"),
    Case("zarr-chunks-garbled", zarr_chunks_garbled, SUGGEST, "could not read level 0"),
    Case("geojson-binary", geojson_binary, SUGGEST, "not valid JSON", "annotations"),
    Case(
        "geojson-not-features", geojson_not_features, SUGGEST, "not QuPath GeoJSON", "annotations"
    ),
    Case("geojson-nan", geojson_nan_coordinates, SUGGEST, "no prototypes found", "annotations"),
    Case("geojson-huge", geojson_huge_coordinates, SUGGEST, "beyond any image", "annotations"),
    Case(
        "geojson-overflow",
        geojson_overflowing_coordinates,
        SUGGEST,
        "no prototypes found",
        "annotations",
    ),
    Case("geojson-2-points", geojson_two_point_polygon, SUGGEST, "no prototypes", "annotations"),
    Case("geojson-zero-area", geojson_zero_area, SUGGEST, "has zero area", "annotations"),
    Case("geojson-outside", geojson_outside_image, SUGGEST, "not inside the image", "annotations"),
    Case("geojson-class-5", geojson_class_not_text, SUGGEST, "no prototypes", "annotations"),
    Case("geojson-class-empty", geojson_class_empty, SUGGEST, "no prototypes", "annotations"),
    Case("geojson-props-list", geojson_properties_list, SUGGEST, "no prototypes", "annotations"),
    Case(
        "threshold-unknown-class",
        geojson_good,
        SUGGEST,
        "threshold given for unknown class(es) ['Tumour']",
        "annotations",
        extra=("--threshold", "Tumour=0.5"),
        subject_in_message=False,
    ),
    Case("manifest-binary", manifest_binary, QUANTIFY, "is not UTF-8 text", "manifest"),
    Case("manifest-latin1", manifest_latin1, QUANTIFY, "is not UTF-8 text", "manifest"),
    Case("manifest-utf16", manifest_utf16, QUANTIFY, "is not UTF-8 text", "manifest"),
    Case("manifest-huge-field", manifest_huge_field, QUANTIFY, "not a readable CSV", "manifest"),
    Case("manifest-no-path", manifest_without_path_column, QUANTIFY, "no 'path'", "manifest"),
    Case("manifest-empty", manifest_empty, QUANTIFY, "no 'path' column", "manifest"),
    Case("manifest-header-only", manifest_header_only, QUANTIFY, "lists no images", "manifest"),
    Case("manifest-nul-path", manifest_nul_in_path, QUANTIFY, "NUL character", "manifest"),
    Case(
        "manifest-missing-image",
        manifest_missing_image,
        QUANTIFY,
        "no_such_slide.tif: no such image",
        "manifest",
        subject_in_message=False,
    ),
]

_LAST_RUN = "many-corrupt-tiles/suggest"

USABLE = [
    ("ome-tiff-z-stack", ome_tiff_z_stack, BOTH),
    ("ome-tiff-t-z-c", ome_tiff_time_series, ("info",)),
    ("float-nan-inf", float_with_nan_and_inf, BOTH),
    ("sparse-tiff", tile_without_data, ("info",)),  # valid for libtiff/OpenSlide: opens
]


# --- the child interpreter ----------------------------------------------------------------------
_DRIVER = r"""
import contextlib, io, json, sys, time, traceback
from simsearch_wsi.cli.main import main

runs = json.loads(open(sys.argv[1]).read())
results = {}
for run in runs:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(run["argv"])
        except BaseException:  # a crash: what the user would see
            traceback.print_exc()
            code = "crash"
    seconds = time.perf_counter() - t0
    results[run["id"]] = {"code": code, "stderr": err.getvalue(), "seconds": seconds}
with open(sys.argv[2], "w") as fh:
    json.dump(results, fh)
"""


def _messages(stderr: str) -> list[str]:
    """stderr's lines without the rich progress display the command line leaves on stderr by
    design: its rows (``embedding tiles ━━━ 1/1``) and the blank line of an empty display."""
    return [line for line in stderr.splitlines() if line.strip() and "\u2501" not in line]


def _tree_digest(path: Path) -> str:
    """sha256 over every file below ``path`` (or of ``path``), names and bytes."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@dataclass
class Run:
    id: str
    argv: list[str]
    inputs: list[Path]
    subject: Path
    out: Path | None
    argv_dir: Path  # the case's folder: inputs, outputs, cache


def _argv(
    command: str, image: Path, d: Path, *, weights: str, annotations: Path
) -> tuple[list[str], Path | None]:
    if command == "info":
        return ["info", str(image)], None
    if command == "quantify":  # image is the manifest here
        out = d / "quantify-out"
        return ["quantify", "--manifest", str(image), "--out", str(out), "--mpp", "0.5"], out
    out = d / f"suggest-{command}.geojson"
    return (
        [
            "suggest",
            str(image),
            "--annotations",
            str(annotations),
            "--out",
            str(out),
            "--weights",
            weights,
            "--cache",
            str(d / "cache"),
            "--tile-size",
            "256",
        ],
        out,
    )


def _written(out: Path | None) -> bool:
    """Whether a command left its output: the file, or a folder with anything in it."""
    if out is None or not out.exists():
        return False
    return not out.is_dir() or any(out.iterdir())


def _is_slow(case_name: str, command: str) -> bool:
    """The runs left to ``-m slow``: ``suggest`` on an image ``info`` already refuses (the same
    open, about 0.4 s each for the trunk ``suggest`` builds first) and ``suggest`` on the usable
    odd inputs (a real embedding and search, seconds each). Every other run, ``info`` of those
    images included, is in the default part."""
    if command != "suggest":
        return False
    case = next((c for c in CASES if c.name == case_name), None)
    return case is None or "info" in case.commands


def _run_suite(root: Path, *, slow: bool) -> dict[str, Any]:
    """Build the inputs of the runs selected by ``slow`` (:func:`_is_slow`), digest them, run
    every command on them in one child, digest again."""
    runs: list[Run] = []
    items = [(c.name, c.build, c.commands, c.role, c.extra) for c in CASES] + [
        (name, build, commands, "image", ()) for name, build, commands in USABLE
    ]
    for name, build, commands, role, extra in items:
        for command in commands:
            if _is_slow(name, command) != slow:
                continue
            d = root / f"{name}-{command}"
            d.mkdir()
            annotations = d / "prototypes.geojson"
            annotations.write_text(json.dumps(_PROTOTYPE))
            subject = build(d)
            image, weights = subject, "random"
            if role == "weights":
                image, weights = good_tiff(d), str(subject)
            elif role == "annotations":
                image, annotations = good_tiff(d), subject
            argv, out = _argv(command, image, d, weights=weights, annotations=annotations)
            inputs = sorted({subject, image, annotations, d / "prototypes.geojson"})
            if role == "manifest":
                inputs.append(d / "slide.tif")
            runs.append(Run(f"{name}/{command}", argv + list(extra), inputs, subject, out, d))
    # The child exits right after its last run, as the command line does: tile reads still
    # pending then were reported as hundreds of "Task was destroyed but it is pending!" on
    # stderr (test_child_interpreter_left_no_noise). Reads that finish after their read has
    # failed are marked retrieved by asyncio.gather, so only an exit shows them.
    runs.sort(key=lambda r: r.id == _LAST_RUN)
    before = {r.id: [_tree_digest(p) for p in r.inputs] for r in runs}
    spec = root / "runs.json"
    spec.write_text(json.dumps([{"id": r.id, "argv": r.argv} for r in runs]))
    result_file = root / "results.json"
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(spec), str(result_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "SIMSEARCH_WSI_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results: dict[str, Any] = json.loads(result_file.read_text())
    for r in runs:
        results[r.id].update(
            unchanged=before[r.id] == [_tree_digest(p) for p in r.inputs],
            subject=str(r.subject),
            out_written=_written(r.out),
            leftovers=sorted(
                str(f)
                for f in r.argv_dir.rglob("*")
                if f.name.endswith((".tmp", ".old")) or ".tmp" in f.name
            ),
        )
    results["__child_stderr__"] = proc.stderr
    return results


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default part of the suite, run in one child."""
    return _run_suite(tmp_path_factory.mktemp("fuzz"), slow=False)


@pytest.fixture(scope="module")
def fuzz_results_slow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The rest (:func:`_is_slow`), run in another child."""
    return _run_suite(tmp_path_factory.mktemp("fuzz_slow"), slow=True)


def _results(request: pytest.FixtureRequest, case_name: str, command: str) -> dict[str, Any]:
    slow = _is_slow(case_name, command)
    results: dict[str, Any] = request.getfixturevalue(
        "fuzz_results_slow" if slow else "fuzz_results"
    )
    return results


def _param(case_name: str, command: str, *values: Any) -> Any:
    marks = [pytest.mark.slow] if _is_slow(case_name, command) else []
    return pytest.param(*values, marks=marks, id=f"{case_name}/{command}")


@pytest.mark.parametrize(
    ("case", "command"), [_param(c.name, cmd, c, cmd) for c in CASES for cmd in c.commands]
)
def test_damaged_input_is_one_line_and_untouched(
    request: pytest.FixtureRequest, case: Case, command: str
) -> None:
    r = _results(request, case.name, command)[f"{case.name}/{command}"]
    err: str = r["stderr"]
    assert "Traceback" not in err, err
    assert r["code"] == 1, err
    lines = _messages(err)
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("simsearch-wsi: error: "), err
    assert r["subject"] in lines[0] or not case.subject_in_message, err
    assert case.message in lines[0], err
    assert "(rerun with --debug" not in lines[0], err  # a typed error, not a stray OSError
    assert r["unchanged"], "an input file changed"
    assert not r["out_written"]
    assert r["leftovers"] == []  # no half-written temporary file or folder


@pytest.mark.parametrize(
    ("name", "command"), [_param(n, cmd, n, cmd) for n, _, cmds in USABLE for cmd in cmds]
)
def test_usable_odd_input_succeeds_and_is_untouched(
    request: pytest.FixtureRequest, name: str, command: str
) -> None:
    """A Z/T stack (first plane used), a float image with NaN/inf pixels (background) and a
    sparse TIFF (info: metadata only) work."""
    r = _results(request, name, command)[f"{name}/{command}"]
    assert r["code"] == 0, r["stderr"]
    assert _messages(r["stderr"]) == []
    assert r["unchanged"]
    assert r["out_written"] == (command == "suggest")


@pytest.mark.parametrize(
    "part", ["fuzz_results", pytest.param("fuzz_results_slow", marks=pytest.mark.slow)]
)
def test_child_interpreter_left_no_noise(request: pytest.FixtureRequest, part: str) -> None:
    """Nothing on stderr outside the commands: no "Task was destroyed but it is pending!" at
    exit, no logging from tifffile or asyncio."""
    assert request.getfixturevalue(part)["__child_stderr__"] == ""


# --- the same inputs through the HTTP server ----------------------------------------------------
_SERVER_IMAGES: list[Builder] = [
    zero_byte_file,
    unknown_bytes,
    truncated_tiff,
    pyramid_cut_to_20kb,
    pyramid_levels_cut_off,
    tile_without_data,
    tile_offset_past_end,
    size_needs_more_tiles,
    garbled_jpeg_tile,
    zero_size_tiff,
    complex_tiff,
    zarr_attrs_not_json,
    zarray_not_json,
    zarray_zero_chunks,
    zarr_chunk_truncated,
]
_SERVER_PROTOTYPES: list[Builder] = [
    geojson_not_features,
    geojson_nan_coordinates,
    geojson_huge_coordinates,
    geojson_overflowing_coordinates,
    geojson_two_point_polygon,
    geojson_zero_area,
    geojson_outside_image,
    geojson_class_not_text,
    geojson_class_empty,
    geojson_properties_list,
]


def test_server_refuses_damaged_inputs(tmp_path: Path) -> None:
    """``POST /suggest`` with each damaged image (good prototypes) and each damaged prototype
    document (good image): a 4xx with the one-line JSON error naming the image, inputs
    untouched, and no half-written entry in the feature cache. An embed job on an image with a
    damaged tile fails with the tile named."""

    from starlette.exceptions import StarletteDeprecationWarning

    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.search.engine import SearchSettings, SimSearch
    from simsearch_wsi.server import create_app

    with warnings.catch_warnings():  # starlette prefers httpx2; httpx works the same here
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from fastapi.testclient import TestClient

    root = tmp_path.resolve()
    trunk, spec, info = build_trunk(weights="random", seed=0)
    search = SimSearch(
        FeatureExtractor(trunk, spec, info, autocast=False),
        FeatureCache(root / "cache"),
        settings=SearchSettings(tile_size=256),
    )
    requests: list[tuple[str, Path, dict[str, Any]]] = []
    for build in _SERVER_IMAGES:
        d = root / f"image-{build.__name__}"
        d.mkdir()
        image = build(d)
        requests.append((build.__name__, image, {"image": str(image), "annotations": _PROTOTYPE}))
    for build in _SERVER_PROTOTYPES:
        d = root / f"prototypes-{build.__name__}"
        d.mkdir()
        image, doc = good_tiff(d), build(d)
        # NaN is not JSON: send the file's text as the body, as a client with NaN would
        body = f'{{"image": {json.dumps(str(image))}, "annotations": {doc.read_text()}}}'
        requests.append((build.__name__, image, {"__body__": body}))
    before = {name: _tree_digest(path.parent) for name, path, _ in requests}
    api = "/api/v1"
    with TestClient(create_app(search, allowed_roots=[root]), base_url="http://127.0.0.1") as c:
        for name, image, payload in requests:
            if "__body__" in payload:
                r = c.post(
                    f"{api}/suggest",
                    content=payload["__body__"].encode(),
                    headers={"content-type": "application/json"},
                )
            else:
                r = c.post(f"{api}/suggest", json=payload)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            body = r.json()
            assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
            message = body["error"]["message"]
            assert message and "\n" not in message and "Traceback" not in message, (name, body)
            if name in {b.__name__ for b in _SERVER_IMAGES}:
                assert image.name in message, (name, message)
        d = root / "embed-job"
        d.mkdir()
        damaged = garbled_jpeg_tile(d)
        r = c.post(f"{api}/jobs/embed", json={"images": [str(damaged)], "patch_size_px": 64})
        assert r.status_code == 202, r.text
        job: dict[str, Any] = {}
        for _ in range(600):
            job = c.get(f"{api}/jobs/{r.json()['job_id']}").json()
            if job["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.05)
        assert job["state"] == "failed", job
        assert "\n" not in job["error"] and "tile (row 1, column 1) of level 0" in job["error"]
    for name, path, _ in requests:
        assert _tree_digest(path.parent) == before[name], f"{name}: an input changed"
    leftovers = [f for f in root.rglob("*") if ".tmp" in f.name or f.name.endswith(".old")]
    assert leftovers == []


# --- bad pixels in the engine, without the command line -----------------------------------------
def test_tissue_detection_treats_non_finite_pixels_as_background() -> None:
    from simsearch_wsi.features.tissue import detect_foreground
    from simsearch_wsi.io import ArraySource

    fl = np.zeros((128, 128, 2), np.float32)
    fl[32:96, 32:96] = 5.0  # a bright square on black
    fl[:16] = np.nan
    fl[16:20] = np.inf
    fl[120:] = -np.inf
    mask = detect_foreground(ArraySource(fl, mpp=1.0), max_side_px=128, dilate_px=0).mask
    assert mask[40:90, 40:90].all() and not mask[:20].any() and not mask[120:].any()

    bf = np.ones((128, 128, 3), np.float32)  # white glass, float RGB
    bf[32:96, 32:96] = (0.6, 0.3, 0.5)
    bf[:16] = np.nan
    bf[16:20] = -np.inf
    src = ArraySource(bf, mpp=1.0, modality="brightfield")
    mask = detect_foreground(src, max_side_px=128, dilate_px=0).mask
    assert mask[40:90, 40:90].all() and not mask[:20].any()


def test_tissue_detection_on_a_downsampled_overview_ignores_nan() -> None:
    """The block mean of a large level skips NaN instead of spreading it over the block."""
    from simsearch_wsi.features.tissue import detect_foreground
    from simsearch_wsi.io import ArraySource

    fl = np.zeros((512, 512, 1), np.float32)
    fl[128:384, 128:384] = 10.0
    fl[::2, ::2] = np.nan  # a NaN in every 2x2 block
    mask = detect_foreground(ArraySource(fl, mpp=1.0), max_side_px=64, dilate_px=0).mask
    assert mask.shape == (64, 64) and mask[20:44, 20:44].all() and not mask[:12].any()


def test_tissue_detection_refuses_an_image_without_finite_pixels() -> None:
    from simsearch_wsi.core.errors import CorruptImageError
    from simsearch_wsi.features.tissue import detect_foreground
    from simsearch_wsi.io import ArraySource

    src = ArraySource(np.full((32, 32, 3), np.nan, np.float32), path="nan.tif")
    with pytest.raises(CorruptImageError, match=r"nan\.tif: every pixel .* NaN or infinite"):
        detect_foreground(src)


def test_normalization_clears_non_finite_values() -> None:
    from simsearch_wsi.features.preprocess import ChannelNormalization

    norm = ChannelNormalization(low=(0.0,), high=(2.0,), channel_names=("a",), method="fixed-range")
    x = np.array([[np.nan], [np.inf], [-np.inf], [1.0]], np.float32)
    np.testing.assert_array_equal(norm.apply(x).ravel(), [0.0, 1.0, 0.0, 0.5])


def test_display_of_an_overview_with_nan() -> None:
    from simsearch_wsi.features.tiling import display_rgb8

    a = np.random.default_rng(0).random((16, 16, 2)).astype(np.float32)
    a[:4] = np.nan
    a[4:6] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in cast"
        shown = display_rgb8(a, brightfield=False)
    assert shown.shape == (16, 16, 3) and shown[:4].max() == 0
