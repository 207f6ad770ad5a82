"""ASGI middleware of the gateway: body-size limit, the X-Model-Version header, and the last-resort
500. Written as plain ASGI (not BaseHTTPMiddleware) so that streamed answers pass through untouched
and client disconnects still reach the route."""
from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.http.errors import ApiError, error_response

log = logging.getLogger(__name__)

# An oversized body is read and thrown away up to this many bytes before the 413 is sent: a client
# that is still uploading when the server closes the socket would see a reset, not the 413.
_DRAIN_LIMIT = 16 * 1024 * 1024


class BodyLimitMiddleware:
    """Answers 413 (in the route's error format) when the request body exceeds `max_bytes`.

    A declared Content-Length is checked before anything is read; a chunked body is buffered up to the
    limit (FastAPI buffers it anyway to parse the JSON) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared > self.max_bytes:
                await _drain(receive, declared)
                await self._reject(scope, receive, send, declared)
            else:
                await self.app(scope, receive, send)  # the server enforces the declared length
            return

        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away mid-upload
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    size += await _drain(receive, _DRAIN_LIMIT)
                await self._reject(scope, receive, send, size)
                return
            chunks.append(chunk)

        replayed = False

        async def replay() -> Message:
            # The whole body once, then the real channel: routes still hear about disconnects.
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        err = ApiError(413, f"the request body is {size} bytes; this server accepts at most "
                            f"{self.max_bytes} bytes", "validation", None, "request_too_large")
        await error_response(scope["path"], err)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive, limit: int) -> int:
    """Read and discard the rest of the body, at most `limit` bytes. Returns the bytes read."""
    read = 0
    while read < min(limit, _DRAIN_LIMIT):
        message = await receive()
        if message["type"] != "http.request":
            break
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return read


class ModelVersionHeaderMiddleware:
    """Stamps `X-Model-Version` on every answer whose route did not set it itself (errors, 404s, /info).

    Generation routes set it to the version the request actually ran on (which may differ from the
    current one during a hot swap); here the current version is all there is to give.
    """

    def __init__(self, app: ASGIApp, version_for_path: Callable[[str], str]) -> None:
        self.app = app
        self.version_for_path = version_for_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "x-model-version" not in headers:
                    try:
                        headers["X-Model-Version"] = self.version_for_path(scope["path"])
                    except Exception:  # never turn an answer into a failure for a header
                        log.warning("no model version for %s", scope["path"], exc_info=True)
            await send(message)

        await self.app(scope, receive, stamped)


class UnexpectedErrorMiddleware:
    """Last resort for bugs: a 500 in the route's format, without the stack trace (which is logged).

    Starlette's own handler for `Exception` re-raises after answering; this one does not, so the
    error is logged once and test transports do not see it as a crash of the app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope["path"])
            if started:  # the status is on the wire; all we can do is end the connection
                return
            err = ApiError(500, "internal server error", "internal", None, "internal_error")
            await error_response(scope["path"], err)(scope, receive, send)
