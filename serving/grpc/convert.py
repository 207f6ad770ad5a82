"""Between protobuf messages and the service layer's types. Pure functions: no I/O, no grpc.

Everything that is the client's mistake raises serving.errors.ValidationError, so the servicer
answers it exactly like the errors the services raise (INVALID_ARGUMENT).
"""
from __future__ import annotations

from serving.engine.client import EngineClient
from serving.engine.types import SamplingParams, StepOutput
from serving.errors import ValidationError
from serving.services.completion_events import RequestRecord
from serving.services.generation import CompletionStream
from protos.feedloop.v1 import common_pb2, serving_pb2

_FINISH_REASONS = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "eos_token": common_pb2.FINISH_REASON_EOS_TOKEN,
    "stop_sequence": common_pb2.FINISH_REASON_STOP_SEQUENCE,
}


def chat_messages(conversation: common_pb2.Conversation) -> list[dict]:
    """OpenAI-style messages, the form EngineClient.render_chat and RewardClient.score take."""
    if not conversation.messages:
        raise ValidationError("`chat.messages` must hold at least one message")
    if any(not m.role for m in conversation.messages):
        raise ValidationError("every chat message needs a `role`")
    return [{"role": m.role, "content": m.content} for m in conversation.messages]


def generate_prompt(request: serving_pb2.GenerateRequest, engine: EngineClient) -> str:
    """The prompt text the engine sees: raw text as is, chat through the model's template."""
    which = request.WhichOneof("prompt")
    if which == "chat":
        return engine.render_chat(chat_messages(request.chat))
    if which == "text" and request.text:
        return request.text
    raise ValidationError("`prompt` must be set: non-empty `text` or `chat` messages")


def request_record(request: serving_pb2.GenerateRequest, meta: dict[str, str]) -> RequestRecord:
    """What the completion's event records: the prompt as sent (text or chat messages) and the user
    and tenant from the call's metadata (`x-feedloop-user`, `x-feedloop-tenant`), as HTTP's headers."""
    prompt = chat_messages(request.chat) if request.WhichOneof("prompt") == "chat" else request.text
    return RequestRecord(prompt, user=meta.get("x-feedloop-user", ""), tenant=meta.get("x-feedloop-tenant", ""))


def sampling_params(p: common_pb2.SamplingParameters, default_max_new_tokens: int) -> SamplingParams:
    """SamplingParams validates the ranges; here only "absent" is told apart from "zero"."""
    def opt(name: str):
        return getattr(p, name) if p.HasField(name) else None

    return SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else default_max_new_tokens,
        do_sample=p.do_sample,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_k=opt("top_k"),
        top_p=opt("top_p"),
        repetition_penalty=opt("repetition_penalty"),
        stop=tuple(p.stop),
        seed=opt("seed"),
    )


def generate_response(stream: CompletionStream, out: StepOutput) -> serving_pb2.GenerateResponse:
    """One streamed message; the totals go on the last one only (their presence marks it)."""
    msg = serving_pb2.GenerateResponse(
        completion_id=stream.completion_id,
        model_version=stream.model_version,
        token=serving_pb2.Token(id=out.token.id, text=out.token.text, logprob=out.token.logprob,
                                special=out.token.special),
        text=out.text,
    )
    if out.finish_reason is not None:
        msg.finish_reason = _FINISH_REASONS[out.finish_reason]
        msg.generated_text = out.generated_text or ""
        msg.generated_tokens = out.generated_tokens
        msg.prompt_tokens = out.prompt_tokens
        if out.seed is not None:
            msg.seed = out.seed
    return msg


def score_pairs(request: serving_pb2.ScoreRequest) -> list[tuple[str | list[dict], str]]:
    """(prompt text or chat messages, response) pairs; the reward client renders chats itself."""
    pairs: list[tuple[str | list[dict], str]] = []
    for i, pair in enumerate(request.pairs):
        which = pair.WhichOneof("prompt")
        if which == "chat":
            pairs.append((chat_messages(pair.chat), pair.response))
        elif which == "text":
            pairs.append((pair.text, pair.response))
        else:
            raise ValidationError(f"`pairs[{i}]` needs a prompt: `text` or `chat` messages")
    return pairs
