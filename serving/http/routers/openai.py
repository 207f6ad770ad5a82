"""OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models[/{id}]`.

Works with the `openai` client unchanged. Errors use OpenAI's body and 400 for bad requests (see
serving.http.errors).
"""
from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from serving.engine.types import SamplingParams
from serving.http.dependencies import ServicesDep, completion_headers, request_record, served_model_name
from serving.http.disconnect import unless_disconnected
from serving.http.errors import ApiError, InvalidParam, error_response
from serving.http.openai_output import chat_completion, stream_chunks, text_completion
from serving.http.schemas.openai import (ChatCompletionRequest, ChatTemplateError, CompletionRequest,
                                         OpenAIErrorBody, flatten_messages)
from serving.http.sse import EventStreamResponse
from serving.services import Services
from serving.services.completion_events import RequestRecord

router = APIRouter(prefix="/v1", tags=["openai"])

_STARTED = int(time.time())


ERRORS: dict = {code: {"model": OpenAIErrorBody, "description": text} for code, text in [
    (400, "Invalid request (bad or unsupported parameter, prompt too long)"), (413, "Request body too large"),
    (429, "Model is overloaded: retry later"), (500, "Generation failed"), (503, "Engine unavailable")]}
_OK = {200: {"content": {"application/json": {}, "text/event-stream": {}},
             "description": "The answer, or server-sent chunks when `stream` is true"}}


@router.post("/chat/completions", responses={**_OK, **ERRORS})
async def chat_completions(request: Request, body: ChatCompletionRequest, services: ServicesDep) -> Response:
    messages = flatten_messages(body.messages)
    prompt = _render_chat(messages, services)
    params = body.sampling(**_limits(services))
    return await _answer(request, services, "chat", prompt, params, body, logprobs=bool(body.logprobs),
                         record=request_record(request, messages, body.user))


@router.post("/completions", responses={**_OK, **ERRORS})
async def completions(request: Request, body: CompletionRequest, services: ServicesDep) -> Response:
    params = body.sampling(**_limits(services))
    prompt = body.prompt_text
    return await _answer(request, services, "text", prompt, params, body, logprobs=body.logprobs == 0,
                         echo=prompt if body.echo else "", record=request_record(request, prompt, body.user))


@router.get("/models")
async def list_models(services: ServicesDep) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(services)]})


@router.get("/models/{model_id:path}", responses={404: {"model": OpenAIErrorBody}})
async def get_model(request: Request, model_id: str, services: ServicesDep) -> JSONResponse:
    card = _model_card(services)
    if model_id != card["id"]:
        return error_response(request.url.path, ApiError(404, f"The model `{model_id}` does not exist",
                                                         "not_found", "model", "model_not_found"))
    return JSONResponse(card)


# -- helpers of these routes ----------------------------------------------------------------------

def _limits(services: Services) -> dict:
    return {"default_max_new_tokens": services.settings.max_new_tokens_default,
            "max_total_tokens": services.engine.info().max_total_tokens}


def _render_chat(messages: list[dict], services: Services) -> str:
    try:
        return services.engine.render_chat(messages)
    except ChatTemplateError as exc:
        raise InvalidParam(f"the model's chat template refused these messages: {exc}", "messages") from exc


async def _answer(request: Request, services: Services, kind: str, prompt: str, params: SamplingParams,
                  body: ChatCompletionRequest | CompletionRequest, *, logprobs: bool, echo: str = "",
                  record: RequestRecord | None = None) -> Response:
    model = served_model_name(services)
    stops = params.stop
    if body.stream:
        stream = await services.generation.stream(prompt, params, record)
        events = stream_chunks(stream, kind=kind, path=request.url.path, model=model, stops=stops,
                               logprobs=logprobs, include_usage=body.include_usage, echo=echo)
        return EventStreamResponse(events, headers=completion_headers(stream.completion_id, stream.model_version))
    c = await unless_disconnected(request, lambda: services.generation.complete(prompt, params, record))
    if isinstance(c, Response):  # the client left; nobody reads this
        return c
    answer = (chat_completion(c, model=model, stops=stops, logprobs=logprobs) if kind == "chat"
              else text_completion(c, model=model, stops=stops, logprobs=logprobs, echo=echo))
    return JSONResponse(answer, headers=completion_headers(c.completion_id, c.model_version))


def _model_card(services: Services) -> dict:
    info = services.engine.info()
    return {"id": served_model_name(services), "object": "model", "created": _STARTED, "owned_by": "feedloop",
            "model_version": info.model_version, "max_model_len": info.max_total_tokens}
