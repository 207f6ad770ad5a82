"""SteadyLoad against a real gateway on the tiny model: every request recorded with its version, no
errors on a healthy server, and errors counted once the server is really stopped."""
from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack

import pytest

from simulate.load import SteadyLoad, percentile
from tests.http.server import serve_http


async def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll until `condition()` holds; fails (does not hang) after a generous timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("api", ["tgi", "openai"])
async def test_healthy_server_every_request_answered_by_the_served_version(recording_gateway, api):
    version = recording_gateway.model_version
    async with SteadyLoad(recording_gateway.url, clients=3, api=api, max_new_tokens=2) as load:
        await wait_for(lambda: len(load.samples) >= 8)
    samples = list(load.samples)
    assert load.errors() == 0, load.error_messages()
    assert load.versions() == {version: len(samples)}
    assert all(s.ok and s.status == 200 and s.latency_s > 0 for s in samples)
    assert load.first_answer_from(version) == min(s.finished_at for s in samples)
    assert load.first_answer_from("another-version") is None
    summary = load.latency()
    assert summary.count == len(samples) and summary.errors == 0 and summary.p50_s <= summary.p99_s
    middle = sorted(s.started_at for s in samples)[len(samples) // 2]
    assert len(load.window(until=middle)) + len(load.window(since=middle)) == len(samples)
    assert sum(sum(c.values()) for _, c in load.versions_by_window(0.2)) == len(samples)


async def test_a_fixed_rate_is_not_exceeded(recording_gateway):
    load = SteadyLoad(recording_gateway.url, clients=2, max_new_tokens=1, rate=2.0)
    started = time.monotonic()
    await load.start()
    await asyncio.sleep(1.5)
    await load.stop()
    elapsed = time.monotonic() - started
    # Slots at 0, 0.5, 1.0, … s: at most rate·elapsed + 1 requests, however fast the answers come.
    assert 1 <= len(load.samples) <= 2.0 * elapsed + 1


async def test_stopping_the_server_mid_run_counts_errors(tiny_services):
    with ExitStack() as server:
        url = server.enter_context(serve_http(tiny_services))
        load = SteadyLoad(url, clients=2, max_new_tokens=2, timeout_s=10, pause_after_error_s=0.02)
        await load.start()
        try:
            await wait_for(lambda: load.latency().count >= 4)
            stopped_at = time.time()
            await asyncio.to_thread(server.close)  # a real fault: the server goes away
            await wait_for(lambda: load.errors(since=stopped_at) >= 3)
        finally:
            await load.stop()
    assert load.errors(until=stopped_at) == 0
    failed = [s for s in load.window(since=stopped_at) if not s.ok]
    assert len(failed) == load.errors() >= 3
    assert all(s.status is None and s.model_version is None for s in failed)
    assert all(s.error.startswith(("connect:", "transport:")) for s in failed), load.error_messages()


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5      # halfway between the middle two
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)  # rank 2.97


@pytest.mark.parametrize("kwargs, message", [
    ({"clients": 0}, "clients"), ({"api": "grpc"}, "api must be"), ({"rate": 0}, "rate"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"url": "localhost:8080"}, "http://HOST:PORT"),
])
def test_bad_load_settings_are_refused(kwargs, message):
    kwargs.setdefault("url", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match=message):
        SteadyLoad(**kwargs)
