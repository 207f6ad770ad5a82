"""One gateway drives the fleet's reloads: the holder of the `fleet-rollouts` lease in the store.

Several gateways (the gateway Deployment scales 2-20) follow one registry. Each must route to the
version the registry names, but only one may reload the workers: two gateways rolling the same
fleet would pause and reload each worker twice, and race each other's canaries. So in upstream
mode every gateway runs a `LeaderLease`:

- it takes or renews the lease every `ttl / 3` seconds on a task of its own (a reload that runs for
  minutes does not let it lapse); it counts as held only until `0.8 × ttl` after the last renewal
  *began* (a holder that cannot reach the store stops acting before another can take over);
- the holder reloads workers (serving/fleet.py); the others only route, once the workers' health
  checks report the registry's version;
- a stopping holder releases it, so another gateway takes over at its next renewal, not a TTL later;
  a holder that dies is replaced once the TTL ran out;
- the lease's token goes with every reload (`lease_token`): a worker refuses a token lower than the
  highest it has seen (409 `stale_leader`), so a holder that stalled past its lease (a long GC pause,
  a frozen node) cannot undo what its successor did.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from feedback.store.leases import LeaseState, Leases

log = logging.getLogger(__name__)

ROLLOUTS = "fleet-rollouts"


def default_holder() -> str:
    """The pod's name (its hostname in Kubernetes), the pid, and a random suffix: unique per process."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


class LeaderLease:
    def __init__(self, leases: Leases, *, name: str = ROLLOUTS, ttl: float = 15.0, holder: str | None = None) -> None:
        self.leases = leases
        self.name = name
        self.ttl = ttl
        self.holder = holder or default_holder()
        self.token: int | None = None  # while held: the fencing token
        self.current: LeaseState | None = None  # the lease as last read (whoever holds it)
        self.error: str | None = None
        self._valid_until = 0.0  # monotonic
        self._task: asyncio.Task | None = None

    @property
    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    async def refresh(self) -> bool:
        """Take or renew the lease once; whether this process holds it now."""
        began = time.monotonic()
        was = self.held
        try:
            state = await asyncio.to_thread(self.leases.acquire, self.name, self.holder, self.ttl)
        except Exception as exc:  # the store unreachable: the lease lapses on its own (held → False)
            message = f"{type(exc).__name__}: {exc}"
            if self.error != message:
                log.warning("cannot renew the rollout lease", extra={"fl_lease": self.name, "fl_error": message})
            self.error = message
            return self.held
        self.error = None
        self.current = state
        if state.holder == self.holder:
            self._valid_until = began + 0.8 * self.ttl
            self.token = state.token
            if not was:
                log.info("this gateway now drives the fleet's rollouts",
                         extra={"fl_lease": self.name, "fl_holder": self.holder, "fl_token": state.token})
        else:
            self._valid_until = 0.0
            self.token = None
            if was:
                log.warning("another gateway took the rollout lease",
                            extra={"fl_lease": self.name, "fl_holder": state.holder, "fl_token": state.token})
        return self.held

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._renew(), name="feedloop-rollout-lease")

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.refresh()
            except Exception:  # pragma: no cover - renewing must never stop
                log.exception("rollout lease renewal failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.held:
            self._valid_until = 0.0
            try:
                await asyncio.to_thread(self.leases.release, self.name, self.holder)
                log.info("released the rollout lease", extra={"fl_lease": self.name, "fl_holder": self.holder})
            except Exception as exc:  # the store is gone: the lease expires on its own
                log.warning("could not release the rollout lease", extra={"fl_error": f"{type(exc).__name__}: {exc}"})

    def as_dict(self) -> dict:
        c = self.current
        return {"lease": self.name, "this_gateway": self.holder, "is_leader": self.held, "token": self.token,
                "holder": c.holder if c else None, "expires_at": c.expires_at.isoformat() if c else None,
                "error": self.error}


__all__ = ["LeaderLease", "ROLLOUTS", "default_holder"]
