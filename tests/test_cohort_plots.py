"""Cohort plots: per-well aggregation, plate layout, dose series, default columns, PNG outputs."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from simsearch_wsi.cohort.plots import (
    default_dose_column,
    default_group_column,
    dose_series,
    metadata_columns,
    plate_matrix,
    read_table,
    well_rows,
    write_cohort_plots,
)
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.infer.quantify import write_table


def _stat(
    cls: str,
    frac: float | None,
    *,
    n: int = 0,
    density: float | None = None,
    um2: float | None = None,
    px: float = 0.0,
    dab: float | None = None,
) -> dict[str, Any]:
    return {
        "class_name": cls,
        "n_detections": n,
        "density_per_mm2": density,
        "area_um2": um2,
        "area_px_l0": px,
        "fraction_of_foreground": frac,
        "mean_dab_od": dab,
    }


def _field(plate: str, well: str, field: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The columns of one plate field before its statistics."""
    row, column = well[0], well[1:]
    return {
        "image": f"{plate}_{well}_f{field}",
        **meta,
        "plate": plate,
        "well": well,
        "row": row,
        "column": column,
        "field": field,
    }


def _roundtrip(tmp_path: Path, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Write rows as the cohort does and read them back with the real reader."""
    return read_table(write_table(tmp_path / "quantification.csv", rows))


def _plate_rows() -> list[dict[str, Any]]:
    """Plate P1: B2 with two fields (classes a, b), A10 and A2 with two fields (class a), and a
    slide row without a well. ``note`` differs between the fields of every well, ``batch`` only
    between those of B2."""
    b2_0 = _field("P1", "B2", 0, {"compound": "X", "note": "f0", "batch": "1"})
    b2_1 = _field("P1", "B2", 1, {"compound": "X", "note": "f1", "batch": "2"})
    a10 = [_field("P1", "A10", f, {"compound": "Y", "note": f"g{f}", "batch": "1"}) for f in (0, 1)]
    a2 = [_field("P1", "A2", f, {"compound": "Y", "note": f"h{f}", "batch": "3"}) for f in (0, 1)]
    return [
        {**b2_0, **_stat("a", 0.2, n=3, density=10.0, um2=100.0, px=400.0, dab=0.1)},
        {**b2_0, **_stat("b", 0.4, n=1, um2=50.0, px=200.0)},
        {**b2_1, **_stat("a", 0.4, n=5, density=20.0, px=600.0)},
        {**b2_1, **_stat("b", 0.6, n=2, um2=30.0, px=100.0)},
        *({**f, **_stat("a", 0.7, n=1, um2=1.0, px=4.0)} for f in a10),
        *({**f, **_stat("a", 0.9, n=4, um2=2.0, px=8.0)} for f in a2),
        {"image": "slide", "compound": "Z", "note": "-", "batch": "9", **_stat("a", 0.5)},
    ]


def test_read_table_and_metadata_columns(tmp_path: Path) -> None:
    rows = _roundtrip(tmp_path, _plate_rows())
    assert len(rows) == 9
    assert rows[0]["image"] == "P1_B2_f0"
    assert rows[1]["density_per_mm2"] == ""  # None written as an empty cell
    assert metadata_columns(rows) == ["compound", "note", "batch"]


def test_well_rows_sum_mean_and_constant_metadata(tmp_path: Path) -> None:
    wells = well_rows(_roundtrip(tmp_path, _plate_rows()))
    # the slide row is ignored; order: row A before B, column 2 before 10, classes as first seen
    assert [(w["well"], w["class_name"]) for w in wells] == [
        ("A2", "a"),
        ("A10", "a"),
        ("B2", "a"),
        ("B2", "b"),
    ]
    b2a, b2b = wells[2], wells[3]
    # "note" differs between the fields of every well: dropped; "batch" only in B2: None there
    assert list(b2a) == [
        "plate",
        "well",
        "row",
        "column",
        "compound",
        "batch",
        "class_name",
        "n_fields",
        "n_detections",
        "density_per_mm2",
        "area_um2",
        "area_px_l0",
        "fraction_of_foreground",
        "mean_dab_od",
    ]
    assert (b2a["plate"], b2a["row"], b2a["column"], b2a["compound"]) == ("P1", "B", "2", "X")
    assert b2a["batch"] is None and wells[0]["batch"] == "3"
    assert b2a["n_fields"] == 2
    assert b2a["n_detections"] == 8
    assert b2a["density_per_mm2"] == pytest.approx(15.0)
    assert b2a["area_um2"] is None  # one field has no area in um^2
    assert b2a["area_px_l0"] == pytest.approx(1000.0)
    assert b2a["fraction_of_foreground"] == pytest.approx(0.3)
    assert b2a["mean_dab_od"] == pytest.approx(0.1)  # the one field with a value
    assert b2b["n_detections"] == 3
    assert b2b["density_per_mm2"] is None and b2b["mean_dab_od"] is None
    assert b2b["area_um2"] == pytest.approx(80.0)
    assert b2b["area_px_l0"] == pytest.approx(300.0)
    assert b2b["fraction_of_foreground"] == pytest.approx(0.5)


def test_well_rows_without_plate_rows_is_empty() -> None:
    assert well_rows([{"image": "s", "well": "", **_stat("a", 0.1)}]) == []


def test_plate_matrix_layout_with_missing_well() -> None:
    wells = [
        {"plate": "P", "well": w, "row": w[0], "column": w[1:], **_stat(cls, f)}
        for w, cls, f in [
            ("A1", "a", 0.1),
            ("A3", "a", 0.3),
            ("C1", "a", 0.5),
            ("C3", "b", 0.9),
            ("C3", "a", None),
        ]
    ]
    wells.append({"plate": "Q", "well": "A1", "row": "A", "column": "1", **_stat("a", 0.7)})
    rows, columns, values = plate_matrix(wells, plate="P", class_name="a")
    assert rows == ["A", "B", "C"]  # row B and column 2 have no well: still laid out
    assert columns == ["1", "2", "3"]
    expected = np.array([[0.1, np.nan, 0.3], [np.nan] * 3, [0.5, np.nan, np.nan]])
    np.testing.assert_allclose(values, expected)
    _, _, b = plate_matrix(wells, plate="P", class_name="b")
    assert b[2, 2] == pytest.approx(0.9) and np.isnan(b).sum() == 8
    with pytest.raises(ConfigError, match=r"'R'.*'P', 'Q'"):
        plate_matrix(wells, plate="R", class_name="a")


def test_plate_matrix_orders_rows_past_z_and_columns_numerically() -> None:
    wells = [
        {"plate": "P", "well": f"{r}{c}", "row": r, "column": c, **_stat("a", i / 10)}
        for i, (r, c) in enumerate([("AA", "10"), ("Z", "9"), ("Z", "10"), ("AA", "9")])
    ]
    rows, columns, values = plate_matrix(wells, plate="P", class_name="a")
    assert rows == ["Z", "AA"]
    assert columns == ["9", "10"]
    np.testing.assert_allclose(values, [[0.1, 0.2], [0.3, 0.0]])


def test_dose_series_means_and_stds() -> None:
    rows = [
        {"compound": "X", "dose": "10", **_stat("a", 0.5)},
        {"compound": "X", "dose": "1", **_stat("a", 0.2)},
        {"compound": "Y", "dose": "1", **_stat("a", 0.4)},
        {"compound": "X", "dose": "n/a", **_stat("a", 0.9)},  # not a number: skipped
        {"compound": "X", "dose": "1", **_stat("a", None)},  # no fraction: skipped
        {"compound": "X", "dose": "1", **_stat("b", 0.8)},  # another class
    ]
    series = dose_series(rows, dose_column="dose", class_name="a")
    assert list(series) == ["all"]
    doses, means, stds, counts = series["all"]
    np.testing.assert_allclose(doses, [1.0, 10.0])
    np.testing.assert_allclose(means, [0.3, 0.5])
    np.testing.assert_allclose(stds, [math.sqrt(0.02), 0.0])  # sample sd; 0 for one value
    np.testing.assert_array_equal(counts, [2, 1])
    grouped = dose_series(rows, dose_column="dose", class_name="a", group_by="compound")
    assert list(grouped) == ["X", "Y"]
    np.testing.assert_allclose(grouped["X"][1], [0.2, 0.5])
    np.testing.assert_allclose(grouped["Y"][0], [1.0])
    np.testing.assert_array_equal(grouped["Y"][3], [1])


def test_default_columns() -> None:
    meta = [
        ("s1", "1", "HE", "p1", "0"),
        ("s2", "2", "HE", "p1", "1"),
        ("s3", "3", "HE", "p2", "1"),
    ]
    rows = [
        {"image": image, "id": i, "stain": stain, "Dose": dose, "patient": patient, **_stat(c, 0.1)}
        for image, i, stain, patient, dose in meta
        for c in ("a", "b")
    ]
    # id: one value per image; stain: one value; Dose: a dose column -> patient
    assert default_group_column(rows) == "patient"
    assert default_group_column(rows, exclude=["patient"]) is None
    assert default_dose_column(rows) == "Dose"
    no_dose = [{**r, "Dose": "high"} for r in rows]
    assert default_dose_column(no_dose) is None


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.csv"):
        read_table(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as fh:
        csv.writer(fh).writerows([["image", "class_name"], ["s", "a"]])
    with pytest.raises(ConfigError, match=r"bad\.csv.*fraction_of_foreground"):
        read_table(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("image,class_name,fraction_of_foreground\n")
    with pytest.raises(ConfigError, match=r"empty\.csv.*no rows"):
        read_table(empty)


def _slide_rows() -> list[dict[str, Any]]:
    rows = []
    for i, patient in enumerate(["p1", "p1", "p2", "p2", "p3"]):
        for cls, frac in (("Tumor", 0.1 * (i + 1)), ("Stroma", 0.3)):
            rows.append({"image": f"slide{i}", "patient": patient, **_stat(cls, frac)})
    return rows


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA")
        return im.size


def test_unknown_group_column_is_named(tmp_path: Path) -> None:
    table = write_table(tmp_path / "q.csv", _slide_rows())
    with pytest.raises(ConfigError, match=r"'donor'.*\['patient'\]"):
        write_cohort_plots(table, tmp_path / "plots", group_by="donor")
    with pytest.raises(ConfigError, match="'dose'"):
        write_cohort_plots(table, tmp_path / "plots", dose_column="dose")
    assert not (tmp_path / "plots").exists()


def test_write_cohort_plots_slides(tmp_path: Path) -> None:
    table = write_table(tmp_path / "q.csv", _slide_rows())
    out = tmp_path / "plots"
    written = write_cohort_plots(table, out, colors={"Tumor": (200, 0, 0)})
    assert written == {"fractions": out / "fractions.png"}
    width, height = _png(out / "fractions.png")
    assert width > 100 and height > 100
    assert sorted(p.name for p in out.iterdir()) == ["fractions.png"]  # no temporaries left


def test_write_cohort_plots_plate_with_dose(tmp_path: Path) -> None:
    rows = []
    for r in "AB":
        for c in range(1, 5):
            meta = {"compound": "X" if r == "A" else "Y", "conc": str(10 ** (c - 2))}
            for f in range(2):
                for cls, frac in (("Nuclei", 0.1 * c + 0.01 * f), ("Debris", 0.05)):
                    rows.append({**_field("Plate 1/A", f"{r}{c}", f, meta), **_stat(cls, frac)})
    rows = [r for r in rows if r["well"] != "B3"]  # a well without images
    table = write_table(tmp_path / "q.csv", rows)
    out = tmp_path / "plots"
    written = write_cohort_plots(table, out, group_by="compound", dose_column="conc")
    assert set(written) == {"fractions", "wells", "plate_Plate_1_A", "dose_response"}
    for name in ("fractions", "plate_Plate_1_A", "dose_response"):
        assert written[name] == out / f"{name}.png"
        assert min(_png(written[name])) > 100
    with written["wells"].open(newline="") as fh:
        wells = list(csv.DictReader(fh))
    assert len(wells) == 7 * 2
    first = wells[0]
    assert (first["well"], first["class_name"], first["compound"], first["conc"]) == (
        "A1",
        "Nuclei",
        "X",
        "0.1",
    )
    assert first["n_fields"] == "2"
    assert float(first["fraction_of_foreground"]) == pytest.approx(0.105)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written.values())


def test_dose_column_without_numbers_writes_nothing(tmp_path: Path) -> None:
    rows = [{**r, "dose": "high"} for r in _slide_rows()]
    table = write_table(tmp_path / "q.csv", rows)
    with pytest.raises(ConfigError, match="'dose' holds no numbers"):
        write_cohort_plots(table, tmp_path / "plots", dose_column="dose")
    assert not (tmp_path / "plots").exists()
