"""End to end on the embedded bus: what the gateway acknowledges is in the local log (the real
feedback.bus.local_log), on the right topic, keyed by the prompt."""
from __future__ import annotations

from feedback import topics
from feedback.bus.local_log import LocalLogConsumer, LocalLogPublisher
from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import events_pb2
from serving.engine.types import SamplingParams
from tests.feedback.gateway.conftest import recording_services


async def test_served_completion_and_its_rating_reach_the_local_log(tiny_services, tmp_path):
    publisher = LocalLogPublisher(tmp_path)
    services = recording_services(tiny_services, publisher)
    try:
        done = await services.generation.complete("local log prompt", SamplingParams(max_new_tokens=3))
        rating = events_pb2.FeedbackEvent(rating=events_pb2.Rating(completion_id=done.completion_id, score=1))
        (event_id,) = await services.feedback.submit([rating])
        assert services.recorder.close(timeout=10)
    finally:
        publisher.close()
    consumer = LocalLogConsumer(tmp_path, "test", [topics.COMPLETIONS, topics.FEEDBACK])
    try:
        records = consumer.poll(timeout=5)
    finally:
        consumer.close()
    by_topic = {r.topic: r for r in records}
    assert len(records) == 2
    key = prompt_key("local log prompt").encode()
    served = events_pb2.CompletionServed.FromString(by_topic[topics.COMPLETIONS].value)
    assert served.completion_id == done.completion_id and served.response == done.text
    assert by_topic[topics.COMPLETIONS].key == by_topic[topics.FEEDBACK].key == key
    feedback = events_pb2.FeedbackEvent.FromString(by_topic[topics.FEEDBACK].value)
    assert feedback.rating.meta.event_id == event_id
    assert by_topic[topics.FEEDBACK].headers["event_id"] == event_id.encode()
