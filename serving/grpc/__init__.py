"""gRPC transport: the `feedloop.v1.Serving` service over the same services as HTTP."""
from serving.grpc.server import SERVICE_NAME, start_grpc_server, stop_grpc_server

__all__ = ["SERVICE_NAME", "start_grpc_server", "stop_grpc_server"]
