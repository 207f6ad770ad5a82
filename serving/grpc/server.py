"""Start and stop the gRPC server: the Serving and Feedback services, standard health checking and
reflection."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.grpc.feedback_servicer import FeedbackServicer
from serving.grpc.servicer import ServingServicer
from serving.services import Services
from protos.feedloop.v1 import feedback_service_pb2, feedback_service_pb2_grpc, serving_pb2, serving_pb2_grpc

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name  # "feedloop.v1.Serving"
FEEDBACK_SERVICE_NAME = feedback_service_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name


async def start_grpc_server(services: Services, host: str = "127.0.0.1", port: int = 0) -> grpc.aio.Server:
    """Bind, start and mark SERVING. Port 0 picks a free port.

    The returned server carries two attributes of ours: `bound_port` (the port it listens on) and
    `health_servicer` (which stop_grpc_server flips to NOT_SERVING before draining).
    """
    server = grpc.aio.server(options=[
        # The same cap as HTTP bodies; larger messages get RESOURCE_EXHAUSTED from grpc itself.
        ("grpc.max_receive_message_length", services.settings.max_body_bytes),
        # grpc sets SO_REUSEPORT by default, so a second gateway on a busy port would start and
        # silently share it; we want the bind to fail instead.
        ("grpc.so_reuseport", 0),
    ])
    serving_pb2_grpc.add_ServingServicer_to_server(ServingServicer(services), server)
    feedback_service_pb2_grpc.add_FeedbackServicer_to_server(FeedbackServicer(services), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, FEEDBACK_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    bound_port = server.add_insecure_port(f"{host}:{port}")  # raises RuntimeError if it cannot bind
    await server.start()
    for name in ("", SERVICE_NAME, FEEDBACK_SERVICE_NAME):  # "" is the whole server, as the health protocol defines
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.bound_port = bound_port
    server.health_servicer = health_servicer
    return server


async def stop_grpc_server(server: grpc.aio.Server, grace: float | None = 5.0) -> None:
    """Report NOT_SERVING (load balancers stop sending), then let running calls finish for up to
    `grace` seconds before cancelling them (which frees their batch slots)."""
    health_servicer = getattr(server, "health_servicer", None)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)
