"""What the bus tests share: fast client settings for Tansu, and reading a topic to its end."""
from __future__ import annotations

import time
from pathlib import Path

from feedback.bus.base import EventConsumer, Record
from feedback.bus.factory import open_consumer, open_publisher

# Tight timeouts so outages are noticed in about a second (production keeps the defaults).
FAST_KAFKA = dict(request_timeout_ms=500, delivery_timeout_ms=1000, linger_ms=2, retry_backoff_ms=50)
FAST_OUTBOX = dict(rebuild_after=2, backoff_s=0.05, max_backoff_s=0.3)
# Tansu holds a join for about the session timeout: keep it short.
FAST_CONSUMER = dict(session_timeout_ms=1000, heartbeat_interval_ms=250, max_poll_interval_ms=3000)


def kafka_publisher(url: str, data_dir: Path, client_id: str = "test-gateway"):
    return open_publisher(url, data_dir, client_id, kafka_options=FAST_KAFKA, outbox_options=FAST_OUTBOX)


def kafka_consumer(url: str, data_dir: Path, group_id: str, topics) -> EventConsumer:
    return open_consumer(url, data_dir, group_id, topics, kafka_options=FAST_KAFKA, consumer_options=FAST_CONSUMER)


def consume(consumer: EventConsumer, count: int, timeout: float = 15.0, settle: float = 0.0) -> list[Record]:
    """Poll until `count` records arrived (then, if `settle`, keep polling that long for extras)."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        records += consumer.poll(max_records=1000, timeout=0.2)
    end = time.monotonic() + settle
    while time.monotonic() < end:
        records += consumer.poll(max_records=1000, timeout=0.1)
    return records


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def by_key(records: list[Record]) -> dict[bytes | None, list[bytes]]:
    """Values per key, in the order consumed (Kafka orders within a partition, hence within a key)."""
    out: dict[bytes | None, list[bytes]] = {}
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        out.setdefault(r.key, []).append(r.value)
    return out
