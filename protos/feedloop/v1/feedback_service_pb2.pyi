from protos.feedloop.v1 import common_pb2 as _common_pb2
from protos.feedloop.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_events_pb2.FeedbackEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[_events_pb2.FeedbackEvent, _Mapping]]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("accepted", "event_ids")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    event_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[int] = ..., event_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("text", "chat", "n", "parameters", "user", "model_versions")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: _common_pb2.Conversation
    n: int
    parameters: _common_pb2.SamplingParameters
    user: str
    model_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., n: _Optional[int] = ..., parameters: _Optional[_Union[_common_pb2.SamplingParameters, _Mapping]] = ..., user: _Optional[str] = ..., model_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class ComparedCompletion(_message.Message):
    __slots__ = ("completion_id", "text", "model_version")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    text: str
    model_version: str
    def __init__(self, completion_id: _Optional[str] = ..., text: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("comparison_id", "completions")
    COMPARISON_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    comparison_id: str
    completions: _containers.RepeatedCompositeFieldContainer[ComparedCompletion]
    def __init__(self, comparison_id: _Optional[str] = ..., completions: _Optional[_Iterable[_Union[ComparedCompletion, _Mapping]]] = ...) -> None: ...
