"""Deployments across a fleet of upstreams: the registry's promotions and canaries rolled onto the
gateway's upstream pools (FEEDLOOP_UPSTREAMS; serving/upstreams/). `DeploymentWatcher`
(serving/deployment.py) polls the registry as in local mode and hands each change to `FleetDeployer`.

Policy, for the registry's row (serving S, canary C at p %):

- **Upstreams that reload in place** (kind `feedloop`: `feedloop worker`): `UpstreamPool.rollout`, one
  worker at a time — pause (no new requests from the pool) → `POST /v1/admin/reload` with the
  version's checkpoint path (as the workers see it: a shared volume) and the registry's checksums →
  resume. As soon as the first worker serves S the pool routes new requests to S only, so a client
  never gets the old version after the new one; requests running on the old weights finish there.
  A canary that no blue/green pool serves runs inside the workers (`canary_percent`: each worker
  keeps S and sends p % of its new requests to C).
- **SGLang** (kind `sglang`) reloads in place too: the same pause → reload → resume, through its
  `/update_weights_from_disk` (serving/upstreams/sglang.py), after the gateway itself verified the
  checkpoint against the registry's checksums (SGLang does not). It serves one model per server:
  a canary on a fleet of SGLang servers only is refused (`no_pool`) unless a blue/green pool serves it.
- **Upstreams that cannot reload** (kinds `tgi`, `openai`): blue/green. The version's pool is
  configured in FEEDLOOP_UPSTREAMS with `model_version` (ops bring it up); the gateway waits until
  one of its upstreams passes its health check (at most `ready_timeout`, polling, without blocking
  serving), then routes: `Routing(S, C, p)` — the canary's share first, all traffic on promotion.
  The old version's upstreams get no new requests and finish the ones they run (drain).
- **Refusals.** A worker answering 409 (checksums, load failure, another tokenizer) — or a version
  no upstream can serve (no worker to load it and no pool configured for it, or its pool never
  became healthy) — is refused as in local mode: `record_refusal` + `rollback(expected=version)`.
  The routing never names a version without upstreams. A worker that cannot be reached, or answers
  5xx, is retried at the next poll (no refusal).
- **Reconciling.** At every poll, workers whose health check reports another version or routing
  than the registry's (a restarted pod comes back on its `--model`) are reloaded; until then the
  routing keeps them out. A worker that refuses then is left out (logged), not rolled back for.

Several gateways, one registry: only the gateway holding the store's `fleet-rollouts` lease
(serving/leadership.py) reloads workers; the others apply the same rows by routing only, once the
workers' health checks report the version (until then: Pending, retried at the next poll). Reloads
carry the lease's token, so a worker fences off a gateway that lost the lease without noticing.

Reward: `feedloop worker --role reward` reloads in place too (`/v1/admin/reload` swaps the model);
every reward worker is moved to the serving version (the registry refuses reward canaries).

Registered pools (feedback/store/pools.py): at every poll, before the deployments, the pools in the
store are made the pool's registered sources (`sync_pools`): a new pool's members join once healthy
(so a promotion to its version waits for them as for any blue/green pool), a removed one's drain and
leave. FEEDLOOP_UPSTREAMS' own entries stay as they are. Every gateway does this (not only the
lease holder): each routes to the members it knows.

Start-up: when the registry has no deployment for a role, the version the fleet's workers report
(with the checkpoint path their /health gives, if this gateway can read it) is registered and
deployed (`ensure_deployed`); otherwise the registry wins and the fleet is moved to its version.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx

from feedback.store.registry import DeploymentState
from serving.checkpoint import checksums, read_manifest
from serving.deployment import ACTOR, Refused, verify_files
from serving.engine.types import Routing
from serving.upstreams.balancer import Member
from serving.upstreams.config import UpstreamSpec, spec_from_pool
from serving.upstreams.pool import RELOADABLE, RolloutFailed, RolloutRefused, UpstreamPool, raise_for_reload

log = logging.getLogger(__name__)



class VersionRefused(Refused):
    """`version` will not be served by this fleet (kind: checksum | load | incompatible | no_pool | unhealthy)."""

    def __init__(self, version: str, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.version = version


class Pending(Exception):
    """Not applicable yet (a blue/green pool is not healthy yet, no worker reachable): next poll."""


class FleetDeployer:
    """Applies registry deployments to the gateway's upstream pools (see the module docstring)."""

    def __init__(self, watcher, *, ready_timeout: float = 300.0, reload_timeout: float = 600.0,
                 lease=None) -> None:
        self.watcher = watcher
        self.lease = lease  # LeaderLease: only its holder reloads workers (None: this gateway always does)
        self.registry = watcher.registry
        self.services = watcher.services
        self.pool: UpstreamPool = watcher.services.engine
        self.ready_timeout = ready_timeout
        self.reload_timeout = reload_timeout
        self.pending: dict[str, str | None] = {"policy": None, "reward": None}
        self.applied: dict[str, DeploymentState | None] = {"policy": None, "reward": None}
        self._waiting_since: dict[tuple[str, str], float] = {}
        self._left_out: dict[tuple[str, str], str] = {}  # (url, version) → why a worker refused it
        self._verified: set[tuple[str, str]] = set()  # (version, path) checked for SGLang upstreams
        self._pools_seen: tuple | None = None  # the registered pools applied last (skip when unchanged)
        self._bad_pools: dict[str, str] = {}  # name → why this gateway cannot use it (logged once)

    @staticmethod
    def wanted_for(services) -> bool:
        return isinstance(services.engine, UpstreamPool)

    @property
    def admin_token(self) -> str | None:
        return self.services.settings.admin_token or None

    @property
    def leads(self) -> bool:
        """Whether this gateway reloads workers (holds the rollout lease); else it only routes."""
        return self.lease is None or self.lease.held

    @property
    def lease_token(self) -> int | None:
        return self.lease.token if self.lease is not None else None

    def _reward_members(self) -> list[Member]:
        balancer = getattr(self.services.reward, "balancer", None)  # NoReward: none
        return list(balancer.members) if balancer is not None else []

    # -- start-up -------------------------------------------------------------------------------
    async def register(self) -> bool:
        """`ensure_deployed` for what the fleet's workers serve, for a role the registry has no row
        for. True once done (or nothing can be done); False: retry at the next poll."""
        for role, members in (("policy", self.pool.members), ("reward", self._reward_members())):
            if not members or await asyncio.to_thread(self.registry.deployment, role) is not None:
                continue  # nothing to register, or the registry wins
            workers = [m for m in members if m.upstream.kind in RELOADABLE]
            if not workers:
                log.warning("the registry has no deployment and no worker can say what it serves: register "
                            "and promote the fleet's version (feedloop models register / promote)",
                            extra={"fl_role": role})
                continue
            reports = {(m.version, (m.health_body or {}).get("model_path")) for m in workers if m.healthy}
            if not reports:
                return False  # no worker answered its health check yet
            if len(reports) != 1:
                log.warning("the fleet serves several versions and the registry none: promote one",
                            extra={"fl_role": role, "fl_versions": sorted(str(v) for v, _ in reports)})
                continue
            ((version, path),) = reports
            if path is None:  # an untrained reward model: nothing to register (as in local mode)
                continue
            path = Path(path)
            if not path.is_dir():
                log.warning("cannot register the fleet's version: its checkpoint is not visible from the "
                            "gateway; register and promote it with `feedloop models`",
                            extra={"fl_role": role, "fl_model_version": version, "fl_path": str(path)})
                continue
            manifest = read_manifest(path) or {}
            sums = manifest.get("files") or await asyncio.to_thread(checksums, path)
            stage = manifest.get("stage") or ("rm" if role == "reward" else "base")
            state = await asyncio.to_thread(self.registry.ensure_deployed, role, version, stage=stage,
                                            checkpoint_path=str(path.resolve()), checksums=sums, actor=ACTOR)
            log.info("registered the fleet's version", extra={"fl_role": role, "fl_model_version": version,
                                                              "fl_registry": state.serving_version})
        return True

    # -- registered pools -----------------------------------------------------------------------
    async def sync_pools(self) -> None:
        """Follow the pools registered in the store (module docstring). A store that cannot be read
        leaves the members as they are (the next poll retries)."""
        from feedback.store.pools import UpstreamPools

        try:
            records = await asyncio.to_thread(UpstreamPools(self.registry.store).list)
        except Exception as exc:
            log.warning("could not read the registered pools (will retry)",
                        extra={"fl_error": f"{type(exc).__name__}: {exc}"})
            return
        if tuple(records) == self._pools_seen:
            return
        specs: dict[str, dict[str, UpstreamSpec]] = {"policy": {}, "reward": {}}
        for record in records:
            try:
                specs[record.role][record.name] = spec_from_pool(record)
            except ValueError as exc:
                if self._bad_pools.get(record.name) != str(exc):
                    log.error("registered pool left out: this gateway cannot use it",
                              extra={"fl_registered_pool": record.name, "fl_error": str(exc)})
                self._bad_pools[record.name] = str(exc)
        await self.pool.set_registered(specs["policy"])
        reward = self.services.reward
        if hasattr(reward, "set_registered"):
            await reward.set_registered(specs["reward"])
        elif specs["reward"]:
            log.warning("registered reward pools ignored: this gateway has no reward upstreams in "
                        "FEEDLOOP_UPSTREAMS (add one)", extra={"fl_registered_pools": sorted(specs["reward"])})
        self._pools_seen = tuple(records)

    # -- applying -------------------------------------------------------------------------------
    async def apply(self, role: str, state: DeploymentState) -> None:
        """A new revision: roll it onto the pool; record a refusal, or leave it for the next poll."""
        await self._converge(role, state, reconcile=False)

    async def reconcile(self, role: str, state: DeploymentState) -> None:
        """The revision is applied: bring back in line workers that drifted (restarted, were down)."""
        if self.applied[role] is not None and self.applied[role].revision == state.revision:
            await self._converge(role, state, reconcile=True)

    async def _converge(self, role: str, state: DeploymentState, reconcile: bool) -> None:
        started = time.perf_counter()
        try:
            if role == "policy":
                routing, changed = await self._policy(state, reconcile)
            else:
                routing, changed = await self._reward(state, reconcile)
        except VersionRefused as refusal:
            self.pending[role] = None
            await self.watcher._refuse(role, refusal.version, state, refusal)
            return
        except (Pending, RolloutFailed) as exc:
            if self.pending[role] != str(exc):
                log.warning("deployment not applied yet (will retry)",
                            extra={"fl_role": role, "fl_revision": state.revision, "fl_reason": str(exc)})
            self.pending[role] = str(exc)
            return
        except Exception as exc:  # the registry unreachable mid-way: retry the whole change next poll
            log.warning("could not apply the deployment (will retry)", extra={
                "fl_role": role, "fl_revision": state.revision, "fl_error": f"{type(exc).__name__}: {exc}"})
            self.pending[role] = f"{type(exc).__name__}: {exc}"
            return
        self.pending[role] = None
        if reconcile:
            if changed:
                log.info("fleet reconciled", extra={"fl_role": role, "fl_revision": state.revision})
            return
        self.applied[role] = state
        await self.watcher._applied(role, state, routing, (time.perf_counter() - started) * 1000)

    async def _row(self, role: str, version: str):
        row = await asyncio.to_thread(self.registry.store.get_version, version)
        if row is None:
            raise VersionRefused(version, "load", f"{version} is not registered")
        if row.role != role:
            raise VersionRefused(version, "incompatible", f"{version} is a {row.role} model, not a {role} model")
        return row

    def _ready(self, role: str, version: str, members: list[Member]) -> None:
        """Blue/green: raise Pending until one of `version`'s upstreams passes its health check, and
        VersionRefused once that took longer than `ready_timeout`."""
        if any(m.healthy for m in members):
            self._waiting_since.pop((role, version), None)
            return
        since = self._waiting_since.setdefault((role, version), time.monotonic())
        waited = time.monotonic() - since
        urls = ", ".join(m.url for m in members)
        if waited > self.ready_timeout:
            self._waiting_since.pop((role, version), None)
            raise VersionRefused(version, "unhealthy", f"the upstreams of {version} ({urls}) did not pass their "
                                 f"health check within {self.ready_timeout:g} s")
        raise Pending(f"waiting for the upstreams of {version} ({urls}) to pass their health check "
                      f"({waited:.0f} of {self.ready_timeout:g} s)")

    async def _policy(self, state: DeploymentState, reconcile: bool) -> tuple[Routing, bool]:
        S, C = state.serving_version, state.canary_version
        p = state.canary_percent if C else 0.0
        members = self.pool.members
        workers = [m for m in members if m.upstream.kind in RELOADABLE]
        fixed: dict[str, list[Member]] = {}
        for m in members:
            if m.upstream.kind not in RELOADABLE and m.version:
                fixed.setdefault(m.version, []).append(m)
        for version in [S] + ([C] if C else []):
            if version in fixed:
                self._ready("policy", version, fixed[version])
            elif not workers:
                raise VersionRefused(version, "no_pool", (
                    f"no upstream serves {version}: no feedloop worker can load it and FEEDLOOP_UPSTREAMS has no "
                    f"tgi/openai upstream with model_version {version!r} (bring its pool up and configure it "
                    f"first; configured: {', '.join(sorted(fixed)) or 'none'})"))
        # the pool's routing once everything is in place: a canary served by workers splits inside them
        pool_canary = C if C in fixed else None
        routing = Routing(S, pool_canary, p if pool_canary else 0.0)
        worker_canary = C if C and C not in fixed else None
        if worker_canary and not any(m.upstream.kind == "feedloop" for m in workers):
            raise VersionRefused(C, "no_pool", (
                f"no upstream can serve the canary {C}: SGLang servers load one model each, so a canary cannot "
                f"be split inside them; add feedloop workers, or a blue/green pool with model_version {C!r}, "
                f"or promote it"))
        changed = False
        if workers and self.leads:  # followers wait for the leader's reloads to show in the health checks
            changed = await self._roll_workers(workers, S, worker_canary, p, routing, S in fixed, reconcile)
        members = self.pool.members  # (discovery may have changed them meanwhile)
        missing = [v for v in routing.versions if not any(m.version == v for m in members)]
        if missing:  # never route to nothing: e.g. every worker is down, none could load it yet
            on = ", ".join(f"{m.url} {m.version or '?'}" for m in workers) or "none"
            who = "" if self.leads else "; the gateway holding the rollout lease reloads them"
            raise Pending(f"no upstream serves {', '.join(missing)} yet (workers: {on}{who})")
        if self.pool.routing != routing:
            self.pool.set_routing(routing)
            changed = True
        return (Routing(S, C, p) if C else routing), changed

    @staticmethod
    def _worker_routing(m: Member) -> dict | None:
        return (m.health_body or {}).get("routing") if m.health_body else None

    async def _roll_workers(self, workers: list[Member], serving: str, canary: str | None, percent: float,
                            routing: Routing, served_elsewhere: bool, reconcile: bool) -> bool:
        """Reload workers not on (serving, canary at percent). Returns whether any was reloaded."""
        want = {"serving": serving, "canary": canary, "canary_percent": float(percent) if canary else 0.0}

        def off(m: Member, version: str) -> bool:
            if m.upstream.kind == "sglang":  # one model per server: it serves `serving`, no canary
                return m.healthy and m.version != serving and (m.url, version) not in self._left_out
            r = self._worker_routing(m)
            current = {"serving": m.version, "canary": None, "canary_percent": 0.0} if r is None else \
                {"serving": r.get("serving"), "canary": r.get("canary"), "canary_percent": float(r.get("canary_percent") or 0.0)}
            return m.healthy and current != want and (m.url, version) not in self._left_out

        need = [m for m in workers if off(m, serving)]
        if not need:
            return False
        reloaded = False
        # 1. workers not serving `serving` (or with a canary to withdraw): reload it
        first = [m for m in need if m.version != serving or canary is None]
        if first:
            reloaded |= await self._rollout("policy", serving, first, None, routing, served_elsewhere, reconcile)
        # 2. the canary inside the workers
        if canary is not None:
            second = [m for m in workers if m.upstream.kind == "feedloop" and off(m, canary) and m.version == serving]
            if second:
                reloaded |= await self._rollout("policy", canary, second, percent, routing, False, reconcile)
        return reloaded

    async def _rollout(self, role: str, version: str, members: list[Member], canary_percent: float | None,
                       routing: Routing | None, served_elsewhere: bool, reconcile: bool) -> bool:
        row = await self._row(role, version)
        try:
            if any(m.upstream.kind == "sglang" for m in members):
                await self._verify_for_sglang(version, row)
            if role == "policy":
                done = await self.pool.rollout(row.checkpoint_path, version, row.checksums, self.admin_token,
                                               self.reload_timeout, canary_percent=canary_percent, routing=routing,
                                               members=members, lease_token=self.lease_token,
                                               leading=lambda: self.leads)
            else:
                done = await self._reload_reward(row.checkpoint_path, version, row.checksums, members)
        except RolloutRefused as exc:
            if not (reconcile or served_elsewhere):
                raise VersionRefused(version, exc.code, f"{exc.url} refused it: {exc.reason}") from None
            # others serve it: leave this worker out (the gateway's own check: every SGLang one)
            urls = [m.url for m in members if m.upstream.kind == "sglang"] if exc.url == "gateway" else [exc.url]
            for url in urls:
                self._left_out[(url, version)] = exc.reason
            log.error("a worker refused the version: left out of rotation for it", extra={
                "fl_role": role, "fl_upstream": exc.url, "fl_model_version": version, "fl_reason": exc.reason})
            return bool(exc.done)
        return bool(done)

    async def _verify_for_sglang(self, version: str, row) -> None:
        """SGLang loads whatever is in the directory: the gateway checks the files against the
        registry's checksums first (once per version), as a feedloop worker would itself."""
        key = (version, row.checkpoint_path)
        if key in self._verified:
            return
        path = Path(row.checkpoint_path)
        if not path.is_dir():
            raise RolloutRefused("gateway", "checksum", (
                f"SGLang upstreams do not verify checkpoints, and this gateway cannot read {path} to verify it "
                f"(mount the checkpoints volume in the gateway)"), [])
        try:
            await asyncio.to_thread(verify_files, path, row.checksums or {})
        except Refused as exc:
            raise RolloutRefused("gateway", exc.kind, str(exc), []) from None
        self._verified.add(key)

    # -- reward ---------------------------------------------------------------------------------
    async def _reward(self, state: DeploymentState, reconcile: bool) -> tuple[Routing, bool]:
        version = state.serving_version
        if state.canary_version and not reconcile:
            log.warning("a reward canary in the registry (written before they were refused) is ignored",
                        extra={"fl_role": "reward", "fl_canary": state.canary_version})
        members = self._reward_members()
        if not members:
            if not reconcile:
                log.warning("no reward upstreams: the reward deployment is not applied (/v1/score answers 503)",
                            extra={"fl_model_version": version})
            return Routing(version), False
        need = [m for m in members if m.healthy and m.version != version and (m.url, version) not in self._left_out]
        if not need or not self.leads:
            return Routing(version), False
        changed = await self._rollout("reward", version, need, None, None, False, reconcile)
        return Routing(version), changed

    async def _reload_reward(self, model: str, version: str, sums: dict, members: list[Member]) -> list[dict]:
        """Reward workers swap in place (a scoring call keeps the model it started with): no pause."""
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        body = {"model": model, "version": version, "checksums": sums, "lease_token": self.lease_token}
        done: list[dict] = []
        async with httpx.AsyncClient(timeout=self.reload_timeout) as client:
            for m in members:
                if not self.leads:
                    raise RolloutFailed(m.url, "this gateway lost the rollout lease", done, "not_leader")
                try:
                    r = await client.post(f"{m.url}/v1/admin/reload", json=body, headers=headers)
                except httpx.HTTPError as exc:
                    raise RolloutFailed(m.url, f"{type(exc).__name__}: {exc}", done) from None
                raise_for_reload(m.url, r, done)
                m.upstream.reloaded_to(r.json()["model_version"])
                done.append({"url": m.url, **r.json()})
                log.info("reward worker reloaded", extra={"fl_upstream": m.url, "fl_model_version": version})
        return done

    # -- for the admin routes -------------------------------------------------------------------
    def gateway_state(self, role: str) -> dict:
        """Per upstream: the version it serves and its part in the deployment (serving | canary |
        draining: not routed, still finishing requests | idle: not routed | unhealthy | paused)."""
        state = self.applied[role]
        if role == "policy":
            routing = self.pool.routing
            members = self.pool.members
            loaded = {"routing": routing.as_dict() if routing else None, "versions": self.pool.versions(),
                      "error_window": self.watcher.error_window()}
        else:
            members = self._reward_members()
            version = state.serving_version if state else None
            routing = Routing(version) if version else None
            loaded = {"routing": routing.as_dict() if routing else None,
                      "versions": sorted({m.version for m in members if m.version})}
        upstreams = []
        for m in members:
            r = self._worker_routing(m) if role == "policy" else None
            slot = "idle"
            if routing is not None and m.version == routing.serving:
                slot = "serving"
            elif routing is not None and m.version == routing.canary:
                slot = "canary"
            elif m.outstanding:
                slot = "draining"
            if not m.healthy:
                slot = "unhealthy"
            elif m.paused:
                slot = "paused"
            upstreams.append({"url": m.url, "kind": m.upstream.kind, "model_version": m.version, "slot": slot,
                              "registered_pool": m.source.name if m.source is not None else None,
                              "worker_routing": r, "in_rotation": m.in_rotation(), "outstanding": m.outstanding,
                              "left_out_for": sorted(v for (u, v) in self._left_out if u == m.url)})
        status = self.watcher.roles[role]
        leader = self.lease.as_dict() if self.lease is not None else {"is_leader": True}
        return {**loaded, "mode": "upstreams", "upstreams": upstreams, "pending": self.pending[role], "leader": leader,
                "applied_revision": status.applied_revision, "refused": dict(status.refused),
                "registry_error": status.last_error}


__all__ = ["FleetDeployer", "Pending", "VersionRefused"]
