"""serving.errors → gRPC status codes, in one place (the HTTP side maps the same errors to HTTP).

| error              | code               | why                                                    |
|--------------------|--------------------|--------------------------------------------------------|
| ValidationError    | INVALID_ARGUMENT   | the client's request is wrong; retrying will not help  |
| PromptTooLong      | INVALID_ARGUMENT   | a ValidationError (TGI answers it 422 too)             |
| Overloaded         | RESOURCE_EXHAUSTED | the queue is full; retry later with back-off (HTTP 429)|
| EngineUnavailable  | UNAVAILABLE        | starting or stopping; gRPC clients retry this code     |
| NotFound           | NOT_FOUND          | e.g. feedback on a completion never served (or not yet |
|                    |                    | ingested when served by another replica: retry later)  |
| RecordingUnavailable | UNAVAILABLE      | events cannot be made durable; retry the call          |
| GenerationError    | INTERNAL           | the engine broke mid-request. Not ABORTED: gRPC keeps  |
|                    |                    | that for concurrency conflicts the client should redo. |
| anything else      | INTERNAL           | details say "internal error"; the trace goes to the log|

The trailing metadata `x-error-kind` carries FeedloopError.kind (TGI's error_type), so a client
can tell the kinds apart without parsing details; `x-model-version` names the version a request
failed on, when it had one (a failed lane, an upstream).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from serving.errors import (EngineUnavailable, FeedloopError, GenerationError, NotFound, Overloaded,
                            RecordingUnavailable, ValidationError)

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[FeedloopError], grpc.StatusCode], ...] = (
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),  # PromptTooLong included
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (RecordingUnavailable, grpc.StatusCode.UNAVAILABLE),
    (GenerationError, grpc.StatusCode.INTERNAL),
)


def status_code(error: FeedloopError) -> grpc.StatusCode:
    return next((code for cls, code in _CODES if isinstance(error, cls)), grpc.StatusCode.INTERNAL)


@asynccontextmanager
async def errors_as_status(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Turn what the body raises into a status with a clear details message, never a traceback.

    Cancellation (asyncio.CancelledError, a BaseException) passes through untouched: the client
    has gone and there is nobody to answer.
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise  # the body already chose a status
    except FeedloopError as error:
        metadata = (("x-error-kind", error.kind),)
        if getattr(error, "model_version", None):  # the version the request failed on
            metadata += (("x-model-version", error.model_version),)
        await context.abort(status_code(error), str(error) or error.kind, trailing_metadata=metadata)
    except Exception:
        log.exception("unexpected error in a gRPC handler")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)",
                            trailing_metadata=(("x-error-kind", "internal"),))
