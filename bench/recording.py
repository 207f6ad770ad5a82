"""What recording costs a request: p50/p99 of `GenerationService.complete` with and without the
recorder, the publisher being the real local log (SQLite WAL under a temporary directory).

    python -m bench.recording [--requests 3000] [--tokens 16]

The engine answers instantly (`InstantEngine`, no model), so a request is only the service's own
work and the difference between the runs is the recording: the index insert and the queue put on the request
path (the event is built, serialised and appended on the recorder's thread, which competes for the
GIL — that share is included). Runs alternate in rounds so that drift hits both alike.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from serving.engine.client import EngineClient, RewardClient
from serving.engine.types import EngineInfo, SamplingParams, ScoreResult, StepOutput, Token
from serving.services import Services
from serving.settings import ServingSettings


class InstantEngine(EngineClient):
    """Streams `max_new_tokens` one-word tokens at once: no model, so only the service's work is timed."""

    model_version = "instant-v1"

    def info(self) -> EngineInfo:
        return EngineInfo("instant", self.model_version, "none", "cpu", 4096, 8192, 1, 0)

    def render_chat(self, messages: list[dict]) -> str:
        return "".join(m["content"] for m in messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stats(self) -> dict:
        return {}

    async def generate(self, prompt: str, params: SamplingParams, request_id: str):
        n, prompt_tokens = params.max_new_tokens, len(prompt.split())
        for i in range(n):
            last = i == n - 1
            yield StepOutput(Token(i, " w", -0.5, False), " w", "length" if last else None,
                             " w" * n if last else None, i + 1, prompt_tokens, None)


class NoReward(RewardClient):
    model_version, trained = "none", False

    async def score(self, pairs) -> ScoreResult:  # pragma: no cover - not used here
        raise NotImplementedError


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _run(services: Services, n: int, params: SamplingParams, out: list[float]) -> None:
    for i in range(n):
        start = time.perf_counter()
        await services.generation.complete(f"request {i} " + "word " * 30, params)
        out.append(time.perf_counter() - start)


async def measure(requests: int, tokens: int, synchronous: str) -> dict[str, list[float]]:
    from feedback.bus.local_log import LocalLogPublisher

    params = SamplingParams(max_new_tokens=tokens)
    with tempfile.TemporaryDirectory() as tmp:
        settings = ServingSettings(data_dir=Path(tmp))
        publisher = LocalLogPublisher(Path(tmp), synchronous=synchronous)
        plain = Services.build(settings, InstantEngine(), NoReward())
        recording = Services.build(settings, InstantEngine(), NoReward(), publisher=publisher)
        times: dict[str, list[float]] = {"without": [], "with": []}
        await _run(plain, 200, params, [])  # warm up both
        await _run(recording, 200, params, [])
        rounds = 10
        for _ in range(rounds):
            await _run(plain, requests // rounds, params, times["without"])
            await _run(recording, requests // rounds, params, times["with"])
        recording.recorder.close()
        publisher.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--synchronous", default="NORMAL", help="the local log's SQLite synchronous mode")
    args = parser.parse_args(argv)
    times = asyncio.run(measure(args.requests, args.tokens, args.synchronous))
    print(f"{args.requests} requests x {args.tokens} tokens, instant engine, local log "
          f"synchronous={args.synchronous}")
    for name, xs in times.items():
        print(f"  {name:>7} recorder: p50 {statistics.median(xs) * 1e3:.3f} ms   "
              f"p99 {_percentile(xs, 0.99) * 1e3:.3f} ms   mean {statistics.fmean(xs) * 1e3:.3f} ms")
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        delta = _percentile(times["with"], q) - _percentile(times["without"], q)
        print(f"  overhead {label}: {delta * 1e3:+.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
