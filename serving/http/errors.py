"""Error answers of the HTTP layer, in the format of the route that was called.

Two families of routes, two formats:

- TGI routes (`/`, `/generate`, `/generate_stream`, `/info`, ...): `{"error": str, "error_type": str}`,
  with TGI's statuses (422 validation, 424 generation, 429 overloaded).
- `/v1/...` routes: OpenAI's `{"error": {"message", "type", "param", "code"}}`. The OpenAI-compatible
  routes answer bad requests with 400 as OpenAI (and vLLM) do; `/v1/score` is feedloop's own API
  and keeps the engine's 422 for them, as TGI routes and the gRPC mapping do.

The format is chosen by path, so answers produced outside any route (unknown route, wrong method,
body too large, malformed JSON) already look like the route the client meant to call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import FeedloopError, PromptTooLong, ValidationError

log = logging.getLogger(__name__)

SCORE_PATH = "/v1/score"
# feedloop's own routes under /v1: OpenAI's error body, but 422 for bad input (not OpenAI endpoints).
FEEDLOOP_V1_PATHS = frozenset({SCORE_PATH, "/v1/feedback", "/v1/compare"})


class InvalidParam(ValidationError):
    """A validation error that names the offending request field (OpenAI's `param`) and, where the
    client may want to branch on it, a machine-readable `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    kind: str  # TGI's error_type
    param: str | None = None
    code: str | None = None


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


ADMIN_PREFIX = "/v1/admin/"  # feedloop's admin routes (routers/admin.py): 422 for bad input too


def validation_status(path: str) -> int:
    """400 on OpenAI-compatible routes (OpenAI's contract), 422 everywhere else (TGI's)."""
    feedloop_own = path in FEEDLOOP_V1_PATHS or path.startswith(ADMIN_PREFIX)
    return 400 if is_openai_path(path) and not feedloop_own else 422


def _openai_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(path: str, err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    if is_openai_path(path):
        body = {"error": {"message": err.message, "type": _openai_type(err.status), "param": err.param,
                          "code": err.code}}
    else:
        body = {"error": err.message, "error_type": err.kind}
    return JSONResponse(body, status_code=err.status, headers=headers)


def from_feedloop_error(path: str, exc: FeedloopError) -> ApiError:
    """Map an engine/service error onto the route's status and wording."""
    status = validation_status(path) if isinstance(exc, ValidationError) else exc.status
    if is_openai_path(path) and status not in (400, 404, 422, 429, 503):
        status = 500  # a failed generation: OpenAI clients know 500 (and retry it), not TGI's 424
    code = getattr(exc, "code", None)
    if code is None and isinstance(exc, PromptTooLong):
        code = "context_length_exceeded"  # OpenAI's code for the same condition
    elif code is None and exc.status == 429:
        code = "model_overloaded"
    return ApiError(status, str(exc) or exc.kind, exc.kind, getattr(exc, "param", None), code)


def sse_error_body(path: str, exc: BaseException) -> dict:
    """The body of an error event sent mid-stream, once the 200 status is already on the wire."""
    if isinstance(exc, FeedloopError):
        err = from_feedloop_error(path, exc)
    else:
        err = ApiError(500, "internal error during generation", "generation")
    if is_openai_path(path):
        return {"error": {"message": err.message, "type": _openai_type(err.status), "param": err.param,
                          "code": err.code}}
    return {"error": err.message, "error_type": err.kind}


# -- request validation (pydantic) ----------------------------------------------------------------

def _field_path(loc: tuple) -> str:
    """('body', 'parameters', 'stop', 0) -> 'parameters.stop[0]'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation_error(path: str, exc: RequestValidationError) -> ApiError:
    """Turn FastAPI/pydantic's list of errors into one sentence a client can act on."""
    status = validation_status(path)
    openai = is_openai_path(path)
    messages: list[str] = []
    param = code = None
    for i, e in enumerate(exc.errors()):
        kind, loc = e.get("type", ""), tuple(e.get("loc", ()))
        field = _field_path(loc)
        if kind == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            msg, c = f"the request body is not valid JSON ({detail} at character {loc[-1]})", "invalid_json"
        elif loc in (("body",), ()) and kind in ("missing", "model_attributes_type", "dict_type"):
            msg, c = "the request body must be a JSON object sent with Content-Type: application/json", \
                "invalid_body"
        elif kind == "extra_forbidden":
            msg = (f"Unrecognized request argument supplied: {field}" if openai
                   else f"unknown field `{field}`")
            c = "unknown_parameter"
        elif kind == "missing":
            msg, c = f"`{field}` is required", "missing_parameter"
        elif kind == "value_error":
            # pydantic prefixes our own messages with "Value error, "; the client needs only ours
            msg, c = f"`{field}`: {(e.get('ctx') or {}).get('error', e.get('msg'))}", "invalid_value"
        else:
            msg, c = f"`{field}`: {e.get('msg')}", "invalid_type"
        if i == 0:
            param, code = (None if c in ("invalid_json", "invalid_body") else field or None), c
        if msg not in messages:
            messages.append(msg)
    if not messages:
        messages = ["invalid request"]
    # A union field yields one error per member; three are enough to see what went wrong.
    return ApiError(status, "; ".join(messages[:3]), "validation", param, code)


# -- handlers ---------------------------------------------------------------------------------------

_HTTP_KIND = {404: "not_found", 405: "method_not_allowed", 413: "validation"}


async def _on_feedloop_error(request: Request, exc: FeedloopError) -> JSONResponse:
    # A request that failed on a version (a canary's prefill, an upstream) says which one: the
    # middleware's default would name the serving version, which did not fail.
    failed_on = getattr(exc, "model_version", None)
    headers = {"X-Model-Version": failed_on} if failed_on else None
    return error_response(request.url.path, from_feedloop_error(request.url.path, exc), headers=headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(request.url.path, from_validation_error(request.url.path, exc))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    path, method = request.url.path, request.method
    if exc.status_code == 404:
        message = f"Invalid URL ({method} {path})" if is_openai_path(path) else f"no route {method} {path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {method} is not allowed on {path} (allowed: {allowed})"
    elif exc.status_code == 400:
        # FastAPI's answer to a body it cannot even decode (e.g. bytes that are not UTF-8): to the
        # client it is malformed JSON, so it gets the route's validation status and wording.
        err = ApiError(validation_status(path), f"the request body is not valid JSON ({exc.detail})",
                       "validation", None, "invalid_json")
        return error_response(path, err, headers=exc.headers)
    else:
        message = str(exc.detail)
    kind = _HTTP_KIND.get(exc.status_code, "validation" if exc.status_code < 500 else "internal")
    code = kind if exc.status_code in (404, 405) else None
    return error_response(path, ApiError(exc.status_code, message, kind, None, code), headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FeedloopError, _on_feedloop_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
