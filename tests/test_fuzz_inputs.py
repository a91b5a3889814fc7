"""Fuzz suite of damaged inputs through the command line (issue 31).

Every case is a damaged file (or folder) given to ``simsearch-wsi info`` and/or ``simsearch-wsi
suggest ... --weights random``. Each must end with exit code 1 and exactly one line on stderr that
names the input, with no traceback and no asyncio / logging noise, and must leave every input
byte-identical. A few damaged-but-usable inputs (a Z stack, NaN pixels) must instead succeed.

All cases run in **one** child interpreter (``python -c`` calling ``simsearch_wsi.cli``'s main per
case with stdout/stderr redirected): stderr there is the real stderr a user sees, with no pytest
logging capture in between, and torch is imported once. Grow the suite by adding a case to
``CASES`` (or ``USABLE``): a builder that writes the input under a folder and returns its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
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


# --- cases --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A damaged input, the commands that must refuse it, and a part of the expected message.

    ``role`` says where the input goes: ``image`` (the positional image of info/suggest) or
    ``weights`` (``suggest --weights PATH`` on a good image).
    """

    name: str
    build: Builder
    commands: tuple[str, ...]
    message: str
    role: str = "image"


BOTH = ("info", "suggest")
SUGGEST = ("suggest",)

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
]

_LAST_RUN = "many-corrupt-tiles/suggest"

USABLE = [
    ("ome-tiff-z-stack", ome_tiff_z_stack, BOTH),
    ("ome-tiff-t-z-c", ome_tiff_time_series, ("info",)),
    ("float-nan-inf", float_with_nan_and_inf, BOTH),
]


# --- the child interpreter ----------------------------------------------------------------------
_DRIVER = r"""
import contextlib, io, json, sys, traceback
from simsearch_wsi.cli.main import main

runs = json.loads(open(sys.argv[1]).read())
results = {}
for run in runs:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(run["argv"])
        except BaseException:  # a crash: what the user would see
            traceback.print_exc()
            code = "crash"
    results[run["id"]] = {"code": code, "stderr": err.getvalue()}
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


def _argv(command: str, image: Path, d: Path, weights: str) -> tuple[list[str], Path | None]:
    if command == "info":
        return ["info", str(image)], None
    out = d / f"suggest-{command}.geojson"
    return (
        [
            "suggest",
            str(image),
            "--annotations",
            str(d / "prototypes.geojson"),
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


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build every input, digest it, run every command on it in one child, digest again."""
    root = tmp_path_factory.mktemp("fuzz")
    runs: list[Run] = []
    items = [(c.name, c.build, c.commands, c.role) for c in CASES] + [
        (name, build, commands, "image") for name, build, commands in USABLE
    ]
    for name, build, commands, role in items:
        for command in commands:
            d = root / f"{name}-{command}"
            d.mkdir()
            (d / "prototypes.geojson").write_text(json.dumps(_PROTOTYPE))
            subject = build(d)
            image, weights = (
                (good_tiff(d), str(subject)) if role == "weights" else (subject, "random")
            )
            argv, out = _argv(command, image, d, weights)
            inputs = sorted({subject, image, d / "prototypes.geojson"})
            runs.append(Run(f"{name}/{command}", argv, inputs, subject, out))
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
            out_written=r.out is not None and r.out.exists(),
        )
    results["__child_stderr__"] = proc.stderr
    return results


@pytest.mark.parametrize(
    ("case", "command"),
    [(c, cmd) for c in CASES for cmd in c.commands],
    ids=[f"{c.name}/{cmd}" for c in CASES for cmd in c.commands],
)
def test_damaged_input_is_one_line_and_untouched(
    fuzz_results: dict[str, Any], case: Case, command: str
) -> None:
    r = fuzz_results[f"{case.name}/{command}"]
    err: str = r["stderr"]
    assert "Traceback" not in err, err
    assert r["code"] == 1, err
    lines = _messages(err)
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("simsearch-wsi: error: ") and r["subject"] in lines[0], err
    assert case.message in lines[0], err
    assert "(rerun with --debug" not in lines[0], err  # a typed error, not a stray OSError
    assert r["unchanged"], "an input file changed"
    assert not r["out_written"]


@pytest.mark.parametrize(
    ("name", "command"),
    [(n, cmd) for n, _, cmds in USABLE for cmd in cmds],
    ids=[f"{n}/{cmd}" for n, _, cmds in USABLE for cmd in cmds],
)
def test_usable_odd_input_succeeds_and_is_untouched(
    fuzz_results: dict[str, Any], name: str, command: str
) -> None:
    """A Z/T stack (first plane used) and a float image with NaN/inf pixels (background) work."""
    r = fuzz_results[f"{name}/{command}"]
    assert r["code"] == 0, r["stderr"]
    assert _messages(r["stderr"]) == []
    assert r["unchanged"]
    assert r["out_written"] == (command == "suggest")


def test_child_interpreter_left_no_noise(fuzz_results: dict[str, Any]) -> None:
    """Nothing on stderr outside the commands: no "Task was destroyed but it is pending!" at
    exit, no logging from tifffile or asyncio."""
    assert fuzz_results["__child_stderr__"] == ""


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
