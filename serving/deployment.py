"""The gateway side of deployments: follow the model registry, hot-swap versions, roll back bad ones.

The registry (`feedback/store/registry.py`) says, per role, which version serves and which one is a
canary with what share of traffic; it never talks to a gateway. A `DeploymentWatcher` polls it
(one row per role, by primary key) every `poll_interval` seconds and, when a row's revision moves:

1. loads every version the row names that this gateway has not loaded, on a thread that then ends
   (the one-torch-thread rule, see serving/server.py `in_fresh_thread`), while serving goes on;
2. checks the files first against their own manifest AND against the checksums the registry recorded
   when the version was registered: a checkpoint whose files differ is never served;
3. policy: adds it to the engine as a lane of its own and switches the routing atomically; the engine
   swaps between decode steps and requests already running finish on the weights they started with.
   Reward model: `LocalRewardClient.swap` (calls already submitted keep the model they captured);
4. a version it cannot serve is refused: the refusal goes into the registry's audit log and the
   registry is rolled back (`expected=` the version, so several gateways refusing it roll back once);
   this gateway keeps serving what it has.

Automatic rollback: the version that most recently started taking traffic through a promotion or a
canary is watched. Its finished requests (the `feedloop_requests_total` counter the generation
service already keeps per version and outcome: `ok` and `error` — client cancellations and requests
refused before they started are not its fault) are counted in windows of at least `min_requests`;
a window whose failed share exceeds `max_error_rate` rolls the registry back, and the watcher then
applies the rollback like any other change.

Upstream mode (FEEDLOOP_UPSTREAMS: the gateway loads no weights): the same polling, refusals and
automatic rollback, but each change is rolled across the upstream pools by serving/fleet.py
(`FleetDeployer`: workers reloaded in place one by one, blue/green for TGI and OpenAI upstreams).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from feedback.store.registry import DeploymentState, ModelRegistry, RegistryError
from serving.checkpoint import checksums, read_manifest
from serving.engine.types import Routing
from serving.services import Services

log = logging.getLogger(__name__)

ROLES = ("policy", "reward")
ACTOR = "gateway"
MAX_PASSES = 4  # applying a change may roll the registry back; follow that many revisions per sync


class Refused(Exception):
    """This gateway will not serve a version. `kind` labels the metric: checksum | load | incompatible."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def verify_files(path: Path, recorded: dict[str, str]) -> None:
    """Raise Refused unless the directory's files match both its manifest and the registry's record.

    Hashes every file once. The registry's checksums are the ones taken when the version was
    registered: they catch a directory that was changed (or swapped) after that, manifest included."""
    if not path.is_dir():
        raise Refused("load", f"checkpoint directory {path} does not exist")
    actual = checksums(path)
    manifest = read_manifest(path)
    if manifest and manifest.get("files"):
        bad = _differing(manifest["files"], actual)
        if bad:
            raise Refused("checksum", f"files do not match the checkpoint's manifest: {', '.join(bad)}")
    if not recorded:
        raise Refused("checksum", "the registry records no checksums for this version")
    bad = _differing(recorded, actual)
    if bad:
        raise Refused("checksum", f"files do not match the checksums recorded in the registry: {', '.join(bad)}")


def _differing(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Files missing, changed or extra. The manifest is not among `actual` (checksums() skips it)."""
    return sorted(rel for rel in set(expected) | set(actual) if expected.get(rel) != actual.get(rel))


@dataclass
class _Window:
    """Outcome counts of the watched version at the start of the current window."""

    version: str
    ok: float
    error: float
    since: float = field(default_factory=time.monotonic)


@dataclass
class RoleStatus:
    """What this gateway did about one role (the admin route shows it)."""

    applied_revision: int | None = None
    refused: dict[str, str] = field(default_factory=dict)  # version → why, this gateway's refusals
    last_error: str | None = None  # the registry could not be read or changed
    watched: _Window | None = None
    metric_labels: set[tuple[str, str]] = field(default_factory=set)  # (version, slot) set on the gauge


class DeploymentWatcher:
    """Polls the registry and applies it to `services` (a LocalEngineClient and a LocalRewardClient).

    `start()` registers what the gateway loaded (the first gateway deploys it; later ones find the
    registry's choice, which wins), applies the registry once before traffic, then polls.
    A registry that cannot be reached is logged and polled again: serving goes on with what it has.
    """

    def __init__(self, registry: ModelRegistry, services: Services, *, poll_interval: float = 1.0,
                 min_requests: int = 20, max_error_rate: float = 0.05, device: str = "auto",
                 dtype: str = "auto", lease_ttl: float = 15.0) -> None:
        self.registry = registry
        self.services = services
        self.poll_interval = poll_interval
        self.min_requests = min_requests
        self.max_error_rate = max_error_rate
        self.device, self.dtype = device, dtype
        self.roles = {role: RoleStatus() for role in ROLES}
        self._metrics = services.metrics.deployments
        self._registered = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        from serving.fleet import FleetDeployer  # imports this module

        # upstream mode (FEEDLOOP_UPSTREAMS): the changes are rolled onto the upstream pools instead,
        # the workers reloaded by the one gateway holding the rollout lease (serving/leadership.py)
        self.fleet = None
        if FleetDeployer.wanted_for(services):
            from feedback.store.leases import Leases
            from serving.leadership import LeaderLease

            self.fleet = FleetDeployer(self, lease=LeaderLease(Leases(registry.store), ttl=lease_ttl))

    @classmethod
    def from_settings(cls, registry: ModelRegistry, services: Services) -> "DeploymentWatcher":
        s = services.settings
        return cls(registry, services, poll_interval=s.poll_interval, min_requests=s.rollback_min_requests,
                   max_error_rate=s.rollback_error_rate, device=s.device, dtype=s.dtype,
                   lease_ttl=s.leader_lease_ttl)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.fleet is not None and self.fleet.lease is not None:
            await self.fleet.lease.start()
        await self.sync()
        self._task = asyncio.create_task(self._run(), name="feedloop-deployments")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.fleet is not None and self.fleet.lease is not None:
            await self.fleet.lease.stop()  # released: another gateway takes the rollouts over now

    def poke(self) -> None:
        """Read the registry now instead of at the next tick (an admin route just changed it)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.sync()
            except Exception:  # a bug here must not stop the polling (nor serving)
                log.exception("deployment sync failed")

    # -- one round ----------------------------------------------------------------------------
    async def sync(self) -> None:
        """Register at first, apply every role's registry change, then check the watched error rate."""
        async with self._lock:
            if self.fleet is not None:  # pools registered in the store join (or leave) first
                await self.fleet.sync_pools()
            if not self._registered:
                self._registered = await (self.fleet.register() if self.fleet else self._register_loaded())
            for role in ROLES:
                tried = None
                for _ in range(MAX_PASSES):
                    state = await self._read(role)
                    if state is None or state.revision == tried:  # not applicable now: next tick
                        break
                    if state.revision == self.roles[role].applied_revision:
                        if self.fleet is not None:  # workers that drifted (restarted) are moved back
                            await self.fleet.reconcile(role, state)
                        break
                    tried = state.revision
                    await self._apply(role, state)
            await self._check_error_rate()

    async def _read(self, role: str) -> DeploymentState | None:
        status = self.roles[role]
        try:
            state = await asyncio.to_thread(self.registry.deployment, role)
        except Exception as exc:  # database down: keep serving what is loaded, try again next tick
            message = f"{type(exc).__name__}: {exc}"
            if status.last_error != message:  # once per distinct failure, not every second
                log.warning("registry unreachable", extra={"fl_role": role, "fl_error": message})
            status.last_error = message
            return None
        status.last_error = None
        return state

    async def _register_loaded(self) -> bool:
        """`ensure_deployed` for what the gateway loaded at start-up (an untrained reward model, which
        has no checkpoint, is not registered). True once done (or nothing to do)."""
        loaded = []
        policy = self.services.engine.policy
        loaded.append(("policy", policy.model_version, Path(policy.path)))
        reward = self.services.reward.reward
        if reward.path is not None:
            loaded.append(("reward", reward.model_version, Path(reward.path)))
        try:
            for role, version, path in loaded:
                manifest = read_manifest(path) or {}
                sums = manifest.get("files") or await asyncio.to_thread(checksums, path)
                stage = manifest.get("stage") or ("rm" if role == "reward" else "base")
                state = await asyncio.to_thread(
                    self.registry.ensure_deployed, role, version, stage=stage,
                    checkpoint_path=str(path.resolve()), checksums=sums, actor=ACTOR)
                if state.serving_version != version:
                    log.info("the registry serves another version: it wins", extra={
                        "fl_role": role, "fl_loaded": version, "fl_registry": state.serving_version})
        except Exception as exc:
            log.warning("could not register the loaded models (will retry)",
                        extra={"fl_error": f"{type(exc).__name__}: {exc}"})
            return False
        return True

    # -- applying a registry change -----------------------------------------------------------
    async def _apply(self, role: str, state: DeploymentState) -> None:
        if self.fleet is not None:  # upstream mode: serving/fleet.py rolls it out, then calls _applied
            await self.fleet.apply(role, state)
            return
        wanted = [state.serving_version] + ([state.canary_version] if state.canary_version else [])
        if role == "reward" and state.canary_version:
            log.warning("a reward canary in the registry (written before they were refused) is ignored",
                        extra={"fl_role": role, "fl_canary": state.canary_version})
            wanted = wanted[:1]
        for version in wanted:
            if self._is_loaded(role, version):
                continue
            try:
                await self._load(role, version)
            except Refused as refusal:
                await self._refuse(role, version, state, refusal)
                return
            except Exception as exc:  # registry unreachable mid-way: retry the whole change next tick
                log.warning("could not apply the deployment (will retry)", extra={
                    "fl_role": role, "fl_revision": state.revision, "fl_error": f"{type(exc).__name__}: {exc}"})
                return
        started = time.perf_counter()
        if role == "policy":
            routing = Routing(state.serving_version, state.canary_version, state.canary_percent
                              if state.canary_version else 0.0)
            try:
                self.services.engine.set_routing(routing)
            except KeyError as exc:  # a drained lane was dropped since we looked: load it next tick
                log.warning("a version was unloaded meanwhile (will retry)",
                            extra={"fl_role": role, "fl_revision": state.revision, "fl_error": str(exc)})
                return
        else:
            # _load swapped it in already; nothing to route
            routing = Routing(state.serving_version)
        await self._applied(role, state, routing, (time.perf_counter() - started) * 1000)

    async def _applied(self, role: str, state: DeploymentState, routing: Routing, swap_ms: float) -> None:
        """Bookkeeping once a revision serves: revision, metrics, log, the newcomer's error window."""
        status = self.roles[role]
        first = status.applied_revision is None
        status.applied_revision = state.revision
        self._metrics.swaps.labels(role).inc()
        self._metrics.revision.labels(role).set(state.revision)
        self._set_version_gauge(role, routing)
        log.info("deployment applied", extra={"fl_role": role, "fl_revision": state.revision,
                                              "fl_routing": routing.as_dict(), "fl_swap_ms": round(swap_ms, 3)})
        if role == "policy":
            await self._watch_newcomer(state, first)

    def _is_loaded(self, role: str, version: str) -> bool:
        if role == "policy":
            return version in self.services.engine.versions()
        return self.services.reward.model_version == version

    async def _load(self, role: str, version: str) -> None:
        """Load, verify and hand `version` to the engine (policy) or swap it in (reward)."""
        from serving.server import in_fresh_thread  # server imports this module

        row = await asyncio.to_thread(self.registry.store.get_version, version)
        if row is None:
            raise Refused("load", f"{version} is not registered")
        if row.role != role:
            raise Refused("incompatible", f"{version} is a {row.role} model, not a {role} model")
        path = Path(row.checkpoint_path)
        log.info("loading model version", extra={"fl_role": role, "fl_model_version": version,
                                                 "fl_path": str(path)})
        started = time.perf_counter()
        if role == "policy":
            await in_fresh_thread(lambda: self._load_policy(version, path, row.checksums))
        else:
            previous = await in_fresh_thread(lambda: self._load_reward(version, path, row.checksums))
            log.info("reward model swapped", extra={"fl_model_version": version, "fl_previous": previous})
        seconds = time.perf_counter() - started
        self._metrics.load_seconds.labels(role).observe(seconds)
        log.info("model version loaded", extra={"fl_role": role, "fl_model_version": version,
                                                "fl_load_s": round(seconds, 3)})

    def _load_policy(self, version: str, path: Path, recorded: dict[str, str]) -> None:
        """On the loading thread: verify, load, add to the engine (not routed yet)."""
        from serving.models import load_policy

        verify_files(path, recorded)
        try:
            policy = load_policy(path, self.device, self.dtype, verified=True)  # verify_files hashed them
        except Exception as exc:
            raise Refused("load", f"loading failed: {type(exc).__name__}: {exc}") from exc
        policy.model_version = version  # the registry's name is what responses and records carry
        try:
            self.services.engine.add_version(policy)
        except ValueError as exc:  # a tokenizer the serving version's requests cannot use
            raise Refused("incompatible", str(exc)) from exc

    def _load_reward(self, version: str, path: Path, recorded: dict[str, str]) -> str:
        """On the loading thread: verify, load and swap the reward model; returns the one replaced."""
        from serving.models import load_reward

        verify_files(path, recorded)
        try:
            reward = load_reward(path, self.services.engine.policy, self.device, self.dtype, verified=True)
        except Exception as exc:
            raise Refused("load", f"loading failed: {type(exc).__name__}: {exc}") from exc
        reward.model_version = version
        return self.services.reward.swap(reward)

    async def _refuse(self, role: str, version: str, state: DeploymentState, refusal: Refused) -> None:
        """Never serve `version`: log it in the registry and roll the registry back past it."""
        status = self.roles[role]
        reason = str(refusal)
        status.refused[version] = reason
        self._metrics.refusals.labels(role, refusal.kind).inc()
        log.error("model version refused", extra={"fl_role": role, "fl_model_version": version,
                                                  "fl_kind": refusal.kind, "fl_reason": reason})
        try:
            await asyncio.to_thread(self.registry.record_refusal, role, version, reason, actor=ACTOR)
            after = await asyncio.to_thread(self.registry.rollback, role, reason=f"refused by a gateway: {reason}",
                                            actor=ACTOR, expected=version)
            log.info("registry rolled back past the refused version",
                     extra={"fl_role": role, "fl_model_version": version, "fl_revision": after.revision})
        except RegistryError as exc:  # nothing to roll back to: keep serving, do not retry this revision
            status.applied_revision = state.revision
            status.last_error = str(exc)
            log.error("cannot roll back past the refused version: serving the current one",
                      extra={"fl_role": role, "fl_model_version": version, "fl_error": str(exc)})
        except Exception as exc:  # database down: the next tick reads the same revision and retries
            log.warning("could not record the refusal (will retry)",
                        extra={"fl_role": role, "fl_error": f"{type(exc).__name__}: {exc}"})

    def _set_version_gauge(self, role: str, routing: Routing) -> None:
        status = self.roles[role]
        now = {(routing.serving, "serving"): routing.share(routing.serving)}
        if routing.canary is not None:
            now[(routing.canary, "canary")] = routing.share(routing.canary)
        for version, slot in status.metric_labels - set(now):
            self._metrics.serving.remove(role, version, slot)
        for (version, slot), share in now.items():
            self._metrics.serving.labels(role, version, slot).set(share)
        status.metric_labels = set(now)

    # -- automatic rollback -------------------------------------------------------------------
    async def _watch_newcomer(self, state: DeploymentState, first: bool) -> None:
        """Watch the version the last promotion or canary sent traffic to (not a rollback target,
        not what the gateway found at start-up): that is the change an error rate should undo."""
        status = self.roles["policy"]
        routed = {state.serving_version, state.canary_version} - {None}
        if status.watched is not None and status.watched.version not in routed:
            status.watched = None
        if first:
            return
        try:
            events = await asyncio.to_thread(self.registry.history, "policy", 1)
        except Exception:
            return
        if not events or events[0].action not in ("promote", "canary") or events[0].version not in routed:
            return
        version = events[0].version
        outcomes = self.services.metrics.request_outcomes(version)
        status.watched = _Window(version, outcomes.get("ok", 0.0), outcomes.get("error", 0.0))
        log.info("watching the new version's error rate", extra={
            "fl_model_version": version, "fl_min_requests": self.min_requests,
            "fl_max_error_rate": self.max_error_rate})

    def error_window(self) -> dict | None:
        """The watched version's current window: requests finished and failed since it began."""
        window = self.roles["policy"].watched
        if window is None:
            return None
        outcomes = self.services.metrics.request_outcomes(window.version)
        failed = outcomes.get("error", 0.0) - window.error
        done = outcomes.get("ok", 0.0) - window.ok + failed
        return {"model_version": window.version, "requests": int(done), "failed": int(failed)}

    async def _check_error_rate(self) -> None:
        status = self.roles["policy"]
        current = self.error_window()
        if current is None or current["requests"] < self.min_requests:
            return
        version, done, failed = current["model_version"], current["requests"], current["failed"]
        rate = failed / done
        if rate <= self.max_error_rate:  # a healthy window: start the next one
            outcomes = self.services.metrics.request_outcomes(version)
            status.watched = _Window(version, outcomes.get("ok", 0.0), outcomes.get("error", 0.0))
            return
        reason = f"error rate {rate:.0%} > {self.max_error_rate:.0%} ({failed} of {done} requests failed)"
        log.error("rolling back: the new version fails its requests",
                  extra={"fl_model_version": version, "fl_reason": reason})
        try:
            after = await asyncio.to_thread(self.registry.rollback, "policy", reason=reason, actor=ACTOR,
                                            expected=version)
        except RegistryError as exc:
            log.error("automatic rollback impossible", extra={"fl_model_version": version, "fl_error": str(exc)})
            status.watched = None
            return
        except Exception as exc:  # database down: the window stays, the next tick tries again
            log.warning("automatic rollback failed (will retry)",
                        extra={"fl_error": f"{type(exc).__name__}: {exc}"})
            return
        status.watched = None
        self._metrics.auto_rollbacks.labels("policy").inc()
        log.info("registry rolled back", extra={"fl_revision": after.revision, "fl_serving": after.serving_version})
        self._wake.set()  # apply it now

    # -- for the admin routes -----------------------------------------------------------------
    def gateway_state(self, role: str) -> dict:
        if self.fleet is not None:  # per upstream: the version it serves, its slot in the deployment
            return self.fleet.gateway_state(role)
        status = self.roles[role]
        if role == "policy":
            engine = self.services.engine
            loaded = {"routing": engine.routing.as_dict(), "versions": engine.versions(),
                      "error_window": self.error_window()}
        else:
            reward = self.services.reward
            loaded = {"routing": {"serving": reward.model_version, "canary": None, "canary_percent": 0.0},
                      "versions": {reward.model_version: {"trained": reward.trained}}}
        return {**loaded, "applied_revision": status.applied_revision, "refused": dict(status.refused),
                "registry_error": status.last_error}


__all__ = ["DeploymentWatcher", "Refused", "verify_files", "ROLES"]
