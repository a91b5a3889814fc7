"""The app factory: the ASGI app around a ready engine (:func:`create_app`), and :func:`serve`.

:func:`create_app` only wires the parts: the allowed paths, the job manager and the locks (a
:class:`~simsearch_wsi.server.context.ServerContext`), the error handlers, the gate middleware
and the routers. The protocol is described in :mod:`simsearch_wsi.server`.
"""

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from simsearch_wsi import __version__
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.errors import install_error_handlers
from simsearch_wsi.server.gate import Gate
from simsearch_wsi.server.jobs import JobManager
from simsearch_wsi.server.locks import Locks
from simsearch_wsi.server.paths import AllowedPaths
from simsearch_wsi.server.protocol import API_PREFIX, SUMMARY, TITLE
from simsearch_wsi.server.routes import routers
from simsearch_wsi.server.security import is_loopback

# is_loopback is re-exported: ``simsearch-wsi serve`` imports it from here with the factory
__all__ = ["create_app", "is_loopback", "serve"]

_Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]


def create_app(
    search: SimSearch,
    *,
    allowed_roots: Sequence[Path],
    token: str | None = None,
    max_body_bytes: int = 32 * 2**20,
    job_workers: int = 1,
) -> FastAPI:
    """The server's ASGI app around a ready :class:`~simsearch_wsi.search.engine.SimSearch`.

    Parameters
    ----------
    search
        the engine (trunk on its device, feature cache, settings); kept for the app's lifetime.
    allowed_roots
        folders whose contents (after resolving symlinks) clients may name: images, sessions.
    token
        when set, every route but ``/health`` requires ``Authorization: Bearer <token>``;
        when None, only requests whose ``Host`` is a loopback address are answered.
    max_body_bytes
        largest request body accepted (413 above).
    job_workers
        threads running background jobs.

    Raises
    ------
    ConfigError
        no allowed root, a root that is not a folder, an empty token, or a non-positive limit.
    """
    paths = AllowedPaths(allowed_roots)
    _check_limits(token, max_body_bytes)
    ctx = ServerContext(
        search=search,
        paths=paths,
        locks=Locks(),
        jobs=JobManager(job_workers),
        auth_required=token is not None,
    )
    app = FastAPI(
        title=TITLE,
        version=__version__,
        description=SUMMARY,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        lifespan=_lifespan(ctx.jobs),
    )
    app.state.search = search
    app.state.jobs = ctx.jobs
    app.state.allowed_roots = paths.roots
    app.state.locks = ctx.locks
    install_error_handlers(app)
    app.add_middleware(Gate, token=token, max_body_bytes=max_body_bytes)
    for router in routers(ctx):
        app.include_router(router)
    return app


def _check_limits(token: str | None, max_body_bytes: int) -> None:
    if token is not None and not token.strip():
        raise ConfigError("the token must not be empty")
    if (
        isinstance(max_body_bytes, bool)
        or not isinstance(max_body_bytes, int)
        or max_body_bytes < 1
    ):
        raise ConfigError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")


def _lifespan(jobs: JobManager) -> _Lifespan:
    """The app's lifespan: on shutdown, cancel the jobs and wait for running ones to stop."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(jobs.shutdown)

    return lifespan


def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until interrupted (log level warning). The caller decides the
    address; binding to anything but loopback should require a token (:func:`is_loopback`)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
