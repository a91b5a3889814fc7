"""Plots of a cohort's ``quantification.csv``: class fractions, plate heat maps, dose response.

Pure computations (:func:`well_rows`, :func:`plate_matrix`, :func:`dose_series`, ...) are kept
apart from drawing. Figures are :class:`matplotlib.figure.Figure` objects rendered on the Agg
canvas (no ``pyplot`` global state) and, like the per-well table, written atomically.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from numpy.typing import NDArray

from simsearch_wsi.core.atomic import atomic_path
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.tables import csv_errors
from simsearch_wsi.infer.quantify import ClassStats, write_table
from simsearch_wsi.qupath.geojson import class_color

__all__ = [
    "default_dose_column",
    "default_group_column",
    "dose_series",
    "metadata_columns",
    "plate_matrix",
    "plate_plot_files",
    "plot_dose",
    "plot_fractions",
    "plot_plate",
    "read_table",
    "well_rows",
    "write_cohort_plots",
]

#: class name -> (r, g, b) in 0..255
Colors = Mapping[str, tuple[int, int, int]]
Rows = Sequence[Mapping[str, Any]]
PathArg = str | os.PathLike[str]
#: doses, mean fractions, their sample standard deviations (0 for one value), counts
DoseSeries = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]

PLATE_COLUMNS = ("plate", "well", "row", "column", "field")
_STAT_COLUMNS = tuple(f.name for f in fields(ClassStats))
_REQUIRED = ("image", "class_name", "fraction_of_foreground")
_DOSE_NAMES = ("dose", "concentration")
_NO_GROUP = "(none)"
_MAX_LABELLED_BARS = 40
_MAX_ANNOTATED_WELLS = 96
_EMPTY_WELL = "#c4c4c4"
_DPI = 110
_WELL_NAME = re.compile(r"^([A-Za-z]+)0*(\d+)$")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _num(value: Any) -> float | None:
    """A finite number from a cell (text or number), else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_table(path: PathArg) -> list[dict[str, str]]:
    """Rows of a ``quantification.csv`` as column -> text (empty cells ``""``), in file order.

    Raises :class:`ConfigError` naming the file when it is missing, has no rows, or lacks an
    ``image``, ``class_name`` or ``fraction_of_foreground`` column.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: quantification table not found; run 'simsearch-wsi cohort' first")
    with csv_errors(p, "quantification table"), p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = [{c: row.get(c) or "" for c in columns} for row in reader]
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise ConfigError(
            f"{p}: not a quantification table: it lacks the columns {missing} (has {columns})"
        )
    if not rows:
        raise ConfigError(f"{p}: the table has no rows; quantify at least one image first")
    return rows


def metadata_columns(rows: Rows) -> list[str]:
    """The manifest's columns of table rows (any but ``image``, plate and statistics columns),
    in first-seen order."""
    skip = {"image", "n_fields", *PLATE_COLUMNS, *_STAT_COLUMNS}
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in skip:
                seen.setdefault(key, None)
    return list(seen)


def _letter_index(label: str) -> int | None:
    """A -> 1, Z -> 26, AA -> 27; None for anything but ASCII letters."""
    if not (label.isascii() and label.isalpha()):
        return None
    n = 0
    for ch in label.upper():
        n = n * 26 + ord(ch) - 64
    return n


def _letters(n: int) -> str:
    out = ""
    while n > 0:
        n, r = divmod(n - 1, 26)
        out = chr(65 + r) + out
    return out


def _int(label: str) -> int | None:
    try:
        return int(label)
    except ValueError:
        return None


def _axis_key(label: str) -> tuple[int, int, str]:
    """Plate axis order: letters as A..Z, AA..; then integers numerically; then text."""
    index = _letter_index(label)
    if index is not None:
        return (0, index, "")
    number = _int(label)
    return (1, number, "") if number is not None else (2, 0, label)


def _well_parts(row: Mapping[str, Any]) -> tuple[str, str]:
    """(row, column) of a plate row, from its ``row``/``column`` cells or its well name."""
    r, c = _text(row.get("row")), _text(row.get("column"))
    match = _WELL_NAME.match(_text(row.get("well")))
    if match and not (r and c):
        r, c = r or match.group(1), c or match.group(2)
    return r, c


def _mean(rows: Rows, column: str) -> float | None:
    values = [v for v in (_num(r.get(column)) for r in rows) if v is not None]
    return sum(values) / len(values) if values else None


def _sum(rows: Rows, column: str) -> float | None:
    values = [_num(r.get(column)) for r in rows]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _count(rows: Rows, column: str) -> int:
    return sum(int(_num(r.get(column)) or 0) for r in rows)


#: how :func:`well_rows` combines a well's fields, per statistic
_WELL_STATS: dict[str, Callable[[Rows, str], float | None]] = {
    "n_detections": _count,
    "density_per_mm2": _mean,
    "area_um2": _sum,
    "area_px_l0": _sum,
    "fraction_of_foreground": _mean,
    "mean_dab_od": _mean,
}


def well_rows(rows: Rows) -> list[dict[str, Any]]:
    """Plate rows (those with a ``well``) aggregated per (plate, well, class).

    Each result has ``plate, well, row, column``, the metadata columns (their value when constant
    over the well's fields, else None; columns constant in no well are left out),
    ``class_name``, ``n_fields``, ``n_detections`` (sum), ``density_per_mm2`` (mean),
    ``area_um2`` and ``area_px_l0`` (sums, None if a field lacks one), ``fraction_of_foreground``
    and ``mean_dab_od`` (means over the fields with a value, None if none). Sorted by plate, row
    (A..Z, AA..), column (numerically), then class in first-seen order; [] without plate rows.
    """
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    per_well: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    class_order: dict[str, int] = {}
    for row in rows:
        well = _text(row.get("well"))
        if not well:
            continue
        plate, cls = _text(row.get("plate")), _text(row.get("class_name"))
        class_order.setdefault(cls, len(class_order))
        groups.setdefault((plate, well, cls), []).append(row)
        per_well.setdefault((plate, well), []).append(row)
    meta = metadata_columns([r for members in per_well.values() for r in members])
    constant: dict[tuple[str, str], dict[str, str | None]] = {}
    for key, members in per_well.items():
        values = {col: {_text(r.get(col)) for r in members} for col in meta}
        constant[key] = {col: v.pop() if len(v) == 1 else None for col, v in values.items()}
    kept = [col for col in meta if any(c[col] is not None for c in constant.values())]
    out: list[dict[str, Any]] = []
    for (plate, well, cls), members in groups.items():
        r, c = _well_parts(members[0])
        head = {"plate": plate, "well": well, "row": r, "column": c}
        meta_values = {col: constant[(plate, well)][col] for col in kept}
        stats = {col: agg(members, col) for col, agg in _WELL_STATS.items()}
        out.append({**head, **meta_values, "class_name": cls, "n_fields": len(members), **stats})
    order = {
        key: (key[0], *map(_axis_key, _well_parts(g[0])), class_order[key[2]])
        for key, g in groups.items()
    }
    out.sort(key=lambda w: order[(w["plate"], w["well"], w["class_name"])])
    return out


def _layout(labels: set[str]) -> list[str]:
    """Sorted plate axis labels; gaps between letters or between integers are filled in."""
    parsers: tuple[tuple[Callable[[str], int | None], Callable[[int], str]], ...] = (
        (_letter_index, _letters),
        (_int, str),
    )
    for parse, name in parsers:
        parsed = {parse(s): s for s in labels}
        numbers = [k for k in parsed if k is not None]
        if labels and len(numbers) == len(labels):
            lo, hi = min(numbers), max(numbers)
            if hi - lo < 2 * len(labels) + 48:
                return [parsed.get(i) or name(i) for i in range(lo, hi + 1)]
    return sorted(labels, key=_axis_key)


def plate_matrix(
    wells: Rows, *, plate: str, class_name: str
) -> tuple[list[str], list[str], NDArray[np.float64]]:
    """A plate's layout of one class' ``fraction_of_foreground``, from :func:`well_rows`.

    Returns ``(row_labels, column_labels, values)``: rows A..Z, AA.., columns numerically (gaps
    between the plate's wells filled in), values an (n_rows, n_columns) float array, NaN where a
    well is absent or has no value. Raises :class:`ConfigError` for a plate without wells.
    """
    mine = [w for w in wells if _text(w.get("plate")) == plate]
    if not mine:
        plates = sorted({_text(w.get("plate")) for w in wells})
        raise ConfigError(f"no wells of plate {plate!r}; the plates are {plates}")
    parts = [_well_parts(w) for w in mine]
    row_labels = _layout({r for r, _ in parts})
    column_labels = _layout({c for _, c in parts})
    ri = {s: i for i, s in enumerate(row_labels)}
    ci = {s: i for i, s in enumerate(column_labels)}
    values = np.full((len(row_labels), len(column_labels)), np.nan)
    for w, (r, c) in zip(mine, parts, strict=True):
        v = _num(w.get("fraction_of_foreground"))
        if _text(w.get("class_name")) == class_name and v is not None:
            values[ri[r], ci[c]] = v
    return row_labels, column_labels, values


def _dose_points(
    rows: Rows, dose_column: str, class_name: str, group_by: str | None
) -> dict[str, list[tuple[float, float]]]:
    """group -> [(dose, fraction)] of the rows of one class with a numeric dose and fraction."""
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        dose, frac = _num(row.get(dose_column)), _num(row.get("fraction_of_foreground"))
        if _text(row.get("class_name")) != class_name or dose is None or frac is None:
            continue
        group = "all" if group_by is None else _text(row.get(group_by)) or _NO_GROUP
        out.setdefault(group, []).append((dose, frac))
    return out


def _series(points: Sequence[tuple[float, float]]) -> DoseSeries:
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    doses = np.unique(arr[:, 0])
    per_dose = [arr[arr[:, 0] == d, 1] for d in doses]
    means = np.array([v.mean() for v in per_dose], dtype=np.float64)
    stds = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in per_dose], dtype=np.float64)
    counts = np.array([v.size for v in per_dose], dtype=np.int64)
    return doses, means, stds, counts


def dose_series(
    rows: Rows, *, dose_column: str, class_name: str, group_by: str | None = None
) -> dict[str, DoseSeries]:
    """One class' ``fraction_of_foreground`` per dose: group -> (doses, means, stds, counts).

    Arrays are sorted by dose; stds are sample standard deviations (0 for a single value). Rows
    without a numeric dose or fraction are skipped. Groups are ``group_by``'s values in
    first-seen order (``"(none)"`` for an empty value), or one group ``"all"``.
    """
    points = _dose_points(rows, dose_column, class_name, group_by)
    return {group: _series(pts) for group, pts in points.items()}


def default_dose_column(rows: Rows) -> str | None:
    """The first metadata column named ``dose`` or ``concentration`` (any case) with at least 2
    distinct numeric values, else None."""
    for col in metadata_columns(rows):
        values = {_num(r.get(col)) for r in rows} - {None}
        if col.lower() in _DOSE_NAMES and len(values) >= 2:
            return col
    return None


def default_group_column(rows: Rows, *, exclude: Sequence[str] = ()) -> str | None:
    """The first metadata column (not a dose column, not in ``exclude``) with 2 or more distinct
    non-empty values, fewer than the table's images (so images share groups), else None."""
    n_images = len({_text(r.get("image")) for r in rows})
    for col in metadata_columns(rows):
        if col.lower() in _DOSE_NAMES or col in exclude:
            continue
        values = {_text(r.get(col)) for r in rows} - {""}
        if 2 <= len(values) < n_images:
            return col
    return None


# --- drawing -------------------------------------------------------------------------------------


def _classes(rows: Rows) -> list[str]:
    return list(dict.fromkeys(c for c in (_text(r.get("class_name")) for r in rows) if c))


def _rgb(name: str, colors: Colors | None) -> tuple[float, float, float]:
    r, g, b = colors[name] if colors and name in colors else class_color(name)
    return (r / 255, g / 255, b / 255)


def _figure(width: float, height: float, *, constrained: bool = True) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathArg) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    return Path(path)


def _units(rows: Rows) -> list[tuple[str, Mapping[str, Any]]]:
    """(label, row): slide rows labelled by image file name (the path where names repeat),
    plate rows aggregated per well."""
    wells = well_rows(rows)
    one_plate = len({w["plate"] for w in wells}) <= 1
    images = list(dict.fromkeys(_text(r.get("image")) for r in rows if not _text(r.get("well"))))
    names = [PurePath(p).name or p for p in images]
    label = dict(zip(images, names if len(set(names)) == len(names) else images, strict=True))
    units = [(label[_text(r.get("image"))], r) for r in rows if not _text(r.get("well"))]
    units += [(w["well"] if one_plate else f"{w['plate']} {w['well']}", w) for w in wells]
    return units


def plot_fractions(
    rows: Rows, path: PathArg, *, group_by: str | None = None, colors: Colors | None = None
) -> Path:
    """A stacked bar per image (per well for plate rows) of each class' fraction of foreground.

    Bars are ordered and separated by ``group_by``'s value (written under its bars); classes are
    coloured by ``colors`` or QuPath's default class colours. Writes a PNG; returns ``path``.
    """
    units = _units(rows)
    classes = _classes(rows)
    if not units:
        raise ConfigError("no table rows to plot")
    bars: dict[str, dict[str, float]] = {}
    groups: dict[str, list[str]] = {}
    for label, row in units:
        if label not in bars:
            bars[label] = {}
            group = _text(row.get(group_by)) or _NO_GROUP if group_by else ""
            groups.setdefault(group, []).append(label)
        frac = _num(row.get("fraction_of_foreground"))
        if frac is not None:
            bars[label][_text(row.get("class_name"))] = frac
    labels: list[str] = []
    positions: list[float] = []
    spans: list[tuple[str, float, float]] = []
    for group, members in groups.items():
        start = len(labels) + len(spans) if group_by else len(labels)
        positions += [start + i for i in range(len(members))]
        labels += members
        spans.append((group, start, positions[-1]))
    x = np.asarray(positions, dtype=np.float64)
    n = len(labels)
    fig = _figure(min(24.0, max(6.0, 2.5 + 0.26 * (x[-1] + 1))), 4.8, constrained=False)
    ax = fig.add_subplot()
    bottom = np.zeros(n)
    for cls in classes:
        height = np.array([bars[label].get(cls, 0.0) for label in labels])
        ax.bar(x, height, bottom=bottom, width=0.85, color=_rgb(cls, colors), label=cls)
        bottom += height
    middle, half = x[-1] / 2, max(x[-1] / 2 + 0.7, 2.5)  # a few bars are not too wide
    ax.set_xlim(middle - half, middle + half)
    ax.set_ylim(0, max(1.0, float(bottom.max())))
    ax.set_ylabel("fraction of foreground")
    kind = "well" if all(_text(r.get("well")) for _, r in units) else "image"
    ax.set_title(f"class fractions per {kind}" + (f", by {group_by}" if group_by else ""))
    ax.spines[["top", "right"]].set_visible(False)
    if n <= _MAX_LABELLED_BARS:
        ax.set_xticks(x, labels, rotation=90, fontsize=8)
    else:
        ax.set_xticks([])
        if not group_by:
            ax.set_xlabel(f"{n} {kind}s")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], title="class", loc="upper left", bbox_to_anchor=(1.01, 1))
    if group_by:
        _group_labels(fig, ax, spans)
    return _save(fig, path)


def _group_labels(fig: Figure, ax: Axes, spans: Sequence[tuple[str, float, float]]) -> None:
    """Write each group's name centred under its bars, below the x tick labels (tilted when
    neighbouring names would overlap)."""
    axis_box = ax.xaxis.get_tightbbox()
    below = 0.0 if axis_box is None else max(0.0, ax.bbox.y0 - axis_box.y0)
    offset = below * 72 / fig.dpi + 4
    notes: list[Annotation] = []
    where: dict[str, Any] = {"xycoords": ("data", "axes fraction"), "textcoords": "offset points"}
    for group, first, last in spans:
        xy = ((first + last) / 2, 0)
        notes.append(ax.annotate(group, xy, xytext=(0, -offset), **where, ha="center", va="top"))
    fig.draw_without_rendering()
    boxes = [note.get_window_extent() for note in notes]
    if any(a.x1 + 2 > b.x0 for a, b in itertools.pairwise(boxes)):
        for note in notes:
            note.set_rotation(30)
            note.set_horizontalalignment("right")
            note.set_rotation_mode("anchor")


def plot_plate(wells: Rows, path: PathArg, *, plate: str, colors: Colors | None = None) -> Path:
    """Heat maps of one plate from :func:`well_rows`: a panel per class of its fraction of
    foreground in plate layout (rows down, columns across), grey where a well has no value, the
    values written in the cells for plates of at most 96 wells. Writes a PNG; returns ``path``.
    """
    classes = _classes([w for w in wells if _text(w.get("plate")) == plate])
    if not classes:
        raise ConfigError(f"plate {plate!r} has no wells with a class_name to plot")
    panels = [plate_matrix(wells, plate=plate, class_name=cls) for cls in classes]
    row_labels, column_labels, _ = panels[0]
    n_rows, n_cols = len(row_labels), len(column_labels)
    annotate = n_rows * n_cols <= _MAX_ANNOTATED_WELLS
    cell = 0.42 if annotate else min(0.3, max(0.12, 9.0 / n_cols))
    panel_w, panel_h = n_cols * cell + 1.6, n_rows * cell + 1.0
    per_line = max(1, min(len(classes), int(16 // panel_w)))
    lines = math.ceil(len(classes) / per_line)
    fig = _figure(panel_w * per_line, panel_h * lines + 0.5)
    missing = False
    for k, (cls, (_, _, values)) in enumerate(zip(classes, panels, strict=True)):
        ax = fig.add_subplot(lines, per_line, k + 1)
        white_to_class = [(1.0, 1.0, 1.0), _rgb(cls, colors)]
        cmap: Colormap = LinearSegmentedColormap.from_list(cls, white_to_class)
        cmap = cmap.with_extremes(bad=_EMPTY_WELL)
        finite = values[np.isfinite(values)]
        missing |= finite.size < values.size
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=top)
        ax.set_xticks(range(n_cols), column_labels)
        ax.set_yticks(range(n_rows), row_labels)
        ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1.0)
        ax.tick_params(which="both", length=0, labelsize=8 if annotate else 6)
        ax.xaxis.tick_top()
        ax.set_title(cls)
        colorbar_axes = ax.inset_axes((1.03, 0.0, 0.04, 1.0))  # as tall as the plate
        fig.colorbar(image, cax=colorbar_axes)
        if annotate:
            for (i, j), v in np.ndenumerate(values):
                if np.isfinite(v):
                    r, g, b, _ = cmap(float(v) / top)
                    ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color=ink)
    note = "; grey: no value" if missing else ""
    fig.suptitle(f"plate {plate}: fraction of foreground per well (mean over fields){note}")
    return _save(fig, path)


def plot_dose(
    rows: Rows,
    path: PathArg,
    *,
    dose_column: str,
    group_by: str | None = None,
    colors: Colors | None = None,
) -> Path:
    """A panel per class of fraction of foreground vs ``dose_column``: each row (image or well)
    as a faint point, the mean ± sd per dose joined by a line, one line per ``group_by`` value;
    log x axis when all doses are > 0 and span a factor >= 10 (symlog when zero doses are added
    to such doses, linear otherwise). Writes a PNG; returns ``path``.

    Raises :class:`ConfigError` when no row has a numeric dose and fraction.
    """
    classes = _classes(rows)
    data = {cls: _dose_points(rows, dose_column, cls, group_by) for cls in classes}
    doses = [d for per in data.values() for pts in per.values() for d, _ in pts]
    if not doses:
        raise ConfigError(
            f"column {dose_column!r} has no numeric doses on rows with a fraction_of_foreground"
        )
    positive = [d for d in doses if d > 0]
    wide = min(doses) >= 0 and bool(positive) and max(positive) >= 10 * min(positive)
    groups = list(dict.fromkeys(g for per in data.values() for g in per))
    palette = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    per_line = min(len(classes), 3)
    lines = math.ceil(len(classes) / per_line)
    fig = _figure(4.2 * per_line + (1.6 if group_by else 0.0), 3.4 * lines + 0.4)
    legend: dict[str, Any] = {}
    for k, cls in enumerate(classes):
        ax = fig.add_subplot(lines, per_line, k + 1)
        for index, group in enumerate(groups):
            points = data[cls].get(group)
            if not points:
                continue
            color = palette(index % palette.N) if group_by else _rgb(cls, colors)
            arr = np.asarray(points, dtype=np.float64)
            ax.scatter(arr[:, 0], arr[:, 1], s=12, alpha=0.3, color=color, linewidths=0)
            x, mean, sd, _ = _series(points)
            line = ax.errorbar(x, mean, yerr=sd, color=color, marker="o", ms=4, capsize=3)
            legend.setdefault(group, line)
        if wide and min(doses) > 0:
            ax.set_xscale("log")
        elif wide:  # a zero dose (control) on a log scale of the others
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_ylim(bottom=0)
        ax.set_title(cls)
        ax.set_xlabel(dose_column)
        if k % per_line == 0:
            ax.set_ylabel("fraction of foreground")
        ax.spines[["top", "right"]].set_visible(False)
    if group_by:
        fig.legend(list(legend.values()), list(legend), title=group_by, loc="outside right upper")
    fig.suptitle(f"fraction of foreground vs {dose_column} (mean ± sd)")
    return _save(fig, path)


def _file_name(plate: str, taken: set[str]) -> str:
    """``plate_<name>`` for a plate name (``.ome.zarr``/``.zarr`` dropped), unique in ``taken``."""
    stem = re.sub(r"(\.ome)?\.zarr$", "", plate, flags=re.IGNORECASE)
    base = "plate_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "unnamed")
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def plate_plot_files(plates: Iterable[str]) -> list[str]:
    """File names of the plate plots :func:`write_cohort_plots` writes for ``plates`` (in
    order; ``plate_<name>.png``, made unique), so a run can check them against its inputs
    before it starts."""
    taken: set[str] = set()
    return [f"{_file_name(plate, taken)}.png" for plate in dict.fromkeys(plates)]


def write_cohort_plots(
    table: PathArg,
    out_dir: PathArg,
    *,
    group_by: str | None = None,
    dose_column: str | None = None,
    colors: Colors | None = None,
) -> dict[str, Path]:
    """Plots of a cohort's ``quantification.csv`` into ``out_dir``.

    Writes ``fractions.png``; for plate rows ``wells.csv`` (:func:`well_rows`) and
    ``plate_<name>.png`` per plate; ``dose_response.png`` (per well for plates) when
    ``dose_column`` is given or :func:`default_dose_column` finds one (on plates, doses must be
    constant over each well's fields). Without ``group_by``, :func:`default_group_column` picks
    one (or none). Returns name (file stem) -> path written.

    Raises :class:`ConfigError` for a bad table or a ``group_by``/``dose_column`` not in it.
    """
    rows = read_table(table)
    available = metadata_columns(rows) + [c for c in ("plate", "row", "column") if c in rows[0]]
    for what, column in (("group_by", group_by), ("dose_column", dose_column)):
        if column is not None and column not in available:
            raise ConfigError(
                f"{table}: {what} column {column!r} is not in the table; "
                f"available columns: {available}"
            )
    units = [row for _, row in _units(rows)]  # images, and wells for plates
    if dose_column is not None and not any(_num(r.get(dose_column)) is not None for r in units):
        raise ConfigError(
            f"{table}: dose_column {dose_column!r} holds no numbers (on plates: none constant "
            "over a well's fields)"
        )
    dose = dose_column or default_dose_column(units)
    group = group_by or default_group_column(rows, exclude=[dose] if dose else [])
    out = Path(out_dir)
    written = {
        "fractions": plot_fractions(rows, out / "fractions.png", group_by=group, colors=colors)
    }
    wells = well_rows(rows)
    if wells:
        written["wells"] = write_table(out / "wells.csv", wells)
        plates = list(dict.fromkeys(w["plate"] for w in wells))
        for plate, file in zip(plates, plate_plot_files(plates), strict=True):
            name = file.removesuffix(".png")
            written[name] = plot_plate(wells, out / file, plate=plate, colors=colors)
    if dose:
        written["dose_response"] = plot_dose(
            units, out / "dose_response.png", dose_column=dose, group_by=group, colors=colors
        )
    return written
