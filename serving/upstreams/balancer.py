"""The members of a pool, their health, and the choice of one: what the policy pool
(serving/upstreams/pool.py) and the reward pool (serving/upstreams/reward.py) share.

Members are either listed (one per FEEDLOOP_UPSTREAMS entry) or come from a *source*: an entry with
`discovery` stands for whatever its DNS name resolves to (serving/upstreams/discovery.py), re-read
every `discovery_interval` seconds, and a pool registered in the store (feedback/store/pools.py,
followed by serving/fleet.py) is a source too — its one URL, or its DNS name's records. A new member
enters rotation once it passes its first health check; a member whose record (or registered pool)
went away gets no new requests, finishes the ones it has, and is dropped (its connections closed)
when they are done.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable

import httpx

from serving.upstreams.base import CircuitBreaker, Upstream
from serving.upstreams.config import PoolOptions, UpstreamSpec
from serving.upstreams.discovery import DiscoveryError, Resolver

log = logging.getLogger(__name__)


class Member:
    """One upstream in a pool: its breaker, health and live counts."""

    def __init__(self, upstream: Upstream, options: PoolOptions, *, healthy: bool = True,
                 source: "Source | None" = None) -> None:
        self.upstream = upstream
        self.breaker = CircuitBreaker(options.breaker_failures, options.breaker_cooldown)
        # listed members: healthy until the first check says otherwise (start() checks before
        # serving); discovered ones join mid-flight and wait for their first check
        self.healthy = healthy
        self.health_error: str | None = None
        self.outstanding = 0
        self.waiting = 0  # outstanding requests that have not had their first token yet
        self.outcomes: Counter = Counter()  # ok | error | cancelled | refused | retried
        self.paused = False  # a rollout reloads it: no new requests (those in flight finish)
        self.health_body: dict | None = None  # its last successful /health answer
        self.source = source  # the discovered entry it came from (None: listed)

    @property
    def url(self) -> str:
        return self.upstream.url

    @property
    def version(self) -> str | None:
        return self.upstream.model_version

    def in_rotation(self) -> bool:
        return self.healthy and not self.paused and self.breaker.available()

    def as_dict(self) -> dict:
        source = self.source
        return {"url": self.url, "kind": self.upstream.kind, "model_version": self.version,
                "healthy": self.healthy, "health_error": self.health_error, "paused": self.paused,
                "breaker": self.breaker.state,
                "breaker_opened": self.breaker.opened_total, "outstanding": self.outstanding,
                "outcomes": dict(self.outcomes),
                "discovered_from": source.spec.url if source is not None and source.spec.discovery else None,
                "registered_pool": source.name if source is not None else None}


class Source:
    """Where members come from besides the listed ones: a discovered FEEDLOOP_UPSTREAMS entry, or a
    pool registered in the store (`name`; its spec may be discovered too, or one plain URL). Holds
    the spec and how to make an upstream for one member URL."""

    def __init__(self, spec: UpstreamSpec, factory: Callable[[str], Upstream], name: str | None = None) -> None:
        self.spec, self.factory, self.name = spec, factory, name
        self.error: str | None = None  # the last lookup's failure (members kept), None once it answers


class Balancer:
    """Members, health checks, discovery and the choice of a member."""

    def __init__(self, members: list[Member], options: PoolOptions, name: str,
                 sources: list[Source] | None = None) -> None:
        self.sources = list(sources or [])
        if not members and not self.sources:
            raise ValueError("a pool needs at least one upstream")
        self.members = members
        self.options = options
        self.name = name
        self._rr = itertools.count()
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task] = []
        self._leaving: set[asyncio.Task] = set()
        self._resolver: Resolver | None = None
        self.retries = 0
        self.discovery_errors = 0
        self.on_health: list = []  # callbacks(member, body) after each successful check

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.options.health_timeout))
        return self._http

    async def start(self) -> None:
        await self.discover()
        await self.check_all()
        self._tasks.append(asyncio.create_task(self._every(self.options.health_interval, self.check_all),
                                               name=f"feedloop-{self.name}-health"))
        # always: a registered pool with DNS discovery may be added while the gateway runs
        self._tasks.append(asyncio.create_task(self._every(self.options.discovery_interval, self.discover),
                                               name=f"feedloop-{self.name}-discovery"))

    async def stop(self) -> None:
        for task in self._tasks + list(self._leaving):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._leaving, return_exceptions=True)
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _every(self, seconds: float, job) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:  # pragma: no cover - a round must never end the loop
                log.exception("upstream %s round failed", getattr(job, "__name__", "?"))

    # -- discovery --------------------------------------------------------------------------------
    async def discover(self) -> None:
        """Re-read every discovered entry's DNS name and add / drop members to match."""
        for source in list(self.sources):
            await self._discover(source)

    async def _discover(self, source: Source) -> None:
        if source.spec.discovery is None:  # a registered pool of one server
            urls = [source.spec.url]
        else:
            if self._resolver is None:
                self._resolver = Resolver(self.options)
            try:
                urls = await self._resolver.urls(source.spec)
            except DiscoveryError as exc:
                self.discovery_errors += 1
                if source.error != str(exc):
                    log.warning("upstream discovery failed: keeping the members found before",
                                extra={"fl_pool": self.name, "fl_source": source.spec.url, "fl_error": str(exc)})
                source.error = str(exc)
                return
            source.error = None
        if source in self.sources:  # (removed meanwhile: its members are leaving already)
            await self._sync(source, urls)

    async def set_registered(self, sources: list[Source]) -> None:
        """Make the registered pools' sources these (by name and spec): a new one's members are
        found and checked now, a removed or changed one's members drain and leave."""
        wanted = {s.name: s for s in sources}
        for old in [s for s in self.sources if s.name is not None]:
            new = wanted.get(old.name)
            if new is not None and new.spec == old.spec:
                wanted.pop(old.name)
                continue
            self.sources.remove(old)
            await self._sync(old, [])
            log.info("registered pool removed: its members drain and leave", extra={
                "fl_pool": self.name, "fl_registered_pool": old.name, "fl_url": old.spec.url})
        for source in wanted.values():
            self.sources.append(source)
            log.info("registered pool added", extra={"fl_pool": self.name, "fl_registered_pool": source.name,
                                                     "fl_url": source.spec.url, "fl_kind": source.spec.kind,
                                                     "fl_model_version": source.spec.model_version})
            await self._discover(source)

    async def _sync(self, source: Source, urls: list[str]) -> None:
        have = {m.url: m for m in self.members if m.source is source}
        added = [Member(source.factory(url), self.options, healthy=False, source=source)
                 for url in urls if url not in have]
        gone = [m for url, m in have.items() if url not in urls]
        if not added and not gone:
            return
        self.members = [m for m in self.members if m not in gone] + added
        for m in gone:
            task = asyncio.create_task(self._drop_when_drained(m), name=f"feedloop-{self.name}-drain")
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)
        log.info("upstream members changed", extra={
            "fl_pool": self.name, "fl_source": source.name or source.spec.url, "fl_added": [m.url for m in added],
            "fl_removed": [m.url for m in gone], "fl_members": [m.url for m in self.members if m.source is source]})
        await asyncio.gather(*(self.check(m) for m in added))

    @staticmethod
    async def _drop_when_drained(m: Member) -> None:
        try:
            while m.outstanding:
                await asyncio.sleep(0.2)
        finally:
            await m.upstream.aclose()

    # -- health -----------------------------------------------------------------------------------
    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(m) for m in list(self.members)))

    async def check(self, m: Member) -> None:
        epoch = m.upstream.version_epoch
        try:
            r = await self.http.get(f"{m.url}/health")
            ok = r.status_code == 200
            error = None if ok else f"/health answered {r.status_code}"
            body = json_or_none(r) if ok else None
        except httpx.HTTPError as exc:
            ok, error, body = False, f"{type(exc).__name__}: {exc}", None
        describe = getattr(m.upstream, "describe", None)  # SGLang: its version is on /model_info
        if ok and describe is not None:
            body = {**(body if isinstance(body, dict) else {}), **(await describe(self.http) or {})}
        if m.upstream.version_epoch != epoch:  # reloaded while we asked: what we read is stale
            return
        if ok and isinstance(body, dict) and isinstance(body.get("model_version"), str):
            m.upstream.reported_version = body["model_version"]
        if ok != m.healthy and (m.source is None or m.health_error is not None or ok):
            # (a discovered member's first failing check is not news: it never was in rotation)
            log.warning("upstream %s", "back in rotation" if ok else "left rotation (health check failed)",
                        extra={"fl_upstream": m.url, "fl_pool": self.name, "fl_error": error})
        m.healthy, m.health_error = ok, error
        if ok:
            m.health_body = body if isinstance(body, dict) else None
            for callback in self.on_health:
                callback(m, body)

    # -- choice -----------------------------------------------------------------------------------
    def candidates(self, version: str | None, exclude: set[Member]) -> list[Member]:
        return [m for m in self.members
                if m not in exclude and m.in_rotation() and (version is None or m.version == version)]

    def pick(self, version: str | None, exclude: set[Member]) -> Member | None:
        """Least outstanding requests; ties in round-robin order."""
        found = self.candidates(version, exclude)
        if not found:
            return None
        least = min(m.outstanding for m in found)
        tied = [m for m in found if m.outstanding == least]
        return tied[next(self._rr) % len(tied)]

    def versions_known(self) -> set[str]:
        return {m.version for m in self.members if m.version}

    def unavailable_message(self, version: str | None, tried: list[str], last: BaseException | None) -> str:
        which = f" serving {version}" if version else ""
        states = ", ".join(f"{m.url} ({'unhealthy' if not m.healthy else m.breaker.state})"
                           for m in self.members if version is None or m.version == version)
        msg = f"no {self.name} upstream{which} can take the request (upstreams: {states or 'none'}"
        if self.sources:
            msg += "; from " + ", ".join(
                (f"registered pool {s.name} ({s.spec.url})" if s.name else s.spec.url)
                + (f" (lookup failing: {s.error})" if s.error else "") for s in self.sources)
        msg += ")"
        if tried:
            msg += f"; tried {', '.join(tried)}"
        if last is not None:
            msg += f"; last error: {last}"
        return msg


def json_or_none(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return None


class PoolCollector:
    """Per-upstream gauges and counters of one pool, for the gateway's /metrics."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pool = self.balancer.name
        up = GaugeMetricFamily("feedloop_upstream_healthy", "1 while the upstream passes its health check",
                               labels=["pool", "upstream"])
        breaker = GaugeMetricFamily("feedloop_upstream_breaker_open", "1 while the upstream's circuit breaker "
                                    "is open or half-open", labels=["pool", "upstream"])
        outstanding = GaugeMetricFamily("feedloop_upstream_outstanding", "Requests in flight to the upstream",
                                        labels=["pool", "upstream"])
        requests = CounterMetricFamily("feedloop_upstream_requests", "Requests sent to the upstream by outcome "
                                       "(ok, error, refused, retried, cancelled)",
                                       labels=["pool", "upstream", "outcome"])
        retries = CounterMetricFamily("feedloop_upstream_retries", "Requests moved to another upstream before "
                                      "their first token", labels=["pool"])
        members = GaugeMetricFamily("feedloop_upstream_members", "Upstreams in the pool (listed and discovered)",
                                    labels=["pool"])
        lookups = CounterMetricFamily("feedloop_upstream_discovery_errors", "DNS lookups of discovered upstreams "
                                      "that failed (the members found before were kept)", labels=["pool"])
        for m in self.balancer.members:
            up.add_metric([pool, m.url], float(m.healthy))
            breaker.add_metric([pool, m.url], float(m.breaker.state != CircuitBreaker.CLOSED))
            outstanding.add_metric([pool, m.url], float(m.outstanding))
            for outcome, n in m.outcomes.items():
                requests.add_metric([pool, m.url, outcome], float(n))
        retries.add_metric([pool], float(self.balancer.retries))
        members.add_metric([pool], float(len(self.balancer.members)))
        lookups.add_metric([pool], float(self.balancer.discovery_errors))
        yield from (up, breaker, outstanding, requests, retries, members, lookups)
