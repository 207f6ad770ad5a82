"""The Kafka bus (kafka-python): a publisher behind the durable outbox, and a consumer-group member.

Producer settings and why:
  * acks="all" + enable_idempotence: an event is acked once every in-sync replica has it, and the
    producer's own retries never write it twice (the broker deduplicates by producer id + sequence);
  * up to 5 requests in flight (the most idempotence keeps in order), `linger_ms` for batching;
  * the default partitioner hashes the key, so one key (a prompt) always lands on one partition and
    its events stay ordered.
Topics are created idempotently whenever a producer or consumer connects: a restarted Tansu (memory
storage) comes back empty, and a real cluster may simply not have them yet.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError, RetriableError, TopicAlreadyExistsError

from feedback import topics as bus_topics
from feedback.bus.base import EventConsumer, Record
from feedback.bus.outbox import OutboxPublisher, OutboxRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaConfig:
    """Where the brokers are and how the clients talk to them (times in milliseconds)."""

    bootstrap_servers: tuple[str, ...]
    client_id: str = "feedloop"
    topics: tuple[str, ...] = bus_topics.ALL  # created on connect
    partitions: int = 4
    replication_factor: int = 1  # 3 on a real cluster (Strimzi); Tansu has one broker
    linger_ms: int = 5
    request_timeout_ms: int = 5_000
    delivery_timeout_ms: int = 15_000  # a batch not acked by then fails (the outbox retries it)
    retry_backoff_ms: int = 100
    extra_producer: dict = field(default_factory=dict)

    @classmethod
    def from_url(cls, url: str, **overrides) -> "KafkaConfig":
        """`kafka://host:port[,host:port...]`."""
        if not url.startswith("kafka://"):
            raise ValueError(f"not a kafka URL: {url!r}")
        servers = tuple(s.strip() for s in url[len("kafka://"):].rstrip("/").split(",") if s.strip())
        if not servers:
            raise ValueError(f"no brokers in {url!r}")
        return cls(bootstrap_servers=servers, **overrides)


def ensure_topics(config: KafkaConfig) -> None:
    """Create the configured topics; ones that exist already are left as they are."""
    admin = KafkaAdminClient(bootstrap_servers=list(config.bootstrap_servers), client_id=f"{config.client_id}-admin",
                             request_timeout_ms=config.request_timeout_ms,
                             bootstrap_timeout_ms=config.request_timeout_ms)
    try:
        for topic in config.topics:  # one by one: an "already exists" must not hide the others
            try:
                admin.create_topics([NewTopic(topic, config.partitions, config.replication_factor)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class KafkaSender:
    """One KafkaProducer; the outbox's `Sender`. Connects (and creates the topics) when built."""

    def __init__(self, config: KafkaConfig):
        self._config = config
        ensure_topics(config)
        self._producer = KafkaProducer(
            bootstrap_servers=list(config.bootstrap_servers), client_id=config.client_id,
            acks="all", enable_idempotence=True, max_in_flight_requests_per_connection=5,
            linger_ms=config.linger_ms, request_timeout_ms=config.request_timeout_ms,
            delivery_timeout_ms=max(config.delivery_timeout_ms, config.request_timeout_ms + config.linger_ms),
            # send() waits this long for metadata (e.g. a topic the restarted broker lost): bounded,
            # so a round fails and the outbox retries instead of the thread hanging
            max_block_ms=config.request_timeout_ms,
            retry_backoff_ms=config.retry_backoff_ms,
            bootstrap_timeout_ms=config.request_timeout_ms,
            **config.extra_producer,
        )

    def send(self, rows: Sequence[OutboxRow]) -> list[BaseException | None]:
        futures: list = []
        for row in rows:
            try:
                futures.append(self._producer.send(row.topic, key=row.key, value=row.value,
                                                   headers=list(row.headers.items()) or None))
            except Exception as exc:  # could not even queue it: it and everything after it fail
                futures.extend([exc] * (len(rows) - len(futures)))
                break
        # Every batch completes (acked or expired) within delivery_timeout_ms of being queued.
        deadline = time.monotonic() + self._config.delivery_timeout_ms / 1000 + 1.0
        try:
            self._producer.flush(timeout=max(0.0, deadline - time.monotonic()))
        except KafkaError:
            pass  # the unfinished futures are reported below
        return [f if isinstance(f, BaseException)
                else (f.exception if f.is_done else TimeoutError("no ack before the delivery timeout"))
                for f in futures]

    def close(self) -> None:
        try:
            self._producer.close(timeout=1)
        except KafkaError:
            # kafka-python 3.0: close() flushes first and raises if a stuck producer cannot, before it
            # reaches its own force-close; do that step ourselves so its thread and sockets go away.
            sender = getattr(self._producer, "_sender", None)
            if sender is not None and sender.is_alive():
                sender.force_close()
            self._producer._closed = True


class KafkaEventPublisher(OutboxPublisher):
    """Publishes to Kafka through the outbox at `outbox_path` (see feedback/bus/outbox.py)."""

    def __init__(self, config: KafkaConfig, outbox_path: Path, **outbox_options):
        self.config = config
        super().__init__(outbox_path, lambda: KafkaSender(config), **outbox_options)


class KafkaEventConsumer(EventConsumer):
    """A consumer-group member with explicit commits.

    Connects lazily: while the brokers are unreachable, `poll` waits its timeout and returns nothing,
    so the ingestor's loop needs no special case for a broker that is not up yet.

    Args:
        session_timeout_ms: on Tansu this also sets how long a join waits for the group to settle
            (measured with kafka-python 3.0.12: ~1 s at 1000, ~2 s at 3000, over 20 s at the default),
            so tests use ~1000; real clusters want the headroom of the default (10 s).
        max_poll_interval_ms: the most time between polls before the member is dropped from the group
            (also the rebalance timeout a join announces).
    """

    def __init__(self, config: KafkaConfig, group_id: str, topics: Sequence[str], *,
                 session_timeout_ms: int = 10_000, heartbeat_interval_ms: int | None = None,
                 max_poll_interval_ms: int = 30_000, fetch_max_wait_ms: int = 100, extra: dict | None = None):
        self._config = replace(config, topics=tuple(dict.fromkeys([*config.topics, *topics])))
        self._group_id = group_id
        self._topics = list(topics)
        self._options = dict(
            group_id=group_id, client_id=config.client_id, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms or max(100, session_timeout_ms // 3),
            max_poll_interval_ms=max_poll_interval_ms, fetch_max_wait_ms=fetch_max_wait_ms,
            request_timeout_ms=max(config.request_timeout_ms, session_timeout_ms + 1000),
            bootstrap_timeout_ms=config.request_timeout_ms, **(extra or {}),
        )
        self._consumer: KafkaConsumer | None = None
        self._uncommitted: dict[TopicPartition, OffsetAndMetadata] = {}

    def _connect(self) -> KafkaConsumer:
        ensure_topics(self._config)
        consumer = KafkaConsumer(bootstrap_servers=list(self._config.bootstrap_servers), **self._options)
        consumer.subscribe(self._topics, listener=_ForgetRevoked(self._uncommitted))
        return consumer

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        if self._consumer is None:
            started = time.monotonic()
            try:
                self._consumer = self._connect()
            except RetriableError as exc:  # a configuration error, say, is raised
                log.warning("consumer %s: brokers unreachable (%s)", self._group_id, exc)
                time.sleep(max(0.0, timeout - (time.monotonic() - started)))
                return []
        batches = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        records = []
        for tp, messages in batches.items():
            for m in messages:
                records.append(Record(m.topic, m.partition, m.offset, m.key, m.value, dict(m.headers or ())))
            if messages:
                self._uncommitted[tp] = OffsetAndMetadata(messages[-1].offset + 1, "", -1)
        return records

    def commit(self) -> None:
        """Commit what `poll` returned. Raises KafkaError if the broker cannot take it (try again);
        offsets of partitions that moved to another member in a rebalance are dropped (that member
        re-reads those records: at least once, and the ingestor's writes are idempotent)."""
        if self._consumer is None or not self._uncommitted:
            return
        offsets = dict(self._uncommitted)
        try:
            self._consumer.commit(offsets=offsets)
        except CommitFailedError as exc:
            log.warning("consumer %s: commit refused after a rebalance (%s); records will be re-read",
                        self._group_id, exc)
        for tp, offset in offsets.items():
            if self._uncommitted.get(tp) == offset:
                del self._uncommitted[tp]

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment()) if self._consumer else set()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None


class _ForgetRevoked(ConsumerRebalanceListener):
    """Offsets of records from a partition we no longer own cannot be committed by us."""

    def __init__(self, uncommitted: dict):
        self._uncommitted = uncommitted

    def on_partitions_revoked(self, revoked):
        for tp in revoked:
            self._uncommitted.pop(tp, None)

    def on_partitions_assigned(self, assigned):
        pass
