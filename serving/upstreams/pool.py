"""`UpstreamPool`: several upstreams behind the EngineClient interface.

- **Members** are listed, or discovered from DNS (a headless Service's pods; serving/upstreams/
  balancer.py and discovery.py), which the pool follows as the Deployment scales and rolls.
- **Health.** Every `health_interval` seconds each upstream's `GET /health` is read (feedloop workers
  also report their `model_version` there); one that fails leaves rotation until it answers 200.
- **Balancing.** Least outstanding requests among the upstreams in rotation (ties: round robin).
- **Versions.** Each upstream serves one version (what it reports, else its configured one). A
  request naming a version goes to upstreams of that version; otherwise `routing` (serving + canary
  share, like the local engine's) draws one, and without routing any upstream serves.
- **Retries, only when safe.** Connection refused, 503 and 429 *before any token was streamed* move
  the request to another upstream (at most `max_attempts` upstreams); after the first token nothing
  is retried: the caller has already seen part of one answer.
- **Timeouts.** `request_timeout` for the whole request; the transports add connect and per-token
  read timeouts.
- **Circuit breaker** per upstream (serving/upstreams/base.py): `breaker_failures` consecutive
  failures open it; after `breaker_cooldown` one trial request decides.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from serving.engine.client import EngineClient
from serving.engine.types import EngineInfo, Routing, SamplingParams, StepOutput
from serving.errors import EngineUnavailable, UnknownModelVersion
from serving.upstreams.balancer import Balancer, Member, PoolCollector, Source, json_or_none
from serving.upstreams.base import (RolloutFailed, RolloutRefused, Upstream, UpstreamTimeout, is_retryable,
                                    is_upstream_fault)
from serving.upstreams.config import PoolOptions, UpstreamSpec

log = logging.getLogger(__name__)


def raise_for_reload(url: str, r: httpx.Response, done: list[dict]) -> None:
    """A worker's answer to POST /v1/admin/reload: nothing if 200; 409 is a refusal of the version
    (`RolloutRefused`) — except `stale_leader`: the worker saw a newer rollout lease than ours, so
    this gateway is no longer the one to reload it (`RolloutFailed`, nothing refused)."""
    if r.status_code == 200:
        return
    if r.status_code == 409:
        error = (json_or_none(r) or {}).get("error") or {}
        code, message = error.get("code") or "refused", error.get("message") or r.text
        if code == "stale_leader":
            raise RolloutFailed(url, message, done, code)
        raise RolloutRefused(url, code, message, done)
    raise RolloutFailed(url, f"{r.status_code} {r.text[:500]}", done)


RELOADABLE = ("feedloop", "sglang")  # kinds that load a new version in place (the others: blue/green)

_PENDING_NEW_VERSION: Any = object()  # rollout(): "route to whatever version the first worker reports"


def make_upstream(spec: UpstreamSpec, options: PoolOptions) -> Upstream:
    timeouts = {"connect_timeout": options.connect_timeout, "read_timeout": options.read_timeout}
    if spec.kind == "openai":
        from serving.upstreams.openai_upstream import OpenAIUpstream

        return OpenAIUpstream(spec.url, spec.model_version, model=spec.model, api_key=spec.api_key, **timeouts)
    if spec.kind == "sglang":
        from serving.upstreams.sglang import SGLangUpstream

        return SGLangUpstream(spec.url, spec.model_version, model=spec.model, api_key=spec.api_key, **timeouts)
    from serving.upstreams.tgi import TGIUpstream

    up = TGIUpstream(spec.url, spec.model_version, **timeouts)
    up.kind = spec.kind  # "feedloop" workers speak TGI's routes
    return up



def _source(spec: UpstreamSpec, options: PoolOptions, name: str | None = None) -> Source:
    """Members from a discovered entry or a registered pool: one upstream per URL it yields."""
    return Source(spec, lambda url: make_upstream(spec.model_copy(update={"url": url, "discovery": None}), options),
                  name)


class UpstreamPool(EngineClient):
    """A policy served by upstream inference servers (see the module docstring).

    `tokenizer` renders chats and counts tokens at the gateway (upstreams take text prompts)."""

    def __init__(self, upstreams: list[Upstream], tokenizer, *, options: PoolOptions | None = None,
                 routing: Routing | None = None, max_input_tokens: int = 2048, max_total_tokens: int = 4096,
                 model_id: str = "upstreams", sources: list[Source] | None = None) -> None:
        self.options = options or PoolOptions()
        self.balancer = Balancer([Member(u, self.options) for u in upstreams], self.options, "policy", sources)
        self.tokenizer = tokenizer
        self._routing = routing
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.model_id = model_id
        self._random = random.Random()
        self._started = False

    @classmethod
    def from_specs(cls, specs: list[UpstreamSpec], tokenizer, options: PoolOptions | None = None,
                   **kwargs) -> "UpstreamPool":
        options = options or PoolOptions()
        listed = [make_upstream(s, options) for s in specs if s.discovery is None]
        sources = [_source(s, options) for s in specs if s.discovery is not None]
        return cls(listed, tokenizer, options=options, sources=sources, **kwargs)

    async def set_registered(self, specs: dict[str, UpstreamSpec]) -> None:
        """The pools registered in the store, by name (serving/fleet.py): members of new ones join
        after their health check, those of removed ones drain and leave."""
        await self.balancer.set_registered([_source(spec, self.options, name) for name, spec in specs.items()])

    @property
    def members(self) -> list[Member]:
        return self.balancer.members

    # -- versions and routing ---------------------------------------------------------------------
    @property
    def routing(self) -> Routing | None:
        return self._routing

    def set_routing(self, routing: Routing | None) -> None:
        """Where new requests go (None: any upstream). KeyError if a version has no upstream."""
        if routing is not None:
            missing = [v for v in routing.versions if v not in self.balancer.versions_known()]
            if missing:
                raise KeyError(f"no upstream serves {', '.join(missing)}")
        self._routing = routing

    @property
    def model_version(self) -> str:
        if self._routing is not None:
            return self._routing.serving
        healthy = Counter(m.version for m in self.members if m.version and m.healthy)
        every = Counter(m.version for m in self.members if m.version)
        common = (healthy or every).most_common(1)
        return common[0][0] if common else "unknown"

    def versions(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for m in self.members:
            v = out.setdefault(m.version or "unknown", {"upstreams": 0, "in_rotation": 0, "running": 0,
                                                        "waiting": 0, "share": 0.0})
            v["upstreams"] += 1
            v["in_rotation"] += int(m.in_rotation())
            v["running"] += m.outstanding - m.waiting
            v["waiting"] += m.waiting
        for version, v in out.items():
            v["share"] = self._routing.share(version) if self._routing is not None else None
        return out

    # -- EngineClient -----------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return EngineInfo(self.model_id, self.model_version, "unknown", "upstream", self.max_input_tokens,
                          self.max_total_tokens, max_batch_size=0, max_queue=0,
                          extra={"routing": self._routing.as_dict() if self._routing else None,
                                 "versions": self.versions(), "upstreams": [m.as_dict() for m in self.members]})

    def render_chat(self, messages: list[dict]) -> str:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def stats(self) -> dict:
        waiting = sum(m.waiting for m in self.members)
        running = sum(m.outstanding for m in self.members) - waiting
        return {"queue_size": waiting, "batch_size": running, "retries": self.balancer.retries,
                "upstreams": [m.as_dict() for m in self.members]}

    def check_health(self) -> None:
        if not self._started:
            raise EngineUnavailable("the upstream pool is not started")
        if not any(m.in_rotation() for m in self.members):
            raise EngineUnavailable(self.balancer.unavailable_message(None, [], None))

    async def start(self) -> None:
        await self.balancer.start()
        self._started = True
        log.info("upstream pool started", extra={"fl_upstreams": [m.as_dict() for m in self.members]})

    async def stop(self) -> None:
        self._started = False
        await self.balancer.stop()
        await asyncio.gather(*(m.upstream.aclose() for m in self.members), return_exceptions=True)

    def _version_for(self, model_version: str | None) -> str | None:
        if model_version is not None:
            if model_version not in self.balancer.versions_known():
                raise UnknownModelVersion(f"no upstream serves model version {model_version!r} "
                                          f"(served: {', '.join(sorted(self.balancer.versions_known())) or 'none'})")
            return model_version
        if self._routing is None:
            return None
        drawn = self._routing.pick(self._random.random())
        if drawn != self._routing.serving and not self.balancer.candidates(drawn, set()):
            return self._routing.serving  # the canary's upstreams are all out: serve it the usual way
        return drawn

    async def generate(self, prompt: str, params: SamplingParams, request_id: str,
                       model_version: str | None = None) -> AsyncIterator[StepOutput]:
        version = self._version_for(model_version)
        deadline = time.monotonic() + self.options.request_timeout
        tried: set[Member] = set()
        tried_urls: list[str] = []
        last_error: BaseException | None = None
        while len(tried) < self.options.max_attempts:
            m = self.balancer.pick(version, tried)
            if m is None:
                break
            tried.add(m)
            tried_urls.append(m.url)
            m.breaker.acquire()
            m.outstanding += 1
            m.waiting += 1
            first = True
            outcome = "cancelled"
            stream = m.upstream.generate(prompt, params, request_id)
            try:
                while True:
                    try:
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            out = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise UpstreamTimeout(f"upstream {m.url} did not finish within "
                                              f"{self.options.request_timeout:g} s") from None
                    if first:
                        first = False
                        m.waiting -= 1
                    if out.model_version is None:
                        out.model_version = m.version or self.model_version
                    if out.finish_reason is not None and not out.prompt_tokens:
                        out.prompt_tokens = self.count_tokens(prompt)  # the upstream did not say
                    yield out
                    if out.finish_reason is not None:
                        break
                outcome = "ok"
                m.breaker.success()
                return
            except GeneratorExit:
                raise
            except Exception as exc:
                if is_upstream_fault(exc):
                    m.breaker.failure()
                else:
                    m.breaker.release()
                if first and is_retryable(exc):
                    outcome = "retried"
                    last_error = exc
                    self.balancer.retries += 1
                    log.info("upstream refused a request; trying another",
                             extra={"fl_upstream": m.url, "fl_error": str(exc), "fl_request_id": request_id})
                    continue
                outcome = "error" if is_upstream_fault(exc) else "refused"
                if first and not hasattr(exc, "model_version") and m.version:
                    exc.model_version = m.version  # GenerationService counts the failure under it
                raise
            finally:
                if outcome == "cancelled":
                    m.breaker.release()
                m.outcomes[outcome] += 1
                m.outstanding -= 1
                if first:
                    m.waiting -= 1
                await stream.aclose()
        if last_error is not None:  # 429 everywhere stays an overload (the client retries later); else 503
            raise type(last_error)(self.balancer.unavailable_message(version, tried_urls, last_error))
        raise EngineUnavailable(self.balancer.unavailable_message(version, tried_urls, last_error))

    # -- fleet hot-swap (feedloop workers) --------------------------------------------------------
    async def rollout(self, model: str, version: str | None = None, checksums: dict | None = None,
                      admin_token: str | None = None, timeout: float = 600.0, *,
                      canary_percent: float | None = None, routing: Routing | None = None,
                      members: list[Member] | None = None, lease_token: int | None = None,
                      leading=None) -> list[dict]:
        """Move the pool's feedloop workers (or `members`) to the checkpoint `model`, one worker at a
        time: pause (no new requests from this pool, when another upstream in rotation can take
        them) → `POST /v1/admin/reload` (SGLang: `/update_weights_from_disk`, serving/upstreams/
        sglang.py) (the worker loads and verifies it beside the running version
        and switches its new requests to it; requests already running finish on the old weights) →
        resume. `canary_percent`: the worker keeps its serving version and sends that share of its
        new requests to `model` (a canary inside the worker).

        Routing: as soon as the first worker serves the new version, the pool's routing becomes
        `routing` (default: the new version, if the pool had a routing) — a client never gets the
        old version after the new one. Workers out of rotation are skipped (the caller reconciles
        them later). A refusal (409: checksums, load, tokenizer) stops the rollout with
        `RolloutRefused`; another failure (connection, timeout, 5xx) with `RolloutFailed`. Workers
        already moved stay moved. TGI and OpenAI upstreams cannot reload: blue/green (serving/fleet.py).
        `lease_token` goes with each reload (workers fence off older rollout leaders); `leading()`,
        asked before each worker, stops the rollout once this gateway lost the lease."""
        if routing is None and self._routing is not None and canary_percent is None:
            routing = _PENDING_NEW_VERSION
        body = {"model": model, "version": version, "checksums": checksums, "lease_token": lease_token}
        if canary_percent is not None:
            body["canary_percent"] = canary_percent
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        todo = members if members is not None else [m for m in self.members if m.upstream.kind in RELOADABLE]
        done: list[dict] = []
        async with httpx.AsyncClient(timeout=timeout) as client:
            for m in todo:
                if not m.healthy:
                    log.warning("rollout skips an upstream out of rotation", extra={"fl_upstream": m.url})
                    continue
                if leading is not None and not leading():
                    raise RolloutFailed(m.url, "this gateway lost the rollout lease", done, "not_leader")
                m.paused = self._can_pause(m)
                try:
                    if m.upstream.kind == "sglang":  # its own admin API, no canary inside one server
                        if canary_percent is not None:
                            raise RolloutFailed(m.url, "SGLang serves one model per server: no canary inside it",
                                                done, "incompatible")
                        answer = await m.upstream.reload(client, model, version or Path(model).name, done)
                    else:
                        try:
                            r = await client.post(f"{m.url}/v1/admin/reload", json=body, headers=headers)
                        except httpx.HTTPError as exc:
                            raise RolloutFailed(m.url, f"{type(exc).__name__}: {exc}", done) from None
                        raise_for_reload(m.url, r, done)
                        answer = r.json()
                    m.upstream.reloaded_to(answer["model_version"] if canary_percent is None
                                           else (answer.get("routing") or {}).get("serving", m.upstream.reported_version))
                    if m.health_body is not None and "routing" in answer:
                        m.health_body = {**m.health_body, "model_version": m.upstream.reported_version,
                                         "routing": answer["routing"], "model_path": model
                                         if canary_percent is None else m.health_body.get("model_path")}
                    done.append({"url": m.url, **answer})
                    log.info("upstream reloaded", extra={"fl_upstream": m.url,
                                                         "fl_model_version": answer["model_version"],
                                                         "fl_canary_percent": canary_percent})
                    if routing is _PENDING_NEW_VERSION:
                        routing = Routing(answer["model_version"])
                    if routing is not None and self._routing != routing:
                        self.set_routing(routing)  # new requests: the new version only, from now on
                finally:
                    m.paused = False
        return done

    def _can_pause(self, m: Member) -> bool:
        """Pause `m` only if another upstream in rotation serves what the routing sends requests to
        (pausing the only one would turn requests away)."""
        wanted = set(self._routing.versions) if self._routing is not None else None
        return any(o is not m and o.in_rotation() and (wanted is None or o.version in wanted)
                   for o in self.members)

    # -- metrics ----------------------------------------------------------------------------------
    def register_metrics(self, registry) -> None:
        """Per-upstream gauges and counters on the gateway's /metrics."""
        registry.register(PoolCollector(self.balancer))


