"""Errors the engine and services raise; each transport maps them to its own format and status."""
from __future__ import annotations


class FeedloopError(Exception):
    """Base class. `status` is the HTTP status; `kind` is TGI's error_type."""

    status = 500
    kind = "internal"


class ValidationError(FeedloopError):
    """The request is malformed or a parameter is out of range (client's mistake)."""

    status = 422
    kind = "validation"


class PromptTooLong(ValidationError):
    """The prompt (or prompt + max_new_tokens) exceeds the engine's limits."""


class UnknownModelVersion(ValidationError):
    """A request names a model version this engine has not loaded."""


class Overloaded(FeedloopError):
    """The waiting queue is full; the client should retry later."""

    status = 429
    kind = "overloaded"


class GenerationError(FeedloopError):
    """The engine failed while generating (TGI answers these with 424)."""

    status = 424
    kind = "generation"


class EngineUnavailable(FeedloopError):
    """The engine is not running (starting up or shut down)."""

    status = 503
    kind = "unavailable"


class NotFound(FeedloopError):
    """The request names something this platform does not know (e.g. feedback on a completion it
    never served). `param` names the request field, `code` is machine-readable."""

    status = 404
    kind = "not_found"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class RecordingUnavailable(FeedloopError):
    """Events cannot be made durable (no event bus configured, or the local log failed)."""

    status = 503
    kind = "unavailable"
