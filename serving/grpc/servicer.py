"""The gRPC servicer: a thin layer over the same service objects the HTTP routers call."""
from __future__ import annotations

import grpc

from serving.grpc import convert
from serving.grpc.status import errors_as_status
from serving.services import Services
from protos.feedloop.v1 import serving_pb2, serving_pb2_grpc


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, services: Services) -> None:
        self.services = services

    async def Generate(self, request: serving_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> None:
        # Written with context.write rather than as an async generator so that the stream's whole
        # lifetime stays inside this coroutine: when the client cancels (or the deadline passes),
        # grpc cancels this task, the CancelledError lands here and `finally` closes the stream
        # (freeing the engine's batch slot) deterministically, not whenever asyncio's finaliser
        # gets round to a generator that grpc abandoned at a `yield`.
        async with errors_as_status(context):
            s = self.services
            prompt = convert.generate_prompt(request, s.engine)
            params = convert.sampling_params(request.parameters, s.settings.max_new_tokens_default)
            stream = await s.generation.stream(prompt, params, convert.request_record(
                request, dict(context.invocation_metadata() or ())))
            try:
                await context.send_initial_metadata((("x-completion-id", stream.completion_id),
                                                     ("x-model-version", stream.model_version)))
                async for out in stream:
                    await context.write(convert.generate_response(stream, out))
            finally:
                await stream.aclose()

    async def Score(self, request: serving_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> serving_pb2.ScoreResponse:
        async with errors_as_status(context):
            result = await self.services.scoring.score(convert.score_pairs(request))
            return serving_pb2.ScoreResponse(scores=result.scores, model_version=result.model_version,
                                             trained=self.services.reward.trained)
