"""Leases in the store: at most one holder of a name at a time, on SQLite and Postgres alike.

A lease is one row (`leases`, feedback/store/tables.py). `acquire` renews it for its holder, takes it
over once it expired, or leaves it to its holder — each write a compare-and-set on (holder, token),
so two processes racing for an expired lease cannot both win. The token grows by one whenever the
holder changes: a fencing token (a worker refuses a token lower than one it saw). Expiry is judged
on the caller's clock: keep the TTL well above the clock skew between the machines (NTP: ms).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from feedback.store.tables import Lease
from feedback.store.types import utcnow


@dataclass(frozen=True)
class LeaseState:
    name: str
    holder: str
    token: int
    expires_at: datetime

    def held_by(self, holder: str, now: datetime | None = None) -> bool:
        return self.holder == holder and self.expires_at > (now or utcnow())


def _state(row: Lease) -> LeaseState:
    return LeaseState(row.name, row.holder, row.token, row.expires_at)


class Leases:
    def __init__(self, store) -> None:
        self.store = store
        self.engine = store.engine

    def get(self, name: str) -> LeaseState | None:
        with Session(self.engine) as session:
            row = session.get(Lease, name)
            return _state(row) if row is not None else None

    def acquire(self, name: str, holder: str, ttl: float) -> LeaseState:
        """Take or renew `name` for `holder` for `ttl` seconds if it is free, expired or already
        theirs. Returns the lease as it stands afterwards (`held_by(holder)` tells who won)."""
        now = utcnow()
        until = now + timedelta(seconds=ttl)
        with Session(self.engine) as session:
            row = session.get(Lease, name)
            if row is None:
                statement = self.store._insert(Lease.__table__).values(
                    name=name, holder=holder, token=1, expires_at=until, acquired_at=now, renewed_at=now)
                session.execute(statement.on_conflict_do_nothing(index_elements=["name"]))
            elif row.holder == holder and row.expires_at > now:  # renew: same holder, same token
                session.execute(update(Lease).where(Lease.name == name, Lease.holder == holder,
                                                    Lease.token == row.token)
                                .values(expires_at=until, renewed_at=now))
            elif row.expires_at <= now:  # expired: whoever writes first takes it, with a new token
                session.execute(update(Lease).where(Lease.name == name, Lease.holder == row.holder,
                                                    Lease.token == row.token)
                                .values(holder=holder, token=row.token + 1, expires_at=until,
                                        acquired_at=now, renewed_at=now))
            session.commit()
        state = self.get(name)
        assert state is not None
        return state

    def release(self, name: str, holder: str) -> bool:
        """Give the lease up now (a stopping holder), so another takes it without waiting for the TTL."""
        with Session(self.engine) as session:
            result = session.execute(update(Lease).where(Lease.name == name, Lease.holder == holder)
                                     .values(expires_at=utcnow()))
            session.commit()
            return result.rowcount == 1


__all__ = ["LeaseState", "Leases"]
