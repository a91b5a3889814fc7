"""Every readable file in ../shared/data opens with the expected metadata (skips when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simsearch_wsi.core.errors import UnsupportedFormatError
from simsearch_wsi.io import is_plate, open_image, open_plate

pytestmark = pytest.mark.shared_data

# path, format, level-0 (w, h), level count, mpp (None = unknown), channels, dtype, modality
EXPECTED = [
    ("wsi/CMU-1-Small-Region.svs", "aperio-svs", (2220, 2967), 1, 0.499, 3, "uint8", "brightfield"),
    (
        "wsi/tcga-cr-7395-01a-01-ts1.svs",
        "aperio-svs",
        (4443, 3567),
        2,
        None,
        3,
        "uint8",
        "brightfield",
    ),
    ("wsi/openslide-python_small.svs", "aperio-svs", (16, 16), 1, 0.499, 3, "uint8", "brightfield"),
    (
        "wsi/openslide-python_boxes.tiff",
        "tiff-pyramid",
        (300, 250),
        4,
        None,
        3,
        "uint8",
        "brightfield",
    ),
    (
        "wsi/pathml_small_vectra.qptiff",
        "qptiff",
        (1920, 1440),
        1,
        0.4965,
        3,
        "uint8",
        "fluorescence",
    ),
    ("wsi/pathml_smalltif.tif", "tiff", (640, 480), 1, None, 1, "uint16", "fluorescence"),
    (
        "brightfield/bankhead2022_OS-1-detail.ome.tif",
        "ome-tiff",
        (1101, 1101),
        1,
        0.2271,
        3,
        "uint8",
        "brightfield",
    ),
    ("brightfield/skimage_ihc.png", "png", (512, 512), 1, None, 3, "uint8", "brightfield"),
    (
        "omezarr/ome-zarr-py-testdata/v1",
        "ome-zarr-0.1",
        (16, 16),
        1,
        None,
        2,
        "uint8",
        "fluorescence",
    ),
    (
        "omezarr/ome-zarr-py-testdata/v2",
        "ome-zarr-0.2",
        (16, 16),
        1,
        None,
        2,
        "uint8",
        "fluorescence",
    ),
    (
        "omezarr/ome-zarr-py-testdata/bf2raw/fake-series-2.zarr",
        "ome-zarr-0.4",
        (512, 512),
        2,
        None,
        1,
        "uint8",
        "fluorescence",
    ),
    (
        "omezarr/ome-zarr-py-testdata/bf2raw/plate-rows-2.zarr/A/1/0",
        "ome-zarr-0.4",
        (512, 512),
        2,
        1.0,
        1,
        "uint8",
        "fluorescence",
    ),
]


@pytest.mark.parametrize(
    ("rel", "fmt", "dims", "n_levels", "mpp", "n_ch", "dtype", "modality"),
    EXPECTED,
    ids=[e[0].split("/")[-1] for e in EXPECTED],
)
def test_real_file_metadata(
    shared_data: Path,
    rel: str,
    fmt: str,
    dims: tuple[int, int],
    n_levels: int,
    mpp: float | None,
    n_ch: int,
    dtype: str,
    modality: str,
) -> None:
    with open_image(shared_data / rel) as img:
        assert img.format == fmt
        assert img.dimensions == dims
        assert img.level_count == n_levels
        if mpp is None:
            assert img.mpp is None
        else:
            assert img.mpp == pytest.approx(mpp, rel=1e-3)
        assert img.n_channels == n_ch
        assert str(img.dtype) == dtype
        assert img.modality == modality
        # A read that straddles the bottom-right corner: inside pixels real, outside padded.
        w, h = img.dimensions
        size = (min(w, 64), min(h, 64))
        region = img.read_region((w - size[0] // 2, h - size[1] // 2), 0, size)
        assert region.shape == (size[1], size[0], n_ch)
        assert np.all(region[size[1] // 2 + 1 :, :] == img.fill_value)
        inside = img.read_region((w - size[0], h - size[1]), 0, size)
        np.testing.assert_array_equal(
            region[: size[1] // 2, : size[0] // 2], inside[size[1] // 2 :, size[0] // 2 :]
        )


def test_tcga_jpeg2000_levels_agree(shared_data: Path) -> None:
    """Level 1 of the JPEG2000 SVS matches a 2x2 mean of level 0 (decoder + level mapping)."""
    with open_image(shared_data / "wsi/tcga-cr-7395-01a-01-ts1.svs") as img:
        lvl1 = img.read_region((2000, 1600), 1, (64, 64)).astype(np.float64)
        lvl0 = img.read_region((2000, 1600), 0, (128, 128)).astype(np.float64)
        pooled = lvl0.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
        assert np.abs(lvl1 - pooled).mean() < 12.0
        assert lvl1.std() > 5.0  # real tissue, not a blank or padded read


def test_qptiff_channel_names(shared_data: Path) -> None:
    with open_image(shared_data / "wsi/pathml_small_vectra.qptiff") as img:
        assert img.channel_names == ("DAPI", "FITC", "Cy3")


def test_user_mpp_overrides_missing_metadata(shared_data: Path) -> None:
    with open_image(shared_data / "wsi/tcga-cr-7395-01a-01-ts1.svs", mpp=0.25) as img:
        assert img.mpp == 0.25
        assert img.mpp_source == "user"


def test_dicom_is_refused_with_advice(shared_data: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match=r"pathml_small_dicom\.dcm: DICOM .*convert"):
        open_image(shared_data / "wsi/pathml_small_dicom.dcm")


def test_bioformats2raw_plate(shared_data: Path) -> None:
    path = shared_data / "omezarr/ome-zarr-py-testdata/bf2raw/plate-rows-2.zarr"
    assert is_plate(path)
    plate = open_plate(path)
    assert plate.rows == ("A", "B") and plate.columns == ("1",)
    assert [w.name for w in plate.wells] == ["A1", "B1"]
    fields = list(plate.fields())
    assert [f.image_id for f in fields] == ["A1_f0", "B1_f0"]
    with fields[1].open() as img:
        assert img.dimensions == (512, 512)
        assert img.read_region((0, 0), 1, (256, 256)).shape == (256, 256, 1)
    with pytest.raises(UnsupportedFormatError, match="HCS plate"):
        open_image(path)
