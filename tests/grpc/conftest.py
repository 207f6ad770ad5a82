"""Start the gRPC server in-process on 127.0.0.1 (port 0) and talk to it through real stubs."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import pytest

from tests.fakes import FakeEngine, FakeReward
from serving.engine.client import EngineClient, RewardClient
from serving.grpc import start_grpc_server, stop_grpc_server
from serving.services import Services
from serving.settings import ServingSettings
from protos.feedloop.v1 import serving_pb2_grpc


@dataclass
class Running:
    services: Services
    server: grpc.aio.Server
    channel: grpc.aio.Channel
    stub: serving_pb2_grpc.ServingStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.bound_port}"


@pytest.fixture
async def serve():
    """`await serve(engine=..., reward=..., settings=..., services=...)` → Running; all stopped after."""
    started: list[Running] = []

    async def _serve(engine: EngineClient | None = None, reward: RewardClient | None = None,
                     settings: ServingSettings | None = None, services: Services | None = None) -> Running:
        if services is None:
            services = Services.build(settings or ServingSettings(), engine or FakeEngine(),
                                      reward or FakeReward())
        server = await start_grpc_server(services, "127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}")
        running = Running(services, server, channel, serving_pb2_grpc.ServingStub(channel))
        started.append(running)
        return running

    yield _serve
    for running in started:
        await running.channel.close()
        await stop_grpc_server(running.server, grace=None)  # cancels what still runs
        await _until_idle(running.services.engine)


async def _until_idle(engine: EngineClient, timeout: float = 5.0) -> None:
    """Wait for the engine to drop cancelled requests before this test's event loop closes: the
    session-wide real engine would otherwise stream its next token into a closed loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not stats.get("batch_size") and not stats.get("queue_size"):
            return
        await asyncio.sleep(0.01)
