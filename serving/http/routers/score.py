"""`POST /v1/score`: reward-model scores of (prompt or messages, response) pairs.

feedloop's own API under /v1, so errors use the OpenAI error body like the other /v1 routes, but
bad input answers 422 (the engine's status), not OpenAI's 400: this is not an OpenAI endpoint, and
gRPC and the TGI routes report the same errors the same way.
"""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serving.http.dependencies import ServicesDep
from serving.http.errors import InvalidParam
from serving.http.schemas.openai import ChatTemplateError, OpenAIErrorBody
from serving.http.schemas.score import ScoreRequest, ScoreResponse

router = APIRouter(prefix="/v1", tags=["feedloop"])


@router.post("/score", response_model=ScoreResponse, responses={
    413: {"model": OpenAIErrorBody}, 422: {"model": OpenAIErrorBody, "description": "Invalid pairs"}})
async def score(body: ScoreRequest, services: ServicesDep) -> JSONResponse:
    pairs = [(p.context(i), p.response) for i, p in enumerate(body.inputs)]
    try:
        result = await services.scoring.score(pairs)
    except ChatTemplateError as exc:
        raise InvalidParam(f"the reward model's chat template refused these messages: {exc}", "inputs") from exc
    return JSONResponse({"scores": result.scores, "model_version": result.model_version,
                         "reward_model_trained": services.reward.trained},
                        headers={"X-Model-Version": result.model_version})
