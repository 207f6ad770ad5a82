"""Event messages → table rows (plain dicts for bulk inserts). Pure: no database, no validation."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from protos.feedloop.v1 import common_pb2, events_pb2

FINISH_REASONS = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_EOS_TOKEN: "eos_token",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}
WINNERS = {
    events_pb2.Comparison.WINNER_A: "a",
    events_pb2.Comparison.WINNER_B: "b",
    events_pb2.Comparison.WINNER_TIE: "tie",
    events_pb2.Comparison.WINNER_BOTH_BAD: "both_bad",
}


def chat_messages(conversation: common_pb2.Conversation) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in conversation.messages]


def completion_prompt(event: events_pb2.CompletionServed) -> str | list[dict] | None:
    which = event.WhichOneof("prompt")
    if which == "text":
        return event.text
    if which == "chat":
        return chat_messages(event.chat)
    return None


def demonstration_prompt(event: events_pb2.Demonstration) -> str | list[dict] | None:
    which = event.WhichOneof("target")
    if which == "prompt_text":
        return event.prompt_text
    if which == "prompt_chat":
        return chat_messages(event.prompt_chat)
    return None


def event_time(meta: events_pb2.EventMeta, received_at: datetime) -> datetime:
    """The gateway's time of the event; the store's clock if the producer left it unset."""
    if meta.HasField("time"):
        return meta.time.ToDatetime(tzinfo=timezone.utc)
    return received_at


def _common(meta: events_pb2.EventMeta, received_at: datetime) -> dict[str, Any]:
    return {"event_id": meta.event_id, "tenant": meta.tenant, "user_id": meta.user,
            "created_at": event_time(meta, received_at)}


def sampling_parameters(parameters: common_pb2.SamplingParameters) -> dict[str, Any]:
    """Only the fields that were set: absent means "the engine's default", as in the request."""
    return {field.name: list(value) if field.is_repeated else value for field, value in parameters.ListFields()}


def completion_row(event: events_pb2.CompletionServed, received_at: datetime) -> dict[str, Any]:
    prompt = completion_prompt(event)
    row = _common(event.meta, received_at)
    del row["event_id"]
    return {
        "completion_id": event.completion_id,
        "event_id": event.meta.event_id,
        "schema_version": event.meta.schema_version,
        **row,
        "prompt_text": prompt if isinstance(prompt, str) else None,
        "prompt_chat": prompt if isinstance(prompt, list) else None,
        "prompt_key": event.prompt_key,
        "response": event.response,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "model_version": event.model_version,
        "parameters": sampling_parameters(event.parameters),
        "finish_reason": FINISH_REASONS.get(event.finish_reason),
        "comparison_id": event.comparison_id or None,
        "ingested_at": received_at,
    }


def rating_row(event: events_pb2.Rating, received_at: datetime) -> dict[str, Any]:
    return {**_common(event.meta, received_at), "completion_id": event.completion_id, "score": event.score,
            "comment": event.comment if event.HasField("comment") else None, "ingested_at": received_at}


def comparison_row(event: events_pb2.Comparison, prompt_key: str, received_at: datetime) -> dict[str, Any]:
    return {**_common(event.meta, received_at), "comparison_id": event.comparison_id or None,
            "completion_a": event.completion_a, "completion_b": event.completion_b,
            "winner": WINNERS[event.winner], "prompt_key": prompt_key, "ingested_at": received_at}


def ranking_row(event: events_pb2.Ranking, prompt_key: str, received_at: datetime) -> dict[str, Any]:
    return {**_common(event.meta, received_at), "prompt_key": prompt_key,
            "size": len(event.completion_ids), "ingested_at": received_at}


def demonstration_row(event: events_pb2.Demonstration, prompt_key: str, received_at: datetime) -> dict[str, Any]:
    prompt = demonstration_prompt(event)
    return {**_common(event.meta, received_at),
            "completion_id": event.completion_id if event.WhichOneof("target") == "completion_id" else None,
            "prompt_text": prompt if isinstance(prompt, str) else None,
            "prompt_chat": prompt if isinstance(prompt, list) else None,
            "prompt_key": prompt_key, "text": event.text, "ingested_at": received_at}
