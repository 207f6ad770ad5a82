"""Gateway → local log → ingestor → store, on SQLite and Postgres (the embedded default path)."""
from __future__ import annotations

import uuid

import httpx

from feedback import topics
from feedback.bus.local_log import LocalLogConsumer, LocalLogPublisher
from feedback.ingest import Ingestor
from feedback.prompt_key import prompt_key
from protos.feedloop.v1 import events_pb2
from serving.services import Services
from tests.feedback.ingest.helpers import chat, rate
from tests.http.server import serve_http

GROUP = "feedloop-ingest"


def _ingest_all(data_dir, store, **options):
    consumer = LocalLogConsumer(data_dir, GROUP, [topics.COMPLETIONS, topics.FEEDBACK])
    try:
        return Ingestor(consumer, store, poll_timeout=0.1, **options).run(until_idle=0.5)
    finally:
        consumer.close()


def test_everything_served_and_rated_reaches_the_store_once(tiny_services, store, tmp_path):
    publisher = LocalLogPublisher(tmp_path)
    services = Services.build(tiny_services.settings, tiny_services.engine, tiny_services.reward, publisher=publisher)
    with serve_http(services) as url:
        ids = [chat(url, f"question {i}") for i in range(4)]
        compared = httpx.post(f"{url}/v1/compare", json={"prompt": "pick one", "n": 3, "max_tokens": 4,
                                                         "seed": 1}, timeout=30).json()
        trio = [c["completion_id"] for c in compared["completions"]]
        retry_id = str(uuid.uuid4())
        assert rate(url, ids[0], 1, retry_id).status_code == 202
        assert rate(url, ids[0], 1, retry_id).status_code == 202  # the client retried: stored once
        assert rate(url, ids[1], -1).status_code == 202
        feedback = [
            {"type": "comparison", "completion_ids": trio[:2], "winner": "b", "comparison_id": compared["comparison_id"]},
            {"type": "ranking", "completion_ids": [trio[2], trio[0], trio[1]]},
            {"type": "demonstration", "completion_id": ids[2], "text": "A better answer."},
        ]
        assert httpx.post(f"{url}/v1/feedback", json=feedback, timeout=30).status_code == 202
    services.recorder.close()
    publisher.close()

    stats = _ingest_all(tmp_path, store)
    counts = store.counts()
    assert counts["completions"] == 7
    assert (counts["ratings"], counts["comparisons"], counts["rankings"], counts["demonstrations"]) == (2, 1, 1, 1)
    assert counts["dead_letters"] == 0
    assert stats.duplicates == 1 and stats.inserted == 12
    stored = store.get_completion(ids[0])
    assert stored.model_version == tiny_services.engine.model_version
    assert stored.prompt_key == prompt_key([{"role": "user", "content": "question 0"}])
    assert store.get_completion(trio[0]).comparison_id == compared["comparison_id"]

    again = _ingest_all(tmp_path, store)  # offsets were committed: nothing is read twice
    assert again.inserted == again.duplicates == 0


def _completion(completion_id: str, text: str) -> events_pb2.CompletionServed:
    event = events_pb2.CompletionServed(completion_id=completion_id, text=text, prompt_key=prompt_key(text),
                                        response="an answer", model_version="v1")
    event.meta.event_id, event.meta.schema_version = str(uuid.uuid4()), 1
    event.meta.time.GetCurrentTime()
    return event


def _rating(completion_id: str) -> events_pb2.FeedbackEvent:
    event = events_pb2.FeedbackEvent(rating=events_pb2.Rating(completion_id=completion_id, score=1))
    event.rating.meta.event_id, event.rating.meta.schema_version = str(uuid.uuid4()), 1
    event.rating.meta.time.GetCurrentTime()
    return event


def test_feedback_that_overtakes_its_completion_is_parked_not_lost(store, tmp_path):
    publisher = LocalLogPublisher(tmp_path)
    publisher.publish(topics.FEEDBACK, b"k", _rating("cmpl-late").SerializeToString())
    consumer = LocalLogConsumer(tmp_path, GROUP, [topics.COMPLETIONS, topics.FEEDBACK])
    ingestor = Ingestor(consumer, store, poll_timeout=0.1, park_timeout=30)
    ingestor.run(until_idle=0.3)
    assert ingestor.parked == 1 and store.counts()["ratings"] == 0  # waiting, not dead-lettered
    publisher.publish(topics.COMPLETIONS, b"k", _completion("cmpl-late", "late prompt").SerializeToString())
    ingestor.run(until_idle=0.3)
    consumer.close()
    publisher.close()
    assert ingestor.parked == 0
    assert store.counts()["ratings"] == 1 and store.counts()["dead_letters"] == 0
    assert _ingest_all(tmp_path, store).inserted == 0  # committed once nothing was parked


def test_bad_events_are_dead_lettered_with_the_reason_and_do_not_block(store, tmp_path):
    publisher = LocalLogPublisher(tmp_path)
    publisher.publish(topics.FEEDBACK, b"k", b"\xff\xfenot a protobuf")
    publisher.publish(topics.FEEDBACK, b"k", _rating("cmpl-never-served").SerializeToString())
    publisher.publish(topics.COMPLETIONS, b"k", _completion("cmpl-ok", "fine").SerializeToString())
    publisher.close()
    stats = _ingest_all(tmp_path, store, park_timeout=0.2)
    letters = {letter.reason.split(":")[0] for letter in store.dead_letters()}
    assert store.counts()["completions"] == 1
    assert stats.dead_lettered == 2 and len(letters) == 2
    assert "unknown_completion" in letters
