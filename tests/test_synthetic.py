"""Tests of simsearch_wsi.synthetic: files read back right, ground truth matches the pixels."""

from __future__ import annotations

import csv
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ome_zarr_models.v04.hcs
import pytest
import tifffile
import tiffslide
import zarr
from ome_zarr_models.v04.image import Image as ImageV04
from ome_zarr_models.v04.well import Well as WellV04
from ome_zarr_models.v05.image import Image as ImageV05

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.synthetic import (
    CLASS_COLORS,
    SyntheticPlate,
    SyntheticSlide,
    class_color,
    make_fluorescence_slide,
    make_synthetic_omezarr_slide,
    make_synthetic_plate,
    make_synthetic_slide,
    write_ome_zarr_image,
)

SMALL = {"width": 768, "height": 512, "n_per_class": 3, "motif_size_l0": 40, "n_levels": 2}


@pytest.fixture(scope="module")
def bf_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    return make_synthetic_slide(tmp_path_factory.mktemp("bf") / "slide.tif", seed=0)


@pytest.fixture(scope="module")
def bf_level0(bf_slide: SyntheticSlide) -> np.ndarray:
    return np.asarray(tifffile.imread(bf_slide.path))


@pytest.fixture(scope="module")
def fl_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    return make_fluorescence_slide(tmp_path_factory.mktemp("fl") / "fluo.ome.tif", seed=3)


@pytest.fixture(scope="module")
def plate(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPlate:
    return make_synthetic_plate(tmp_path_factory.mktemp("plate") / "plate.ome.zarr", seed=5)


def _crop(arr: np.ndarray, obj: Any, pad: int = 0) -> np.ndarray:
    y0, x0 = int(obj.y_l0) - pad, int(obj.x_l0) - pad
    return arr[y0 : int(obj.y_l0 + obj.height_l0) + pad, x0 : int(obj.x_l0 + obj.width_l0) + pad]


# --- brightfield TIFF ------------------------------------------------------------------------
def test_tiff_levels_and_mpp_read_back_with_tiffslide(bf_slide: SyntheticSlide) -> None:
    with tiffslide.TiffSlide(bf_slide.path) as ts:
        assert ts.level_count == 3
        assert ts.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert ts.dimensions == (2048, 1536)
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.5, rel=1e-6)
        assert float(ts.properties["tiffslide.mpp-y"]) == pytest.approx(0.5, rel=1e-6)
        region = np.asarray(ts.read_region((512, 256), 1, (64, 32)).convert("RGB"))
    assert region.shape == (32, 64, 3)
    assert (bf_slide.width, bf_slide.height, bf_slide.mpp) == (2048, 1536, 0.5)


def test_tiff_structure_and_area_averaged_levels(
    bf_slide: SyntheticSlide, bf_level0: np.ndarray
) -> None:
    with tifffile.TiffFile(bf_slide.path) as tf:
        series = tf.series[0]
        assert len(series.levels) == 3
        assert [lv.shape for lv in series.levels] == [
            (1536, 2048, 3),
            (768, 1024, 3),
            (384, 512, 3),
        ]
        page0 = tf.pages[0]
        assert page0.is_tiled and (page0.tilewidth, page0.tilelength) == (256, 256)
        assert page0.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page0.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        level1 = series.levels[1].asarray()
    expected = bf_level0.reshape(768, 2, 1024, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(level1.astype(np.float64) - expected).max() <= 0.5


def test_jpeg_tiff_decodes_to_the_same_colours(tmp_path: Path) -> None:
    a = make_synthetic_slide(tmp_path / "z.tif", compression="zlib", seed=2, **SMALL)
    b = make_synthetic_slide(tmp_path / "j.tif", compression="jpeg", seed=2, **SMALL)
    za, jb = tifffile.imread(a.path).astype(np.int16), tifffile.imread(b.path).astype(np.int16)
    assert za.shape == jb.shape == (512, 768, 3)
    # a colour-space mix-up would shift whole channels by tens of grey levels
    assert np.abs(za.mean(axis=(0, 1)) - jb.mean(axis=(0, 1))).max() < 2.0
    assert np.abs(za - jb).mean() < 5.0
    raw = make_synthetic_slide(tmp_path / "r.tif", compression=None, seed=2, **SMALL)
    assert np.array_equal(tifffile.imread(raw.path), za)


def test_objects_inside_tissue_and_well_spaced(bf_slide: SyntheticSlide) -> None:
    assert bf_slide.tissue_mask.shape == (1536, 2048)
    assert bf_slide.tissue_mask.dtype == bool
    assert 0.35 < bf_slide.tissue_mask.mean() < 0.65
    assert len(bf_slide.objects) == 24
    for name in ("ring", "cluster", "stripes"):
        assert len(bf_slide.objects_of(name)) == 8
    assert bf_slide.objects_of("nope") == ()
    for o in bf_slide.objects:
        assert o.x_l0 >= 0 and o.x_l0 + o.width_l0 <= bf_slide.width
        assert o.y_l0 >= 0 and o.y_l0 + o.height_l0 <= bf_slide.height
        assert 10 <= o.width_l0 <= 48 * 1.1 + 2 and 10 <= o.height_l0 <= 48 * 1.1 + 2
        assert _crop(bf_slide.tissue_mask, o).all()
    for a, b in itertools.combinations(bf_slide.objects, 2):
        assert not a.box.intersects(b.box)
        (ax, ay), (bx, by) = a.center_l0, b.center_l0
        assert np.hypot(ax - bx, ay - by) >= 1.5 * 48


def test_motifs_darken_their_boxes(bf_slide: SyntheticSlide, bf_level0: np.ndarray) -> None:
    gray = bf_level0.astype(np.float64).mean(axis=2)
    near_motif = np.zeros_like(bf_slide.tissue_mask)
    for o in bf_slide.objects:
        _crop(near_motif, o, pad=8)[...] = True
    tissue_bg = gray[bf_slide.tissue_mask & ~near_motif].mean()
    glass = gray[~bf_slide.tissue_mask].mean()
    assert glass > 230 and 170 < tissue_bg < 215
    for o in bf_slide.objects:
        assert tissue_bg - _crop(gray, o).mean() > 20, o


def test_classes_have_distinct_colours(bf_slide: SyntheticSlide, bf_level0: np.ndarray) -> None:
    means = {}
    for name in bf_slide.classes:
        pix = np.concatenate(
            [_crop(bf_level0, o).reshape(-1, 3) for o in bf_slide.objects_of(name)]
        ).astype(np.float64)
        dark = pix[pix.mean(axis=1) < 120]
        assert len(dark) > 500
        means[name] = dark.mean(axis=0)
    for a, b in itertools.combinations(means, 2):
        assert np.linalg.norm(means[a] - means[b]) > 25, (a, b, means)
    # H&E-like: blue cluster nuclei, red-heavy stripes, purple rings in between
    assert means["cluster"][2] > means["cluster"][0] + 50
    assert means["stripes"][0] > means["ring"][0] > means["cluster"][0]


def test_geojson_and_csv(bf_slide: SyntheticSlide, tmp_path: Path) -> None:
    gj = bf_slide.to_geojson(tmp_path / "objects.geojson")
    assert gj == json.loads((tmp_path / "objects.geojson").read_text())
    assert gj == bf_slide.to_geojson()  # ids are deterministic
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(bf_slide.objects)
    ids = set()
    for feat, obj in zip(gj["features"], bf_slide.objects, strict=True):
        assert uuid.UUID(feat["id"]).version == 4
        ids.add(feat["id"])
        assert feat["geometry"]["type"] == "Polygon"
        ring = feat["geometry"]["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert ring[0] == [obj.x_l0, obj.y_l0]
        assert ring[2] == [obj.x_l0 + obj.width_l0, obj.y_l0 + obj.height_l0]
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == obj.class_name
        color = props["classification"]["color"]
        assert color == list(CLASS_COLORS[obj.class_name])
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    assert len(ids) == len(bf_slide.objects)

    bf_slide.to_csv(tmp_path / "objects.csv")
    with (tmp_path / "objects.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [
        "class",
        "x_l0",
        "y_l0",
        "width_l0",
        "height_l0",
        "center_x_l0",
        "center_y_l0",
    ]
    assert len(rows) == len(bf_slide.objects)
    first = bf_slide.objects[0]
    assert rows[0]["class"] == first.class_name
    assert float(rows[0]["center_x_l0"]) == pytest.approx(first.center_l0[0])


def test_fallback_class_colour_is_deterministic() -> None:
    c = class_color("tumour_bud")
    assert c == class_color("tumour_bud") and c != class_color("tumour_buds")
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in c)


def test_same_seed_same_slide_different_seed_differs(tmp_path: Path) -> None:
    a = make_synthetic_slide(tmp_path / "a.tif", seed=7, **SMALL)
    b = make_synthetic_slide(tmp_path / "b.tif", seed=7, **SMALL)
    c = make_synthetic_slide(tmp_path / "c.tif", seed=8, **SMALL)
    pa, pb, pc = (tifffile.imread(s.path) for s in (a, b, c))
    assert np.array_equal(pa, pb)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.objects == b.objects
    assert np.array_equal(a.tissue_mask, b.tissue_mask)
    assert a.to_geojson() == b.to_geojson()
    assert not np.array_equal(pa, pc)
    assert a.objects != c.objects
    assert a.to_geojson()["features"][0]["id"] != c.to_geojson()["features"][0]["id"]


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown motif class 'blob'"):
        make_synthetic_slide(tmp_path / "x.tif", classes=("ring", "blob"), **SMALL)
    with pytest.raises(ConfigError, match="cannot place"):
        make_synthetic_slide(
            tmp_path / "y.tif", width=512, height=384, n_per_class=60, motif_size_l0=48
        )
    with pytest.raises(ValueError, match="tile_size"):
        make_synthetic_slide(tmp_path / "z.tif", tile_size=100, **SMALL)
    with pytest.raises(ConfigError, match="unknown fluorescence class"):
        make_fluorescence_slide(tmp_path / "f.ome.tif", classes=("ring",))
    with pytest.raises(ConfigError, match="cannot place"):
        make_fluorescence_slide(tmp_path / "g.ome.tif", width=256, height=256, n_per_class=40)
    assert not (tmp_path / "x.tif").exists()


# --- fluorescence OME-TIFF -------------------------------------------------------------------
def test_fluorescence_ome_tiff_structure(fl_slide: SyntheticSlide) -> None:
    with tifffile.TiffFile(fl_slide.path) as tf:
        assert tf.is_ome
        series = tf.series[0]
        assert series.axes == "CYX"
        assert series.shape == (3, 768, 1024)
        assert series.dtype == np.uint16
        assert len(series.levels) == 2
        assert series.levels[1].shape == (3, 384, 512)
        xml = tf.ome_metadata
    assert xml is not None
    for name in ("DAPI", "GFP", "Cy5"):
        assert f'Name="{name}"' in xml
    assert 'PhysicalSizeX="0.65"' in xml and 'PhysicalSizeY="0.65"' in xml
    with tiffslide.TiffSlide(fl_slide.path) as ts:
        assert ts.level_count == 2
        assert ts.level_downsamples == pytest.approx((1.0, 2.0))
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.65, rel=1e-6)
    assert fl_slide.channel_names == ("DAPI", "GFP", "Cy5")


def test_fluorescence_reporter_localisation(fl_slide: SyntheticSlide) -> None:
    data = tifffile.imread(fl_slide.path).astype(np.float64)
    dapi, gfp = data[0], data[1]
    assert len(fl_slide.objects_of("nuclear_gfp")) == 8
    assert len(fl_slide.objects_of("cytoplasmic_gfp")) == 8
    background = gfp[~fl_slide.tissue_mask].mean()
    assert background < 0.03 * 65535
    for o in fl_slide.objects:
        cx, cy = (round(v) for v in o.center_l0)
        assert fl_slide.tissue_mask[cy, cx]
        assert dapi[cy - 1 : cy + 2, cx - 1 : cx + 2].mean() > 0.25 * 65535
        centre_gfp = gfp[cy - 1 : cy + 2, cx - 1 : cx + 2].mean()
        box_gfp = _crop(gfp, o)
        if o.class_name == "nuclear_gfp":
            assert centre_gfp > 0.3 * 65535
        else:
            assert centre_gfp < 0.05 * 65535
            assert box_gfp.max() > 0.25 * 65535  # the ring around the nucleus
    # cells that are not objects carry no reporter
    obj_mask = np.zeros(gfp.shape, dtype=bool)
    for o in fl_slide.objects:
        _crop(obj_mask, o, pad=2)[...] = True
    assert gfp[~obj_mask].max() < 0.1 * 65535
    assert dapi[fl_slide.tissue_mask & ~obj_mask].max() > 0.3 * 65535


def test_fluorescence_is_deterministic(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"width": 384, "height": 256, "n_per_class": 2, "n_levels": 1}
    a = make_fluorescence_slide(tmp_path / "a.ome.tif", seed=1, **kwargs)
    b = make_fluorescence_slide(tmp_path / "b.ome.tif", seed=1, **kwargs)
    c = make_fluorescence_slide(tmp_path / "c.ome.tif", seed=2, **kwargs)
    assert a.path.read_bytes() == b.path.read_bytes()  # OME UUID is seeded too
    assert a.objects == b.objects and a.objects != c.objects
    assert not np.array_equal(tifffile.imread(a.path), tifffile.imread(c.path))
    with tifffile.TiffFile(a.path) as tf:
        assert tf.series[0].axes == "CYX" and len(tf.series[0].levels) == 1


# --- OME-Zarr --------------------------------------------------------------------------------
def test_omezarr_04_image(tmp_path: Path) -> None:
    s = make_synthetic_omezarr_slide(tmp_path / "img.ome.zarr", version="0.4", seed=4, **SMALL)
    group = zarr.open_group(s.path, mode="r", zarr_format=2)
    model = ImageV04.from_zarr(group)
    ms = model.attributes.multiscales[0]
    assert [d.path for d in ms.datasets] == ["0", "1"]
    assert [a.name for a in ms.axes] == ["c", "y", "x"]
    assert [a.unit for a in ms.axes[1:]] == ["micrometer", "micrometer"]
    scales = [d.coordinateTransformations[0].scale for d in ms.datasets]
    assert scales == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0]]
    attrs = json.loads((s.path / ".zattrs").read_text())
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["R", "G", "B"]
    zarray = json.loads((s.path / "0" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2
    assert zarray["compressor"]["id"] in ("blosc", "zlib")
    assert "zstd" not in json.dumps(zarray["compressor"]).lower()
    assert zarray["dimension_separator"] == "/"
    arr0 = np.asarray(group["0"][:])
    assert arr0.shape == (3, 512, 768) and arr0.dtype == np.uint8
    assert group["1"].shape == (3, 256, 384)
    # the same renderer as the TIFF: identical pixels and ground truth
    t = make_synthetic_slide(tmp_path / "same.tif", seed=4, **SMALL)
    assert np.array_equal(np.moveaxis(arr0, 0, 2), tifffile.imread(t.path))
    assert t.objects == s.objects
    assert s.format == "ome-zarr-0.4"


def test_omezarr_05_image(tmp_path: Path) -> None:
    s = make_synthetic_omezarr_slide(tmp_path / "img.ome.zarr", version="0.5", seed=4, **SMALL)
    group = zarr.open_group(s.path, mode="r", zarr_format=3)
    model = ImageV05.from_zarr(group)
    ms = model.ome_attributes.multiscales[0]
    assert [d.path for d in ms.datasets] == ["0", "1"]
    meta = json.loads((s.path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5"
    assert [c["label"] for c in ome["omero"]["channels"]] == ["R", "G", "B"]
    arr = group["0"]
    assert arr.metadata.zarr_format == 3
    assert tuple(arr.metadata.dimension_names) == ("c", "y", "x")
    assert group["1"].shape == (3, 256, 384)


def test_write_ome_zarr_image_generic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (4, 300, 200), dtype=np.uint16)
    names = ("DAPI", "GFP", "Cy3", "Cy5")
    for version in ("0.4", "0.5"):
        out = write_ome_zarr_image(
            tmp_path / f"g{version}.zarr",
            data,
            mpp=0.325,
            channel_names=names,
            version=version,  # type: ignore[arg-type]
            n_levels=3,
            chunk=128,
        )
        group = zarr.open_group(out, mode="r")
        model: Any = (ImageV04 if version == "0.4" else ImageV05).from_zarr(group)
        assert model is not None
        assert np.array_equal(group["0"][:], data)
        assert group["2"].shape == (4, 75, 50)
        assert group["0"].chunks == (4, 128, 128)
        lvl1 = np.asarray(group["1"][:]).astype(np.float64)
        ref = data.reshape(4, 150, 2, 100, 2).astype(np.float64).mean(axis=(2, 4))
        assert np.abs(lvl1 - ref).max() <= 0.5
    with pytest.raises(ConfigError, match="channel names"):
        write_ome_zarr_image(tmp_path / "bad.zarr", data, mpp=0.5, channel_names=("a",))
    with pytest.raises(ConfigError, match="version"):
        write_ome_zarr_image(
            tmp_path / "bad.zarr",
            data,
            mpp=0.5,
            channel_names=names,
            version="0.3",  # type: ignore[arg-type]
        )


# --- HCS plate -------------------------------------------------------------------------------
def test_plate_validates_and_has_expected_layout(plate: SyntheticPlate) -> None:
    root = zarr.open_group(plate.path, mode="r", zarr_format=2)
    hcs = ome_zarr_models.v04.hcs.HCS.from_zarr(root)
    meta = hcs.attributes.plate
    assert [r.name for r in meta.rows] == ["A", "B"]
    assert [c.name for c in meta.columns] == ["1", "2", "3"]
    assert [w.path for w in meta.wells] == ["A/1", "A/2", "A/3", "B/1", "B/2", "B/3"]
    assert meta.field_count == 2
    assert set(plate.wells) == {w.path for w in meta.wells}
    for well_meta in meta.wells:
        well = WellV04.from_zarr(root[well_meta.path])
        assert [im.path for im in well.attributes.well.images] == ["0", "1"]
        for f in ("0", "1"):
            img = ImageV04.from_zarr(root[f"{well_meta.path}/{f}"])
            assert [d.path for d in img.attributes.multiscales[0].datasets] == ["0", "1"]
            labels = [c["label"] for c in root[f"{well_meta.path}/{f}"].attrs["omero"]["channels"]]
            assert labels == ["DAPI", "GFP"]
        arr = root[f"{well_meta.path}/0/0"]
        assert arr.shape == (2, 256, 256) and arr.dtype == np.uint16
        assert root[f"{well_meta.path}/0/1"].shape == (2, 128, 128)


def test_plate_dose_response_matches_pixels(plate: SyntheticPlate) -> None:
    root = zarr.open_group(plate.path, mode="r", zarr_format=2)
    for r in plate.rows:
        fractions = [plate.wells[f"{r}/{c}"].gfp_positive_fraction for c in plate.columns]
        assert all(b - a > 0.2 for a, b in itertools.pairwise(fractions)), fractions
    for key, truth in plate.wells.items():
        assert len(truth.cells) == plate.fields_per_well
        assert truth.n_cells == sum(len(cells) for cells in truth.cells) > 100
        positives = sum(p for cells in truth.cells for _, _, p in cells)
        assert truth.gfp_positive_fraction == pytest.approx(positives / truth.n_cells)
        for f, cells in enumerate(truth.cells):
            pix = np.asarray(root[f"{key}/{f}/0"][:]).astype(np.float64)
            for x, y, positive in cells:
                xi, yi = round(x), round(y)
                assert pix[0, yi, xi] > 0.25 * 65535  # every cell has a nucleus
                assert (pix[1, yi, xi] > 0.2 * 65535) == positive


def test_plate_is_deterministic(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"rows": ("C",), "columns": ("1", "2"), "fields_per_well": 1}
    a = make_synthetic_plate(tmp_path / "a.zarr", seed=1, **kwargs)
    b = make_synthetic_plate(tmp_path / "b.zarr", seed=1, **kwargs)
    c = make_synthetic_plate(tmp_path / "c.zarr", seed=2, **kwargs)
    assert a.wells == b.wells and a.wells != c.wells
    za, zb = (zarr.open_group(p.path, mode="r") for p in (a, b))
    assert np.array_equal(za["C/2/0/0"][:], zb["C/2/0/0"][:])
    with pytest.raises(ConfigError, match="letters/digits"):
        make_synthetic_plate(tmp_path / "d.zarr", rows=("A-1",))


def test_look_alikes_and_stain_jitter(tmp_path: Path) -> None:
    """The distractor painters stamp objects of their own class; stain jitter changes the
    colours (seeded) but not where anything is, and 0 leaves the slide as it was."""
    classes = ("ring", "disc", "doublet", "crosshatch")
    kw: dict[str, Any] = {"width": 1024, "height": 768, "n_per_class": 3, "n_levels": 1}
    plain = make_synthetic_slide(tmp_path / "a.tif", classes=classes, seed=3, **kw)
    zero = make_synthetic_slide(tmp_path / "b.tif", classes=classes, seed=3, stain_jitter=0, **kw)
    jit = make_synthetic_slide(tmp_path / "c.tif", classes=classes, seed=3, stain_jitter=0.3, **kw)
    assert {o.class_name for o in plain.objects} == set(classes)
    assert plain.objects == jit.objects
    pa, pz, pj = (tifffile.imread(s.path) for s in (plain, zero, jit))
    assert np.array_equal(pa, pz)
    assert not np.array_equal(pa, pj)
    # optical density scales per channel: dark stays darker than light, glass stays near white
    od_a = -np.log(np.maximum(pa, 1) / 255.0).reshape(-1, 3).mean(axis=0)
    od_j = -np.log(np.maximum(pj, 1) / 255.0).reshape(-1, 3).mean(axis=0)
    ratio = od_j / od_a
    assert np.all((ratio > 0.65) & (ratio < 1.35)) and np.ptp(ratio) > 0.01
    with pytest.raises(ConfigError, match="stain_jitter"):
        make_synthetic_slide(tmp_path / "d.tif", seed=3, stain_jitter=1.5, **kw)
