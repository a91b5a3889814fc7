"""``GET /health``: whether the server runs, and what it runs."""

from typing import Any

from fastapi import APIRouter

from simsearch_wsi import __version__
from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.protocol import API_PREFIX, PROTOCOL_VERSION
from simsearch_wsi.server.schemas import HealthResponse

__all__ = ["router"]


def router(ctx: ServerContext) -> APIRouter:
    """The health route (the one route that never needs a token)."""
    api = APIRouter()

    @api.get(f"{API_PREFIX}/health", response_model=HealthResponse, tags=["server"])
    def health() -> dict[str, Any]:
        """Whether the server runs, and what it runs (no token needed)."""
        ex = ctx.search.extractor
        return {
            "status": "ok",
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "backbone": ex.spec.name,
            "weights": ex.weights.description,
            "device": str(ex.device),
            "auth_required": ctx.auth_required,
        }

    return api
