"""Per-image quantification: class areas, fractions, densities, DAB, and CSV tables."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from skimage.color import hed2rgb

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.infer.quantify import (
    ClassStats,
    dab_od,
    region_stats,
    stats_rows,
    write_table,
)


def _labels_and_foreground() -> tuple[NDArray[np.int32], NDArray[np.bool_]]:
    """10 x 20 grid: class 1 = 30 px (20 inside the foreground), class 2 = 50 px (all inside)."""
    labels = np.zeros((10, 20), dtype=np.int32)
    labels[0:3, 0:10] = 1  # 30 px
    labels[5:10, 10:20] = 2  # 50 px
    fg = np.zeros((10, 20), dtype=bool)
    fg[1:3, 0:10] = True  # 20 px of class 1
    fg[5:10, 10:20] = True  # 50 px of class 2
    fg[5:8, 0:10] = True  # 30 px unclassified
    return labels, fg


def test_areas_fractions_and_density_are_exact() -> None:
    labels, fg = _labels_and_foreground()
    stats = region_stats(
        labels,
        classes=["a", "b", "c"],
        downsample=(2.0, 3.0),
        mpp=0.5,
        foreground=fg,
        detections_per_class={"a": 12, "b": 3},
    )
    a, b, c = stats
    assert [s.class_name for s in stats] == ["a", "b", "c"]
    assert a.area_px_l0 == 30 * 6.0 and b.area_px_l0 == 50 * 6.0 and c.area_px_l0 == 0.0
    assert a.area_um2 == pytest.approx(30 * 6.0 * 0.25)
    assert a.fraction_of_foreground == pytest.approx(20 / 100)
    assert b.fraction_of_foreground == pytest.approx(50 / 100)
    assert c.fraction_of_foreground == 0.0
    fg_mm2 = 100 * 6.0 * 0.25 * 1e-6
    assert a.density_per_mm2 == pytest.approx(12 / fg_mm2)
    assert b.density_per_mm2 == pytest.approx(3 / fg_mm2)
    assert c.n_detections == 0 and c.density_per_mm2 == 0.0
    assert a.mean_dab_od is None


def test_density_uses_the_whole_grid_without_foreground() -> None:
    labels, _ = _labels_and_foreground()
    (a, _b) = region_stats(
        labels, classes=["a", "b"], downsample=(1.0, 1.0), mpp=1.0, detections_per_class={"a": 4}
    )
    assert a.density_per_mm2 == pytest.approx(4 / (200 * 1e-6))
    assert a.fraction_of_foreground is None


def test_none_when_inputs_are_missing() -> None:
    labels, fg = _labels_and_foreground()
    (a, _b) = region_stats(labels, classes=["a", "b"], downsample=(1.0, 1.0), mpp=None)
    assert a == ClassStats("a", 0, None, None, 30.0, None, None)
    # counts without mpp: no density; an empty foreground: no fraction or density
    (a, _b) = region_stats(
        labels,
        classes=["a", "b"],
        downsample=(1.0, 1.0),
        mpp=0.5,
        foreground=np.zeros_like(fg),
        detections_per_class={"a": 1},
    )
    assert a.n_detections == 1 and a.density_per_mm2 is None
    assert a.fraction_of_foreground is None


def _hed_image(labels: NDArray[np.int32], dab: dict[int, float]) -> NDArray[np.uint8]:
    hed = np.zeros((*labels.shape, 3))
    hed[..., 0] = np.where(labels > 0, 0.05, 0.0)  # some haematoxylin wherever there is tissue
    for k, value in dab.items():
        hed[..., 2][labels == k] = value
    rgb: NDArray[np.uint8] = np.round(hed2rgb(hed) * 255).astype(np.uint8)
    return rgb


def test_mean_dab_recovers_the_stain_amounts() -> None:
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[5:20, 5:30] = 1
    labels[25:35, 10:50] = 2
    rgb = _hed_image(labels, {1: 0.3, 2: 0.05})
    a, b, c = region_stats(
        labels, classes=["strong", "weak", "absent"], downsample=(1.0, 1.0), mpp=None, rgb=rgb
    )
    assert a.mean_dab_od is not None and b.mean_dab_od is not None
    assert a.mean_dab_od > b.mean_dab_od > 0
    assert a.mean_dab_od == pytest.approx(0.3, abs=0.02)
    assert b.mean_dab_od == pytest.approx(0.05, abs=0.01)
    assert c.mean_dab_od is None  # no pixels
    od = dab_od(rgb)
    assert od.dtype == np.float32 and od.shape == labels.shape
    assert od[labels == 0].max() == pytest.approx(0.0, abs=1e-6)  # white background


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ["a"]}, "label value 2 has no class"),
        ({"classes": ["a", "a"]}, "unique"),
        ({"foreground": np.ones((3, 3), dtype=bool)}, "same grid"),
        ({"rgb": np.zeros((10, 20, 3), dtype=np.float32)}, "uint8"),
        ({"rgb": np.zeros((5, 20, 3), dtype=np.uint8)}, "resample"),
        ({"detections_per_class": {"z": 1}}, "unknown classes"),
        ({"detections_per_class": {"a": -1}}, ">= 0"),
        ({"downsample": (1.0, -2.0)}, "downsample"),
        ({"mpp": 1000.0}, "pixel size"),
    ],
)
def test_bad_input_raises_config_error(kwargs: dict[str, object], message: str) -> None:
    labels, _ = _labels_and_foreground()
    args: dict[str, object] = {
        "classes": ["a", "b"],
        "downsample": (1.0, 1.0),
        "mpp": 0.5,
        **kwargs,
    }
    with pytest.raises(ConfigError, match=message):
        region_stats(labels, **args)  # type: ignore[arg-type]


def test_table_round_trip(tmp_path: Path) -> None:
    labels, fg = _labels_and_foreground()
    stats = region_stats(
        labels, classes=["a", "b"], downsample=(1.0, 1.0), mpp=1 / 3, foreground=fg
    )
    extra = {"well": "B03", "row": "B", "column": 3, "field": 0}
    rows = stats_rows("plate.zarr/B/3/0", stats, extra=extra)
    rows.append({"image": "other", "note": "late column"})
    path = write_table(tmp_path / "out" / "table.csv", rows)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        read = list(reader)
    assert header == [
        "image",
        "well",
        "row",
        "column",
        "field",
        "class_name",
        "n_detections",
        "density_per_mm2",
        "area_um2",
        "area_px_l0",
        "fraction_of_foreground",
        "mean_dab_od",
        "note",
    ]
    assert len(read) == 3
    first = read[0]
    assert first["image"] == "plate.zarr/B/3/0" and first["well"] == "B03"
    assert first["column"] == "3" and first["class_name"] == "a"
    assert first["area_um2"] == "3.33333"  # 30 px x (1/3 um)^2, 6 significant digits
    assert first["fraction_of_foreground"] == "0.2"
    assert first["density_per_mm2"] == "" and first["mean_dab_od"] == ""  # None
    assert first["note"] == ""
    assert read[2]["note"] == "late column" and read[2]["class_name"] == ""
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]


def test_write_is_atomic_and_failures_leave_the_old_table(tmp_path: Path) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("cannot format")

    path = tmp_path / "table.csv"
    write_table(path, [{"image": "x", "value": 1.0}])
    before = path.read_text(encoding="utf-8")
    with pytest.raises(RuntimeError, match="cannot format"):
        write_table(path, [{"image": "y", "value": 2.0}, {"image": "z", "value": Unprintable()}])
    assert path.read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    with pytest.raises(RuntimeError):
        write_table(tmp_path / "new.csv", [{"value": Unprintable()}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_non_finite_values_and_bad_tables() -> None:
    stats = [ClassStats("a", 1, float("nan"), None, 1.0, float("inf"), 0.123456789)]
    (row,) = stats_rows("img", stats)
    assert row["class_name"] == "a" and row["mean_dab_od"] == 0.123456789
    with pytest.raises(ConfigError, match="clash"):
        stats_rows("img", stats, extra={"class_name": "x"})
    with pytest.raises(ConfigError, match="no rows"):
        write_table("unused.csv", [])


def test_non_finite_cells_are_empty(tmp_path: Path) -> None:
    stats = [ClassStats("a", 1, float("nan"), None, 1.0, float("inf"), 0.123456789)]
    path = write_table(tmp_path / "t.csv", stats_rows("img", stats))
    with path.open(newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["density_per_mm2"] == "" and row["fraction_of_foreground"] == ""
    assert row["mean_dab_od"] == "0.123457" and row["n_detections"] == "1"
    assert row["area_px_l0"] == "1"
