"""``POST /jobs/predict``: apply a model bundle to images, as ``simsearch-wsi predict`` does."""

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.infer.dense import PatchModel
from simsearch_wsi.infer.predict import (
    PredictResult,
    PredictSettings,
    check_thresholds,
    expand_inputs,
    predict_images,
    refuse_overwriting_inputs,
)
from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.jobs import JobContext
from simsearch_wsi.server.protocol import API_PREFIX
from simsearch_wsi.server.routes.jobs import job_created
from simsearch_wsi.server.schemas import (
    ERROR_RESPONSES,
    JobCreated,
    PredictJobRequest,
    plate_selection,
)
from simsearch_wsi.train.bundle import ModelBundle, load_bundle

__all__ = ["router"]


def router(ctx: ServerContext) -> APIRouter:
    """The route that submits predict jobs."""
    api = APIRouter()
    search, paths = ctx.search, ctx.paths

    @api.post(
        f"{API_PREFIX}/jobs/predict",
        status_code=202,
        response_model=JobCreated,
        responses=ERROR_RESPONSES,
        tags=["jobs"],
    )
    def predict_job(body: PredictJobRequest) -> JSONResponse:
        """Apply a model bundle to images: per image QuPath GeoJSON (detections and segmentation
        annotations), an OME-Zarr with class probabilities and labels, an overlay PNG and a run
        record, and ``quantification.csv`` for the images of the job (as ``simsearch-wsi
        predict``).

        The result names every file written, per image, and the table. An image whose outputs
        exist for the same model and settings is not run again (``reused``) unless ``force``.
        The model runs on the engine's device with the engine's tile and batch sizes, loaded
        for the job; the job does not take the engine lock (it needs neither the engine's trunk
        nor its feature cache), so suggestions keep answering while it runs."""
        images = [paths.resolve(text, what="image") for text in body.images]
        model_path = paths.resolve(body.model, what="model")
        out = paths.resolve(body.out, what="output folder")
        # a missing image (404), a clash of output names, a missing or broken bundle and
        # unknown classes are answered now rather than in a failed job
        targets = expand_inputs([str(p) for p in images], **plate_selection(body))
        refuse_overwriting_inputs(targets, out, inputs=[("model", model_path)])
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out {out}: exists and is not a folder; give an output folder")
        bundle = load_bundle(model_path)
        check_thresholds(body.thresholds, bundle.classes, option="thresholds")
        settings = PredictSettings(
            thresholds=dict(body.thresholds),
            simplify_px=body.simplify_px,
            min_area_um2=body.min_area_um2,
            tile_size=search.settings.tile_size,
            batch_size=search.settings.batch_size,
            tiles=search.settings.tiles,
            write_back=body.write_back,
        )
        device, autocast = search.extractor.device, search.extractor.autocast

        open_allowed = paths.opener()  # plate fields lie inside their plate

        def run(task: JobContext) -> dict[str, Any]:
            task.progress("loading the model", 0, 1)
            t0 = time.perf_counter()
            model = PatchModel(bundle, device=device, autocast=autocast)
            current = [0, len(targets)]  # the image being run, of how many

            def progress(stage: str, done: int, total: int) -> None:
                if stage != "images":
                    task.progress(f"image {current[0] + 1}/{current[1]}: {stage}", done, total)
                elif done < total:
                    current[:] = [done, total]
                    task.progress("images", done, total)
                else:  # every image is written: let the table be written too
                    task.report("writing quantification.csv", done, total)

            results = predict_images(
                targets,
                model,
                out_dir=out,
                open_image=open_allowed,
                settings=settings,
                resume=not body.force,
                progress=progress,
            )
            task.report("done", 1, 1)
            return _predict_summary(
                model_path,
                out,
                bundle=bundle,
                settings=settings,
                results=results,
                seconds=time.perf_counter() - t0,
            )

        job = ctx.jobs.submit(
            "predict",
            run,
            params={
                "images": [str(p) for p in images],
                "model": str(model_path),
                "out": str(out),
                "thresholds": dict(body.thresholds),
                "simplify_px": body.simplify_px,
                "min_area_um2": body.min_area_um2,
                "write_back": body.write_back,
                "force": body.force,
                **({"wells": body.wells} if body.wells else {}),
                **({"fields": body.fields} if body.fields else {}),
            },
        )
        return job_created(job)

    return api


def _predict_summary(
    model: Path,
    out: Path,
    *,
    bundle: ModelBundle,
    settings: PredictSettings,
    results: Sequence[PredictResult],
    seconds: float,
) -> dict[str, Any]:
    """A predict job's result: the model, its classes and the thresholds applied, and per image
    the files written and the detections per class (the table rows are in
    ``quantification.csv`` and in each image's ``<stem>.predict.json``)."""
    thresholds = {**bundle.thresholds, **settings.thresholds}
    return {
        "model": str(model),
        "classes": list(bundle.classes),
        "thresholds": {c: float(t) for c, t in thresholds.items()},
        "out": str(out),
        "quantification": str(out / "quantification.csv"),
        "images": [
            {
                "image": r.image,
                "stem": r.stem,
                "outputs": dict(r.outputs),
                "n_detections": dict(r.n_detections),
                "reused": r.reused,
                "seconds": round(r.seconds, 2),
            }
            for r in results
        ],
        "seconds": round(seconds, 2),
    }
