"""open_image / read_region / open_plate on synthetic files of every supported format."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import tifffile
from PIL import Image

from simsearch_wsi.core.errors import (
    ConfigError,
    CorruptImageError,
    ImageNotFoundError,
    PlateError,
    RegionError,
    SimSearchError,
    UnsupportedFormatError,
)
from simsearch_wsi.io import ArraySource, ImageSource, is_plate, open_image, open_plate


def _pool2(arr: np.ndarray, factor: int) -> np.ndarray:
    h, w, c = arr.shape
    h2, w2 = h // factor, w // factor
    blocks = arr[: h2 * factor, : w2 * factor].reshape(h2, factor, w2, factor, c)
    pooled: np.ndarray = blocks.astype(np.float64).mean(axis=(1, 3))
    return pooled


# --- formats ------------------------------------------------------------------------------------
def test_pyramidal_tiff(synthetic_slide: Any) -> None:
    with open_image(synthetic_slide.path) as img:
        assert img.dimensions == (synthetic_slide.width, synthetic_slide.height)
        assert img.level_count == 3
        assert img.level_downsamples == pytest.approx((1.0, 2.0, 4.0), rel=1e-3)
        assert img.mpp == pytest.approx(synthetic_slide.mpp, rel=1e-3)
        assert img.channel_names == ("R", "G", "B") and img.modality == "brightfield"


@pytest.mark.parametrize("level", [1, 2])
def test_read_region_at_level_equals_downsampled_level0(synthetic_slide: Any, level: int) -> None:
    """Issue 2: read_region at level k equals the downsampled level-0 region within tolerance."""
    factor = 2**level
    with open_image(synthetic_slide.path) as img:
        x_l0, y_l0, size_lvl = 512, 384, 96
        low = img.read_region((x_l0, y_l0), level, (size_lvl, size_lvl)).astype(np.float64)
        full = img.read_region((x_l0, y_l0), 0, (size_lvl * factor, size_lvl * factor))
        pooled = _pool2(full, factor)
        assert low.shape == pooled.shape
        # compression and resampling differ slightly; a misaligned read would be far off
        assert np.abs(low - pooled).mean() < 4.0
        shifted = _pool2(
            img.read_region((x_l0 + 3 * factor, y_l0), 0, (size_lvl * factor, size_lvl * factor)),
            factor,
        )
        assert np.abs(low - shifted).mean() > np.abs(low - pooled).mean()


def test_fluorescence_ome_tiff(fluorescence_slide: Any) -> None:
    with open_image(fluorescence_slide.path) as img:
        assert img.format == "ome-tiff"
        assert img.channel_names == ("DAPI", "GFP", "Cy5")
        assert img.dtype == np.uint16 and img.bit_depth == 16
        assert img.modality == "fluorescence"
        assert img.mpp == pytest.approx(fluorescence_slide.mpp, rel=1e-3)
        assert img.level_count == 2
        region = img.read_region((0, 0), 0, (128, 96))
        assert region.shape == (96, 128, 3)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_image_versions(tmp_path: Path, version: Literal["0.4", "0.5"]) -> None:
    from simsearch_wsi.io.omezarr_writer import write_ome_zarr_image

    rng = np.random.default_rng(3)
    cyx = rng.integers(0, 4000, size=(2, 300, 200), dtype=np.uint16)
    path = write_ome_zarr_image(
        tmp_path / f"img{version}.zarr",
        cyx,
        mpp=0.325,
        channel_names=("DAPI", "GFP"),
        version=version,
        n_levels=2,
    )
    with open_image(path) as img:
        assert img.format == f"ome-zarr-{version}"
        assert img.dimensions == (200, 300)
        assert img.level_count == 2
        assert img.mpp == pytest.approx(0.325)
        assert img.channel_names == ("DAPI", "GFP")
        region = img.read_region((10, 20), 0, (50, 40))
        np.testing.assert_array_equal(region, np.moveaxis(cyx[:, 20:60, 10:60], 0, -1))


def test_plain_png_and_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    with open_image(tmp_path / "a.png") as png:
        assert png.format == "png" and png.mpp is None
        np.testing.assert_array_equal(png.read_region((0, 0), 0, (60, 40)), rgb)
    with open_image(tmp_path / "a.jpg", mpp=0.5) as jpg:
        assert jpg.format == "jpeg" and jpg.mpp == 0.5 and jpg.n_channels == 3
    with open_image(tmp_path / "gray.png") as gray:
        assert gray.n_channels == 1 and gray.modality == "fluorescence"


def test_plain_16bit_tiff(tmp_path: Path) -> None:
    arr = (np.arange(30 * 20, dtype=np.uint16).reshape(30, 20) * 50).astype(np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", arr)
    with open_image(tmp_path / "plain.tif") as img:
        assert img.dtype == np.uint16 and img.n_channels == 1
        np.testing.assert_array_equal(img.read_region((0, 0), 0, (20, 30))[..., 0], arr)


def test_plate_walks_every_field(synthetic_plate: Any) -> None:
    assert is_plate(synthetic_plate.path)
    plate = open_plate(synthetic_plate.path)
    assert plate.rows == ("A", "B") and plate.columns == ("1", "2", "3")
    assert len(plate.wells) == 6
    fields = list(plate.fields())
    assert len(fields) == 6 * 2  # two fields per well: not only the first one
    assert {f.field_index for f in fields} == {0, 1}
    ids = [f.image_id for f in fields]
    assert len(set(ids)) == len(ids)
    first, second = fields[0], fields[1]
    with first.open() as a, second.open() as b:
        assert a.channel_names == ("DAPI", "GFP")
        assert not np.array_equal(a.read_level(0), b.read_level(0))


# --- read_region semantics ----------------------------------------------------------------------
@pytest.fixture()
def ramp() -> ArraySource:
    arr = np.arange(64 * 48 * 2, dtype=np.uint16).reshape(48, 64, 2)
    return ArraySource(arr, n_levels=3, mpp=0.5)


def test_padding_is_deterministic(ramp: ArraySource) -> None:
    out = ramp.read_region((-10, -5), 0, (20, 10))
    assert out.shape == (10, 20, 2)
    assert np.all(out[:5] == 0) and np.all(out[:, :10] == 0)
    np.testing.assert_array_equal(out[5:, 10:], ramp.read_level(0)[:5, :10])
    again = ramp.read_region((-10, -5), 0, (20, 10), fill=7)
    assert np.all(again[:5] == 7)


def test_brightfield_pads_white() -> None:
    img = ArraySource(np.zeros((10, 10, 3), np.uint8))
    assert img.read_region((5, 5), 0, (10, 10))[9, 9].tolist() == [255, 255, 255]


def test_level_location_is_level0(ramp: ArraySource) -> None:
    lvl2 = ramp.read_level(2)
    np.testing.assert_array_equal(ramp.read_region((8, 4), 2, (3, 2)), lvl2[1:3, 2:5])


@pytest.mark.parametrize(
    ("location", "level", "size", "message"),
    [
        ((0, 0), 0, (0, 10), "must be two positive integers"),
        ((0, 0), 0, (-5, 10), "must be two positive integers"),
        ((0, 0), 3, (10, 10), "level 3 does not exist"),
        ((1000, 0), 0, (10, 10), "lies outside the image"),
        ((-20, -20), 0, (10, 10), "lies outside the image"),
    ],
)
def test_bad_regions(
    ramp: ArraySource, location: tuple[int, int], level: int, size: tuple[int, int], message: str
) -> None:
    with pytest.raises(RegionError, match=message):
        ramp.read_region(location, level, size)


def test_read_allocates_only_the_region(synthetic_slide: Any) -> None:
    """A read asks the backend for the in-bounds part of the region only."""
    with open_image(synthetic_slide.path) as img:
        seen: list[tuple[int, int, int, int, int]] = []
        original = img._read_window

        def spy(level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
            seen.append((level, x0, y0, x1, y1))
            return original(level, x0, y0, x1, y1)

        img._read_window = spy  # type: ignore[method-assign]
        img.read_region((-16, 100), 1, (64, 32))
        assert seen == [(1, 0, 50, 56, 82)]


def test_sources_pickle_by_path(synthetic_slide: Any, ramp: ArraySource) -> None:
    with open_image(synthetic_slide.path, mpp=0.4) as img:
        clone: ImageSource = pickle.loads(pickle.dumps(img))
        assert clone.mpp == 0.4 and clone.mpp_source == "user"
        np.testing.assert_array_equal(
            clone.read_region((100, 100), 0, (32, 32)), img.read_region((100, 100), 0, (32, 32))
        )
    clone_mem = pickle.loads(pickle.dumps(ramp))
    np.testing.assert_array_equal(clone_mem.read_level(1), ramp.read_level(1))


def test_shared_source_is_thread_safe(synthetic_slide: Any) -> None:
    with open_image(synthetic_slide.path) as img:
        locations = [(x, y) for x in range(0, 1536, 256) for y in range(0, 1024, 256)]
        expected = {loc: img.read_region(loc, 0, (128, 128)) for loc in locations}
        errors: list[str] = []

        def worker(offset: int) -> None:
            for loc in locations[offset:] + locations[:offset]:
                if not np.array_equal(img.read_region(loc, 0, (128, 128)), expected[loc]):
                    errors.append(f"mismatch at {loc}")

        threads = [threading.Thread(target=worker, args=(i * 3,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


# --- bad input ----------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match=r"nope\.svs: no such file"):
        open_image(tmp_path / "nope.svs")
    with pytest.raises(FileNotFoundError):  # also a builtin error
        open_image(tmp_path / "nope.svs")


def test_directory_that_is_not_ome_zarr(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="not an OME-Zarr image"):
        open_image(tmp_path)


def test_zarr_group_without_multiscales(tmp_path: Path) -> None:
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    with pytest.raises(UnsupportedFormatError, match="no OME-Zarr 'multiscales'"):
        open_image(tmp_path / "g.zarr")
    with pytest.raises(PlateError, match="no OME-Zarr 'plate'"):
        open_plate(tmp_path / "g.zarr")


def test_unknown_bytes_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "x.svs").write_bytes(b"hello world, not an image" * 10)
    with pytest.raises(UnsupportedFormatError, match="unrecognised file format"):
        open_image(tmp_path / "x.svs")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty or truncated"):
        open_image(tmp_path / "empty.tif")


def test_truncated_tiff(tmp_path: Path, synthetic_slide: Any) -> None:
    """A TIFF cut in half fails with CorruptImageError, at open or at the first bad read."""
    data = synthetic_slide.path.read_bytes()
    cut = tmp_path / "truncated.tiff"
    cut.write_bytes(data[: len(data) // 2])
    with (
        pytest.raises(CorruptImageError, match=r"truncated\.tiff: .*(truncated|corrupt)"),
        open_image(cut) as img,
    ):
        for level in range(img.level_count):
            img.read_level(level)


def test_truncated_png(tmp_path: Path) -> None:
    buf = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(buf)
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.read_bytes()[:200])
    with pytest.raises(SimSearchError, match=r"cut\.png"):
        open_image(cut)


def test_bad_user_mpp(synthetic_slide: Any) -> None:
    with pytest.raises(ConfigError, match="outside the plausible range"):
        open_image(synthetic_slide.path, mpp=500.0)


def test_plate_with_missing_well(tmp_path: Path, synthetic_plate: Any) -> None:
    import shutil

    broken = tmp_path / "broken.zarr"
    shutil.copytree(synthetic_plate.path, broken)
    shutil.rmtree(broken / "B" / "2")
    with pytest.raises(PlateError, match="well 'B/2' is listed in the plate but missing"):
        open_plate(broken)


# --- issue 31: extra planes, empty arrays, malformed NGFF, corrupt tiles ------------------------
def test_ome_tiff_z_stack_pyramid_reads_the_first_plane(tmp_path: Path) -> None:
    """Issue 31: tiffslide refuses series with Z or T (NotImplementedError); the README says the
    first plane is read, and now it is, at every level, with the OME pixel size and names."""
    zcyx = np.random.default_rng(4).integers(0, 60000, (3, 2, 96, 64), dtype=np.uint16)
    path = tmp_path / "stack.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            zcyx,
            tile=(32, 32),
            subifds=1,
            metadata={
                "axes": "ZCYX",
                "PhysicalSizeX": 0.5,
                "PhysicalSizeY": 0.5,
                "Channel": {"Name": ["DAPI", "GFP"]},
            },
        )
        tw.write(zcyx[:, :, ::2, ::2], tile=(32, 32), subfiletype=1)
    with open_image(path) as img:
        assert img.format == "ome-tiff" and img.level_dimensions == ((64, 96), (32, 48))
        assert img.channel_names == ("DAPI", "GFP") and img.mpp == pytest.approx(0.5)
        assert img.extra["dropped_axes"] == "Z"
        np.testing.assert_array_equal(
            img.read_region((0, 0), 0, (64, 96)), np.moveaxis(zcyx[0], 0, -1)
        )
        np.testing.assert_array_equal(
            img.read_region((0, 0), 1, (32, 48)), np.moveaxis(zcyx[0, :, ::2, ::2], 0, -1)
        )


@pytest.mark.parametrize(
    ("axes", "shape", "first"),
    [
        ("ZYXS", (3, 40, 48, 3), (0,)),
        ("TZCYX", (2, 3, 2, 40, 48), (0, 0)),
        ("ZYX", (4, 40, 48), (0,)),
    ],
)
def test_ome_tiff_time_and_z_planes(
    tmp_path: Path, axes: str, shape: tuple[int, ...], first: tuple[int, ...]
) -> None:
    data = np.random.default_rng(5).integers(0, 255, shape, dtype=np.uint8)
    path = tmp_path / "planes.ome.tif"
    rgb = "S" in axes
    tifffile.imwrite(
        path, data, ome=True, photometric="rgb" if rgb else None, metadata={"axes": axes}
    )
    with open_image(path) as img:
        plane = data[first]
        expected = (
            plane if rgb else (plane[..., None] if plane.ndim == 2 else np.moveaxis(plane, 0, -1))
        )
        assert img.dimensions == (48, 40)
        assert img.extra["dropped_axes"] == axes.replace("Y", "").replace("X", "").replace(
            "S", ""
        ).replace("C", "")
        np.testing.assert_array_equal(img.read_level(0), expected)


def test_zero_size_tiff_and_zarr(tmp_path: Path) -> None:
    """Issue 31: a dimension of 0 was a tiffslide NotImplementedError or a ZeroDivisionError."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile: "writing zero-size array"
        tifffile.imwrite(tmp_path / "zero.tif", np.zeros((0, 16), np.uint8))
    with pytest.raises(CorruptImageError, match=r"zero\.tif: TIFF image has no pixels"):
        open_image(tmp_path / "zero.tif")
    for name, shape in (("rows.zarr", (1, 0, 16)), ("channels.zarr", (0, 16, 16))):
        group = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=2)
        group.create_array("0", shape=shape, dtype="uint8", chunks=(1, 8, 8))
        group.attrs["multiscales"] = [
            {"version": "0.4", "axes": ["c", "y", "x"], "datasets": [{"path": "0"}]}
        ]
        with pytest.raises(CorruptImageError, match=rf"{name}: .*no pixels"):
            open_image(tmp_path / name)


_AXES = [{"name": "c", "type": "channel"}, {"name": "y"}, {"name": "x"}]


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"multiscales": {"version": "0.4"}}, "'multiscales' must be a list of objects"),
        ({"multiscales": ["a", "b"]}, "'multiscales' must be a list of objects"),
        ({"multiscales": []}, "'multiscales' must be a list of objects"),
        (
            {"multiscales": [{"version": "0.4", "axes": _AXES[1:], "datasets": [{"path": "0"}]}]},
            "axes 'yx' name 2 dimensions but dataset '0' has 3",
        ),
        (
            {"multiscales": [{"version": "0.4", "axes": _AXES, "datasets": [{}]}]},
            "dataset 0 has no 'path'",
        ),
        (
            {"multiscales": [{"version": "0.4", "axes": _AXES, "datasets": ["0"]}]},
            "dataset 0 has no 'path'",
        ),
        (
            {"multiscales": [{"version": "0.4", "axes": _AXES, "datasets": [{"path": "9"}]}]},
            "dataset '9' is missing",
        ),
        (
            {"multiscales": [{"version": "0.4", "axes": "cyx", "datasets": [{"path": "0"}]}]},
            "'axes' must be a list",
        ),
        (
            {
                "multiscales": [
                    {"version": "0.4", "axes": [{"name": 1}], "datasets": [{"path": "0"}]}
                ]
            },
            "has no name",
        ),
        (
            {
                "multiscales": [
                    {"version": "0.4", "axes": ["c", "y", "y"], "datasets": [{"path": "0"}]}
                ]
            },
            "name an axis twice",
        ),
        (
            {
                "multiscales": [
                    {
                        "version": "0.4",
                        "axes": _AXES,
                        "datasets": [
                            {
                                "path": "0",
                                "coordinateTransformations": [
                                    {"type": "scale", "scale": [1, "a", "b"]}
                                ],
                            }
                        ],
                    }
                ]
            },
            "is not a list of numbers",
        ),
        ({"multiscales": [{"version": 7, "axes": _AXES}]}, "version '7' is not supported"),
    ],
    ids=[
        "object",
        "strings",
        "empty",
        "axes-vs-ndim",
        "no-path",
        "dataset-string",
        "missing-array",
        "axes-string",
        "axis-name",
        "duplicate-axis",
        "scale-strings",
        "version",
    ],
)
def test_malformed_ngff_metadata(tmp_path: Path, attrs: dict[str, Any], message: str) -> None:
    """Issue 31: malformed NGFF metadata raised AttributeError/KeyError; now MetadataError."""
    import zarr

    from simsearch_wsi.core.errors import MetadataError

    path = tmp_path / "bad.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(1, 16, 16), dtype="uint8", chunks=(1, 8, 8))
    group.attrs.update(attrs)
    with pytest.raises(MetadataError, match=f"bad.ome.zarr: .*{message}"):
        open_image(path)


def test_ngff_dataset_of_strings_and_damaged_json(tmp_path: Path) -> None:
    import zarr

    from simsearch_wsi.core.errors import MetadataError

    path = tmp_path / "text.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(1, 8, 8), dtype="<U4", chunks=(1, 8, 8))
    group.attrs["multiscales"] = [
        {"version": "0.4", "axes": ["c", "y", "x"], "datasets": [{"path": "0"}]}
    ]
    with pytest.raises(MetadataError, match=r"text\.zarr: .*holds <U4 values"):
        open_image(path)
    (path / ".zattrs").write_text("{not json")
    with pytest.raises(MetadataError, match=r"text\.zarr: \.zattrs is not valid JSON"):
        open_image(path)
    (path / ".zattrs").write_text("[1, 2]")
    with pytest.raises(MetadataError, match=r"\.zattrs must hold a JSON object, got list"):
        open_image(path)


def _tiff_with_corrupt_tiles(path: Path, *, every: int = 3) -> Path:
    """A 256x256 zlib-tiled TIFF with every ``every``-th tile's bytes overwritten."""
    image = np.random.default_rng(6).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    for i, (offset, count) in enumerate(spans):
        if i % every == 0:
            data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return path


def test_many_corrupt_tiles_give_one_error_and_no_asyncio_noise(tmp_path: Path) -> None:
    """Issue 31: zarr reads a region's tiles concurrently; when one failed the others' errors
    were logged as dozens of "Task exception was never retrieved" tracebacks (and "Task was
    destroyed but it is pending!" at exit). Run in a fresh interpreter to see its real stderr."""
    import subprocess
    import sys

    path = _tiff_with_corrupt_tiles(tmp_path / "tiles.tif")
    script = (
        "import gc, sys\n"
        "from simsearch_wsi.io import open_image\n"
        "from simsearch_wsi.core.errors import CorruptImageError\n"
        "img = open_image(sys.argv[1])\n"
        "for _ in range(3):\n"
        "    try:\n"
        "        img.read_region((0, 0), 0, (256, 256))\n"
        "    except CorruptImageError as exc:\n"
        "        print(exc)\n"
        "gc.collect()\n"
        "print(img.read_region((16, 0), 0, (16, 16)).shape)\n"  # tile 1 is intact
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0 and "never retrieved" not in proc.stderr, proc.stderr[-2000:]
    assert "Task was destroyed" not in proc.stderr and proc.stderr == "", proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == "(16, 16, 3)"
    assert all(line.startswith(f"{path}: could not decode level 0") for line in lines[:3])
    assert "tile (row 0, column 0) of level 0 at x=0..16, y=0..16 failed" in lines[0]


def test_truncated_tiff_is_refused_at_open(tmp_path: Path) -> None:
    image = np.random.default_rng(7).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, image, tile=(32, 32), compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with pytest.raises(CorruptImageError, match=r"cut\.tif: file is truncated or corrupt"):
        open_image(cut)


def test_a_tile_without_data_is_never_a_silent_black_tile(tmp_path: Path) -> None:
    """Issue 24, review: a sparse TIFF (a tile listed with byte count 0, valid for libtiff and
    OpenSlide) opens, with its metadata; reads that avoid the tile work, and a read that touches
    it is refused naming the tile, never filled with black."""
    from simsearch_wsi.core.errors import CorruptImageError

    image = np.random.default_rng(24).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, image, tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path, mode="r+") as tf:
        counts = list(tf.pages[0].databytecounts)  # type: ignore[union-attr]
        counts[5] = 0  # row 1, column 1
        tf.pages[0].tags["TileByteCounts"].overwrite(counts)  # type: ignore[union-attr]
    with open_image(path) as img:
        assert img.dimensions == (64, 64)
        region = img.read_region((0, 0), 0, (16, 16))
        np.testing.assert_array_equal(region, image[:16, :16])  # other tiles read
        with pytest.raises(
            CorruptImageError,
            match=r"tile \(row 1, column 1\) of level 0 at x=16\.\.32, y=16\.\.32 has no data "
            r"\(a sparse TIFF",
        ):
            img.read_region((0, 0), 0, (64, 64))


def test_odd_imagej_metadata_is_not_taken_for_a_damaged_file(tmp_path: Path) -> None:
    """Review of issue 24: tifffile logs "ImageJ series metadata invalid or corrupted file" for
    an ImageJ description that disagrees with the pages and reads the file as a generic
    series; the open-time structure check must not refuse it (only a broken IFD chain or
    SubIFDs are damage)."""
    pixels = np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, pixels, imagej=True, photometric="rgb")
    with tifffile.TiffFile(path, mode="r+") as tf:
        tag = tf.pages[0].tags["ImageDescription"]  # type: ignore[union-attr]
        tag.overwrite(str(tag.value).replace("images=1", "images=0"))
    with open_image(path) as img:
        np.testing.assert_array_equal(img.read_region((0, 0), 0, (64, 64)), pixels)


@pytest.mark.parametrize("path_kind", ["tiles", "zarr"])
def test_overlapping_tiff_reads_decode_each_tile_once(tmp_path: Path, path_kind: str) -> None:
    """Issue 24: reads with overlapping halos reuse the tiles the reading thread decoded before
    (a bounded cache in the TIFF reader), both where a level is one tiled page read tile by
    tile and where zarr reads it: the same pixels, each tile decoded once, and the cache never
    holds more than its bound."""
    from simsearch_wsi.io import tiff as tiff_mod

    image = np.random.default_rng(24).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    path = tmp_path / "tiles.tif"
    tifffile.imwrite(path, image, tile=(16, 16), compression="zlib")
    padded = np.zeros((96 + 16, 128 + 16, 3), np.uint8)
    padded[8:-8, 8:-8] = image
    decoded: list[Any] = []
    with open_image(path) as img:
        assert isinstance(img, tiff_mod.TiffSource)
        assert img._tiled_pages[0] is not None  # a tiled page: read tile by tile
        if path_kind == "zarr":
            img._tiled_pages = []
            inner = img._level_arrays()[0].store
            real_get = inner._store.get

            async def counting_get(key: str, prototype: Any, byte_range: Any = None) -> Any:
                if tiff_mod._is_chunk_key(key):
                    decoded.append(key)
                return await real_get(key, prototype, byte_range)

            inner._store.get = counting_get
        else:
            real_decode = img._decode_tile

            def counting_decode(level: int, page: Any, ty: int, tx: int, *args: Any) -> Any:
                decoded.append((level, ty, tx))
                return real_decode(level, page, ty, tx, *args)

            img._decode_tile = counting_decode  # type: ignore[method-assign]
        regions = [(x, y) for y in (-8, 24, 56) for x in (-8, 40, 88)]  # 48-px reads, 8-px halos
        for x, y in regions:
            np.testing.assert_array_equal(
                img.read_region((x, y), 0, (48, 48), fill=0),
                padded[y + 8 : y + 56, x + 8 : x + 56],
            )
        assert len(decoded) == len(set(decoded)) == 6 * 8  # every tile, each once
        cache = img._local.tiles
        assert cache.nbytes == 48 * 16 * 16 * 3 <= cache.max_bytes
        cache.max_bytes = 10 * 16 * 16 * 3  # a smaller bound: the oldest tiles go first
        first, newest = next(iter(cache._items)), ("new", 0)
        cache.put(newest, np.zeros(16 * 16 * 3, np.uint8), 16 * 16 * 3)
        assert cache.nbytes == cache.max_bytes and newest in cache._items
        assert first not in cache._items and cache.get(first) is None


@pytest.mark.parametrize("path_kind", ["tiles", "zarr"])
def test_a_damaged_tile_is_refused_at_every_read_next_to_cached_ones(
    tmp_path: Path, path_kind: str
) -> None:
    """Issue 24: the decoded-tile cache holds only good tiles: a read that touches a damaged
    tile is refused naming it every time, also when its neighbours come from the cache."""
    path = _tiff_with_corrupt_tiles(tmp_path / "tiles.tif", every=7)  # tiles 0, 7, 14, ...
    with open_image(path) as img:
        if path_kind == "zarr":
            img._tiled_pages = []  # type: ignore[attr-defined]
        good = img.read_region((16, 0), 0, (96, 16))  # tiles 1..6 of row 0, now cached
        for _ in range(2):
            with pytest.raises(
                CorruptImageError,
                match=r"tiles\.tif: could not decode level 0 .*tile \(row 0, column 7\) of "
                r"level 0 at x=112\.\.128, y=0\.\.16 failed",
            ):
                img.read_region((16, 0), 0, (112, 16))
        np.testing.assert_array_equal(img.read_region((16, 0), 0, (96, 16)), good)
