"""The gate: ASGI middleware that checks every HTTP request before it is routed.

In order: the ``Host`` header (loopback only, when the server has no token), the protocol
version a client names (409 on another), the token (401; ``/health`` needs none), the body's
declared size (413), then the body itself, buffered so that its streamed size is checked too
(a chunked upload has no Content-Length), and its media type (415 unless JSON).
"""

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simsearch_wsi import __version__
from simsearch_wsi.server.errors import error_response
from simsearch_wsi.server.protocol import HEALTH_PATH, PROTOCOL_HEADER, PROTOCOL_VERSION
from simsearch_wsi.server.security import bearer_token_matches, host_of, is_loopback

__all__ = ["Gate"]


class Gate:
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
                await error_response(
                    415,
                    "unsupported_media_type",
                    message=f"request bodies must be JSON; send the header Content-Type: "
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
        return error_response(
            413,
            "payload_too_large",
            message=f"request body larger than {self.max_body_bytes} bytes; send paths and "
            "annotations, never pixels, or restart the server with a larger limit",
        )

    def _check_headers(self, scope: Scope, headers: dict[str, str]) -> JSONResponse | None:
        if self.token is None and "host" in headers and not is_loopback(host_of(headers["host"])):
            return error_response(
                403,
                "host_not_allowed",
                message=f"Host {headers['host']!r} is not a loopback address; a server without "
                "a token only answers requests to 127.0.0.1/localhost",
            )
        client = headers.get(PROTOCOL_HEADER.lower())
        if client is not None and client.strip() != str(PROTOCOL_VERSION):
            return error_response(
                409,
                "protocol_mismatch",
                message=f"protocol mismatch: the client speaks simsearch-wsi protocol "
                f"{client.strip()!r}, this server (simsearch_wsi {__version__}) speaks protocol "
                f"{PROTOCOL_VERSION}; update the QuPath scripts or the simsearch_wsi package so "
                "that they match",
            )
        if (
            self.token is not None
            and scope["path"] != HEALTH_PATH
            and not bearer_token_matches(headers.get("authorization", ""), self.token)
        ):
            return error_response(
                401,
                "unauthorized",
                message="missing or wrong token: send the header Authorization: Bearer <token> "
                "with the token the server was started with",
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return error_response(
                    400, "bad_request", message=f"invalid Content-Length {length!r}"
                )
            if n > self.max_body_bytes:
                return self._too_large()
        return None
