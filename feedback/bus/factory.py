"""Choosing the bus by URL: None or "local" → the embedded local log; "kafka://h:p[,h:p]" → Kafka.

    data_dir/bus/log.db                 the local log (shared by every process on the machine)
    data_dir/outbox/<client_id>.db      a Kafka publisher's outbox (one per publishing process)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from feedback.bus.base import EventConsumer, EventPublisher


def is_local(url: str | None) -> bool:
    return url is None or url in ("", "local", "local://")


def outbox_path(data_dir: Path, client_id: str) -> Path:
    return Path(data_dir) / "outbox" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', client_id)}.db"


def open_publisher(url: str | None, data_dir: Path, client_id: str = "feedloop-gateway", *,
                   synchronous: str = "NORMAL", kafka_options: dict | None = None,
                   outbox_options: dict | None = None) -> EventPublisher:
    """The publisher for `url`. A Kafka publisher's outbox is keyed by `client_id`: give each
    publishing process its own (two processes cannot share one outbox; the second is refused).

    kafka_options: KafkaConfig fields (partitions, request_timeout_ms, ...);
    outbox_options: OutboxPublisher options (batch_size, rebuild_after, backoff_s, max_backoff_s)."""
    if is_local(url):
        from feedback.bus.local_log import LocalLogPublisher

        return LocalLogPublisher(data_dir, synchronous=synchronous)
    from feedback.bus.kafka import KafkaConfig, KafkaEventPublisher

    config = KafkaConfig.from_url(url, client_id=client_id, **(kafka_options or {}))
    return KafkaEventPublisher(config, outbox_path(data_dir, client_id), synchronous=synchronous,
                               **(outbox_options or {}))


def open_consumer(url: str | None, data_dir: Path, group_id: str, topics: Sequence[str], *,
                  client_id: str = "feedloop-ingest", kafka_options: dict | None = None,
                  consumer_options: dict | None = None) -> EventConsumer:
    """A member of consumer group `group_id` reading `topics`.

    consumer_options (Kafka only): session_timeout_ms, heartbeat_interval_ms, max_poll_interval_ms, ..."""
    if is_local(url):
        from feedback.bus.local_log import LocalLogConsumer

        return LocalLogConsumer(data_dir, group_id, topics)
    from feedback.bus.kafka import KafkaConfig, KafkaEventConsumer

    config = KafkaConfig.from_url(url, client_id=client_id, **(kafka_options or {}))
    return KafkaEventConsumer(config, group_id, topics, **(consumer_options or {}))
