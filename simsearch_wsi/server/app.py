"""The local HTTP server QuPath scripts talk to: warm model and feature caches, JSON in and out.

QuPath runs Groovy scripts and bundles an HTTP client but no server, so the interactive loop is a
Python server (bound to 127.0.0.1 by default) that keeps the trunk and the feature caches warm.
Scripts send the image's URI (``getCurrentServer().getURIs()``) and annotations as GeoJSON, and
add the GeoJSON features that come back. Pixels never travel over HTTP: the server reads the
image from disk, so every path must lie inside one of the folders the server was started with.

Protocol (version :data:`PROTOCOL_VERSION`, everything under ``/api/v1``; OpenAPI at
``/api/v1/openapi.json``, docs at ``/api/v1/docs``):

============================  ==================================================================
``GET  /health``              status, protocol, package version, backbone, weights, device
``POST /suggest``             ``{image, annotations?, session?, thresholds?, background?}`` ->
                              a FeatureCollection of suggestions with a ``summary`` member
``POST /review``              ``{image, annotations, session}`` -> the review report
``POST /background``          ``{image, session, n?}`` -> a FeatureCollection of candidates
``GET  /session?dir=DIR``     the session's summary
``POST /jobs/embed``          ``{images, patch_size_px?}`` -> 202 ``{job_id}``
``POST /jobs/train``          ``{session, out?, strategy?, preset?, noisy_images?, seed?}`` ->
                              202 ``{job_id}``; the result names the model bundle written
``POST /jobs/predict``        ``{images, model, out, thresholds?, simplify_px?, min_area_um2?,
                              write_back?, force?}`` -> 202 ``{job_id}``; the result names the
                              files written per image and ``quantification.csv``
``GET  /jobs``                ``{"jobs": [job, ...]}``
``GET  /jobs/{id}``           ``{id, kind, state, progress, error, result, ...}``
``DELETE /jobs/{id}``         cancel a queued or running job
============================  ==================================================================

Rules every route follows:

* an image is a local path or a ``file:`` URI (percent-encoded, as QuPath writes them); it and
  every other path must resolve (symlinks followed) inside one of the allowed roots (403),
  including the paths the server reads from files: the images a session file names are checked
  before anything is opened, and images are opened only through the same rule (``_Paths``);
* no output may replace or land inside an input (the session file, the model, an OME-Zarr
  image), whatever the spelling (400, :mod:`simsearch_wsi.core.pathguard`);
* with a token, every route but ``/health`` needs ``Authorization: Bearer <token>`` (401);
  without one, the ``Host`` header must name a loopback address (403; this stops DNS rebinding
  from web pages);
* a client may send ``X-SimSearch-Protocol: 1``; another value is answered 409;
* request bodies are JSON (415 otherwise) of at most ``max_body_bytes`` (413);
* every error is ``{"error": {"type": ..., "message": <one line>}}``.

Concurrency: one lock guards the engine (the trunk and the feature cache), so requests and jobs
that need it run one at a time (a train job holds it for the whole training); a predict job
does not take it (it runs its own model, not the engine's trunk or caches, on the engine's
device); one lock per session folder serialises updates to a session (a train job reads its
session under it, then trains on that snapshot).
Long work runs as jobs in a thread pool owned by the app; a job reports progress through
:class:`JobContext`, and cancelling makes the next progress report raise inside the job.
"""

import contextlib
import dataclasses
import errno
import hmac
import ipaddress
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simsearch_wsi import __version__
from simsearch_wsi.core.errors import (
    ConfigError,
    CorruptImageError,
    SimSearchError,
)
from simsearch_wsi.core.pathguard import check_outputs_not_inputs
from simsearch_wsi.infer.dense import PatchModel
from simsearch_wsi.infer.predict import (
    PredictResult,
    PredictSettings,
    check_thresholds,
    expand_inputs,
    predict_images,
    refuse_overwriting_inputs,
)
from simsearch_wsi.io import open_image
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.io.uri import local_path
from simsearch_wsi.qupath.geojson import feature_collection, read_features
from simsearch_wsi.review.data import train_session
from simsearch_wsi.review.session import (
    SESSION_FILE,
    Session,
    background_with_session,
    suggest_with_session,
)
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.train.bundle import ModelBundle, load_bundle, save_bundle
from simsearch_wsi.train.fit import (
    DEFAULT_HEAD_INPUT,
    DEFAULT_STRATEGY,
    HEAD_INPUTS,
    PRESETS,
    STRATEGIES,
    TrainConfig,
    TrainResult,
)

__all__ = [
    "API_PREFIX",
    "PROTOCOL_HEADER",
    "PROTOCOL_VERSION",
    "Job",
    "JobContext",
    "JobManager",
    "create_app",
    "is_loopback",
    "local_path",
    "serve",
]

#: Version of the HTTP protocol; bumped on any incompatible change of routes or shapes.
PROTOCOL_VERSION = 1
#: Prefix of every route.
API_PREFIX = f"/api/v{PROTOCOL_VERSION}"
#: Header a client sends with the protocol version it speaks.
PROTOCOL_HEADER = "X-SimSearch-Protocol"

_HEALTH_PATH = f"{API_PREFIX}/health"
_MAX_FINISHED_JOBS = 200
_logger = logging.getLogger(__name__)


# --- errors --------------------------------------------------------------------------------------
class _ApiError(Exception):
    """An error answered as ``{"error": {"type": code, "message": message}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": code, "message": _one_line(message)}},
        status_code=status,
        headers=headers,
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
}


# path errors the client caused: name too long, symlink loop, invalid name, file vs folder
_CLIENT_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.EISDIR, errno.ENOTDIR}


def _status_for(exc: Exception) -> int:
    if isinstance(exc, FileNotFoundError):  # ImageNotFoundError included
        return 404
    if isinstance(exc, PermissionError):
        return 403
    if isinstance(exc, CorruptImageError):
        return 422
    if isinstance(exc, SimSearchError) or (
        isinstance(exc, OSError) and exc.errno in _CLIENT_ERRNOS
    ):
        return 400
    return 500  # other OSError: disk full, I/O error ... (the message says which)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object")
            continue
        where = ".".join(loc) if loc else "request body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "invalid request: " + "; ".join(parts[:5]) + ("; ..." if len(parts) > 5 else "")


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, _ApiError)
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    async def library_error(request: Request, exc: Exception) -> JSONResponse:
        status = _status_for(exc)
        if status >= 500:
            _logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error_response(status, type(exc).__name__, str(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        code = _HTTP_CODES.get(status, f"http_{status}")
        if status == 404:
            message = (
                f"no such route: {request.method} {request.url.path}; this server speaks "
                f"protocol {PROTOCOL_VERSION} (routes under {API_PREFIX}, see {API_PREFIX}/docs)"
            )
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        elif status == 400 and exc.detail == "There was an error parsing the body":
            code, message = (
                "json_invalid",
                "the request body could not be read as JSON (nested too deeply?)",
            )
        else:
            message = str(exc.detail)
        headers = dict(exc.headers) if exc.headers else None
        return _error_response(status, code, message, headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                detail = (err.get("ctx") or {}).get("error", "JSON decode error")
                loc = err.get("loc", ())
                pos = f" at character {loc[-1]}" if len(loc) > 1 else ""
                return _error_response(
                    400, "json_invalid", f"the request body is not valid JSON: {detail}{pos}"
                )
        return _error_response(422, "validation_error", _validation_message(exc))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        _logger.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
        return _error_response(
            500,
            "internal_error",
            f"internal server error ({type(exc).__name__}) while handling {request.method} "
            f"{request.url.path}; see the server's log",
        )

    app.add_exception_handler(_ApiError, api_error)
    app.add_exception_handler(SimSearchError, library_error)
    app.add_exception_handler(OSError, library_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


# --- hosts and paths ---------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True when ``host`` names the loopback interface: ``localhost``, ``127.0.0.0/8``, ``::1``.

    Other names are not resolved (a name that resolves to a loopback address today may not
    tomorrow), so they count as not loopback; ``0.0.0.0`` and ``::`` (all interfaces) are not.
    """
    h = host.strip().rstrip(".").lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``)."""
    h = header.strip()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class _Paths:
    """Turns client-supplied paths into resolved paths inside the allowed roots."""

    def __init__(self, roots: Sequence[Path]) -> None:
        if not roots:
            raise ConfigError("the server needs at least one allowed folder (allowed_roots)")
        resolved = []
        for root in roots:
            r = Path(root).expanduser().resolve()
            if not r.is_dir():
                raise ConfigError(f"allowed folder {root} does not exist or is not a folder")
            resolved.append(r)
        self.roots = tuple(dict.fromkeys(resolved))

    def resolve(self, text: str, *, what: str, named_by: Path | None = None) -> Path:
        """``text`` (a path or ``file:`` URI) resolved, when it lies inside an allowed root;
        else a 403 error naming it (and ``named_by``, the file that named it)."""
        raw = local_path(text, what=what)
        if "\x00" in raw:
            raise ConfigError(f"{what} {text!r}: the path contains a NUL character")
        if not Path(raw).is_absolute():
            raise ConfigError(
                f"{what} {text!r}: not an absolute path on this server; send the full path or "
                "the image's file: URI"
            )
        try:
            resolved = Path(raw).resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"{what} {text!r}: cannot resolve the path ({exc})") from exc
        if not any(resolved.is_relative_to(root) for root in self.roots):
            shown = "" if str(resolved) == raw else f" (resolves to {resolved})"
            if named_by is not None:
                shown += f" (named by {named_by})"
            raise _ApiError(
                403,
                "forbidden_path",
                f"{what} {raw}{shown} is outside the folders this server may read: "
                f"{', '.join(str(r) for r in self.roots)}; restart the server allowing the "
                "folder that holds it",
            )
        return resolved

    def opener(self, *, what: str = "image") -> Callable[[str], ImageSource]:
        """``open_image`` for paths the server did not get from the client directly (plate
        fields, images named by session files): each passes :meth:`resolve` first (403)."""

        def open_allowed(text: str) -> ImageSource:
            return open_image(self.resolve(text, what=what))

        return open_allowed

    def session_images(self, session: Session, *, prototypes_only: bool = False) -> list[Path]:
        """The images ``session`` names (its prototypes' only, with ``prototypes_only``),
        resolved inside the allowed roots: a session file inside an allowed folder that names
        an image outside them is refused (403) before anything is opened."""
        file = session.root / SESSION_FILE
        images = (
            sorted({p.image for p in session.prototypes}) if prototypes_only else session.images()
        )
        return [self.resolve(p, what="session image", named_by=file) for p in images]


# --- jobs ----------------------------------------------------------------------------------------
JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class _JobCancelledError(Exception):
    """Raised inside a job (from its progress callback) once cancellation was requested."""


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


@dataclasses.dataclass
class Job:
    """One background job. Read it through :meth:`JobManager.describe` (thread-safe)."""

    id: str
    kind: str
    params: dict[str, Any]
    state: JobState = "queued"
    stage: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    result: Any = None
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    future: Future[None] | None = None


class JobContext:
    """What a running job sees: progress reports (which raise once cancelled) and its params."""

    def __init__(self, job: Job, lock: threading.Lock) -> None:
        self._job = job
        self._lock = lock

    @property
    def params(self) -> dict[str, Any]:
        return self._job.params

    @property
    def cancel_requested(self) -> bool:
        return self._job.cancel_event.is_set()

    def check_cancelled(self) -> None:
        """Raise the private cancellation exception when the job was cancelled."""
        if self._job.cancel_event.is_set():
            raise _JobCancelledError

    def progress(self, stage: str, done: int, total: int) -> None:
        """Record progress; a :data:`~simsearch_wsi.features.extractor.ProgressFn`. Raises when cancelled,
        which stops the library call that reported it (caches stay resumable)."""
        self.check_cancelled()
        self.report(stage, done, total)

    def report(self, stage: str, done: int, total: int) -> None:
        """Record progress without checking for cancellation: for the last report of a job
        whose work is already committed (a job that wrote its output is done, not cancelled)."""
        with self._lock:
            self._job.stage, self._job.done, self._job.total = stage, int(done), int(total)


JobRunner = Callable[[JobContext], Any]


class JobManager:
    """Background jobs of one app, run in its own thread pool.

    A job kind is a runner ``fn(ctx: JobContext) -> result`` (JSON-serialisable); routes submit
    them with :meth:`submit` (``embed``, ``train`` and ``predict``; others plug in the same
    way).
    """

    def __init__(self, workers: int = 1) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"job_workers must be a positive integer, got {workers!r}")
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simsearch-job")
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def submit(self, kind: str, runner: JobRunner, params: dict[str, Any] | None = None) -> Job:
        job = Job(id=uuid.uuid4().hex, kind=kind, params=dict(params or {}))
        with self._lock:
            self._prune()
            self._jobs[job.id] = job
            job.future = self._executor.submit(self._run, job, runner)
        return job

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished is not None]
        for j in sorted(finished, key=lambda j: j.created)[
            : max(0, len(finished) - _MAX_FINISHED_JOBS)
        ]:
            del self._jobs[j.id]

    def _run(self, job: Job, runner: JobRunner) -> None:
        with self._lock:
            if job.cancel_event.is_set():
                job.state, job.stage, job.finished = "cancelled", "cancelled", time.time()
                return
            job.state, job.stage, job.started = "running", "starting", time.time()
        ctx = JobContext(job, self._lock)
        try:
            result = runner(ctx)
        except _JobCancelledError:
            with self._lock:
                job.state, job.finished = "cancelled", time.time()
        except Exception as exc:
            if isinstance(exc, SimSearchError | _ApiError):
                _logger.info("job %s (%s) failed: %s", job.id, job.kind, exc)
            else:
                _logger.error("job %s (%s) failed", job.id, job.kind, exc_info=exc)
            name = exc.code if isinstance(exc, _ApiError) else type(exc).__name__
            with self._lock:
                job.state, job.finished = "failed", time.time()
                job.error = f"{name}: {_one_line(str(exc))}"
        else:
            with self._lock:
                job.state, job.result, job.finished = "done", result, time.time()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise _ApiError(
                404, "job_not_found", f"no job {job_id!r} (finished jobs are forgotten on restart)"
            )
        return job

    def describe(self, job: Job) -> dict[str, Any]:
        """The job as the protocol's JSON object."""
        with self._lock:
            return {
                "id": job.id,
                "kind": job.kind,
                "state": job.state,
                "progress": {"stage": job.stage, "done": job.done, "total": job.total},
                "error": job.error,
                "result": job.result,
                "params": job.params,
                "cancel_requested": job.cancel_event.is_set(),
                "created": _iso(job.created),
                "started": _iso(job.started),
                "finished": _iso(job.finished),
            }

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or ask a running one to stop at its next progress report.

        Raises a 409 error for a job that already finished (done or failed)."""
        job = self.get(job_id)
        with self._lock:
            if job.state in ("done", "failed"):
                raise _ApiError(
                    409, "job_finished", f"job {job_id} already {job.state}; nothing to cancel"
                )
            job.cancel_event.set()
            if job.state == "queued" and job.future is not None and job.future.cancel():
                job.state, job.stage, job.finished = "cancelled", "cancelled", time.time()
        return job

    def shutdown(self) -> None:
        """Cancel everything and wait for running jobs to stop (at their next progress)."""
        with self._lock:
            for job in self._jobs.values():
                job.cancel_event.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for job in self._jobs.values():
                if job.state == "queued":
                    job.state, job.stage, job.finished = "cancelled", "cancelled", time.time()


# --- request and response bodies ---------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


ImagePath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        description="absolute local path, or file: URI as QuPath's getCurrentServer().getURIs()",
    ),
]
FolderPath = Annotated[str, Field(min_length=1, max_length=4096)]
GeoJSON = dict[str, Any] | list[Any]


def _geojson_value(value: Any) -> Any:
    if value is not None and not isinstance(value, dict | list):
        raise ValueError(
            "must be GeoJSON: a FeatureCollection object, a Feature or an array of Features "
            f"(got a JSON {type(value).__name__})"
        )
    return value


class SuggestRequest(_Body):
    image: ImagePath
    annotations: GeoJSON | None = Field(
        None,
        description="QuPath GeoJSON (FeatureCollection) whose classified rectangles are "
        "prototypes; null: the session's saved prototypes",
    )
    session: FolderPath | None = Field(
        None, description="review session folder (created if missing)"
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="class -> minimum similarity (default 0.5)"
    )
    background: int = Field(
        0, ge=0, le=10_000, description="also return N most and N least similar unlabelled patches"
    )

    _annotations = field_validator("annotations", mode="before")(_geojson_value)


class ReviewRequest(_Body):
    image: ImagePath
    annotations: GeoJSON = Field(description="the objects exported from QuPath after review")
    session: FolderPath

    _annotations = field_validator("annotations", mode="before")(_geojson_value)


class BackgroundRequest(_Body):
    image: ImagePath
    session: FolderPath
    n: int = Field(10, ge=1, le=10_000, description="candidates of each kind")


class EmbedJobRequest(_Body):
    images: list[ImagePath] = Field(min_length=1, max_length=10_000)
    patch_size_px: float = Field(
        64.0, gt=0, le=1_000_000, description="expected prototype size in level-0 pixels"
    )


def _one_of(allowed: Sequence[str], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
        return value

    return check


class TrainJobRequest(_Body):
    session: FolderPath = Field(description="the review session folder to train from")
    out: FolderPath | None = Field(
        None,
        description="where to write the model bundle (a .zip file); default <session>/model.zip",
    )
    strategy: str = Field(
        DEFAULT_STRATEGY,
        description="training stages: positives, negatives (rejected suggestions), "
        "self-learning on noisy patches",
        json_schema_extra={"enum": list(STRATEGIES)},
    )
    preset: str = Field(
        "fast",
        description="fast: minutes on a CPU; paper: the SimSearch paper's schedules",
        json_schema_extra={"enum": list(PRESETS)},
    )
    noisy_images: list[ImagePath] = Field(
        default_factory=list,
        max_length=10_000,
        description="unreviewed images to mine noisy patches from; default: the session's "
        "unreviewed images",
    )
    head_input: str = Field(
        DEFAULT_HEAD_INPUT,
        description="trunk: fine-tune the trunk; search: a head on the search's own window "
        "vectors; auto: both, the better on held-out patches kept",
        json_schema_extra={"enum": list(HEAD_INPUTS)},
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, strict=True)

    _strategy = field_validator("strategy")(_one_of(STRATEGIES, "strategy"))
    _preset = field_validator("preset")(_one_of(PRESETS, "preset"))
    _head_input = field_validator("head_input")(_one_of(HEAD_INPUTS, "head input"))


class PredictJobRequest(_Body):
    images: list[ImagePath] = Field(
        min_length=1,
        max_length=10_000,
        description="slides, images, OME-Zarr images or plates (a plate: every field)",
    )
    model: FolderPath = Field(description="the model bundle (.zip) to apply, as a train job writes")
    out: FolderPath = Field(description="output folder (created if missing)")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="class -> confidence threshold in [0, 1]; classes left out keep the model's",
    )
    simplify_px: float = Field(
        1.0, ge=0, le=10_000, description="polygon simplification tolerance in mask pixels"
    )
    min_area_um2: float = Field(
        0.0,
        ge=0,
        le=1e12,
        description="drop segmentation pieces (and fill holes) under this area in um2",
    )
    write_back: bool = Field(
        False, description="also add the label mask to OME-Zarr inputs as labels/simsearch"
    )
    force: bool = Field(
        False, description="redo images whose outputs exist for the same model and settings"
    )

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, value: dict[str, float]) -> dict[str, float]:
        for name, p in value.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p}: give a probability in [0, 1]")
        return value


class HealthResponse(BaseModel):
    status: str
    protocol: int
    version: str
    backbone: str
    weights: str
    device: str
    auth_required: bool


class FeatureCollectionResponse(BaseModel):
    type: Literal["FeatureCollection"]
    features: list[dict[str, Any]]
    summary: dict[str, Any] = Field(default_factory=dict)


class JobCreated(BaseModel):
    job_id: str


class JobProgress(BaseModel):
    stage: str
    done: int
    total: int


class JobInfo(BaseModel):
    id: str
    kind: str
    state: JobState
    progress: JobProgress
    error: str | None
    result: Any
    params: dict[str, Any]
    cancel_requested: bool
    created: str | None
    started: str | None
    finished: str | None


class JobList(BaseModel):
    jobs: list[JobInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422)
}


# --- the gate: host, protocol, auth, body size --------------------------------------------------
class _Gate:
    """Pure ASGI middleware checking every HTTP request before routing, and buffering the body
    so that its streamed size is checked too (a chunked upload has no Content-Length)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._check_headers(scope, headers)
        if error is not None:
            await error(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if body:
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                await _error_response(
                    415,
                    "unsupported_media_type",
                    f"request bodies must be JSON; send the header Content-Type: "
                    f"application/json (got {media or 'none'!r})",
                )(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> JSONResponse:
        return _error_response(
            413,
            "payload_too_large",
            f"request body larger than {self.max_body_bytes} bytes; send paths and annotations, "
            "never pixels, or restart the server with a larger limit",
        )

    def _check_headers(self, scope: Scope, headers: dict[str, str]) -> JSONResponse | None:
        if self.token is None and "host" in headers and not is_loopback(_host_of(headers["host"])):
            return _error_response(
                403,
                "host_not_allowed",
                f"Host {headers['host']!r} is not a loopback address; a server without a token "
                "only answers requests to 127.0.0.1/localhost",
            )
        client = headers.get(PROTOCOL_HEADER.lower())
        if client is not None and client.strip() != str(PROTOCOL_VERSION):
            return _error_response(
                409,
                "protocol_mismatch",
                f"protocol mismatch: the client speaks simsearch-wsi protocol {client.strip()!r}, "
                f"this server (simsearch_wsi {__version__}) speaks protocol {PROTOCOL_VERSION}; "
                "update the QuPath scripts or the simsearch_wsi package so that they match",
            )
        if self.token is not None and scope["path"] != _HEALTH_PATH:
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("latin-1"), self.token.encode("utf-8")
            )
            if not ok:
                return _error_response(
                    401,
                    "unauthorized",
                    "missing or wrong token: send the header Authorization: Bearer <token> "
                    "with the token the server was started with",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return _error_response(400, "bad_request", f"invalid Content-Length {length!r}")
            if n > self.max_body_bytes:
                return self._too_large()
        return None


# --- the app -------------------------------------------------------------------------------------
class _Locks:
    """The engine lock and one lock per session folder (always taken session first)."""

    def __init__(self) -> None:
        self.engine = threading.Lock()
        self._guard = threading.Lock()
        self._sessions: dict[Path, threading.Lock] = {}

    @contextlib.contextmanager
    def session(self, folder: Path | None) -> Iterator[None]:
        if folder is None:
            yield
            return
        with self._guard:
            lock = self._sessions.setdefault(folder, threading.Lock())
        with lock:
            yield


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
    paths = _Paths(allowed_roots)
    if token is not None and not token.strip():
        raise ConfigError("the token must not be empty")
    if (
        isinstance(max_body_bytes, bool)
        or not isinstance(max_body_bytes, int)
        or max_body_bytes < 1
    ):
        raise ConfigError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    jobs = JobManager(job_workers)
    locks = _Locks()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(jobs.shutdown)

    app = FastAPI(
        title="simsearch_wsi server",
        version=__version__,
        description=(__doc__ or "").split("\n\n", 1)[0],
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        lifespan=lifespan,
    )
    app.state.search = search
    app.state.jobs = jobs
    app.state.allowed_roots = paths.roots
    app.state.locks = locks
    _install_error_handlers(app)
    app.add_middleware(_Gate, token=token, max_body_bytes=max_body_bytes)

    # -- health ------------------------------------------------------------------------------
    @app.get(f"{API_PREFIX}/health", response_model=HealthResponse, tags=["server"])
    def health() -> dict[str, Any]:
        """Whether the server runs, and what it runs (no token needed)."""
        ex = search.extractor
        return {
            "status": "ok",
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "backbone": ex.spec.name,
            "weights": ex.weights.description,
            "device": str(ex.device),
            "auth_required": token is not None,
        }

    # -- suggest / review / background / session ----------------------------------------------
    @app.post(
        f"{API_PREFIX}/suggest",
        response_model=FeatureCollectionResponse,
        responses=_ERRORS,
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
        check_outputs_not_inputs([], [("image", image)], updated=_session_doc(folder))
        with locks.session(folder):
            session = Session.create(folder, exist_ok=True) if folder is not None else None
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
                )
        summary = result.summary()
        summary["session"] = str(folder) if folder is not None else None
        return JSONResponse({**feature_collection(result.geojson_features()), "summary": summary})

    @app.post(f"{API_PREFIX}/review", responses=_ERRORS, tags=["review loop"])
    def review(body: ReviewRequest) -> dict[str, Any]:
        """Record the user's decisions on suggestions (the objects exported after review)."""
        image = paths.resolve(body.image, what="image")
        folder = paths.resolve(body.session, what="session")
        annotations = read_features(body.annotations, where="annotations")
        check_outputs_not_inputs([], [("image", image)], updated=_session_doc(folder))
        with locks.session(folder):
            session = Session.open(folder)
            with open_image(image) as img:  # checks the image exists and is readable
                report = session.ingest_review(
                    img.path,
                    annotations,
                    source=f"HTTP POST {API_PREFIX}/review",
                    image_size_l0=img.dimensions,
                    where="annotations",
                )
            session.save()
        return report.to_dict()

    @app.post(
        f"{API_PREFIX}/background",
        response_model=FeatureCollectionResponse,
        responses=_ERRORS,
        tags=["review loop"],
    )
    def background(body: BackgroundRequest) -> JSONResponse:
        """Background candidates: the N unlabelled patches most and least similar to the mean
        of the session's prototypes, as detections of class ``background``."""
        image = paths.resolve(body.image, what="image")
        folder = paths.resolve(body.session, what="session")
        check_outputs_not_inputs([], [("image", image)], updated=_session_doc(folder))
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
                )
        summary = result.summary()
        summary["session"] = str(folder)
        return JSONResponse({**feature_collection(result.geojson_features()), "summary": summary})

    @app.get(f"{API_PREFIX}/session", responses=_ERRORS, tags=["review loop"])
    def session_summary(
        folder: Annotated[str, Query(alias="dir", min_length=1, max_length=4096)],
    ) -> dict[str, Any]:
        """Classes, thresholds, counts and reviewed images of a session."""
        resolved = paths.resolve(folder, what="session")
        with locks.session(resolved):
            return Session.open(resolved).summary()

    # -- jobs ------------------------------------------------------------------------------------
    @app.post(
        f"{API_PREFIX}/jobs/embed",
        status_code=202,
        response_model=JobCreated,
        responses=_ERRORS,
        tags=["jobs"],
    )
    def embed_job(body: EmbedJobRequest, request: Request) -> JSONResponse:
        """Fill the feature cache (and the pooled windows) of images ahead of time."""
        images = [paths.resolve(text, what="image") for text in body.images]
        for p in images:  # answer a typo now rather than in a failed job
            if not p.exists():
                raise _ApiError(
                    404, "ImageNotFoundError", f"{p}: no such file or directory; check the path"
                )
        patch = float(body.patch_size_px)

        def run(ctx: JobContext) -> dict[str, Any]:
            done: list[dict[str, Any]] = []
            for i, path in enumerate(images):
                ctx.check_cancelled()
                label = f"image {i + 1}/{len(images)}"

                def progress(stage: str, n: int, total: int, label: str = label) -> None:
                    ctx.progress(f"{label}: {stage}", n, total)

                progress("waiting for the engine", 0, 1)
                with open_image(path) as img, locks.engine:
                    ctx.check_cancelled()
                    spec, fmap = search.embed(img, patch, progress=progress)
                    search.pool(spec, fmap, patch, progress=progress)
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

        job = jobs.submit(
            "embed", run, {"images": [str(p) for p in images], "patch_size_px": patch}
        )
        return _job_created(job)

    @app.post(
        f"{API_PREFIX}/jobs/train",
        status_code=202,
        response_model=JobCreated,
        responses=_ERRORS,
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
                *_session_doc(folder),
                *[("session image", p) for p in images],
                *[("noisy image", p) for p in noisy],
            ],
        )
        for p in [*images, *noisy]:  # answer a moved slide now rather than in a failed job
            if not p.exists():
                raise _ApiError(
                    404, "ImageNotFoundError", f"{p}: no such file or directory; check the path"
                )
        # looked up per request (not bound at import), so tests can shrink the presets
        config = TrainConfig.preset_config(body.preset, strategy=body.strategy).replace(
            head_input=body.head_input
        )
        seed = body.seed

        open_allowed = paths.opener()

        def run(ctx: JobContext) -> dict[str, Any]:
            ctx.progress("reading the session", 0, 1)
            with locks.session(folder):
                current = Session.open(folder)  # as it is now, not as it was when queued
            ctx.progress("waiting for the engine", 0, 1)
            with locks.engine:
                ctx.check_cancelled()
                t0 = time.perf_counter()
                result = train_session(
                    current,
                    search,
                    config,
                    open_image=open_allowed,
                    noisy_images=noisy,
                    device=search.extractor.device,
                    seed=seed,
                    progress=ctx.progress,
                )
            ctx.progress("saving the model", 0, 1)  # the last point where cancelling stops it
            save_bundle(out, result.bundle)
            ctx.report("done", 1, 1)
            return _train_summary(out, result, preset=body.preset, seconds=time.perf_counter() - t0)

        job = jobs.submit(
            "train",
            run,
            {
                "session": str(folder),
                "out": str(out),
                "strategy": body.strategy,
                "preset": body.preset,
                "noisy_images": [str(p) for p in noisy],
                "seed": seed,
            },
        )
        return _job_created(job)

    @app.post(
        f"{API_PREFIX}/jobs/predict",
        status_code=202,
        response_model=JobCreated,
        responses=_ERRORS,
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
        targets = expand_inputs([str(p) for p in images])
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
            write_back=body.write_back,
        )
        device, autocast = search.extractor.device, search.extractor.autocast

        open_allowed = paths.opener()  # plate fields lie inside their plate

        def run(ctx: JobContext) -> dict[str, Any]:
            ctx.progress("loading the model", 0, 1)
            t0 = time.perf_counter()
            model = PatchModel(bundle, device=device, autocast=autocast)
            current = [0, len(targets)]  # the image being run, of how many

            def progress(stage: str, done: int, total: int) -> None:
                if stage != "images":
                    ctx.progress(f"image {current[0] + 1}/{current[1]}: {stage}", done, total)
                elif done < total:
                    current[:] = [done, total]
                    ctx.progress("images", done, total)
                else:  # every image is written: let the table be written too
                    ctx.report("writing quantification.csv", done, total)

            results = predict_images(
                targets,
                model,
                out,
                open_image=open_allowed,
                settings=settings,
                resume=not body.force,
                progress=progress,
            )
            ctx.report("done", 1, 1)
            return _predict_summary(
                model_path, out, bundle, settings, results, seconds=time.perf_counter() - t0
            )

        job = jobs.submit(
            "predict",
            run,
            {
                "images": [str(p) for p in images],
                "model": str(model_path),
                "out": str(out),
                "thresholds": dict(body.thresholds),
                "simplify_px": body.simplify_px,
                "min_area_um2": body.min_area_um2,
                "write_back": body.write_back,
                "force": body.force,
            },
        )
        return _job_created(job)

    @app.get(f"{API_PREFIX}/jobs", response_model=JobList, responses=_ERRORS, tags=["jobs"])
    def list_jobs() -> dict[str, Any]:
        """All jobs of this server run, oldest first."""
        return {"jobs": [jobs.describe(j) for j in jobs.jobs()]}

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}", response_model=JobInfo, responses=_ERRORS, tags=["jobs"]
    )
    def get_job(job_id: str) -> dict[str, Any]:
        """State, progress and (when done) result of a job."""
        return jobs.describe(jobs.get(job_id))

    @app.delete(
        f"{API_PREFIX}/jobs/{{job_id}}", response_model=JobInfo, responses=_ERRORS, tags=["jobs"]
    )
    def cancel_job(job_id: str) -> JSONResponse:
        """Cancel a job: a queued one at once (200), a running one at its next progress
        report (202; poll until its state is ``cancelled``)."""
        job = jobs.cancel(job_id)
        info = jobs.describe(job)
        return JSONResponse(info, status_code=200 if info["state"] == "cancelled" else 202)

    return app


def _job_created(job: Job) -> JSONResponse:
    return JSONResponse(
        {"job_id": job.id},
        status_code=202,
        headers={"Location": f"{API_PREFIX}/jobs/{job.id}"},
    )


def _session_doc(folder: Path | None) -> list[tuple[str, Path | None]]:
    """The session file a route rewrites, for :func:`check_outputs_not_inputs`."""
    return [("session file", folder / SESSION_FILE)] if folder is not None else []


def _train_summary(
    out: Path, result: TrainResult, *, preset: str, seconds: float
) -> dict[str, Any]:
    """A train job's result: the bundle's path, classes and thresholds, the headline metrics
    (the full metrics are in the bundle) and the notes."""
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
        "classes": list(bundle.classes),
        "thresholds": {c: float(t) for c, t in bundle.thresholds.items()},
        "metrics": metrics,
        "notes": list(result.notes),
        "seconds": round(seconds, 2),
    }


def _predict_summary(
    model: Path,
    out: Path,
    bundle: ModelBundle,
    settings: PredictSettings,
    results: Sequence[PredictResult],
    *,
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


# --- running it ----------------------------------------------------------------------------------
def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until interrupted (log level warning). The caller decides the
    address; binding to anything but loopback should require a token (:func:`is_loopback`)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
