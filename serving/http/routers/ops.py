"""Operational routes: `GET /health` (liveness of the engine) and `GET /metrics` (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from serving.http.dependencies import ServicesDep
from serving.metrics import CONTENT_TYPE_LATEST

router = APIRouter(tags=["operations"])


@router.get("/health", responses={503: {"description": "The engine is not running"}})
async def health(services: ServicesDep) -> JSONResponse:
    """200 while the engine answers (TGI's /health); 503 while it starts or stops."""
    services.engine.check_health()  # raises EngineUnavailable (→ 503) when the engine cannot serve
    return JSONResponse({"status": "ok", "model_version": services.engine.model_version,
                         "reward_model_version": services.reward.model_version})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)

