"""feedloop's feedback routes: `POST /v1/feedback` (ratings, comparisons, rankings, demonstrations)
and `POST /v1/compare` (K sampled answers to compare).

Errors use the OpenAI body like every /v1 route, with 422 for bad input and 404 for a completion id
that was never served (see serving.http.errors). Who gave the feedback: each event's `user`, else the
`X-Feedloop-User` header; the tenant comes from `X-Feedloop-Tenant` (no auth yet: both are recorded
as sent).
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Request, Response
from fastapi.responses import JSONResponse

from serving.http.dependencies import ServicesDep
from serving.http.disconnect import unless_disconnected
from serving.http.errors import InvalidParam
from serving.http.schemas.feedback import CompareRequest, CompareResponse, FeedbackAccepted, FeedbackIn
from serving.http.schemas.openai import ChatTemplateError, OpenAIErrorBody, flatten_messages
from serving.services.completion_events import RequestRecord

router = APIRouter(prefix="/v1", tags=["feedloop"])

UserHeader = Annotated[str | None, Header(alias="X-Feedloop-User", description="Default `user` of the events.")]
TenantHeader = Annotated[str | None, Header(alias="X-Feedloop-Tenant")]

_ERRORS: dict = {code: {"model": OpenAIErrorBody, "description": text} for code, text in [
    (413, "Request body too large"), (422, "Invalid request"), (429, "Model is overloaded: retry later"),
    (503, "Events cannot be recorded now: retry")]}


@router.post("/feedback", status_code=202, response_model=FeedbackAccepted, responses={
    404: {"model": OpenAIErrorBody, "description": "A completion id was never served (or is not recorded yet)"},
    **_ERRORS})
async def feedback(body: Annotated[FeedbackIn | list[FeedbackIn], Body()], services: ServicesDep,
                   user: UserHeader = None, tenant: TenantHeader = None) -> JSONResponse:
    """One feedback event or a list (at most 100), all accepted or none. 202 once they are durable on
    the gateway; they reach the store through the bus shortly after."""
    items = body if isinstance(body, list) else [body]
    event_ids = await services.feedback.submit([item.to_event() for item in items], user=user or "",
                                               tenant=tenant or "")
    return JSONResponse({"accepted": len(event_ids), "event_ids": event_ids}, status_code=202)


@router.post("/compare", response_model=CompareResponse, responses=_ERRORS)
async def compare(request: Request, body: CompareRequest, services: ServicesDep, user: UserHeader = None,
                  tenant: TenantHeader = None) -> Response:
    """`n` sampled answers to one prompt, each a completion carrying the comparison's id."""
    if body.messages is not None:
        messages = flatten_messages(body.messages)
        try:
            prompt = services.engine.render_chat(messages)
        except ChatTemplateError as exc:
            raise InvalidParam(f"the model's chat template refused these messages: {exc}", "messages") from exc
        recorded: str | list[dict] = messages
    else:
        prompt = recorded = body.prompt
    params = body.sampling(default_max_new_tokens=services.settings.max_new_tokens_default,
                           max_total_tokens=services.engine.info().max_total_tokens)
    record = RequestRecord(recorded, user=body.user or user or "", tenant=tenant or "")
    result = await unless_disconnected(request, lambda: services.comparison.compare(
        prompt, params, body.n, record, body.model_versions or ()))
    if isinstance(result, Response):  # the client left; nobody reads this
        return result
    completions = [{"completion_id": c.completion_id, "text": c.text, "model_version": c.model_version}
                   for c in result.completions]
    version = result.completions[0].model_version
    return JSONResponse({"comparison_id": result.comparison_id, "completions": completions},
                        headers={"X-Model-Version": version})

