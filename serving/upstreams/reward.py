"""`RewardUpstreamPool`: the reward model served by `feedloop worker --role reward` processes, over
their `POST /v1/score`. Same balancing, health checks and breaker as the policy pool; scoring has no
stream, so connection refused / 503 / 429 move the call to another worker (at most `max_attempts`)."""
from __future__ import annotations

import httpx

from serving.engine.client import RewardClient
from serving.engine.types import ScoreResult
from serving.errors import EngineUnavailable, ValidationError
from serving.upstreams.base import (Upstream, UpstreamGenerationError, UpstreamOverloaded, UpstreamTimeout,
                                    UpstreamUnavailable, is_retryable, is_upstream_fault)
from serving.upstreams.config import PoolOptions, UpstreamSpec
from serving.upstreams.balancer import Balancer, Member, Source


class ScoreUpstream(Upstream):
    """One reward worker."""

    kind = "feedloop"

    def __init__(self, url: str, model_version: str | None = None) -> None:
        super().__init__(url, model_version)
        self.trained: bool | None = None

    def generate(self, prompt, params, request_id):  # pragma: no cover - reward workers do not generate
        raise NotImplementedError

    async def score(self, http: httpx.AsyncClient, pairs) -> ScoreResult:
        inputs = [{"messages": p, "response": r} if isinstance(p, list) else {"prompt": p, "response": r}
                  for p, r in pairs]
        try:
            resp = await http.post(f"{self.url}/v1/score", json={"inputs": inputs})
        except httpx.ConnectError as exc:
            raise UpstreamUnavailable(f"reward upstream {self.url} cannot be reached: {exc}") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"reward upstream {self.url} timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamGenerationError(f"reward upstream {self.url} failed: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            message = _error_message(resp)
            if resp.status_code == 429:
                raise UpstreamOverloaded(f"reward upstream {self.url} answered 429: {message}")
            if resp.status_code == 503:
                raise UpstreamUnavailable(f"reward upstream {self.url} answered 503: {message}")
            if resp.status_code in (400, 413, 422):
                raise ValidationError(message)
            raise UpstreamGenerationError(f"reward upstream {self.url} answered {resp.status_code}: {message}")
        body = resp.json()
        self.reported_version = body.get("model_version") or self.reported_version
        self.trained = body.get("reward_model_trained", self.trained)
        version = body.get("model_version") or self.model_version or "unknown"
        return ScoreResult([float(s) for s in body["scores"]], version)


def _error_message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
    except ValueError:
        return resp.text[:500]
    if isinstance(err, dict):
        return str(err.get("message"))
    return str(err)


class RewardUpstreamPool(RewardClient):
    def __init__(self, urls: list[str] | list[UpstreamSpec], options: PoolOptions | None = None) -> None:
        self.options = options or PoolOptions()
        specs = [u if isinstance(u, UpstreamSpec) else UpstreamSpec(url=u) for u in urls]
        ups = [ScoreUpstream(s.url, s.model_version) for s in specs if s.discovery is None]
        sources = [Source(s, lambda url, s=s: ScoreUpstream(url, s.model_version)) for s in specs if s.discovery]
        self.balancer = Balancer([Member(u, self.options) for u in ups], self.options, "reward", sources)
        self.balancer.on_health.append(self._on_health)
        self._http: httpx.AsyncClient | None = None

    async def set_registered(self, specs: dict[str, UpstreamSpec]) -> None:
        """Registered reward pools, by name (see `UpstreamPool.set_registered`)."""
        await self.balancer.set_registered([Source(spec, lambda url, s=spec: ScoreUpstream(url, s.model_version), name)
                                            for name, spec in specs.items()])

    def _on_health(self, m: Member, body) -> None:
        if isinstance(body, dict):
            if isinstance(body.get("reward_model_version"), str):
                m.upstream.reported_version = body["reward_model_version"]
            if isinstance(body.get("reward_model_trained"), bool):
                m.upstream.trained = body["reward_model_trained"]

    @property
    def members(self) -> list[Member]:
        return self.balancer.members

    @property
    def model_version(self) -> str:
        for m in self.members:
            if m.healthy and m.version:
                return m.version
        return next((m.version for m in self.members if m.version), "unknown")

    @property
    def trained(self) -> bool:
        return any(m.upstream.trained for m in self.members if m.healthy)

    async def start(self) -> None:
        o = self.options
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(o.request_timeout, connect=o.connect_timeout),
                                       limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        await self.balancer.start()

    async def stop(self) -> None:
        await self.balancer.stop()
        if self._http is not None:
            await self._http.aclose()

    async def score(self, pairs) -> ScoreResult:
        if self._http is None:
            raise EngineUnavailable("the reward upstream pool is not started")
        tried: set[Member] = set()
        urls: list[str] = []
        last: BaseException | None = None
        while len(tried) < self.options.max_attempts:
            m = self.balancer.pick(None, tried)
            if m is None:
                break
            tried.add(m)
            urls.append(m.url)
            m.breaker.acquire()
            m.outstanding += 1
            outcome = "cancelled"
            try:
                result = await m.upstream.score(self._http, pairs)
                m.breaker.success()
                outcome = "ok"
                return result
            except Exception as exc:
                m.breaker.failure() if is_upstream_fault(exc) else m.breaker.release()
                if is_retryable(exc):
                    outcome, last = "retried", exc
                    self.balancer.retries += 1
                    continue
                outcome = "error" if is_upstream_fault(exc) else "refused"
                raise
            finally:
                if outcome == "cancelled":
                    m.breaker.release()
                m.outcomes[outcome] += 1
                m.outstanding -= 1
        if last is not None:
            raise type(last)(self.balancer.unavailable_message(None, urls, last))
        raise EngineUnavailable(self.balancer.unavailable_message(None, urls, None))

    def register_metrics(self, registry) -> None:
        from serving.upstreams.balancer import PoolCollector

        registry.register(PoolCollector(self.balancer))


class NoReward(RewardClient):
    """A gateway with policy upstreams and no reward upstream: /v1/score answers 503."""

    model_version = "none"
    trained = False

    async def score(self, pairs) -> ScoreResult:
        raise EngineUnavailable("this gateway has no reward model: add `reward` upstreams to FEEDLOOP_UPSTREAMS")
