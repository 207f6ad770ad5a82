"""The breaker's states, the FEEDLOOP_UPSTREAMS format, and a stale health check against a reload."""
from __future__ import annotations

import json

import pytest

from serving.upstreams.base import CircuitBreaker
from serving.upstreams.config import parse_upstreams


def test_breaker_opens_after_n_failures_and_half_opens_after_the_cooldown():
    now = [0.0]
    b = CircuitBreaker(failures=3, cooldown=5.0, clock=lambda: now[0])
    for _ in range(2):
        b.acquire()
        b.failure()
    assert b.state == "closed" and b.available()
    b.success()  # consecutive failures only
    for _ in range(3):
        b.acquire()
        b.failure()
    assert b.state == "open" and not b.available()
    now[0] = 4.9
    assert not b.available()
    now[0] = 5.0
    assert b.available()
    b.acquire()  # the trial request
    assert b.state == "half_open" and not b.available()  # one trial at a time
    b.failure()
    assert b.state == "open" and not b.available()
    now[0] = 10.0
    b.acquire()
    b.success()
    assert b.state == "closed" and b.available() and b.opened_total == 2


def test_upstreams_json_and_file(tmp_path):
    cfg = {"policy": [{"url": "http://w1:8080/"}, {"url": "http://tgi:80", "kind": "tgi", "model_version": "v1"},
                      {"url": "http://vllm:8000", "kind": "openai", "model": "m"}],
           "reward": [{"url": "http://r1:8080"}], "routing": {"serving": "v1"},
           "options": {"max_attempts": 2, "health_interval": 0.5}}
    parsed = parse_upstreams(json.dumps(cfg))
    assert parsed.policy[0].url == "http://w1:8080" and parsed.policy[0].kind == "feedloop"
    assert parsed.options.max_attempts == 2 and parsed.routing.to_routing().serving == "v1"
    f = tmp_path / "u.json"
    f.write_text(json.dumps(cfg))
    assert parse_upstreams(f"@{f}") == parsed
    for bad in ("{", json.dumps({"policy": []}), json.dumps({"policy": [{"url": "w1:8080"}]}),
                json.dumps({"policy": [{"url": "http://a"}], "reward": [{"url": "http://b", "kind": "tgi"}]}),
                json.dumps({"policy": [{"url": "http://a", "colour": "red"}]})):
        with pytest.raises(ValueError, match="FEEDLOOP_UPSTREAMS"):
            parse_upstreams(bad)


async def test_a_health_check_that_read_the_version_before_a_reload_does_not_undo_it():
    """A worker reloaded while a health check of it was in flight: the check's answer names the old
    version and must not overwrite the reload's (the fleet would see it drifted and reload it again)."""
    import asyncio
    import threading

    from fastapi import FastAPI

    from serving.upstreams.balancer import Balancer, Member
    from serving.upstreams.config import PoolOptions
    from serving.upstreams.tgi import TGIUpstream
    from tests.upstreams.harness import serve_app

    asked, answer = threading.Event(), threading.Event()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        asked.set()
        while not answer.is_set():  # the version is read now; the answer leaves later
            await asyncio.sleep(0.01)
        return {"status": "ok", "model_version": "v1"}

    with serve_app(app) as url:
        options = PoolOptions()
        member = Member(TGIUpstream(url, None), options)
        balancer = Balancer([member], options, "policy")
        check = asyncio.create_task(balancer.check(member))
        await asyncio.to_thread(asked.wait, 10)
        member.upstream.reloaded_to("v2")  # the reload answered while the check waits
        answer.set()
        await check
        assert member.version == "v2"
        answer.clear()
        answer.set()
        await balancer.check(member)  # a check begun after the reload is believed
        assert member.version == "v1"
        await balancer.stop()
        await member.upstream.aclose()
