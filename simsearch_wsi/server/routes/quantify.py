"""``POST /jobs/quantify``: IHC positive-cell scoring of one image, as ``simsearch-wsi quantify``
does, with the cells and scored regions returned as QuPath GeoJSON."""

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from simsearch_wsi.cohort.ihc import IHC_RUN, IHC_TABLE, run_record
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import check_outputs_not_inputs, check_writable
from simsearch_wsi.infer.cells import QUPATH_H_DAB, CellDetectionParams, estimate_image_stains
from simsearch_wsi.infer.ihc import (
    REGION_TYPES,
    IhcResult,
    PositivityRule,
    cell_features,
    quantify_image,
    region_features,
    score_rows,
)
from simsearch_wsi.io import open_image
from simsearch_wsi.io.selection import image_stem
from simsearch_wsi.qupath.geojson import feature_collection, read_features
from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.jobs import JobContext
from simsearch_wsi.server.paths import require_existing
from simsearch_wsi.server.protocol import API_PREFIX
from simsearch_wsi.server.routes.jobs import job_created
from simsearch_wsi.server.schemas import ERROR_RESPONSES, JobCreated, QuantifyJobRequest

__all__ = ["router"]


def router(ctx: ServerContext) -> APIRouter:
    """The route that submits quantify jobs."""
    api = APIRouter()
    paths = ctx.paths

    @api.post(
        f"{API_PREFIX}/jobs/quantify",
        status_code=202,
        response_model=JobCreated,
        responses=ERROR_RESPONSES,
        tags=["jobs"],
    )
    def quantify_job(body: QuantifyJobRequest) -> JSONResponse:
        """Detect and classify the cells of an image (hematoxylin nuclei, cell expansion, DAB
        OD against QuPath's thresholds) and score each annotation sent (or the whole image):
        counts, positive %, 1+/2+/3+, H-score, cells/mm^2.

        The result holds ``scores`` (one row per region, as ``ihc_scores.csv``) and
        ``features``: a FeatureCollection of the cells (QuPath cell objects with QuPath's
        measurement names) and the regions as annotations carrying ``Num Detections``, ``Num
        Positive``, ``Positive %``, ``H-score`` ..., each with the id of the annotation it
        scores. With ``out`` the files of ``simsearch-wsi quantify`` are written there too."""
        image = paths.resolve(body.image, what="image")
        require_existing([image])
        out = None if body.out is None else paths.resolve(body.out, what="output folder")
        if out is not None:
            if out.exists() and not out.is_dir():
                raise ConfigError(f"out {out}: exists and is not a folder; give an output folder")
            stem = image_stem(image.name)
            written = [
                ("out", out / name)
                for name in (f"{stem}.ihc.geojson", f"{stem}.cells.csv", IHC_TABLE, IHC_RUN)
            ]
            check_outputs_not_inputs(written, [("image", image)], into=[("out", out)])
            check_writable("out", out / IHC_TABLE)
        annotations = (
            None
            if body.annotations is None
            else read_features(body.annotations, where="annotations")
        )
        regions_sent = [a for a in annotations or [] if a.object_type in REGION_TYPES]
        params = CellDetectionParams(
            detection_image=body.detection_image, cell_expansion_um=body.cell_expansion_um
        )
        t1, t2, t3 = body.thresholds
        rule = PositivityRule(
            compartment=body.compartment,
            thresholds=(t1, t2, t3),
            single_threshold=not body.three_classes,
        )

        def run(task: JobContext) -> dict[str, Any]:
            t0 = time.perf_counter()
            with open_image(image, mpp=body.mpp) as img:
                stains = estimate_image_stains(img) if body.stains == "estimate" else QUPATH_H_DAB
                res = quantify_image(
                    img,
                    annotations=regions_sent or None,
                    params=params,
                    rule=rule,
                    stains=stains,
                    progress=lambda done, total: task.progress("tiles", done, total),
                )
                size = img.dimensions
            task.report("writing objects", 0, 1)
            feats = cell_features(res.cells, res.bins, rule=rule)
            feats += region_features(res.regions, res.scores, image_size_l0=size, rule=rule)
            rows = score_rows(image.name, res.scores)
            outputs: dict[str, str] = {}
            if out is not None:
                record = run_record(
                    rule=rule,
                    params=params,
                    stains=body.stains if body.stains == "estimate" else stains,
                    tissue=False,
                    images=[
                        {
                            "image": str(image),
                            "stem": image_stem(image.name),
                            "stains": {
                                "hematoxylin": list(stains.hematoxylin),
                                "dab": list(stains.dab),
                            },
                            "level": res.cells.level,
                            "working_pixel_size_um": res.cells.px_um,
                        }
                    ],
                )
                outputs = _write(out, image.name, feats, rows, res, rule, record)
            task.report("done", 1, 1)
            return {
                "image": str(image),
                "n_cells": len(res.cells),
                "scores": rows,
                "features": feature_collection(feats),
                "stains": {"hematoxylin": list(stains.hematoxylin), "dab": list(stains.dab)},
                "outputs": outputs,
                "seconds": round(time.perf_counter() - t0, 2),
            }

        job = ctx.jobs.submit(
            "quantify",
            run,
            params={
                "image": str(image),
                "regions": len(regions_sent),
                "thresholds": list(body.thresholds),
                "three_classes": body.three_classes,
                "compartment": body.compartment,
                "out": None if out is None else str(out),
            },
        )
        return job_created(job)

    return api


def _write(
    out: Path,
    name: str,
    feats: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    res: IhcResult,
    rule: PositivityRule,
    record: dict[str, Any],
) -> dict[str, str]:
    """The files of ``simsearch-wsi quantify`` for one image; ``ihc_scores.csv`` keeps the
    rows of the other images already there (one job per image builds one table) and
    ``ihc_run.json`` records this job's settings. Jobs writing into the same folder at the same
    time may lose each other's rows: run them one after the other."""
    from simsearch_wsi.cohort.ihc import write_cell_table
    from simsearch_wsi.core.atomic import write_json_atomic
    from simsearch_wsi.infer.quantify import write_table
    from simsearch_wsi.qupath.geojson import write_feature_collection

    stem = image_stem(name)
    written = {"geojson": str(write_feature_collection(out / f"{stem}.ihc.geojson", feats))}
    written["cells"] = str(write_cell_table(out / f"{stem}.cells.csv", res, rule))
    table = out / IHC_TABLE
    written["table"] = str(write_table(table, [*rows, *_other_rows(table, name)]))
    written["run"] = str(write_json_atomic(out / IHC_RUN, record))
    return written


def _other_rows(table: Path, image: str) -> list[dict[str, Any]]:
    """The rows of ``table`` (an earlier ``ihc_scores.csv``) of images other than ``image``;
    none when there is no table. Values stay text (written back as read)."""
    import csv

    if not table.is_file():
        return []
    with table.open(newline="", encoding="utf-8") as fh:
        return [dict(r) for r in csv.DictReader(fh) if r.get("image") != image]
