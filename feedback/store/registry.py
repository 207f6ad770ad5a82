"""The model registry's deployments: which version serving runs per role, canaries, promotion and
rollback, with an audit log. Versions themselves (immutable rows with parent, stage, metrics,
checksums) are `FeedbackStore.register_version` / `set_status`.

    registry = ModelRegistry(store)
    registry.promote("ppo-3f2a…", actor="loop", reason="gates passed")
    registry.start_canary("ppo-3f2a…", 10, actor="cli")
    registry.rollback("policy", reason="error rate 7% > 5%", actor="gateway", expected="ppo-3f2a…")

Gateways poll `deployment(role)` (one row by primary key) and apply what it says; nothing here talks to
a gateway. Every change is a compare-and-set on the row's `revision`, so two writers (a person with the
CLI and the loop; two gateways reporting the same bad version) cannot both win: the loser re-reads and
retries, and `expected=` makes a rollback a no-op when someone else already moved the deployment on.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from feedback.store.store import FeedbackStore
from feedback.store.tables import MODEL_ROLES, Deployment, DeploymentEvent, ModelVersion
from feedback.store.types import utcnow

CAS_ATTEMPTS = 20


class RegistryError(ValueError):
    """A registry change that cannot be made as asked (unknown or rejected version, nothing to roll
    back to, a canary without a serving version). The message says why."""


@dataclass(frozen=True)
class DeploymentState:
    """A snapshot of one role's deployment row."""

    role: str
    serving_version: str
    canary_version: str | None
    canary_percent: float
    revision: int
    updated_at: datetime

    def to_dict(self) -> dict:
        return {"role": self.role, "serving_version": self.serving_version, "canary_version": self.canary_version,
                "canary_percent": self.canary_percent, "revision": self.revision,
                "updated_at": self.updated_at.isoformat()}


def _state(row: Deployment) -> DeploymentState:
    return DeploymentState(row.role, row.serving_version, row.canary_version, row.canary_percent, row.revision,
                           row.updated_at)


class _Retry(Exception):
    """The deployment row changed between our read and our write."""


class ModelRegistry:
    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self.engine = store.engine

    # -- reading ------------------------------------------------------------------------------
    def deployment(self, role: str) -> DeploymentState | None:
        _check_role(role)
        with Session(self.engine) as session:
            row = session.get(Deployment, role)
            return _state(row) if row is not None else None

    def history(self, role: str | None = None, limit: int = 100) -> list[DeploymentEvent]:
        """Newest first."""
        query = select(DeploymentEvent).order_by(DeploymentEvent.id.desc()).limit(limit)
        if role is not None:
            query = query.where(DeploymentEvent.role == role)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.execute(query).scalars())

    # -- changing -----------------------------------------------------------------------------
    def ensure_deployed(self, role: str, version: str, *, stage: str, checkpoint_path: str,
                        checksums: dict[str, str], actor: str = "gateway") -> DeploymentState:
        """First start: register what the gateway loaded and deploy it, unless the role already has a
        deployment — then the registry wins (a restarted gateway serves the promoted version)."""
        existing = self.deployment(role)
        if existing is not None:
            return existing
        self.store.register_version(version, stage=stage, checkpoint_path=checkpoint_path, checksums=checksums,
                                    status="candidate", role=role)

        def change(session: Session, row: Deployment | None) -> Deployment:
            if row is not None:  # another gateway deployed first
                return row
            _set_status(session, version, "serving")
            session.add(DeploymentEvent(role=role, action="deploy", version=version, reason="first deployment",
                                        actor=actor))
            return Deployment(role=role, serving_version=version)

        return self._change(role, change, allow_missing=True)

    def promote(self, version: str, *, actor: str = "", reason: str = "") -> DeploymentState:
        """Serve `version` to all traffic. The version it replaces is retired (and is where a rollback
        returns to); a canary of another version is withdrawn (back to candidate)."""
        target = self._deployable(version)

        def change(session: Session, row: Deployment | None) -> Deployment:
            if row is None:
                row = Deployment(role=target.role, serving_version=version, revision=0)
                previous = None
            else:
                previous = row.serving_version
                if previous == version and row.canary_version is None:
                    return row  # already serving everything: nothing to do
                if previous != version:
                    _set_status(session, previous, "retired")
                if row.canary_version not in (None, version):
                    _set_status(session, row.canary_version, "candidate")
            _set_status(session, version, "serving")
            row.serving_version, row.canary_version, row.canary_percent = version, None, 0.0
            session.add(DeploymentEvent(role=target.role, action="promote", version=version,
                                        previous_version=previous, reason=reason, actor=actor))
            return row

        return self._change(target.role, change, allow_missing=True)

    def start_canary(self, version: str, percent: float, *, actor: str = "", reason: str = "") -> DeploymentState:
        """Send `percent` of new requests to `version`; the rest stay on the serving version. Policies
        only: a reward model is promoted (RegistryError)."""
        if not 0 < percent <= 100:
            raise RegistryError(f"canary percent must be in (0, 100], got {percent}")
        target = self._deployable(version)
        if target.role == "reward":
            # Scores are not answers: a client comparing scores from two calls must get them on one
            # scale, and the loop promotes a reward model on its own held-out accuracy gate.
            raise RegistryError(f"{version} is a reward model: reward models have no canary (two versions "
                                f"would score on different scales); promote it")

        def change(session: Session, row: Deployment | None) -> Deployment:
            if row is None:
                raise RegistryError(f"no {target.role} is deployed yet: promote a version before a canary")
            if row.serving_version == version:
                raise RegistryError(f"{version} already serves all {target.role} traffic")
            if row.canary_version not in (None, version):
                _set_status(session, row.canary_version, "candidate")
            _set_status(session, version, "canary")
            row.canary_version, row.canary_percent = version, float(percent)
            session.add(DeploymentEvent(role=target.role, action="canary", version=version,
                                        previous_version=row.serving_version, canary_percent=float(percent),
                                        reason=reason, actor=actor))
            return row

        return self._change(target.role, change)

    def rollback(self, role: str, *, reason: str, actor: str = "", expected: str | None = None) -> DeploymentState:
        """Undo the last change for `role`: withdraw a running canary (it is marked rejected), else return
        serving to the version the current one replaced (the current one is marked rejected).

        `expected`: only roll back if that version is the canary or the serving version right now —
        several gateways may report the same bad version; the first rolls it back, the rest are no-ops.
        """
        _check_role(role)

        def change(session: Session, row: Deployment | None) -> Deployment:
            if row is None:
                raise RegistryError(f"no {role} is deployed: nothing to roll back")
            if expected is not None and expected not in (row.serving_version, row.canary_version):
                return row
            if row.canary_version is not None and expected in (None, row.canary_version):
                bad = row.canary_version
                _set_status(session, bad, "rejected", {"rejected_reasons": [f"rolled back: {reason}"]})
                row.canary_version, row.canary_percent = None, 0.0
                session.add(DeploymentEvent(role=role, action="rollback", version=row.serving_version,
                                            previous_version=bad, reason=reason, actor=actor))
                return row
            bad = row.serving_version
            previous = self._replaced_by(session, role, bad)
            if previous is None:
                raise RegistryError(f"{bad} was not promoted over another {role} version: nothing to roll back to")
            _set_status(session, bad, "rejected", {"rejected_reasons": [f"rolled back: {reason}"]})
            _set_status(session, previous, "serving")
            if row.canary_version is not None:
                _set_status(session, row.canary_version, "candidate")
            row.serving_version, row.canary_version, row.canary_percent = previous, None, 0.0
            session.add(DeploymentEvent(role=role, action="rollback", version=previous, previous_version=bad,
                                        reason=reason, actor=actor))
            return row

        return self._change(role, change)

    def reject(self, version: str, reasons: list[str], *, actor: str = "") -> ModelVersion:
        """Mark a candidate rejected (failed gates, corrupt files), keeping it with the reasons.
        A version that is serving or in canary must be rolled back instead."""
        row = self.store.get_version(version)
        if row is None:
            raise RegistryError(f"no model version {version}")
        if row.status in ("serving", "canary"):
            raise RegistryError(f"{version} is {row.status}: roll it back instead of rejecting it")
        with Session(self.engine, expire_on_commit=False) as session:
            _set_status(session, version, "rejected", {"rejected_reasons": list(reasons)})
            session.add(DeploymentEvent(role=row.role, action="reject", version=version, reason="; ".join(reasons),
                                        actor=actor))
            session.commit()
        return self.store.get_version(version)

    def record_refusal(self, role: str, version: str, reason: str, *, actor: str = "gateway") -> None:
        """A gateway could not serve `version` (checksums do not match, load failed): log it. The caller
        decides whether to roll back (`rollback(..., expected=version)`)."""
        with Session(self.engine) as session:
            session.add(DeploymentEvent(role=role, action="refused", version=version, reason=reason, actor=actor))
            session.commit()

    # -- internals ----------------------------------------------------------------------------
    def _deployable(self, version: str) -> ModelVersion:
        row = self.store.get_version(version)
        if row is None:
            raise RegistryError(f"no model version {version}: register it first")
        if row.status == "rejected":
            reasons = "; ".join(row.metrics.get("rejected_reasons", [])) or "no reason recorded"
            raise RegistryError(f"{version} was rejected ({reasons}): it is never served")
        return row

    @staticmethod
    def _replaced_by(session: Session, role: str, version: str) -> str | None:
        """The version that `version` replaced when it was last promoted (None: it never was)."""
        event = session.execute(
            select(DeploymentEvent).where(DeploymentEvent.role == role, DeploymentEvent.version == version,
                                          DeploymentEvent.action == "promote")
            .order_by(DeploymentEvent.id.desc()).limit(1)).scalar_one_or_none()
        return event.previous_version if event is not None else None

    def _change(self, role: str, change, allow_missing: bool = False) -> DeploymentState:
        """Read the row, let `change` modify it (and add events), write it with a compare-and-set on
        `revision`; retry from a fresh read if another writer got there first."""
        for _ in range(CAS_ATTEMPTS):
            with Session(self.engine, expire_on_commit=False) as session:
                row = session.get(Deployment, role)
                if row is None and not allow_missing:
                    change(session, None)  # raises the role's own "nothing deployed" error
                seen = row.revision if row is not None else None
                if row is not None:
                    session.expunge(row)
                new = change(session, row)
                if new is row and seen is not None and not session.new:
                    return _state(row)  # nothing to change
                try:
                    if seen is None:
                        new.revision, new.updated_at = 1, utcnow()
                        session.add(new)
                        session.flush()
                    else:
                        result = session.execute(
                            update(Deployment).where(Deployment.role == role, Deployment.revision == seen)
                            .values(serving_version=new.serving_version, canary_version=new.canary_version,
                                    canary_percent=new.canary_percent, revision=seen + 1, updated_at=utcnow()))
                        if result.rowcount != 1:
                            raise _Retry()
                        new.revision = seen + 1
                    session.commit()
                except _Retry:
                    session.rollback()
                    continue
                except Exception as exc:
                    session.rollback()
                    if seen is None and _is_duplicate_key(exc):
                        continue  # another writer created the row first: re-read and apply over it
                    raise
                return self.deployment(role)
        raise RegistryError(f"the {role} deployment kept changing under us ({CAS_ATTEMPTS} attempts); try again")


def _set_status(session: Session, version: str, status: str, metrics: dict | None = None) -> None:
    row = session.get(ModelVersion, version)
    if row is None:
        raise RegistryError(f"no model version {version}")
    row.status = status
    if metrics:
        merged = dict(row.metrics)
        for key, value in metrics.items():
            if isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = merged[key] + value
            else:
                merged[key] = value
        row.metrics = merged
    row.updated_at = utcnow()
    session.add(row)


def _check_role(role: str) -> None:
    if role not in MODEL_ROLES:
        raise RegistryError(f"role must be one of {', '.join(MODEL_ROLES)}, got {role!r}")


def _is_duplicate_key(exc: Exception) -> bool:
    text = str(exc).lower()
    return "unique" in text or "duplicate key" in text


__all__ = ["ModelRegistry", "DeploymentState", "RegistryError"]
