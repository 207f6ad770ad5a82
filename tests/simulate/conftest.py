"""A gateway that records to the real embedded bus (feedback.bus.local_log) in a temporary data
directory, served over HTTP on 127.0.0.1, around the session's shared tiny engine; and a reader of
what reached the log, so tests check what was *published*, not what the simulator says it sent."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from feedback import topics
from feedback.bus.local_log import LocalLogConsumer, LocalLogPublisher
from protos.feedloop.v1 import events_pb2
from serving.services import Services
from tests.feedback.gateway.conftest import recording_services
from tests.http.server import serve_http


@dataclass
class RecordingGateway:
    url: str
    services: Services
    data_dir: Path

    @property
    def model_version(self) -> str:
        return self.services.engine.model_version

    def read_log(self) -> tuple[dict[str, events_pb2.CompletionServed], dict[str, events_pb2.FeedbackEvent]]:
        """Everything in the log so far, from the start (a fresh consumer group each time)."""
        consumer = LocalLogConsumer(self.data_dir, f"test-{uuid.uuid4().hex}", [topics.COMPLETIONS, topics.FEEDBACK])
        completions, feedback = {}, {}
        try:
            while records := consumer.poll(max_records=5000, timeout=0.2):
                for r in records:
                    if r.topic == topics.COMPLETIONS:
                        served = events_pb2.CompletionServed.FromString(r.value)
                        completions[served.completion_id] = served
                    else:
                        event = events_pb2.FeedbackEvent.FromString(r.value)
                        feedback[getattr(event, event.WhichOneof("event")).meta.event_id] = event
        finally:
            consumer.close()
        return completions, feedback

    def published(self, event_ids: list[str], timeout: float = 20.0):
        """(completions by id, feedback events by event_id) once the log holds every event in
        `event_ids` and every completion they name. Feedback is durable before the 202; the
        completions are published by the recorder thread a moment after their answers."""
        deadline = time.monotonic() + timeout
        while True:
            completions, feedback = self.read_log()
            wanted = [feedback.get(i) for i in event_ids]
            named = {c for e in wanted if e is not None for c in completion_ids_of(e)}
            if (all(wanted) and named <= completions.keys()) or time.monotonic() > deadline:
                return completions, {i: feedback[i] for i in event_ids if i in feedback}
            time.sleep(0.05)


def completion_ids_of(event: events_pb2.FeedbackEvent) -> list[str]:
    kind = event.WhichOneof("event")
    if kind == "comparison":
        return [event.comparison.completion_a, event.comparison.completion_b]
    if kind == "ranking":
        return list(event.ranking.completion_ids)
    return [event.rating.completion_id]


def served_prompt_text(served: events_pb2.CompletionServed) -> str:
    """The prompt as a rule sees it, from the stored event: the text, or the last user message."""
    if served.WhichOneof("prompt") == "text":
        return served.text
    return [m.content for m in served.chat.messages if m.role == "user"][-1]


@pytest.fixture(scope="module")
def recording_gateway(tiny_services, tmp_path_factory) -> RecordingGateway:
    data_dir = tmp_path_factory.mktemp("simulate-bus")
    publisher = LocalLogPublisher(data_dir)
    services = recording_services(tiny_services, publisher)
    try:
        with serve_http(services) as url:
            yield RecordingGateway(url, services, data_dir)
    finally:
        services.recorder.close(timeout=10)
        publisher.close()
