"""``POST /jobs/train``: train a patch model from a review session into a model bundle (.zip)."""

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import check_outputs_not_inputs
from simsearch_wsi.io.selection import expand_images
from simsearch_wsi.review.data import train_session
from simsearch_wsi.review.session import Session
from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.jobs import JobContext
from simsearch_wsi.server.paths import require_existing, session_doc
from simsearch_wsi.server.protocol import API_PREFIX
from simsearch_wsi.server.routes.jobs import job_created
from simsearch_wsi.server.schemas import (
    ERROR_RESPONSES,
    JobCreated,
    TrainJobRequest,
    plate_selection,
)
from simsearch_wsi.train.bundle import save_bundle
from simsearch_wsi.train.fit import TrainConfig, TrainResult

__all__ = ["router"]


def router(ctx: ServerContext) -> APIRouter:
    """The route that submits train jobs."""
    api = APIRouter()
    search, paths, locks = ctx.search, ctx.paths, ctx.locks

    @api.post(
        f"{API_PREFIX}/jobs/train",
        status_code=202,
        response_model=JobCreated,
        responses=ERROR_RESPONSES,
        tags=["jobs"],
    )
    def train_job(body: TrainJobRequest) -> JSONResponse:
        """Train a patch model from a review session and write it as a model bundle (.zip).

        The result names the bundle, its classes and confidence thresholds, and the validation
        metrics; progress reports the stage (mining, self-learning, supervised contrastive,
        linear) with epochs and loss. The job holds the engine while it trains: suggestions and
        other engine work wait until it is done (or cancelled)."""
        folder = paths.resolve(body.session, what="session")
        out = paths.resolve(body.out, what="model") if body.out else folder / "model.zip"
        noisy = [paths.resolve(text, what="noisy image") for text in body.noisy_images]
        if noisy:  # plates: their fields (as wells/fields select)
            require_existing(noisy)
            noisy = [
                Path(i.path)
                for i in expand_images([str(p) for p in noisy], **plate_selection(body))
            ]
        if out.suffix.lower() != ".zip":
            raise ConfigError(
                f"model {out}: not a .zip file name; give a file name ending in .zip for the "
                "model bundle"
            )
        if out.is_dir():
            raise ConfigError(f"model {out}: is a folder; give a file name for the model bundle")
        with locks.session(folder):
            session = Session.open(folder)
        if not session.prototypes:
            raise ConfigError(
                f"{folder}: the session has no prototypes yet, nothing to train on; suggest with "
                "classified rectangles and review the suggestions first"
            )
        images = paths.session_images(session)
        check_outputs_not_inputs(
            [("out", out)],
            [
                *session_doc(folder),
                *[("session image", p) for p in images],
                *[("noisy image", p) for p in noisy],
            ],
        )
        require_existing([*images, *noisy])  # answer a moved slide now rather than in a failed job
        # looked up per request (not bound at import), so tests can shrink the presets
        config = TrainConfig.preset_config(body.preset, strategy=body.strategy).replace(
            head_input=body.head_input, similarity_expert=body.similarity_expert
        )
        seed = body.seed

        open_allowed = paths.opener()

        def run(task: JobContext) -> dict[str, Any]:
            task.progress("reading the session", 0, 1)
            with locks.session(folder):
                current = Session.open(folder)  # as it is now, not as it was when queued
            task.progress("waiting for the engine", 0, 1)
            with locks.engine:
                task.check_cancelled()
                t0 = time.perf_counter()
                result = train_session(
                    current,
                    search,
                    config=config,
                    open_image=open_allowed,
                    noisy_images=noisy,
                    device=search.extractor.device,
                    seed=seed,
                    progress=task.progress,
                )
            task.progress("saving the model", 0, 1)  # the last point where cancelling stops it
            save_bundle(out, result.bundle)
            task.report("done", 1, 1)
            return _train_summary(out, result, preset=body.preset, seconds=time.perf_counter() - t0)

        job = ctx.jobs.submit(
            "train",
            run,
            params={
                "session": str(folder),
                "out": str(out),
                "strategy": body.strategy,
                "preset": body.preset,
                "head_input": body.head_input,
                "similarity_expert": body.similarity_expert,
                "noisy_images": [str(p) for p in noisy],
                "seed": seed,
            },
        )
        return job_created(job)

    return api


def _train_summary(
    out: Path, result: TrainResult, *, preset: str, seconds: float
) -> dict[str, Any]:
    """A train job's result: the bundle's path, what its head reads (``head_input``: the
    head kept, ``tuned-search+search`` for the ensemble of two search heads), classes and
    thresholds, the headline metrics (the full metrics are in the bundle) and the notes."""
    bundle, full = result.bundle, result.metrics
    metrics: dict[str, Any] = {}
    for key in ("baseline_validation", "validation"):
        m = full.get(key)
        if isinstance(m, dict):
            metrics[key] = {k: m.get(k) for k in ("n", "accuracy", "balanced_accuracy")}
    metrics["stages"] = {
        name: {"seconds": stage.get("seconds"), "views_per_s": stage.get("views_per_s")}
        for name, stage in dict(full.get("stages") or {}).items()
    }
    metrics["counts"] = full.get("counts", {})
    return {
        "model": str(out),
        "strategy": bundle.strategy,
        "preset": preset,
        "head_input": str(dict(full.get("selection") or {}).get("kept", bundle.head_input)),
        "classes": list(bundle.classes),
        "thresholds": {c: float(t) for c, t in bundle.thresholds.items()},
        "metrics": metrics,
        "notes": list(result.notes),
        "seconds": round(seconds, 2),
    }
