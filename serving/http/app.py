"""The HTTP app: TGI-compatible, OpenAI-compatible and feedloop routes over one Services object."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.http.errors import SCORE_PATH, install_error_handlers
from serving.http.middleware import BodyLimitMiddleware, ModelVersionHeaderMiddleware, UnexpectedErrorMiddleware
from serving.http.routers import admin, feedback, openai, ops, pools, score, tgi
from serving.services import Services


def create_app(services: Services, *, manage_services: bool = False) -> FastAPI:
    """Build the app around already-built services (kept on `app.state.services`); loads no model.

    Lifecycle: who starts the engine is the caller's choice, made explicit here.
    - `manage_services=False` (default): the caller starts and stops `services` itself. This is what
      `feedloop serve` does, since the same services also back the gRPC server, and what tests do
      with a shared, already running engine. Starting twice would start two decode loops.
    - `manage_services=True`: the app's lifespan awaits `services.start()` at startup and
      `services.stop()` at shutdown, for a process that serves this app and nothing else
      (e.g. `uvicorn` pointed at a factory).

    Behaviour shared by every route:
    - bodies over `settings.max_body_bytes` get 413 before they are parsed;
    - every answer carries `X-Model-Version` (the policy's; the reward model's on /v1/score) and
      generation answers `X-Completion-Id`;
    - errors use the format of the route called (TGI's or OpenAI's, see serving.http.errors), also
      for unknown routes (404), wrong methods (405) and malformed JSON; unexpected exceptions give
      a 500 without internals (the trace goes to the log).
    """
    lifespan = _lifespan(services) if manage_services else None
    app = FastAPI(title="feedloop", summary="Model serving with a human-feedback loop",
                  version="1", lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)

    def version_for_path(path: str) -> str:
        return services.reward.model_version if path == SCORE_PATH else services.engine.model_version

    # Starlette runs the last added middleware first: headers wrap everything, so 413s and 500s get them.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=services.settings.max_body_bytes)
    app.add_middleware(ModelVersionHeaderMiddleware, version_for_path=version_for_path)

    for module in (tgi, openai, score, feedback, ops, admin, pools):
        app.include_router(module.router)
    return app


def _lifespan(services: Services):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        try:
            yield
        finally:
            await services.stop()

    return lifespan
