"""Upstream pools in the store: the blue/green pools of a fleet, registered while it runs.

TGI and OpenAI-compatible servers cannot load another model, so a new version on them is a new pool
(blue/green). Listing it in FEEDLOOP_UPSTREAMS means editing every gateway's config and restarting
them; registering it here instead lets every gateway follow (serving/fleet.py reads `list()` at each
poll): its members join once they pass their health check, the registry's promotion or canary routes
traffic to them, and a removed pool's members take no new request and leave once drained.

    pools = UpstreamPools(store)
    pools.add("tgi-v3", role="policy", kind="tgi", url="http://tgi-v3:8080", discovery="dns",
              model_version="ppo-3f2a…", actor="cli")
    registry.promote("ppo-3f2a…")          # gateways wait for tgi-v3's health, then route to it
    pools.remove("tgi-v2", actor="cli")   # refused while tgi-v2's version still serves

A pool is immutable, like a model version: a changed pool is a new name. Adding and removing are
written to the registry's audit log (`deployment_events`: pool_added | pool_removed).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from feedback.store.registry import RegistryError
from feedback.store.tables import MODEL_ROLES, UPSTREAM_KINDS, Deployment, DeploymentEvent, UpstreamPoolRow

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,62}[a-z0-9])?$")  # a DNS label, like the Deployment it names
DISCOVERY = ("dns", "srv")
SELF_REPORTING = ("feedloop", "sglang")  # kinds whose servers say which version they serve


class UnknownPool(RegistryError, LookupError):
    """No pool of that name is registered (a lookup that failed, not a refused change: HTTP 404)."""

    code = "unknown_pool"


@dataclass(frozen=True)
class PoolRecord:
    name: str
    role: str
    kind: str
    url: str
    discovery: str | None
    model_version: str | None
    model: str | None
    api_key_env: str | None
    actor: str
    created_at: datetime

    def to_dict(self) -> dict:
        return {**asdict(self), "created_at": self.created_at.isoformat()}


def _record(row: UpstreamPoolRow) -> PoolRecord:
    return PoolRecord(row.name, row.role, row.kind, row.url, row.discovery, row.model_version, row.model,
                      row.api_key_env, row.actor, row.created_at)


def check_pool(name: str, role: str, kind: str, url: str, discovery: str | None, model_version: str | None) -> None:
    """RegistryError naming what is wrong with a pool's fields (the gateway checks the rest, e.g. SRV names)."""
    if not NAME.match(name or ""):
        raise RegistryError(f"pool name must be a DNS label (lower-case letters, digits and '-', at most 64), "
                            f"got {name!r}")
    if role not in MODEL_ROLES:
        raise RegistryError(f"role must be one of {', '.join(MODEL_ROLES)}, got {role!r}")
    if kind not in UPSTREAM_KINDS:
        raise RegistryError(f"kind must be one of {', '.join(UPSTREAM_KINDS)}, got {kind!r}")
    if role == "reward" and kind != "feedloop":
        raise RegistryError(f"reward pools are feedloop workers (kind feedloop), got {kind!r}")
    if not url.startswith(("http://", "https://")):
        raise RegistryError(f"url must start with http:// or https://, got {url!r}")
    if discovery not in (None, *DISCOVERY):
        raise RegistryError(f"discovery must be one of {', '.join(DISCOVERY)} or none, got {discovery!r}")
    if kind not in SELF_REPORTING and not model_version:
        raise RegistryError(f"a {kind} pool needs model_version: {kind} servers do not say which version they "
                            f"serve, and the registry routes by version")


class UpstreamPools:
    def __init__(self, store) -> None:
        self.store = store
        self.engine = store.engine

    def list(self, role: str | None = None) -> list[PoolRecord]:
        """Registered pools, oldest first."""
        with Session(self.engine) as session:
            query = select(UpstreamPoolRow).order_by(UpstreamPoolRow.created_at, UpstreamPoolRow.name)
            if role is not None:
                query = query.where(UpstreamPoolRow.role == role)
            return [_record(row) for row in session.scalars(query)]

    def get(self, name: str) -> PoolRecord | None:
        with Session(self.engine) as session:
            row = session.get(UpstreamPoolRow, name)
            return _record(row) if row is not None else None

    def add(self, name: str, *, role: str, kind: str, url: str, discovery: str | None = None,
            model_version: str | None = None, model: str | None = None, api_key_env: str | None = None,
            actor: str = "", reason: str = "") -> PoolRecord:
        """Register a pool (RegistryError: bad fields, or the name is taken)."""
        url = url.rstrip("/")
        check_pool(name, role, kind, url, discovery, model_version)
        row = UpstreamPoolRow(name=name, role=role, kind=kind, url=url, discovery=discovery,
                              model_version=model_version, model=model, api_key_env=api_key_env, actor=actor)
        where = f"{name}: {kind} at {url}" + (f" ({discovery} discovery)" if discovery else "")
        with Session(self.engine) as session:
            session.add(row)
            session.add(DeploymentEvent(role=role, action="pool_added", version=model_version, actor=actor,
                                        reason=f"{where}; {reason}" if reason else where))
            try:
                session.commit()
            except IntegrityError:
                raise RegistryError(f"pool {name} exists already (pools are immutable: remove it, or use "
                                    f"another name)") from None
            session.refresh(row)
            return _record(row)

    def remove(self, name: str, *, actor: str = "", reason: str = "", force: bool = False) -> PoolRecord:
        """Unregister a pool: gateways stop sending it requests and drop its members once drained.
        Refused while its version is the role's serving or canary version (the only pool of a TGI
        version takes its traffic with it), unless `force`."""
        with Session(self.engine) as session:
            row = session.get(UpstreamPoolRow, name)
            if row is None:
                known = ", ".join(session.scalars(select(UpstreamPoolRow.name))) or "none"
                raise UnknownPool(f"no pool {name} (registered: {known})")
            deployment = session.get(Deployment, row.role)
            live = {deployment.serving_version, deployment.canary_version} if deployment is not None else set()
            if row.model_version is not None and row.model_version in live and not force:
                slot = "serving" if row.model_version == deployment.serving_version else "canary"
                raise RegistryError(f"pool {name} serves {row.model_version}, the {row.role}'s {slot} version: "
                                    f"promote (or roll back to) a version another pool serves first, or force it")
            record = _record(row)
            session.execute(delete(UpstreamPoolRow).where(UpstreamPoolRow.name == name))
            why = f"{name}: {row.kind} at {row.url}" + (" (forced)" if force and row.model_version in live else "")
            session.add(DeploymentEvent(role=row.role, action="pool_removed", version=row.model_version,
                                        actor=actor, reason=f"{why}; {reason}" if reason else why))
            session.commit()
            return record


__all__ = ["PoolRecord", "UnknownPool", "UpstreamPools", "check_pool"]
