"""The feedback service: checks feedback events against the completions served, then publishes them.

HTTP (`POST /v1/feedback`) and gRPC (`Feedback.Submit`) both hand it `FeedbackEvent` messages
(protos/feedloop/v1/events.proto), the very messages that travel on the bus.

A call is all or nothing: every event is checked first (shape, known completion ids, one prompt per
ranking or comparison) and only then published, so a refused call publishes nothing. The answer
comes after `publish` returned for every event, i.e. once they are durable on this machine. Should
publishing fail half-way (disk full), the call fails and the client retries it; events carry
`event_id`s and the store keeps one row per id, so a retry with the same ids stores each event once
(clients that want that guarantee send their own ids; server-made ids of a failed call are lost).
"""
from __future__ import annotations

import asyncio
import time
import uuid

from feedback import topics
from feedback.bus.base import EventPublisher
from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import events_pb2
from serving.errors import NotFound, RecordingUnavailable, ValidationError
from serving.services.completion_events import SCHEMA_VERSION, event_meta
from serving.services.completion_index import CompletionIndex
from serving.services.recorder import RecorderMetrics

MAX_EVENTS_PER_CALL = 100
MAX_RANKED = 9
MAX_EVENT_ID_CHARS = 128
_Winner = events_pb2.Comparison.Winner


class FeedbackService:
    def __init__(self, index: CompletionIndex, publisher: EventPublisher | None,
                 metrics: RecorderMetrics | None = None) -> None:
        self.index = index
        self.publisher = publisher
        self.metrics = metrics

    async def submit(self, events: list[events_pb2.FeedbackEvent], *, user: str = "", tenant: str = "") -> list[str]:
        """Check, stamp (event_id if absent, schema version, time; `user`/`tenant` where the event has
        none) and publish `events`; returns their event ids in order."""
        if not events:
            raise ValidationError("send at least one feedback event")
        if len(events) > MAX_EVENTS_PER_CALL:
            raise ValidationError(f"at most {MAX_EVENTS_PER_CALL} feedback events per call; got {len(events)}")
        ids = [c for e in events for c in _completion_ids(e)]
        # The fallback may query the database: off the event loop.
        keys = await asyncio.to_thread(self.index.prompt_keys, ids) if ids else {}
        now = time.time_ns()
        out: list[tuple[bytes, bytes, dict[str, bytes]]] = []
        seen: set[str] = set()
        for i, event in enumerate(events):
            key = _check(event, keys, f"[{i}]")
            if event.WhichOneof("event") == "comparison" and not event.comparison.comparison_id:
                event.comparison.comparison_id = self._comparison_id(event.comparison)
            meta = _meta(event)
            _stamp(meta, user, tenant, now, f"[{i}]")
            if meta.event_id in seen:
                raise ValidationError(f"`[{i}].event_id` {meta.event_id!r} appears twice in this call")
            seen.add(meta.event_id)
            out.append((key.encode(), event.SerializeToString(), {"event_id": meta.event_id.encode()}))
        if self.publisher is None:  # checked last: the client still learns what is wrong with its call
            raise RecordingUnavailable("feedback is not recorded on this gateway: no event bus is configured")
        await asyncio.to_thread(self._publish, out)
        return [h["event_id"].decode() for _, _, h in out]

    def _comparison_id(self, c: events_pb2.Comparison) -> str:
        """The id of the /v1/compare call both completions came from, else a fresh one."""
        a, b = self.index.get(c.completion_a), self.index.get(c.completion_b)
        if a and b and a.comparison_id and a.comparison_id == b.comparison_id:
            return a.comparison_id
        return f"cmp-{uuid.uuid4().hex}"

    def _publish(self, events: list[tuple[bytes, bytes, dict[str, bytes]]]) -> None:
        for key, value, headers in events:
            try:
                self.publisher.publish(topics.FEEDBACK, key, value, headers)
            except Exception as exc:
                if self.metrics is not None:
                    self.metrics.dropped.labels(topics.FEEDBACK, "publish_error").inc()
                raise RecordingUnavailable(f"feedback could not be recorded ({exc}); retry the call "
                                           "with the same event ids") from exc
            if self.metrics is not None:
                self.metrics.published.labels(topics.FEEDBACK).inc()


def _meta(event: events_pb2.FeedbackEvent) -> events_pb2.EventMeta:
    which = event.WhichOneof("event")
    if which is None:
        raise ValidationError("a feedback event must be a rating, comparison, ranking or demonstration")
    return getattr(event, which).meta


def _stamp(meta: events_pb2.EventMeta, user: str, tenant: str, now: int, where: str) -> None:
    if len(meta.event_id) > MAX_EVENT_ID_CHARS:
        raise ValidationError(f"`{where}.event_id` is longer than {MAX_EVENT_ID_CHARS} characters")
    fresh = event_meta(meta.user or user, meta.tenant or tenant, now, meta.event_id)
    if meta.HasField("time"):  # a client's clock for when the person gave the feedback is kept
        fresh.time.CopyFrom(meta.time)
    fresh.schema_version = SCHEMA_VERSION
    meta.CopyFrom(fresh)


def _completion_ids(event: events_pb2.FeedbackEvent) -> list[str]:
    which = event.WhichOneof("event")
    if which == "rating":
        return [event.rating.completion_id] if event.rating.completion_id else []
    if which == "comparison":
        return [c for c in (event.comparison.completion_a, event.comparison.completion_b) if c]
    if which == "ranking":
        return list(event.ranking.completion_ids)
    if which == "demonstration" and event.demonstration.WhichOneof("target") == "completion_id":
        return [event.demonstration.completion_id]
    return []


def _known(completion_id: str, keys: dict[str, str], param: str) -> str:
    if not completion_id:
        raise ValidationError(f"`{param}` is required")
    if completion_id not in keys:
        raise NotFound(f"completion {completion_id!r} was not served by this platform (or is not recorded "
                       "yet: retry in a few seconds if it was just served)", param, "completion_not_found")
    return keys[completion_id]


def _one_prompt(ids: list[str], keys: dict[str, str], where: str) -> str:
    found = {_known(c, keys, f"{where}.completion_ids") for c in ids}
    if len(found) > 1:
        raise ValidationError(f"`{where}.completion_ids` must all be completions of the same prompt")
    return found.pop()


def _check(event: events_pb2.FeedbackEvent, keys: dict[str, str], where: str) -> str:
    """Validate one event; return its bus key (the prompt key)."""
    which = event.WhichOneof("event")
    if which == "rating":
        r = event.rating
        if r.score not in (1, -1):
            raise ValidationError(f"`{where}.score` must be 1 or -1; got {r.score}")
        return _known(r.completion_id, keys, f"{where}.completion_id")
    if which == "comparison":
        c = event.comparison
        if not c.completion_a or not c.completion_b:
            raise ValidationError(f"`{where}.completion_ids` must name two completions")
        if c.completion_a == c.completion_b:
            raise ValidationError(f"`{where}.completion_ids` must be two different completions")
        if c.winner == _Winner.WINNER_UNSPECIFIED or c.winner not in _Winner.values():
            raise ValidationError(f"`{where}.winner` must be a, b, tie or both_bad")
        return _one_prompt([c.completion_a, c.completion_b], keys, where)
    if which == "ranking":
        ids = list(event.ranking.completion_ids)
        if not 2 <= len(ids) <= MAX_RANKED:
            raise ValidationError(f"`{where}.completion_ids` must hold 2 to {MAX_RANKED} completions; got {len(ids)}")
        if len(set(ids)) != len(ids):
            raise ValidationError(f"`{where}.completion_ids` holds the same completion twice")
        return _one_prompt(ids, keys, where)
    if which == "demonstration":
        d = event.demonstration
        if not d.text:
            raise ValidationError(f"`{where}.text` must not be empty")
        target = d.WhichOneof("target")
        if target == "completion_id":
            return _known(d.completion_id, keys, f"{where}.completion_id")
        if target == "prompt_text" and d.prompt_text:
            return prompt_key(d.prompt_text)
        if target == "prompt_chat" and d.prompt_chat.messages:
            if any(not m.role for m in d.prompt_chat.messages):
                raise ValidationError(f"`{where}.messages`: every message needs a role")
            return prompt_key([{"role": m.role, "content": m.content} for m in d.prompt_chat.messages])
        raise ValidationError(f"`{where}` needs a `completion_id`, a `prompt` or `messages`")
    raise ValidationError(f"`{where}` must be a rating, comparison, ranking or demonstration")
