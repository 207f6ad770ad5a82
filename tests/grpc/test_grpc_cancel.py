"""A client that goes away must free its engine slot at once, not when the answer would end."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc

from tests.fakes import FakeEngine
from protos.feedloop.v1 import serving_pb2, serving_pb2_grpc

LONG = serving_pb2.GenerateRequest(text="a b c", parameters={"max_new_tokens": 10_000})


async def wait_for(condition, timeout: float = 2.0) -> float:
    """Poll until `condition()` holds; return how long it took."""
    start = time.perf_counter()
    while not condition():
        assert time.perf_counter() - start < timeout, "condition not reached in time"
        await asyncio.sleep(0.005)
    return time.perf_counter() - start


def cancelled_requests(running) -> float:
    return running.services.metrics.registry.get_sample_value(
        "feedloop_requests_total", {"model_version": "fake-v1", "outcome": "cancelled"}) or 0.0


async def test_cancel_frees_the_slot(serve):
    # One slot, no queue: the next request can only run once the cancelled one let go.
    engine = FakeEngine(capacity=1, max_queue=0, delay=0.02)
    running = await serve(engine)
    call = running.stub.Generate(LONG)
    await call.read()
    await call.read()
    assert engine.running == 1

    call.cancel()
    await wait_for(lambda: engine.running == 0, timeout=1.0)
    await wait_for(lambda: cancelled_requests(running) == 1)

    after = [m async for m in running.stub.Generate(
        serving_pb2.GenerateRequest(text="hi", parameters={"max_new_tokens": 2}))]
    assert after[-1].generated_tokens == 2


async def test_deadline_frees_the_slot(serve):
    engine = FakeEngine(capacity=1, max_queue=0, delay=0.02)
    running = await serve(engine)
    call = running.stub.Generate(LONG, timeout=0.2)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for(lambda: engine.running == 0, timeout=1.0)


async def test_sync_client_cancel_frees_the_slot(serve):
    engine = FakeEngine(capacity=1, max_queue=0, delay=0.02)
    running = await serve(engine)
    got_two = threading.Event()

    def read_two_then_cancel():
        with grpc.insecure_channel(running.target) as channel:
            call = serving_pb2_grpc.ServingStub(channel).Generate(LONG, timeout=10)
            next(call), next(call)
            got_two.set()
            call.cancel()

    await asyncio.to_thread(read_two_then_cancel)
    assert got_two.is_set()
    await wait_for(lambda: engine.running == 0, timeout=1.0)


async def test_server_stop_cancels_running_streams(serve):
    from serving.grpc import stop_grpc_server

    engine = FakeEngine(capacity=1, max_queue=0, delay=0.02)
    running = await serve(engine)
    call = running.stub.Generate(LONG)
    await call.read()
    await stop_grpc_server(running.server, grace=0.1)
    await wait_for(lambda: engine.running == 0, timeout=1.0)


async def test_cancel_frees_the_real_engines_slot(serve, tiny_services):
    engine = tiny_services.engine
    running = await serve(services=tiny_services)
    call = running.stub.Generate(serving_pb2.GenerateRequest(
        text="Count: 1 2 3", parameters={"max_new_tokens": 900, "do_sample": True, "seed": 1}))
    await call.read()
    await call.read()  # the first token leaves during prefill; by the second it runs in the batch
    assert engine.stats()["batch_size"] == 1
    call.cancel()
    await wait_for(lambda: engine.stats()["batch_size"] == 0 and engine.stats()["queue_size"] == 0)
