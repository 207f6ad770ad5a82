"""`SteadyLoad`: a small, steady stream of generation requests with a record of every one, so a test
or a benchmark can show what clients saw during an event (a hot swap): failures, latency before /
during / after, and when the first answer of a new model version arrived.

    async with SteadyLoad(url, clients=4) as load:
        ...                                   # swap the model
    load.errors(), load.latency(since=t0, until=t1).p99, load.first_answer_from("v2")

Times are wall-clock seconds (`time.time()`), so they line up with timestamps taken in another
process on the same machine; latencies are measured with a monotonic clock.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from simulate.api import check_base_url, error_message, transport_reason

APIS = ("tgi", "openai")


@dataclass(frozen=True)
class LoadSample:
    """One request as the client saw it."""
    started_at: float           # wall clock, seconds since the epoch
    latency_s: float
    ok: bool
    status: int | None          # HTTP status; None when no answer came (connection refused, reset, timeout)
    error: str                  # "" when ok, else "503: message" / "connect: ConnectError: …"
    model_version: str | None   # the X-Model-Version header, when there was an answer

    @property
    def finished_at(self) -> float:
        return self.started_at + self.latency_s


@dataclass(frozen=True)
class LatencySummary:
    count: int               # answered requests in the window (ok ones)
    errors: int
    p50_s: float | None      # None when nothing was answered in the window
    p99_s: float | None


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


class SteadyLoad:
    """`clients` concurrent clients, each sending its next request as soon as the last one is
    answered, or, with `rate` (requests/s over all clients), on a fixed schedule (a late answer
    delays that client's next request; missed slots are not made up in a burst)."""

    def __init__(self, url: str, *, clients: int = 4, api: str = "tgi", prompt: str = "Tell me a story.",
                 max_new_tokens: int = 8, rate: float | None = None, timeout_s: float = 30.0,
                 pause_after_error_s: float = 0.05):
        if clients < 1:
            raise ValueError("clients must be >= 1")
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 requests/s")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.url, self.clients, self.api, self.prompt = check_base_url(url), clients, api, prompt
        self.max_new_tokens, self.rate, self.timeout_s = max_new_tokens, rate, timeout_s
        self.pause_after_error_s = pause_after_error_s
        self.samples: list[LoadSample] = []
        self._tasks: list[asyncio.Task] = []
        self._client: httpx.AsyncClient | None = None
        self._stopping = asyncio.Event()

    # -- running -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("this load is already running")
        self._stopping.clear()
        self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s,
                                         limits=httpx.Limits(max_connections=self.clients))
        started = time.monotonic()
        self._tasks = [asyncio.create_task(self._run_client(i, started)) for i in range(self.clients)]

    async def stop(self) -> None:
        """Send nothing new; requests under way finish (and are recorded) within the timeout."""
        self._stopping.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=self.timeout_s + 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> "SteadyLoad":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _request(self) -> tuple[str, dict]:
        if self.api == "tgi":
            return "/generate", {"inputs": self.prompt, "parameters": {"max_new_tokens": self.max_new_tokens}}
        return "/v1/chat/completions", {"model": "feedloop", "max_tokens": self.max_new_tokens,
                                        "messages": [{"role": "user", "content": self.prompt}]}

    async def _run_client(self, index: int, started: float) -> None:
        path, body = self._request()
        sent = 0
        while not self._stopping.is_set():
            if self.rate is not None:  # client i owns slots i, i + clients, i + 2·clients, …
                due = started + (index + sent * self.clients) / self.rate
                sent += 1
                wait = due - time.monotonic()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._stopping.wait(), timeout=wait)
                        return
                    except asyncio.TimeoutError:
                        pass
                else:  # behind schedule: skip the missed slots rather than burst
                    sent = max(sent, math.ceil((time.monotonic() - started) * self.rate / self.clients))
            sample = await self._send(path, body)
            self.samples.append(sample)
            if not sample.ok:  # e.g. the server is down: keep counting, but do not spin on it
                await asyncio.sleep(self.pause_after_error_s)

    async def _send(self, path: str, body: dict) -> LoadSample:
        started_at, t0 = time.time(), time.perf_counter()
        try:
            response = await self._client.post(path, json=body)
        except httpx.TransportError as exc:
            return LoadSample(started_at, time.perf_counter() - t0, False, None,
                              f"{transport_reason(exc)}: {type(exc).__name__}: {exc}", None)
        latency = time.perf_counter() - t0
        version = response.headers.get("X-Model-Version")
        if response.status_code >= 400:
            return LoadSample(started_at, latency, False, response.status_code,
                              f"{response.status_code}: {error_message(response)}", version)
        return LoadSample(started_at, latency, True, response.status_code, "", version)

    # -- summaries ---------------------------------------------------------------------------------

    def window(self, since: float | None = None, until: float | None = None) -> list[LoadSample]:
        """The samples of requests started in [since, until) (wall clock; None: unbounded)."""
        return [s for s in list(self.samples)
                if (since is None or s.started_at >= since) and (until is None or s.started_at < until)]

    def latency(self, since: float | None = None, until: float | None = None) -> LatencySummary:
        samples = self.window(since, until)
        latencies = [s.latency_s for s in samples if s.ok]
        return LatencySummary(len(latencies), sum(not s.ok for s in samples),
                              percentile(latencies, 50), percentile(latencies, 99))

    def errors(self, since: float | None = None, until: float | None = None) -> int:
        return sum(not s.ok for s in self.window(since, until))

    def error_messages(self, since: float | None = None, until: float | None = None) -> Counter:
        return Counter(s.error for s in self.window(since, until) if not s.ok)

    def versions(self, since: float | None = None, until: float | None = None) -> Counter:
        """model_version → answered requests in the window."""
        return Counter(s.model_version for s in self.window(since, until) if s.ok)

    def versions_by_window(self, width_s: float) -> list[tuple[float, Counter]]:
        """(window start, versions answered) for consecutive windows of `width_s` over the run."""
        samples = list(self.samples)
        if not samples:
            return []
        first, last = min(s.started_at for s in samples), max(s.started_at for s in samples)
        starts = [first + i * width_s for i in range(int((last - first) // width_s) + 1)]
        return [(t, self.versions(t, t + width_s)) for t in starts]

    def first_answer_from(self, version: str) -> float | None:
        """When (wall clock) the first successful answer from `version` arrived; None if none did."""
        times = [s.finished_at for s in list(self.samples) if s.ok and s.model_version == version]
        return min(times) if times else None
