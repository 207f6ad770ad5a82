"""The embedded bus: a durable local log shared by processes on one machine."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from feedback import topics
from feedback.bus.factory import open_consumer, open_publisher
from feedback.bus.kafka import KafkaConfig
from feedback.bus.local_log import LocalLogConsumer, LocalLogPublisher
from tests.feedback.bus.helpers import consume


def test_round_trip_in_order_with_headers(tmp_path):
    publisher = open_publisher(None, tmp_path)
    consumer = open_consumer("local", tmp_path, "ingest", [topics.COMPLETIONS, topics.FEEDBACK])
    assert isinstance(publisher, LocalLogPublisher) and isinstance(consumer, LocalLogConsumer)
    try:
        for i in range(50):
            publisher.publish(topics.COMPLETIONS, b"prompt-%d" % (i % 3), b"c-%03d" % i, {"event_id": b"%d" % i})
        publisher.publish(topics.FEEDBACK, b"prompt-0", b"rating", {"event_id": b"r"})
        assert publisher.flush(0) and publisher.pending() == 0
        records = consume(consumer, 51)
        completions = [r for r in records if r.topic == topics.COMPLETIONS]
        assert [r.value for r in completions] == [b"c-%03d" % i for i in range(50)]
        assert completions[7].key == b"prompt-1" and completions[7].headers == {"event_id": b"7"}
        assert [r.value for r in records if r.topic == topics.FEEDBACK] == [b"rating"]
        assert consumer.poll(timeout=0.05) == []
    finally:
        consumer.close()
        publisher.close()


def test_restarted_consumer_resumes_at_the_committed_offset(tmp_path):
    publisher = open_publisher(None, tmp_path)
    for i in range(30):
        publisher.publish(topics.FEEDBACK, None, b"e-%02d" % i)
    consumer = open_consumer(None, tmp_path, "ingest", [topics.FEEDBACK])
    assert [r.value for r in consumer.poll(max_records=10)] == [b"e-%02d" % i for i in range(10)]
    consumer.commit()
    assert len(consumer.poll(max_records=10)) == 10  # read but never committed
    consumer.close()

    consumer = open_consumer(None, tmp_path, "ingest", [topics.FEEDBACK])
    try:
        # nothing committed comes back, nothing uncommitted is skipped
        assert [r.value for r in consume(consumer, 20)] == [b"e-%02d" % i for i in range(10, 30)]
        other_group = open_consumer(None, tmp_path, "export", [topics.FEEDBACK])
        assert len(consume(other_group, 30)) == 30  # groups keep their own offsets
        other_group.close()
    finally:
        consumer.close()
        publisher.close()


def test_one_active_member_per_group(tmp_path):
    publisher = open_publisher(None, tmp_path)
    publisher.publish(topics.FEEDBACK, None, b"only")
    first = open_consumer(None, tmp_path, "ingest", [topics.FEEDBACK])
    second = open_consumer(None, tmp_path, "ingest", [topics.FEEDBACK])
    try:
        assert [r.value for r in first.poll()] == [b"only"]
        assert second.poll(timeout=0.1) == []  # the group's log is taken
        first.close()
        assert [r.value for r in second.poll()] == [b"only"]  # never committed: read again
    finally:
        second.close()
        publisher.close()


PUBLISHER_PROCESS = textwrap.dedent("""
    import sys
    from pathlib import Path
    from feedback.bus.factory import open_publisher
    publisher = open_publisher(None, Path(sys.argv[1]))
    for i in range(500):
        publisher.publish("feedloop.completions", b"prompt-%d" % (i % 5), b"event-%04d" % i, {"n": b"%d" % i})
    publisher.close()
""")


def test_two_processes_share_the_log(tmp_path):
    consumer = open_consumer(None, tmp_path, "ingest", [topics.COMPLETIONS])
    try:
        child = subprocess.Popen([sys.executable, "-c", PUBLISHER_PROCESS, str(tmp_path)],
                                 env={**os.environ, "PYTHONPATH": os.getcwd()})
        records = consume(consumer, 500, timeout=20)  # reads while the other process appends
        assert child.wait(timeout=20) == 0
        assert [r.value for r in records] == [b"event-%04d" % i for i in range(500)]
        assert records[-1].headers == {"n": b"499"}
    finally:
        consumer.close()


@pytest.mark.parametrize("url, servers", [("kafka://a:9092", ("a:9092",)),
                                          ("kafka://a:9092,b:9093/", ("a:9092", "b:9093"))])
def test_kafka_url(url, servers):
    assert KafkaConfig.from_url(url).bootstrap_servers == servers


@pytest.mark.parametrize("url", ["kafka://", "postgres://x", "a:9092"])
def test_bad_kafka_url(url):
    with pytest.raises(ValueError):
        KafkaConfig.from_url(url)
