"""TGI-compatible routes: `POST /`, `/generate`, `/generate_stream`, `GET /info`.

Works with `text_generation.Client` / `AsyncClient` unchanged. Every answer carries the completion id
and the model version in headers (X-Completion-Id, X-Model-Version), since TGI's bodies have no place
for them.
"""
from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator
from importlib import metadata

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from serving.engine.types import MAX_STOP_SEQUENCES, Token
from serving.errors import FeedloopError
from serving.http.dependencies import ServicesDep, completion_headers, request_record
from serving.http.disconnect import unless_disconnected
from serving.http.errors import sse_error_body
from serving.http.schemas.tgi import ERROR_RESPONSES, GenerateRequest, GenerateResponse, Info, StreamEvent
from serving.http.sse import EventStreamResponse, sse_data
from serving.services import Services
from serving.services.generation import Completion, CompletionStream

log = logging.getLogger(__name__)

router = APIRouter(tags=["text-generation-inference"])

_SSE = {"model": StreamEvent, "description": "Server-sent events, one per token: `data:{StreamEvent}`"}


@router.post("/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
async def generate(request: Request, body: GenerateRequest, services: ServicesDep) -> Response:
    """Generate the whole answer. (`stream` is ignored here, as TGI does.)"""
    return await _whole_answer(request, body, services, as_list=False)


@router.post("/generate_stream", response_class=EventStreamResponse,
             responses={200: _SSE, **ERROR_RESPONSES})
async def generate_stream(request: Request, body: GenerateRequest, services: ServicesDep) -> EventStreamResponse:
    """Stream the answer token by token (server-sent events)."""
    return await _streamed_answer(request, body, services)


@router.post("/", response_model=list[GenerateResponse], responses={**ERROR_RESPONSES})
async def compat_generate(request: Request, body: GenerateRequest, services: ServicesDep) -> Response:
    """TGI's compatibility route: `stream` true answers like /generate_stream, else a JSON list holding
    one /generate answer (what text_generation.Client parses)."""
    if body.stream:
        return await _streamed_answer(request, body, services)
    return await _whole_answer(request, body, services, as_list=True)


@router.get("/info", response_model=Info)
async def info(services: ServicesDep) -> JSONResponse:
    """Model and limits, as TGI reports them, plus the versions of the policy and reward model."""
    e = services.engine.info()
    body = Info(
        model_id=e.model_id, model_sha=e.model_version, model_dtype=e.model_dtype,
        model_device_type=e.model_device_type, model_pipeline_tag="text-generation",
        max_concurrent_requests=e.max_batch_size + e.max_queue, max_best_of=1,
        max_stop_sequences=MAX_STOP_SEQUENCES, max_input_tokens=e.max_input_tokens,
        max_input_length=e.max_input_tokens, max_total_tokens=e.max_total_tokens,
        max_client_batch_size=1, validation_workers=1, version=_feedloop_version(), sha=None,
        docker_label=None, router="feedloop", model_version=e.model_version,
        reward_model_version=services.reward.model_version, reward_model_trained=services.reward.trained,
        max_batch_size=e.max_batch_size, max_queue=e.max_queue)
    return JSONResponse(body.model_dump(), headers={"X-Model-Version": e.model_version})


# -- helpers of these routes ----------------------------------------------------------------------

def _sampling(body: GenerateRequest, services: Services):
    return body.sampling(default_max_new_tokens=services.settings.max_new_tokens_default,
                         max_total_tokens=services.engine.info().max_total_tokens)


async def _streamed_answer(request: Request, body: GenerateRequest, services: Services) -> EventStreamResponse:
    stream = await services.generation.stream(body.inputs, _sampling(body, services),
                                              request_record(request, body.inputs))
    return EventStreamResponse(_events(stream, body, request.url.path),
                               headers=completion_headers(stream.completion_id, stream.model_version))


async def _whole_answer(request: Request, body: GenerateRequest, services: Services, as_list: bool) -> Response:
    params = _sampling(body, services)
    record = request_record(request, body.inputs)
    c = await unless_disconnected(request, lambda: services.generation.complete(body.inputs, params, record))
    if isinstance(c, Response):  # the client left; nobody reads this
        return c
    answer = _generate_body(c, body)
    return JSONResponse([answer] if as_list else answer, headers=completion_headers(c.completion_id, c.model_version))


def _token(t: Token) -> dict:
    # JSON has no -inf; TGI's logprob is nullable, so a token of probability 0 reads as null.
    logprob = t.logprob if math.isfinite(t.logprob) else None
    return {"id": t.id, "text": t.text, "logprob": logprob, "special": t.special}


def _generate_body(c: Completion, body: GenerateRequest) -> dict:
    text = (body.inputs + c.text) if body.params.return_full_text else c.text
    out: dict = {"generated_text": text}
    if body.params.details:
        out["details"] = {"finish_reason": c.finish_reason, "generated_tokens": len(c.tokens), "seed": c.seed,
                          "prefill": [], "tokens": [_token(t) for t in c.tokens], "top_tokens": []}
    return out


async def _events(stream: CompletionStream, body: GenerateRequest, path: str) -> AsyncGenerator[bytes, None]:
    """TGI's event stream: `data:{"index", "token", "top_tokens", "generated_text", "details"}`; the
    last event has generated_text (and details when asked). A failure after the first byte becomes an
    error event, which text_generation clients raise as the matching exception."""
    prefix = body.inputs if body.params.return_full_text else ""
    index = 0
    try:
        async for out in stream:
            event = {"index": index, "token": _token(out.token), "top_tokens": None, "generated_text": None,
                     "details": None}
            if out.finish_reason is not None:
                event["generated_text"] = prefix + (out.generated_text or "")
                if body.params.details:
                    event["details"] = {"finish_reason": out.finish_reason,
                                        "generated_tokens": out.generated_tokens, "seed": out.seed,
                                        "input_length": out.prompt_tokens}
            yield sse_data(event)
            index += 1
    except Exception as exc:
        if not isinstance(exc, FeedloopError):
            log.exception("generation stream %s failed", stream.completion_id)
        yield sse_data(sse_error_body(path, exc))
    finally:
        with anyio.CancelScope(shield=True):  # free the batch slot even while being cancelled
            await stream.aclose()


def _feedloop_version() -> str:
    try:
        return metadata.version("feedloop")
    except metadata.PackageNotFoundError:
        return "0+unknown"
