"""Driving a recording gateway and an ingestor in tests."""
from __future__ import annotations

import threading
import uuid

import httpx

from feedback.ingest import Ingestor
from tests.feedback.bus.helpers import wait_for


def chat(url: str, text: str, user: str = "tester") -> str:
    """One chat completion through the OpenAI route; returns its completion id."""
    r = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "feedloop", "messages": [{"role": "user", "content": text}], "max_tokens": 4,
        "temperature": 0, "user": user}, timeout=30)
    r.raise_for_status()
    return r.json()["id"]


def rate(url: str, completion_id: str, score: int = 1, event_id: str | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", json={"type": "rating", "completion_id": completion_id, "score": score,
                                                  "event_id": event_id or str(uuid.uuid4())}, timeout=30)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    return wait_for(predicate, timeout, interval)


class IngestorThread:
    """An Ingestor running on a thread until stop()."""

    def __init__(self, consumer, store, **options) -> None:
        self.consumer = consumer
        self.ingestor = Ingestor(consumer, store, **options)
        self.thread = threading.Thread(target=self.ingestor.run, daemon=True)

    def __enter__(self) -> Ingestor:
        self.thread.start()
        return self.ingestor

    def __exit__(self, *exc) -> None:
        self.ingestor.stop()
        self.thread.join(timeout=30)
        self.consumer.close()
