"""IHC positive-cell quantification of a set of images (a cohort manifest, or a list of paths).

Per image (``<stem>`` = the image's name without image suffixes) it writes into the output
folder:

``<stem>.ihc.geojson``
    QuPath cell objects (classified ``Positive``/``Negative`` or ``1+``/``2+``/``3+``/
    ``Negative``, with QuPath's measurement names) and the scored regions as annotations
    (``Num Detections``, ``Num Positive``, ``Positive %``, ``H-score``, ...), for QuPath's
    File > Import objects.
``<stem>.cells.csv``
    One row per cell: centroid (level-0 pixels), class, intensity bin, measurements.

(header only when the image has no cells), and, for all images, ``ihc_scores.csv`` (one row
per image and region, with the manifest's metadata columns), ``ihc_run.json`` (the settings:
thresholds, compartment, stains, requested and working pixel size) and, when a metadata column
groups the images, ``ihc_groups.png`` (positive % and H-score per image, by group; an older one
is removed when nothing groups the images). Every file is written atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.infer.cells import QUPATH_H_DAB, CellDetectionParams, StainVectors
from simsearch_wsi.infer.ihc import (
    IhcResult,
    PositivityRule,
    RegionScore,
    cell_features,
    check_extra_columns,
    image_regions,
    quantify_image,
    region_features,
    score_rows,
)
from simsearch_wsi.infer.quantify import write_table

if TYPE_CHECKING:
    from simsearch_wsi.io.base import ImageSource
    from simsearch_wsi.qupath.geojson import Annotation

__all__ = [
    "IHC_RUN",
    "IHC_TABLE",
    "IhcImage",
    "IhcRun",
    "plot_ihc_groups",
    "quantify_ihc_images",
    "run_record",
    "write_cell_table",
]

#: the cohort table of scores
IHC_TABLE = "ihc_scores.csv"
#: the per-group plot
IHC_PLOT = "ihc_groups.png"
#: the run's settings (thresholds, compartment, stains, pixel size)
IHC_RUN = "ihc_run.json"

#: progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class IhcImage:
    """One image's outcome: its output files, scores, the stains used, seconds taken, the
    pyramid level and pixel size (µm) detection worked at."""

    path: str
    stem: str
    outputs: dict[str, str]
    scores: list[RegionScore]
    n_cells: int
    stains: dict[str, list[float]]
    seconds: float
    level: int = 0
    working_pixel_size_um: float | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class IhcRun:
    """Every image's outcome, the cohort table and the plots written."""

    images: list[IhcImage]
    table: Path
    plots: dict[str, Path] = field(default_factory=dict)


def cell_rows(res: IhcResult, rule: PositivityRule) -> list[dict[str, Any]]:
    """One table row per cell of an :class:`~simsearch_wsi.infer.ihc.IhcResult`: centroid
    (level-0 pixels), class, bin (0..3) and every measurement."""
    names = rule.class_names(res.bins)
    cols = res.cells.measurements
    rows = []
    for i in range(len(res.cells)):
        row: dict[str, Any] = {
            "x_l0": round(float(res.cells.x_l0[i]), 2),
            "y_l0": round(float(res.cells.y_l0[i]), 2),
            "class": names[i],
            "bin": int(res.bins[i]),
        }
        row.update({k: float(v[i]) for k, v in cols.items()})
        rows.append(row)
    return rows


def quantify_ihc_images(
    images: Sequence[tuple[str, str, dict[str, str]]],
    *,
    out_dir: str | Path,
    open_image: Callable[[str], ImageSource],
    annotations: Callable[[str, str], Sequence[Annotation] | None],
    params: CellDetectionParams | None = None,
    rule: PositivityRule | None = None,
    stains: StainVectors | str = QUPATH_H_DAB,
    tissue: bool = False,
    tile_px: int = 1024,
    outlines: bool = True,
    progress: Progress | None = None,
    annotation_source: Callable[[str, str], str | None] | None = None,
) -> IhcRun:
    """Quantify positive cells on every image and write the files of the module docstring.

    Parameters
    ----------
    images
        ``(path, stem, metadata)`` per image; stems must be unique.
    out_dir
        Output folder (created).
    open_image
        Opens a path (the CLI passes its ``--mpp``).
    annotations
        ``(path, stem) -> QuPath objects or None`` (None: whole image / tissue).
    params, rule, tissue, tile_px
        As in :func:`simsearch_wsi.infer.ihc.quantify_image`.
    outlines
        Write the cells into ``<stem>.ihc.geojson`` (nucleus and cell outlines); False keeps
        only the scored regions there (the cells stay in ``<stem>.cells.csv``): faster, and
        bounded memory per cell on large slides.
    stains
        Stain vectors, or ``"estimate"`` to estimate them per image
        (:func:`simsearch_wsi.infer.cells.estimate_image_stains`).
    progress
        ``(stage, done, total)``; stage ``"<stem> | tiles"`` per image.
    annotation_source
        ``(path, stem) -> name`` of the annotations (their file), for error messages.

    Every image is opened and checked (uint8 RGB, known pixel size), its annotations read and
    checked (a polygonal region overlapping the image) and its metadata checked against the
    score columns before the first detection.

    Raises
    ------
    ConfigError
        Any of those checks fails (nothing is written then).
    """
    from simsearch_wsi.core.atomic import write_json_atomic
    from simsearch_wsi.infer.cells import check_brightfield, estimate_image_stains
    from simsearch_wsi.qupath.geojson import write_feature_collection

    stems = [s for _, s, _ in images]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ConfigError(f"images {dup} would write the same files; rename one or split the run")
    if isinstance(stains, str) and stains != "estimate":
        raise ConfigError(f"stains {stains!r} is unknown; give vectors or 'estimate'")
    rule = rule or PositivityRule()
    params = params or CellDetectionParams()
    # every image, its annotations and metadata are checked before the first detection, so
    # a bad one late in the list does not fail the run after hours of work with no table
    loaded: list[Sequence[Annotation] | None] = []
    for path, stem, meta in images:
        check_extra_columns(meta)
        with open_image(path) as img:
            check_brightfield(img)
            anns = annotations(path, stem)
            if anns is not None:
                where = (annotation_source(path, stem) if annotation_source else None) or (
                    f"annotations of {path}"
                )
                image_regions(anns, img.dimensions, mpp=img.mpp, where=where)
        loaded.append(anns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    done: list[IhcImage] = []
    for (path, stem, meta), anns in zip(images, loaded, strict=True):
        t0 = time.perf_counter()
        with open_image(path) as img:
            vec = estimate_image_stains(img) if isinstance(stains, str) else stains

            def tick(k: int, n: int, stem: str = stem) -> None:
                if progress is not None:
                    progress(f"{stem} | tiles", k, n)

            res = quantify_image(
                img,
                annotations=anns,
                params=params,
                rule=rule,
                stains=vec,
                tissue=tissue,
                tile_px=tile_px,
                with_geometry=outlines,
                progress=tick,
            )
            size = img.dimensions
        feats = cell_features(res.cells, res.bins, rule=rule) if outlines else []
        feats += region_features(res.regions, res.scores, image_size_l0=size, rule=rule)
        gj = write_feature_collection(out / f"{stem}.ihc.geojson", feats)
        cells_csv = write_cell_table(out / f"{stem}.cells.csv", res, rule)
        outputs = {"geojson": str(gj), "cells": str(cells_csv)}
        rows.extend(score_rows(stem, res.scores, extra=meta))
        done.append(
            IhcImage(
                path=path,
                stem=stem,
                outputs=outputs,
                scores=res.scores,
                n_cells=len(res.cells),
                stains={"hematoxylin": list(vec.hematoxylin), "dab": list(vec.dab)},
                seconds=round(time.perf_counter() - t0, 3),
                level=res.cells.level,
                working_pixel_size_um=res.cells.px_um,
            )
        )
    table = write_table(out / IHC_TABLE, rows)
    write_json_atomic(
        out / IHC_RUN,
        run_record(
            rule=rule,
            params=params,
            stains=stains,
            tissue=tissue,
            images=[
                {
                    "image": i.path,
                    "stem": i.stem,
                    "stains": i.stains,
                    "level": i.level,
                    "working_pixel_size_um": i.working_pixel_size_um,
                }
                for i in done
            ],
        ),
    )
    plots: dict[str, Path] = {}
    group = _group_column(rows, [m for _, _, m in images])
    if group is not None:
        plots["groups"] = plot_ihc_groups(rows, out / IHC_PLOT, group_by=group)
    else:
        # a plot of an earlier run would no longer match ihc_scores.csv
        (out / IHC_PLOT).unlink(missing_ok=True)
    return IhcRun(images=done, table=table, plots=plots)


def run_record(
    *,
    rule: PositivityRule,
    params: CellDetectionParams,
    stains: StainVectors | str,
    tissue: bool,
    images: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The settings of a run, as written to ``ihc_run.json``: thresholds, compartment and
    class mode, the detection settings (requested pixel size, ...), the stain setting, and per
    image the stain vectors used, the pyramid level and the working pixel size (µm)."""
    from dataclasses import asdict

    return {
        "thresholds": list(rule.thresholds),
        "compartment": rule.compartment,
        "single_threshold": rule.single_threshold,
        "detection": asdict(params),
        "stains": stains
        if isinstance(stains, str)
        else {"hematoxylin": list(stains.hematoxylin), "dab": list(stains.dab)},
        "tissue": tissue,
        "images": [dict(i) for i in images],
    }


def write_cell_table(path: str | Path, res: IhcResult, rule: PositivityRule) -> Path:
    """``<stem>.cells.csv`` (:func:`cell_rows`), atomically; with no cells a header-only table,
    so that the cells of an earlier run of the image do not survive."""
    import csv

    from simsearch_wsi.core.atomic import atomic_path

    if len(res.cells):
        return write_table(path, cell_rows(res, rule))
    target = Path(path)
    with atomic_path(target) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(["x_l0", "y_l0", "class", "bin", *res.cells.measurements])
    return target


def _group_column(rows: list[dict[str, Any]], metas: Sequence[dict[str, str]]) -> str | None:
    """The first metadata column with 2+ distinct values shared by several images."""
    columns = list(dict.fromkeys(k for m in metas for k in m))
    for col in columns:
        values = [m.get(col, "") for m in metas]
        distinct = {v for v in values if v}
        if 2 <= len(distinct) < len(values):
            return col
    return None


def plot_ihc_groups(rows: Sequence[dict[str, Any]], path: str | Path, *, group_by: str) -> Path:
    """Positive % and H-score of every image-region row, as points per group (mean as a bar).

    Parameters
    ----------
    rows
        :func:`simsearch_wsi.infer.ihc.score_rows` rows of every image (with ``group_by``).
    path
        The PNG to write (atomically).
    group_by
        The metadata column whose values are the groups.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from simsearch_wsi.core.atomic import atomic_path

    groups = list(dict.fromkeys(str(r.get(group_by) or "(none)") for r in rows))
    fig = Figure(figsize=(3.0 + 0.6 * len(groups), 3.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "positive_pct", "Positive %"),
        (axes[1], "h_score", "H-score"),
    ):
        for k, g in enumerate(groups):
            vals = [
                float(r[key])
                for r in rows
                if str(r.get(group_by) or "(none)") == g and r.get(key) is not None
            ]
            if vals:
                xs = k + np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else [k]
                ax.scatter(xs, vals, s=14, color="#8c3b12", zorder=3)
                ax.hlines(float(np.mean(vals)), k - 0.3, k + 0.3, color="black", lw=1.5)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_xlabel(group_by)
        ax.set_ylabel(label)
        ax.set_ylim(0, 100 if key == "positive_pct" else 300)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target
