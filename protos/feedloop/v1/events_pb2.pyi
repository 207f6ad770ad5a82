import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from protos.feedloop.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventMeta(_message.Message):
    __slots__ = ("event_id", "schema_version", "tenant", "user", "time")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    schema_version: int
    tenant: str
    user: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., schema_version: _Optional[int] = ..., tenant: _Optional[str] = ..., user: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompletionServed(_message.Message):
    __slots__ = ("meta", "completion_id", "text", "chat", "prompt_key", "response", "prompt_tokens", "completion_tokens", "model_version", "parameters", "finish_reason", "comparison_id")
    META_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_KEY_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_ID_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    completion_id: str
    text: str
    chat: _common_pb2.Conversation
    prompt_key: str
    response: str
    prompt_tokens: int
    completion_tokens: int
    model_version: str
    parameters: _common_pb2.SamplingParameters
    finish_reason: _common_pb2.FinishReason
    comparison_id: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., completion_id: _Optional[str] = ..., text: _Optional[str] = ..., chat: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., prompt_key: _Optional[str] = ..., response: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., model_version: _Optional[str] = ..., parameters: _Optional[_Union[_common_pb2.SamplingParameters, _Mapping]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., comparison_id: _Optional[str] = ...) -> None: ...

class Rating(_message.Message):
    __slots__ = ("meta", "completion_id", "score", "comment")
    META_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    completion_id: str
    score: int
    comment: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., completion_id: _Optional[str] = ..., score: _Optional[int] = ..., comment: _Optional[str] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("meta", "comparison_id", "completion_a", "completion_b", "winner")
    class Winner(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WINNER_UNSPECIFIED: _ClassVar[Comparison.Winner]
        WINNER_A: _ClassVar[Comparison.Winner]
        WINNER_B: _ClassVar[Comparison.Winner]
        WINNER_TIE: _ClassVar[Comparison.Winner]
        WINNER_BOTH_BAD: _ClassVar[Comparison.Winner]
    WINNER_UNSPECIFIED: Comparison.Winner
    WINNER_A: Comparison.Winner
    WINNER_B: Comparison.Winner
    WINNER_TIE: Comparison.Winner
    WINNER_BOTH_BAD: Comparison.Winner
    META_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_A_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_B_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    comparison_id: str
    completion_a: str
    completion_b: str
    winner: Comparison.Winner
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., comparison_id: _Optional[str] = ..., completion_a: _Optional[str] = ..., completion_b: _Optional[str] = ..., winner: _Optional[_Union[Comparison.Winner, str]] = ...) -> None: ...

class Ranking(_message.Message):
    __slots__ = ("meta", "completion_ids")
    META_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    completion_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., completion_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Demonstration(_message.Message):
    __slots__ = ("meta", "completion_id", "prompt_text", "prompt_chat", "text")
    META_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHAT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    completion_id: str
    prompt_text: str
    prompt_chat: _common_pb2.Conversation
    text: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., completion_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_chat: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("rating", "comparison", "ranking", "demonstration")
    RATING_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATION_FIELD_NUMBER: _ClassVar[int]
    rating: Rating
    comparison: Comparison
    ranking: Ranking
    demonstration: Demonstration
    def __init__(self, rating: _Optional[_Union[Rating, _Mapping]] = ..., comparison: _Optional[_Union[Comparison, _Mapping]] = ..., ranking: _Optional[_Union[Ranking, _Mapping]] = ..., demonstration: _Optional[_Union[Demonstration, _Mapping]] = ...) -> None: ...
