"""The `feedloop.v1.Feedback` servicer: Submit and Compare over the same services as
`POST /v1/feedback` and `POST /v1/compare`."""
from __future__ import annotations

import dataclasses

import grpc

from protos.feedloop.v1 import feedback_service_pb2, feedback_service_pb2_grpc
from serving.grpc import convert
from serving.grpc.status import errors_as_status
from serving.services import Services
from serving.services.completion_events import RequestRecord
from serving.errors import ValidationError


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str:
    return next((v for k, v in context.invocation_metadata() or () if k == name), "")


class FeedbackServicer(feedback_service_pb2_grpc.FeedbackServicer):
    def __init__(self, services: Services) -> None:
        self.services = services

    async def Submit(self, request: feedback_service_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> feedback_service_pb2.SubmitResponse:
        async with errors_as_status(context):
            ids = await self.services.feedback.submit(
                list(request.events), user=_metadata(context, "x-feedloop-user"),
                tenant=_metadata(context, "x-feedloop-tenant"))
            return feedback_service_pb2.SubmitResponse(accepted=len(ids), event_ids=ids)

    async def Compare(self, request: feedback_service_pb2.CompareRequest,
                      context: grpc.aio.ServicerContext) -> feedback_service_pb2.CompareResponse:
        async with errors_as_status(context):
            s = self.services
            which = request.WhichOneof("prompt")
            if which == "chat":
                messages = convert.chat_messages(request.chat)
                prompt, recorded = s.engine.render_chat(messages), messages
            elif which == "text" and request.text:
                prompt = recorded = request.text
            else:
                raise ValidationError("`prompt` must be set: non-empty `text` or `chat` messages")
            params = convert.sampling_params(request.parameters, s.settings.max_new_tokens_default)
            params = dataclasses.replace(params, do_sample=True)  # a comparison is always sampled
            record = RequestRecord(recorded, user=request.user or _metadata(context, "x-feedloop-user"),
                                   tenant=_metadata(context, "x-feedloop-tenant"))
            result = await s.comparison.compare(prompt, params, request.n or 2, record,
                                                list(request.model_versions))
            return feedback_service_pb2.CompareResponse(
                comparison_id=result.comparison_id,
                completions=[feedback_service_pb2.ComparedCompletion(
                    completion_id=c.completion_id, text=c.text, model_version=c.model_version)
                    for c in result.completions])
