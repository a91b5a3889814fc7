"""The routes, one module per resource; each builds an ``APIRouter`` around a
:class:`~simsearch_wsi.server.context.ServerContext`.

==================  ==============================================================================
:mod:`.health`      ``GET /health``
:mod:`.review`      the review loop: ``/suggest``, ``/review``, ``/background``, ``/session``
:mod:`.embed`       ``POST /jobs/embed``
:mod:`.train`       ``POST /jobs/train``
:mod:`.predict`     ``POST /jobs/predict``
:mod:`.quantify`    ``POST /jobs/quantify``
:mod:`.jobs`        ``GET /jobs``, ``GET /jobs/{id}``, ``DELETE /jobs/{id}``
==================  ==============================================================================
"""

from fastapi import APIRouter

from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.routes import embed, health, jobs, predict, quantify, review, train

__all__ = ["routers"]


def routers(ctx: ServerContext) -> list[APIRouter]:
    """Every router of the protocol, in the order their routes are matched."""
    return [
        health.router(ctx),
        review.router(ctx),
        embed.router(ctx),
        train.router(ctx),
        predict.router(ctx),
        quantify.router(ctx),
        jobs.router(ctx),
    ]
