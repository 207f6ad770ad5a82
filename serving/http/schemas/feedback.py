"""Bodies of `POST /v1/feedback` and `POST /v1/compare`, and their mapping onto the event contract.

Feedback arrives as JSON and leaves as `FeedbackEvent` protobuf messages (events.proto): pydantic
checks the shape (422 naming the field), the feedback service checks the meaning (known completions,
one prompt per ranking) for HTTP and gRPC alike.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protos.feedloop.v1 import common_pb2, events_pb2
from serving.engine.types import MAX_STOP_SEQUENCES, SamplingParams
from serving.http.errors import InvalidParam
from serving.http.schemas.openai import ChatMessage, flatten_messages

_FORBID = ConfigDict(extra="forbid")
_WINNERS = {"a": events_pb2.Comparison.WINNER_A, "b": events_pb2.Comparison.WINNER_B,
            "tie": events_pb2.Comparison.WINNER_TIE, "both_bad": events_pb2.Comparison.WINNER_BOTH_BAD}


class _Event(BaseModel):
    model_config = _FORBID
    event_id: str | None = Field(None, max_length=128,
                                 description="Your id for this event: a retried call is stored once. "
                                 "Default: a fresh uuid4.")
    user: str | None = Field(None, description="Who gave the feedback (default: the X-Feedloop-User header).")

    def meta(self) -> events_pb2.EventMeta:
        return events_pb2.EventMeta(event_id=self.event_id or "", user=self.user or "")


class RatingIn(_Event):
    type: Literal["rating"]
    completion_id: str = Field(min_length=1)
    score: Literal[1, -1] = Field(description="1: thumb up, -1: thumb down.")
    comment: str | None = None

    def to_event(self) -> events_pb2.FeedbackEvent:
        rating = events_pb2.Rating(meta=self.meta(), completion_id=self.completion_id, score=self.score)
        if self.comment is not None:
            rating.comment = self.comment
        return events_pb2.FeedbackEvent(rating=rating)


class ComparisonIn(_Event):
    type: Literal["comparison"]
    completion_ids: list[str] = Field(min_length=2, max_length=2, description="[a, b]")
    winner: Literal["a", "b", "tie", "both_bad"]
    comparison_id: str | None = Field(None, description="From /v1/compare; default: that of the compare call "
                                      "both completions came from, else a fresh one.")

    def to_event(self) -> events_pb2.FeedbackEvent:
        a, b = self.completion_ids
        return events_pb2.FeedbackEvent(comparison=events_pb2.Comparison(
            meta=self.meta(), comparison_id=self.comparison_id or "", completion_a=a, completion_b=b,
            winner=_WINNERS[self.winner]))


class RankingIn(_Event):
    type: Literal["ranking"]
    completion_ids: list[str] = Field(description="2 to 9 completions of one prompt, best first.")

    def to_event(self) -> events_pb2.FeedbackEvent:
        return events_pb2.FeedbackEvent(ranking=events_pb2.Ranking(meta=self.meta(),
                                                                   completion_ids=self.completion_ids))


class DemonstrationIn(_Event):
    type: Literal["demonstration"]
    completion_id: str | None = Field(None, description="The answer this one improves on; or:")
    prompt: str | None = Field(None, description="a prompt of your own; or:")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="a conversation of your own.")
    text: str = Field(min_length=1, description="The better answer, written by a person.")

    @model_validator(mode="after")
    def _one_target(self) -> "DemonstrationIn":
        if sum(x is not None for x in (self.completion_id, self.prompt, self.messages)) != 1:
            raise ValueError("give exactly one of `completion_id`, `prompt` or `messages`")
        return self

    def to_event(self) -> events_pb2.FeedbackEvent:
        d = events_pb2.Demonstration(meta=self.meta(), text=self.text)
        if self.completion_id is not None:
            d.completion_id = self.completion_id
        elif self.prompt is not None:
            d.prompt_text = self.prompt
        else:
            d.prompt_chat.messages.extend(common_pb2.ChatMessage(**m) for m in flatten_messages(self.messages))
        return events_pb2.FeedbackEvent(demonstration=d)


FeedbackIn = Annotated[Union[RatingIn, ComparisonIn, RankingIn, DemonstrationIn], Field(discriminator="type")]


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="Events made durable (all of the call's, or the call failed).")
    event_ids: list[str] = Field(description="In the order sent.")


class CompareRequest(BaseModel):
    model_config = _FORBID
    prompt: str | None = Field(None, min_length=1, description="Raw text; or:")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="a conversation (chat template).")
    n: int = Field(2, description="Answers to sample, 2 to 9.")
    max_tokens: int | None = Field(None, json_schema_extra={"minimum": 1})
    temperature: float = Field(1.0, description="> 0: comparisons are sampled.",
                               json_schema_extra={"exclusiveMinimum": 0, "maximum": 2})
    top_p: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    top_k: int | None = Field(None, json_schema_extra={"minimum": 1})
    repetition_penalty: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0})
    stop: list[str] = Field(default_factory=list, json_schema_extra={"maxItems": MAX_STOP_SEQUENCES})
    seed: int | None = Field(None, description="Seeds the first answer; the others get seed+1, seed+2, …",
                             json_schema_extra={"minimum": 0})
    user: str | None = None
    model_versions: list[str] | None = Field(
        None, description="Versions to answer with, each loaded in this gateway (serving or canary): answer i "
                          "runs on model_versions[i % len]. Absent: every answer is routed like any request.")

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompareRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def sampling(self, *, default_max_new_tokens: int, max_total_tokens: int) -> SamplingParams:
        max_new = default_max_new_tokens if self.max_tokens is None else self.max_tokens
        if not 1 <= max_new <= max_total_tokens:
            raise InvalidParam(f"`max_tokens` must be between 1 and {max_total_tokens}", "max_tokens")
        if not 0 < self.temperature <= 2:
            raise InvalidParam("`temperature` must be > 0 and <= 2 (comparisons are sampled)", "temperature")
        return SamplingParams(max_new_tokens=max_new, do_sample=True, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              stop=tuple(self.stop), seed=self.seed, logprobs=False)


class ComparedCompletion(BaseModel):
    completion_id: str
    text: str
    model_version: str


class CompareResponse(BaseModel):
    comparison_id: str
    completions: list[ComparedCompletion]
