"""Hand-built events for the store and export tests."""
from __future__ import annotations

import itertools
from datetime import datetime, timezone

from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import common_pb2, events_pb2

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
_event_ids = itertools.count(1)

WINNERS = {"a": events_pb2.Comparison.WINNER_A, "b": events_pb2.Comparison.WINNER_B,
           "tie": events_pb2.Comparison.WINNER_TIE, "both_bad": events_pb2.Comparison.WINNER_BOTH_BAD,
           "unspecified": events_pb2.Comparison.WINNER_UNSPECIFIED}


def meta(event_id: str | None = None, *, tenant: str = "acme", user: str = "ann", schema_version: int = 1,
         at: datetime = T0) -> events_pb2.EventMeta:
    m = events_pb2.EventMeta(event_id=event_id or f"ev-{next(_event_ids)}", schema_version=schema_version,
                             tenant=tenant, user=user)
    m.time.FromDatetime(at)
    return m


def conversation(messages: list[dict]) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(**m) for m in messages])


def served(completion_id: str, prompt: str | list[dict] = "What is 2+2?", response: str = "4", *,
           event_id: str | None = None, model_version: str = "v1", key: str | None = None,
           **fields) -> events_pb2.CompletionServed:
    event = events_pb2.CompletionServed(meta=meta(event_id), completion_id=completion_id,
                                        prompt_key=key or prompt_key(prompt), response=response,
                                        model_version=model_version, **fields)
    if isinstance(prompt, str):
        event.text = prompt
    else:
        event.chat.CopyFrom(conversation(prompt))
    return event


def rating(completion_id: str, score: int, *, event_id: str | None = None, comment: str | None = None,
           **meta_fields) -> events_pb2.FeedbackEvent:
    inner = events_pb2.Rating(meta=meta(event_id, **meta_fields), completion_id=completion_id, score=score)
    if comment is not None:
        inner.comment = comment
    return events_pb2.FeedbackEvent(rating=inner)


def comparison(a: str, b: str, winner: str, *, comparison_id: str = "cmp-1",
               event_id: str | None = None) -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(comparison=events_pb2.Comparison(
        meta=meta(event_id), comparison_id=comparison_id, completion_a=a, completion_b=b, winner=WINNERS[winner]))


def ranking(completion_ids: list[str], *, event_id: str | None = None) -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(ranking=events_pb2.Ranking(meta=meta(event_id), completion_ids=completion_ids))


def demonstration(text: str, *, completion_id: str | None = None, prompt: str | list[dict] | None = None,
                  event_id: str | None = None) -> events_pb2.FeedbackEvent:
    inner = events_pb2.Demonstration(meta=meta(event_id), text=text)
    if completion_id is not None:
        inner.completion_id = completion_id
    elif isinstance(prompt, str):
        inner.prompt_text = prompt
    elif prompt is not None:
        inner.prompt_chat.CopyFrom(conversation(prompt))
    return events_pb2.FeedbackEvent(demonstration=inner)
