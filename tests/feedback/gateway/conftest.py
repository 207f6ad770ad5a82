"""A gateway that records: Services around the shared tiny engine and reward model (the session's
`tiny_services` is shared, so it is not touched), with an in-memory publisher, served over HTTP.

The publisher is tests/fakes.MemoryPublisher: these tests are about what the gateway publishes and
when; the bus's own durability is tested under tests/feedback/bus.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest

from feedback import topics
from protos.feedloop.v1 import events_pb2
from serving.grpc import start_grpc_server, stop_grpc_server
from serving.services import Services
from tests.fakes import MemoryPublisher
from tests.http.server import serve_http


@dataclass
class Gateway:
    services: Services
    publisher: MemoryPublisher
    url: str = ""

    def served(self, completion_id: str, timeout: float = 5.0) -> list[events_pb2.CompletionServed]:
        """The CompletionServed events of `completion_id` (waits for the recorder thread)."""
        return self.served_where(timeout, completion_id=completion_id)

    def served_where(self, timeout: float = 5.0, **fields) -> list[events_pb2.CompletionServed]:
        """The CompletionServed events whose `fields` have these values, once there is one (or the
        timeout passed): the recorder publishes on its own thread, a moment after the answer."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.completion_events() if all(getattr(e, k) == v for k, v in fields.items())]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    def completion_events(self) -> list[events_pb2.CompletionServed]:
        return [events_pb2.CompletionServed.FromString(v) for _, v, _ in self.publisher.on(topics.COMPLETIONS)]

    def feedback_events(self) -> list[tuple[bytes, events_pb2.FeedbackEvent]]:
        return [(k, events_pb2.FeedbackEvent.FromString(v)) for k, v, _ in self.publisher.on(topics.FEEDBACK)]


def recording_services(tiny_services: Services, publisher: MemoryPublisher | None, **build) -> Services:
    return Services.build(tiny_services.settings, tiny_services.engine, tiny_services.reward,
                          publisher=publisher, **build)


@pytest.fixture(scope="module")
def gateway(tiny_services) -> Gateway:
    publisher = MemoryPublisher()
    services = recording_services(tiny_services, publisher)
    with serve_http(services) as url:
        yield Gateway(services, publisher, url)
    services.recorder.close()


@asynccontextmanager
async def grpc_channel(services: Services) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC server on 127.0.0.1 (free port) over `services`, and a channel to it; both stopped after."""
    server = await start_grpc_server(services, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}")
    try:
        yield channel
    finally:
        await channel.close()
        await stop_grpc_server(server, grace=None)
        deadline = time.monotonic() + 5  # let cancelled requests leave the shared engine
        while time.monotonic() < deadline and any(services.engine.stats().get(k) for k in ("batch_size", "queue_size")):
            await asyncio.sleep(0.01)
