"""Errors as HTTP answers: every error is ``{"error": {"type": ..., "message": <one line>}}``.

:class:`ApiError` carries its own status and type; library errors map to a status by kind
(:func:`status_for`), and the framework's own errors (unknown route, invalid JSON, validation)
get the same shape with a message that says what to do.
"""

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from simsearch_wsi.core.errors import CorruptImageError, SimSearchError
from simsearch_wsi.server.protocol import API_PREFIX, PROTOCOL_VERSION

__all__ = [
    "ApiError",
    "error_response",
    "install_error_handlers",
    "one_line",
    "status_for",
    "validation_message",
]

_logger = logging.getLogger(__name__)

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


class ApiError(Exception):
    """An error answered as ``{"error": {"type": code, "message": message}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, *, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split()) or "(no message)"


def error_response(
    status: int, code: str, *, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The protocol's error object as a response."""
    return JSONResponse(
        {"error": {"type": code, "message": one_line(message)}},
        status_code=status,
        headers=headers,
    )


def status_for(exc: Exception) -> int:
    """The HTTP status of a library error or an ``OSError``."""
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


def validation_message(exc: RequestValidationError) -> str:
    """One line naming up to five invalid fields and what is wrong with each."""
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


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, message=exc.message, headers=exc.headers)


async def _library_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_for(exc)
    if status >= 500:
        _logger.error("%s %s failed: %s", request.method, request.url.path, exc)
    return error_response(status, type(exc).__name__, message=str(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
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
    return error_response(status, code, message=message, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "JSON decode error")
            loc = err.get("loc", ())
            pos = f" at character {loc[-1]}" if len(loc) > 1 else ""
            return error_response(
                400, "json_invalid", message=f"the request body is not valid JSON: {detail}{pos}"
            )
    return error_response(422, "validation_error", message=validation_message(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    _logger.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
    return error_response(
        500,
        "internal_error",
        message=f"internal server error ({type(exc).__name__}) while handling {request.method} "
        f"{request.url.path}; see the server's log",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error ``app`` raises in the protocol's shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(SimSearchError, _library_error)
    app.add_exception_handler(OSError, _library_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
