"""Semantic checks of a batch of events, and the rows to write for the ones that pass.

Each rejection carries a reason `"<code>: <detail>"`; the code is stable (the ingestor may act on
it, e.g. hold back `unknown_completion` feedback that raced ahead of its completion on the other
topic), the detail is for people reading the dead letters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Mapping, NamedTuple, Union

from feedback.prompt_key import prompt_key as compute_prompt_key
from feedback.store import convert
from protos.feedloop.v1 import events_pb2

Event = Union[events_pb2.CompletionServed, events_pb2.FeedbackEvent]

SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
MIN_RANKING, MAX_RANKING = 2, 9

MISSING_FIELD = "missing_field"
UNSUPPORTED_SCHEMA = "unsupported_schema_version"
PROMPT_KEY_MISMATCH = "prompt_key_mismatch"
COMPLETION_CONFLICT = "completion_conflict"
UNKNOWN_COMPLETION = "unknown_completion"
INVALID_SCORE = "invalid_score"
INVALID_WINNER = "invalid_winner"
SAME_COMPLETION = "same_completion"
DIFFERENT_PROMPTS = "different_prompts"
RANKING_SIZE = "ranking_size"
DUPLICATE_IDS = "duplicate_completion_ids"
EMPTY_TEXT = "empty_text"
EMPTY_EVENT = "empty_event"


class Rejected(NamedTuple):
    """An event that cannot be stored (as passed in: the FeedbackEvent, not its inner message)."""

    event: Event
    reason: str

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


class Invalid(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")


@dataclass(frozen=True)
class KnownCompletion:
    prompt_key: str
    event_id: str


@dataclass
class BatchPlan:
    """Rows to insert, per table, for the valid events of one batch."""

    completions: list[dict] = field(default_factory=list)
    ratings: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    rankings: list[tuple[dict, list[str]]] = field(default_factory=list)  # (row, completion ids best first)
    demonstrations: list[dict] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    repeated: int = 0  # events whose event_id already appeared earlier in the same batch

    @property
    def valid(self) -> int:
        return (len(self.completions) + len(self.ratings) + len(self.comparisons) + len(self.rankings)
                + len(self.demonstrations))


def feedback_kind(event: events_pb2.FeedbackEvent):
    if not isinstance(event, events_pb2.FeedbackEvent):
        raise TypeError(f"not an event message: {type(event).__name__}")
    which = event.WhichOneof("event")
    return None if which is None else getattr(event, which)


def referenced_completion_ids(events: list[Event]) -> set[str]:
    """Every completion id the batch names: the ones it serves and the ones its feedback is about."""
    ids: set[str] = set()
    for event in events:
        if isinstance(event, events_pb2.CompletionServed):
            ids.add(event.completion_id)
            continue
        inner = feedback_kind(event)
        if isinstance(inner, (events_pb2.Rating, events_pb2.Demonstration)):
            ids.add(inner.completion_id)
        elif isinstance(inner, events_pb2.Comparison):
            ids.update((inner.completion_a, inner.completion_b))
        elif isinstance(inner, events_pb2.Ranking):
            ids.update(inner.completion_ids)
    ids.discard("")
    return ids


def plan_batch(events: list[Event], stored: Mapping[str, KnownCompletion], received_at: datetime) -> BatchPlan:
    """Validate every event; completions first, so feedback may name a completion served in the
    same batch (in any position) or stored earlier (`stored`)."""
    plan = BatchPlan()
    known = dict(stored)
    seen: set[str] = set()
    feedback: list[tuple[events_pb2.FeedbackEvent, object]] = []
    for event in events:
        inner = event if isinstance(event, events_pb2.CompletionServed) else feedback_kind(event)
        try:
            if inner is None:
                raise Invalid(EMPTY_EVENT, "FeedbackEvent carries no rating, comparison, ranking or demonstration")
            _check_meta(inner.meta)
        except Invalid as error:
            plan.rejected.append(Rejected(event, str(error)))
            continue
        if inner.meta.event_id in seen:
            plan.repeated += 1
            continue
        seen.add(inner.meta.event_id)
        if inner is event:
            _plan(plan, event, lambda: _completion(event, known, received_at, plan))
        else:
            feedback.append((event, inner))
    for event, inner in feedback:
        _plan(plan, event, lambda: _feedback(inner, known, received_at, plan))
    return plan


def _plan(plan: BatchPlan, event: Event, build) -> None:
    try:
        build()
    except Invalid as error:
        plan.rejected.append(Rejected(event, str(error)))


def _check_meta(meta: events_pb2.EventMeta) -> None:
    if not meta.event_id:
        raise Invalid(MISSING_FIELD, "meta.event_id is empty")
    if meta.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise Invalid(UNSUPPORTED_SCHEMA, f"schema_version {meta.schema_version} (this store reads "
                                          f"{sorted(SUPPORTED_SCHEMA_VERSIONS)})")


def _completion(event: events_pb2.CompletionServed, known: dict, received_at: datetime, plan: BatchPlan) -> None:
    for name in ("completion_id", "model_version", "prompt_key"):
        if not getattr(event, name):
            raise Invalid(MISSING_FIELD, f"{name} is empty")
    prompt = convert.completion_prompt(event)
    if prompt is None:
        raise Invalid(MISSING_FIELD, "prompt (text or chat) is not set")
    expected = compute_prompt_key(prompt)
    if event.prompt_key != expected:
        raise Invalid(PROMPT_KEY_MISMATCH, f"prompt_key {event.prompt_key} is not the prompt's key {expected}")
    previous = known.get(event.completion_id)
    if previous is not None and previous.event_id != event.meta.event_id:
        raise Invalid(COMPLETION_CONFLICT, f"completion {event.completion_id} was already served by event "
                                           f"{previous.event_id}")
    known[event.completion_id] = KnownCompletion(event.prompt_key, event.meta.event_id)
    plan.completions.append(convert.completion_row(event, received_at))


def _prompt_key_of(ids: list[str], known: dict) -> str:
    """The one prompt all `ids` answer (each must be a known completion)."""
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise Invalid(UNKNOWN_COMPLETION, f"no completion {', '.join(unknown)} was served")
    keys = {known[i].prompt_key for i in ids}
    if len(keys) > 1:
        raise Invalid(DIFFERENT_PROMPTS, f"completions {', '.join(ids)} answer {len(keys)} different prompts")
    return keys.pop()


def _feedback(inner, known: dict, received_at: datetime, plan: BatchPlan) -> None:
    if isinstance(inner, events_pb2.Rating):
        if not inner.completion_id:
            raise Invalid(MISSING_FIELD, "completion_id is empty")
        if inner.score not in (-1, 1):
            raise Invalid(INVALID_SCORE, f"score {inner.score} (must be +1 or -1)")
        _prompt_key_of([inner.completion_id], known)
        plan.ratings.append(convert.rating_row(inner, received_at))
    elif isinstance(inner, events_pb2.Comparison):
        if inner.winner not in convert.WINNERS:
            raise Invalid(INVALID_WINNER, f"winner {inner.winner} (must be A, B, TIE or BOTH_BAD)")
        ids = [inner.completion_a, inner.completion_b]
        if not all(ids):
            raise Invalid(MISSING_FIELD, "completion_a and completion_b must both be set")
        if ids[0] == ids[1]:
            raise Invalid(SAME_COMPLETION, f"completion {ids[0]} compared with itself")
        plan.comparisons.append(convert.comparison_row(inner, _prompt_key_of(ids, known), received_at))
    elif isinstance(inner, events_pb2.Ranking):
        ids = list(inner.completion_ids)
        if not MIN_RANKING <= len(ids) <= MAX_RANKING:
            raise Invalid(RANKING_SIZE, f"{len(ids)} completions (a ranking has {MIN_RANKING} to {MAX_RANKING})")
        if len(set(ids)) != len(ids):
            raise Invalid(DUPLICATE_IDS, "a completion appears more than once in the ranking")
        plan.rankings.append((convert.ranking_row(inner, _prompt_key_of(ids, known), received_at), ids))
    else:
        _demonstration(inner, known, received_at, plan)


def _demonstration(inner: events_pb2.Demonstration, known: dict, received_at: datetime, plan: BatchPlan) -> None:
    if not inner.text.strip():
        raise Invalid(EMPTY_TEXT, "the demonstration's text is empty")
    target = inner.WhichOneof("target")
    if target is None:
        raise Invalid(MISSING_FIELD, "target (completion_id, prompt_text or prompt_chat) is not set")
    if target == "completion_id":
        key = _prompt_key_of([inner.completion_id], known)
    else:
        prompt = convert.demonstration_prompt(inner)
        if not prompt:
            raise Invalid(MISSING_FIELD, "the demonstration's prompt is empty")
        key = compute_prompt_key(prompt)
    plan.demonstrations.append(convert.demonstration_row(inner, key, received_at))
