"""The review loop: ``/suggest``, ``/review``, ``/background`` and ``/session``.

Each takes the session folder's lock while it reads or updates the session; the engine lock is
taken inside the library calls that need the engine.
"""

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import check_outputs_not_inputs
from simsearch_wsi.io import open_image
from simsearch_wsi.qupath.geojson import feature_collection, read_features
from simsearch_wsi.review.session import Session, background_with_session, suggest_with_session
from simsearch_wsi.search.heatmap import HeatMap, heatmap_png
from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.paths import session_doc
from simsearch_wsi.server.protocol import API_PREFIX
from simsearch_wsi.server.schemas import (
    ERROR_RESPONSES,
    BackgroundRequest,
    FeatureCollectionResponse,
    ReviewRequest,
    SuggestRequest,
)

__all__ = ["heatmap_answer", "router"]


def heatmap_answer(heatmap: HeatMap) -> dict[str, Any]:
    """The heat maps as JSON: their placement on the slide (:meth:`HeatMap.metadata`) and one
    base64 PNG per class (:func:`~simsearch_wsi.search.heatmap.heatmap_png`)."""
    return {
        **heatmap.metadata(),
        "png_base64": {
            name: base64.b64encode(heatmap_png(heatmap.of(name))).decode("ascii")
            for name in heatmap.classes
        },
    }


def router(ctx: ServerContext) -> APIRouter:
    """The routes of the review loop."""
    api = APIRouter()
    search, paths, locks = ctx.search, ctx.paths, ctx.locks

    @api.post(
        f"{API_PREFIX}/suggest",
        response_model=FeatureCollectionResponse,
        responses=ERROR_RESPONSES,
        tags=["review loop"],
    )
    def suggest(body: SuggestRequest) -> JSONResponse:
        """Suggestions (QuPath detections) for the prototypes given, or the session's."""
        image = paths.resolve(body.image, what="image")
        folder = paths.resolve(body.session, what="session") if body.session else None
        if body.annotations is None and folder is None:
            raise ConfigError(
                "suggest needs 'annotations' (GeoJSON with prototype rectangles), or a "
                "'session' with saved prototypes"
            )
        annotations = (
            read_features(body.annotations, where="annotations")
            if body.annotations is not None
            else None
        )
        check_outputs_not_inputs([], [("image", image)], updated=session_doc(folder))
        with locks.session(folder):
            session = Session.open_or_new(folder) if folder is not None else None
            if session is not None:
                paths.session_images(session, prototypes_only=True)  # 403 before any work
            with open_image(image) as img:
                result = suggest_with_session(
                    search,
                    img,
                    session=session,
                    annotations=annotations,
                    where="annotations",
                    thresholds=dict(body.thresholds),
                    n_background=body.background,
                    engine_lock=locks.engine,
                    open_image=paths.opener(what="prototype image"),
                    floor=body.floor,
                    heatmap=body.heatmap,
                    heatmap_downsample=body.heatmap_downsample,
                    dense=body.dense,
                    candidates=body.candidates,
                )
        summary = result.summary()
        summary["session"] = str(folder) if folder is not None else None
        answer: dict[str, Any] = {
            **feature_collection(result.geojson_features()),
            "summary": summary,
        }
        if result.heatmap is not None:
            answer["heatmap"] = heatmap_answer(result.heatmap)
        return JSONResponse(answer)

    @api.post(f"{API_PREFIX}/review", responses=ERROR_RESPONSES, tags=["review loop"])
    def review(body: ReviewRequest) -> dict[str, Any]:
        """Record the user's decisions on suggestions (the objects exported after review)."""
        image = paths.resolve(body.image, what="image")
        folder = paths.resolve(body.session, what="session")
        annotations = read_features(body.annotations, where="annotations")
        check_outputs_not_inputs([], [("image", image)], updated=session_doc(folder))
        with locks.session(folder):
            session = Session.open(folder)
            with open_image(image) as img:  # checks the image exists and is readable
                report = session.ingest_review(
                    img.path,
                    annotations,
                    source=f"HTTP POST {API_PREFIX}/review",
                    image_size_l0=img.dimensions,
                    where="annotations",
                    thresholds=dict(body.thresholds),
                )
            session.save()
        return report.to_dict()

    @api.post(
        f"{API_PREFIX}/background",
        response_model=FeatureCollectionResponse,
        responses=ERROR_RESPONSES,
        tags=["review loop"],
    )
    def background(body: BackgroundRequest) -> JSONResponse:
        """Background candidates: the N unlabelled patches most and least similar to the mean
        of the session's prototypes, as detections of class ``background``."""
        image = paths.resolve(body.image, what="image")
        folder = paths.resolve(body.session, what="session")
        check_outputs_not_inputs([], [("image", image)], updated=session_doc(folder))
        with locks.session(folder):
            session = Session.open(folder)
            paths.session_images(session, prototypes_only=True)  # 403 before any work
            with open_image(image) as img:
                result = background_with_session(
                    search,
                    img,
                    session=session,
                    n=body.n,
                    engine_lock=locks.engine,
                    open_image=paths.opener(what="prototype image"),
                    dense=body.dense,
                    candidates=body.candidates,
                )
        summary = result.summary()
        summary["session"] = str(folder)
        return JSONResponse({**feature_collection(result.geojson_features()), "summary": summary})

    @api.get(f"{API_PREFIX}/session", responses=ERROR_RESPONSES, tags=["review loop"])
    def session_summary(
        folder: Annotated[str, Query(alias="dir", min_length=1, max_length=4096)],
    ) -> dict[str, Any]:
        """Classes, thresholds, counts and reviewed images of a session."""
        resolved = paths.resolve(folder, what="session")
        with locks.session(resolved):
            return Session.open(resolved).summary()

    return api
