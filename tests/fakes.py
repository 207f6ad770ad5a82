"""A fake engine that follows the EngineClient interface, for service- and transport-level tests
that need a fault or a timing the real engine cannot be made to produce. Everything else in the
suite runs the real engine on a tiny model."""
from __future__ import annotations

import asyncio
import threading

from feedback.bus.base import EventPublisher
from serving.engine.client import EngineClient, RewardClient
from serving.engine.types import EngineInfo, SamplingParams, ScoreResult, StepOutput, Token
from serving.errors import Overloaded, PromptTooLong


class FakeEngine(EngineClient):
    """Echoes the prompt's words back one per step. `capacity` requests run at once; `max_queue` wait."""

    def __init__(self, version: str = "fake-v1", capacity: int = 4, max_queue: int = 4, delay: float = 0.0,
                 max_input_tokens: int = 64):
        self._version = version
        self.capacity, self.max_queue, self.delay = capacity, max_queue, delay
        self.max_input_tokens = max_input_tokens
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(capacity)

    @property
    def model_version(self) -> str:
        return self._version

    def info(self) -> EngineInfo:
        return EngineInfo("fake", self._version, "float32", "cpu", self.max_input_tokens, 128,
                          self.capacity, self.max_queue)

    def render_chat(self, messages: list[dict]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stats(self) -> dict:
        return {"queue_size": self.waiting, "batch_size": self.running}

    async def generate(self, prompt: str, params: SamplingParams, request_id: str):
        words = prompt.split() or ["empty"]
        if len(words) > self.max_input_tokens:
            raise PromptTooLong(f"`inputs` must have less than {self.max_input_tokens} tokens")
        if self.waiting >= self.max_queue and self.running >= self.capacity:
            raise Overloaded("Model is overloaded")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            text = ""
            n = params.max_new_tokens
            for i in range(n):
                if self.delay:
                    await asyncio.sleep(self.delay)
                piece = (" " if i else "") + words[i % len(words)]
                text += piece
                stop_hit = next((s for s in params.stop if s in text), None)
                finish = "stop_sequence" if stop_hit else ("length" if i == n - 1 else None)
                yield StepOutput(Token(i, piece, -0.5, False), piece, finish,
                                 text if finish else None, i + 1, len(words), params.seed)
                if finish:
                    return
        finally:
            self.running -= 1
            self._slots.release()


class FakeReward(RewardClient):
    """Scores a response by its length in words (a rule tests can predict)."""

    @property
    def model_version(self) -> str:
        return "fake-rm-v1"

    @property
    def trained(self) -> bool:
        return False

    async def score(self, pairs):
        return ScoreResult([float(len(r.split())) for _, r in pairs], self.model_version)


class MemoryPublisher(EventPublisher):
    """Keeps published events in a list: (topic, key, value, headers). `delay` seconds per publish
    stands in for a slow disk."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.events: list[tuple[str, bytes | None, bytes, dict[str, bytes]]] = []
        self._lock = threading.Lock()

    def publish(self, topic, key, value, headers=None) -> None:
        if self.delay:
            threading.Event().wait(self.delay)
        with self._lock:
            self.events.append((topic, key, value, dict(headers or {})))

    def on(self, topic: str) -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
        with self._lock:
            return [(k, v, h) for t, k, v, h in self.events if t == topic]

    def flush(self, timeout=None) -> bool:
        return True

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        pass
