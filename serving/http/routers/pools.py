"""Admin routes over the upstream pools registered in the store (feedback/store/pools.py):

    GET    /v1/admin/pools                       registered pools (+ the members this gateway has for each)
    POST   /v1/admin/pools                       {"name", "url", "kind", "role", "model_version", …}
    DELETE /v1/admin/pools/{name}?force=&reason= refused (409) while its version serves, unless force

Same auth, error bodies and statuses as routers/admin.py (404 for an unknown pool). Every gateway in
upstream mode follows the store at its next poll; this one at once.
"""
from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from serving.http.dependencies import ServicesDep
from serving.http.routers.admin import _ERRORS, ACTOR, _registry_call, _watcher, require_admin
from serving.http.schemas.admin import PoolRequest

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/admin/pools", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=_ERRORS)


def _pools(services):
    from feedback.store.pools import UpstreamPools

    return UpstreamPools(_watcher(services).registry.store)


def _members(services, name: str) -> list[dict] | None:
    """This gateway's members from the pool (None: not in upstream mode)."""
    balancers = [getattr(services.engine, "balancer", None), getattr(services.reward, "balancer", None)]
    if balancers[0] is None:
        return None
    return [{"url": m.url, "model_version": m.version, "healthy": m.healthy, "outstanding": m.outstanding}
            for b in balancers if b is not None for m in b.members if m.source is not None and m.source.name == name]


@router.get("")
async def list_pools(services: ServicesDep) -> JSONResponse:
    records = await _registry_call(_pools(services).list)
    return JSONResponse({"object": "list", "data": [
        {**r.to_dict(), "members": _members(services, r.name)} for r in records]})


@router.post("", status_code=201)
async def add_pool(body: PoolRequest, services: ServicesDep) -> JSONResponse:
    """Register a pool; gateways add its servers once they pass their health check."""
    from serving.upstreams.config import pool_spec_problem

    problem = pool_spec_problem(body.url, body.kind, body.model_version, body.model, body.discovery)
    if problem is not None:
        raise HTTPException(422, problem)
    fields = body.model_dump(exclude={"name", "reason"})
    record = await _registry_call(_pools(services).add, body.name, **fields, actor=ACTOR, reason=body.reason)
    log.info("pool registered", extra={"fl_registered_pool": body.name, "fl_actor": ACTOR})
    _watcher(services).poke()
    return JSONResponse(record.to_dict(), status_code=201)


@router.delete("/{name}")
async def remove_pool(name: str, services: ServicesDep, force: bool = False,
                      reason: Annotated[str, Query(max_length=2000)] = "") -> JSONResponse:
    """Unregister a pool: no new requests go to it, its servers leave once their requests finish."""
    record = await _registry_call(_pools(services).remove, name, actor=ACTOR, reason=reason, force=force)
    log.info("pool removed", extra={"fl_registered_pool": name, "fl_actor": ACTOR, "fl_forced": force})
    _watcher(services).poke()
    return JSONResponse(record.to_dict())
