"""Admin routes over the model registry: list versions, see deployments, promote, canary, roll back.

    GET  /v1/admin/models                     versions (role, stage, status, parent, metrics)
    GET  /v1/admin/deployments                per role: the registry's row + what this gateway runs
    GET  /v1/admin/history                    the registry's audit log, newest first
    POST /v1/admin/models/{version}/promote   {"reason"}
    POST /v1/admin/models/{version}/canary    {"percent", "reason"}
    POST /v1/admin/rollback                   {"role", "reason", "expected"}

Changes are written to the registry (the store), not to this gateway: every gateway polling the
registry applies them (serving/deployment.py); this one is woken at once. OpenAI's error body like
every /v1 route: 422 for bad bodies, 404 for an unknown version, 409 for a change the registry refuses
(rejected version, nothing to roll back to), 503 when the registry cannot be reached, 404 (code
`no_model_registry`) when this gateway runs without one. `admin_token` (FEEDLOOP_ADMIN_TOKEN) set: every admin route needs
`Authorization: Bearer <token>` (401 otherwise); unset, they are open — bind to 127.0.0.1 then.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.responses import JSONResponse

from feedback.store.registry import RegistryError
from feedback.store.tables import MODEL_STATUSES
from serving.deployment import DeploymentWatcher
from serving.errors import NotFound, RecordingUnavailable
from serving.http.dependencies import ServicesDep
from serving.http.schemas.admin import CanaryRequest, ChangeResponse, PromoteRequest, RollbackRequest
from serving.http.schemas.openai import OpenAIErrorBody
from serving.services import Services

log = logging.getLogger(__name__)
ACTOR = "admin-api"


def require_admin(services: ServicesDep,
                  authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """401 unless the admin token is configured and sent as `Authorization: Bearer <token>`."""
    token = services.settings.admin_token
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "admin routes need `Authorization: Bearer <admin token>` (the gateway's "
                            "admin_token setting)", headers={"WWW-Authenticate": "Bearer"})


_ERRORS: dict = {code: {"model": OpenAIErrorBody, "description": text} for code, text in [
    (401, "Missing or wrong admin token"), (404, "Unknown model version, or no registry here"), (409, "The registry refuses the change"),
    (422, "Invalid request"), (503, "The model registry cannot be reached")]}
router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=_ERRORS)


def _watcher(services: Services) -> DeploymentWatcher:
    if services.deployments is None:  # a gateway built without a store (tools, tests): nothing to administer
        raise NotFound("this gateway runs without a model registry (no store): no admin routes here",
                       code="no_model_registry")
    return services.deployments


async def _registry_call(fn, *args, **kwargs):
    """Run a blocking registry call off the event loop; its errors become the routes' statuses."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except RegistryError as exc:
        if isinstance(exc, LookupError):  # e.g. an unknown pool: nothing refused, nothing there
            raise NotFound(str(exc), code=getattr(exc, "code", "not_found")) from exc
        raise HTTPException(409, str(exc)) from exc
    except (NotFound, HTTPException):
        raise
    except Exception as exc:  # the database: the client may retry
        log.warning("model registry unreachable", extra={"fl_error": f"{type(exc).__name__}: {exc}"})
        raise RecordingUnavailable(f"the model registry cannot be reached: {type(exc).__name__}") from exc


async def _known_version(watcher: DeploymentWatcher, version: str):
    row = await _registry_call(watcher.registry.store.get_version, version)
    if row is None:
        raise NotFound(f"no model version {version!r} in the registry: register it first", "version",
                       "unknown_model_version")
    return row


def _version_dict(row) -> dict:
    return {"version": row.version, "role": row.role, "stage": row.stage, "status": row.status,
            "parent_version": row.parent_version, "checkpoint_path": row.checkpoint_path,
            "metrics": row.metrics, "created_at": row.created_at.isoformat(),
            "updated_at": row.updated_at.isoformat()}


@router.get("/models")
async def list_models(services: ServicesDep, role: Literal["policy", "reward"] | None = None,
                      status: Annotated[str | None, Query(description=f"one of {', '.join(MODEL_STATUSES)}")] = None,
                      ) -> JSONResponse:
    if status is not None and status not in MODEL_STATUSES:
        raise HTTPException(422, f"`status` must be one of {', '.join(MODEL_STATUSES)}, got {status!r}")
    watcher = _watcher(services)
    rows = await _registry_call(watcher.registry.store.list_versions, role=role, status=status)
    return JSONResponse({"object": "list", "data": [_version_dict(r) for r in rows]})


@router.get("/deployments")
async def deployments(services: ServicesDep) -> JSONResponse:
    """Per role: what the registry says (`registry`, null before the first deployment) and what this
    gateway runs (`gateway`: routing, loaded versions with running/waiting requests, the revision it
    applied, versions it refused, the watched version's error window)."""
    watcher = _watcher(services)
    out = {}
    for role in ("policy", "reward"):
        state = await _registry_call(watcher.registry.deployment, role)
        out[role] = {"registry": state.to_dict() if state else None, "gateway": watcher.gateway_state(role)}
    return JSONResponse(out)


@router.get("/history")
async def history(services: ServicesDep, role: Literal["policy", "reward"] | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JSONResponse:
    watcher = _watcher(services)
    events = await _registry_call(watcher.registry.history, role, limit)
    return JSONResponse({"object": "list", "data": [
        {"id": e.id, "role": e.role, "action": e.action, "version": e.version,
         "previous_version": e.previous_version, "canary_percent": e.canary_percent, "reason": e.reason,
         "actor": e.actor, "created_at": e.created_at.isoformat()} for e in events]})


def _changed(watcher: DeploymentWatcher, state) -> JSONResponse:
    watcher.poke()  # this gateway applies it now; others at their next poll
    return JSONResponse({"deployment": state.to_dict()})


@router.post("/models/{version}/promote", response_model=ChangeResponse)
async def promote(version: str, services: ServicesDep, body: PromoteRequest | None = None) -> JSONResponse:
    """Serve `version` to all traffic (it must be registered and not rejected)."""
    watcher = _watcher(services)
    await _known_version(watcher, version)
    reason = body.reason if body else ""
    state = await _registry_call(watcher.registry.promote, version, actor=ACTOR, reason=reason)
    log.info("promoted", extra={"fl_model_version": version, "fl_actor": ACTOR, "fl_reason": reason})
    return _changed(watcher, state)


@router.post("/models/{version}/canary", response_model=ChangeResponse)
async def canary(version: str, body: CanaryRequest, services: ServicesDep) -> JSONResponse:
    """Send `percent` of new requests to `version`; the rest stay on the serving version."""
    watcher = _watcher(services)
    await _known_version(watcher, version)
    state = await _registry_call(watcher.registry.start_canary, version, body.percent, actor=ACTOR,
                                 reason=body.reason)
    log.info("canary", extra={"fl_model_version": version, "fl_percent": body.percent, "fl_actor": ACTOR})
    return _changed(watcher, state)


@router.post("/rollback", response_model=ChangeResponse)
async def rollback(body: RollbackRequest, services: ServicesDep) -> JSONResponse:
    """Withdraw the role's canary, else return serving to the version the current one replaced."""
    watcher = _watcher(services)
    state = await _registry_call(watcher.registry.rollback, body.role, reason=body.reason, actor=ACTOR,
                                 expected=body.expected)
    log.info("rolled back", extra={"fl_role": body.role, "fl_actor": ACTOR, "fl_reason": body.reason})
    return _changed(watcher, state)
