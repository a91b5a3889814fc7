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

and, for all images, ``ihc_scores.csv`` (one row per image and region, with the manifest's
metadata columns) and, when a metadata column groups the images, ``ihc_groups.png``
(positive % and H-score per image, by group). Every file is written atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
    quantify_image,
    region_features,
    score_rows,
)
from simsearch_wsi.infer.quantify import write_table

if TYPE_CHECKING:
    from simsearch_wsi.io.base import ImageSource
    from simsearch_wsi.qupath.geojson import Annotation

__all__ = ["IHC_TABLE", "IhcImage", "IhcRun", "plot_ihc_groups", "quantify_ihc_images"]

#: the cohort table of scores
IHC_TABLE = "ihc_scores.csv"
#: the per-group plot
IHC_PLOT = "ihc_groups.png"

#: progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class IhcImage:
    """One image's outcome: its output files, scores, the stains used, seconds taken."""

    path: str
    stem: str
    outputs: dict[str, str]
    scores: list[RegionScore]
    n_cells: int
    stains: dict[str, list[float]]
    seconds: float

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
    """
    from simsearch_wsi.infer.cells import estimate_image_stains
    from simsearch_wsi.qupath.geojson import write_feature_collection

    stems = [s for _, s, _ in images]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ConfigError(f"images {dup} would write the same files; rename one or split the run")
    if isinstance(stains, str) and stains != "estimate":
        raise ConfigError(f"stains {stains!r} is unknown; give vectors or 'estimate'")
    rule = rule or PositivityRule()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    done: list[IhcImage] = []
    for path, stem, meta in images:
        t0 = time.perf_counter()
        with open_image(path) as img:
            vec = estimate_image_stains(img) if isinstance(stains, str) else stains

            def tick(k: int, n: int, stem: str = stem) -> None:
                if progress is not None:
                    progress(f"{stem} | tiles", k, n)

            res = quantify_image(
                img,
                annotations=annotations(path, stem),
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
        feats += region_features(res.regions, res.scores, image_size_l0=size)
        gj = write_feature_collection(out / f"{stem}.ihc.geojson", feats)
        outputs = {"geojson": str(gj)}
        if len(res.cells):
            cells_csv = write_table(out / f"{stem}.cells.csv", cell_rows(res, rule))
            outputs["cells"] = str(cells_csv)
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
            )
        )
    table = write_table(out / IHC_TABLE, rows)
    plots: dict[str, Path] = {}
    group = _group_column(rows, [m for _, _, m in images])
    if group is not None:
        plots["groups"] = plot_ihc_groups(rows, out / IHC_PLOT, group_by=group)
    return IhcRun(images=done, table=table, plots=plots)


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
