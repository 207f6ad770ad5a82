"""CompletionServed events (protos/feedloop/v1/events.proto) from what the generation service saw."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import common_pb2, events_pb2
from serving.engine.types import SamplingParams, StepOutput

SCHEMA_VERSION = 1

FINISH_REASONS = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "eos_token": common_pb2.FINISH_REASON_EOS_TOKEN,
    "stop_sequence": common_pb2.FINISH_REASON_STOP_SEQUENCE,
}


@dataclass(frozen=True)
class RequestRecord:
    """What the completion's event records about the request, beyond the engine's prompt text.

    `prompt` is the prompt as the user sent it — the text, or the chat messages
    ([{"role", "content"}]) before the chat template — since that is what feedback, datasets and the
    prompt key are about. None: the engine's prompt text is recorded.
    """

    prompt: str | list[dict] | None = None
    user: str = ""
    tenant: str = ""
    comparison_id: str = ""


def event_meta(user: str, tenant: str, time_ns: int, event_id: str = "") -> events_pb2.EventMeta:
    ts = Timestamp()
    ts.FromNanoseconds(time_ns)
    return events_pb2.EventMeta(event_id=event_id or uuid.uuid4().hex, schema_version=SCHEMA_VERSION,
                                tenant=tenant, user=user, time=ts)


def sampling_parameters(params: SamplingParams, seed: int | None) -> common_pb2.SamplingParameters:
    """The parameters as run: `seed` is the seed the engine used (drawn for it if the client sent none),
    so a sampled answer can be reproduced."""
    p = common_pb2.SamplingParameters(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
                                      temperature=params.temperature, stop=list(params.stop))
    for name in ("top_k", "top_p", "repetition_penalty"):
        if getattr(params, name) is not None:
            setattr(p, name, getattr(params, name))
    if seed is not None:
        p.seed = seed
    return p


def completion_served(completion_id: str, model_version: str, prompt: str | list[dict], record: RequestRecord,
                      params: SamplingParams, last: StepOutput, time_ns: int) -> tuple[bytes, bytes, dict]:
    """(key, value, headers) of the event for topic COMPLETIONS, keyed by the prompt key."""
    key = prompt_key(prompt)
    event = events_pb2.CompletionServed(
        meta=event_meta(record.user, record.tenant, time_ns), completion_id=completion_id, prompt_key=key,
        response=last.generated_text or "", prompt_tokens=last.prompt_tokens,
        completion_tokens=last.generated_tokens, model_version=model_version,
        parameters=sampling_parameters(params, last.seed), finish_reason=FINISH_REASONS[last.finish_reason],
        comparison_id=record.comparison_id)
    if isinstance(prompt, str):
        event.text = prompt
    else:
        event.chat.messages.extend(common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    return key.encode(), event.SerializeToString(), {"event_id": event.meta.event_id.encode()}
