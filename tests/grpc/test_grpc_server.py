"""The server around the servicer: free port, standard health checking, reflection, stopping."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from google.protobuf import descriptor_pb2

from serving.grpc import SERVICE_NAME, start_grpc_server, stop_grpc_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_port_zero_binds_a_free_port(serve):
    running = await serve()
    assert running.server.bound_port > 0
    assert SERVICE_NAME == "feedloop.v1.Serving"


async def test_busy_port_fails_instead_of_sharing(serve):
    running = await serve()
    with pytest.raises(RuntimeError):
        await start_grpc_server(running.services, "127.0.0.1", running.server.bound_port)


async def test_health_is_serving_for_the_server_and_the_service(serve):
    running = await serve()
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stop_reports_not_serving_first(serve):
    running = await serve()
    watch = health_pb2_grpc.HealthStub(running.channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert (await watch.read()).status == SERVING
    stopping = asyncio.create_task(stop_grpc_server(running.server, grace=0.5))
    assert (await watch.read()).status == NOT_SERVING
    await stopping


async def reflect(channel, request: reflection_pb2.ServerReflectionRequest):
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(request)
    reply = await call.read()
    await call.done_writing()
    return reply


async def test_reflection_lists_and_describes_the_service(serve):
    running = await serve()
    reply = await reflect(running.channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

    # What grpcurl does next: fetch the file that defines the service, with its dependencies.
    reply = await reflect(running.channel,
                          reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in reply.file_descriptor_response.file_descriptor_proto]
    by_name = {f.name: f for f in files}
    serving = by_name["protos/feedloop/v1/serving.proto"]
    assert [m.name for m in serving.service[0].method] == ["Generate", "Score"]
    assert "protos/feedloop/v1/common.proto" in by_name
