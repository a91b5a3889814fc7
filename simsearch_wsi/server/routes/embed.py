"""``POST /jobs/embed``: fill the feature cache (and the pooled windows) of images ahead of time."""

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from simsearch_wsi.io import open_image
from simsearch_wsi.io.selection import expand_images
from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.jobs import JobContext
from simsearch_wsi.server.paths import require_existing
from simsearch_wsi.server.protocol import API_PREFIX
from simsearch_wsi.server.routes.jobs import job_created
from simsearch_wsi.server.schemas import (
    ERROR_RESPONSES,
    EmbedJobRequest,
    JobCreated,
    plate_selection,
)

__all__ = ["router"]


def router(ctx: ServerContext) -> APIRouter:
    """The route that submits embed jobs."""
    api = APIRouter()
    search, paths, locks = ctx.search, ctx.paths, ctx.locks

    @api.post(
        f"{API_PREFIX}/jobs/embed",
        status_code=202,
        response_model=JobCreated,
        responses=ERROR_RESPONSES,
        tags=["jobs"],
    )
    def embed_job(body: EmbedJobRequest) -> JSONResponse:
        """Fill the feature cache (and the pooled windows) of images ahead of time."""
        images = [paths.resolve(text, what="image") for text in body.images]
        require_existing(images)  # answer a typo now rather than in a failed job
        # plates: their fields (as wells/fields select), named like the CLI's
        images = [
            Path(i.path) for i in expand_images([str(p) for p in images], **plate_selection(body))
        ]
        patch = float(body.patch_size_px)

        def run(task: JobContext) -> dict[str, Any]:
            done: list[dict[str, Any]] = []
            for i, path in enumerate(images):
                task.check_cancelled()
                label = f"image {i + 1}/{len(images)}"

                def progress(stage: str, n: int, total: int, label: str = label) -> None:
                    task.progress(f"{label}: {stage}", n, total)

                progress("waiting for the engine", 0, 1)
                with open_image(path) as img, locks.engine:
                    task.check_cancelled()
                    spec, fmap = search.embed(img, patch, progress=progress)
                    window = search.window_size_l0(patch)
                    search.pool(spec, fmap, patch_size_l0=window, progress=progress)
                    h, w, d = fmap.shape
                    done.append(
                        {
                            "image": str(img.path),
                            "feature_cache": str(fmap.path),
                            "cells": [h, w],
                            "features": d,
                            "tiles_embedded": int(fmap.computed.sum()),
                            "tiles_total": int(fmap.computed.size),
                            "analysis_scale": spec.scale.to_dict(),
                        }
                    )
                progress("done", 1, 1)
            return {"images": done, "patch_size_px": patch}

        job = ctx.jobs.submit(
            "embed", run, params={"images": [str(p) for p in images], "patch_size_px": patch}
        )
        return job_created(job)

    return api
