"""The ingestor (`feedloop ingest`): a consumer group that writes bus events into the store.

Exactly once, end to end: the bus delivers at least once (offsets are committed only after the
database transaction commits), and the store writes idempotently on event_id (a redelivered event
is skipped). Events that cannot be decoded or fail validation go to the dead-letter table (and the
dead-letter topic, when a publisher is given) with the reason; they never block the partition.
While the database is down the ingestor retries the same batch with backoff and does not commit.

Feedback can overtake its completion: they travel on different topics (and partitions, possibly
consumed by different members of the group). Feedback the store rejects as `unknown_completion`
is parked and retried with each later batch for up to `park_timeout` seconds before it is
dead-lettered; offsets are not committed while anything is parked, so a crash redelivers it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from feedback import topics
from feedback.bus.base import EventConsumer, EventPublisher, Record
from feedback.store.store import DeadLetterRecord
from protos.feedloop.v1 import events_pb2

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    batches: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    db_retries: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.time)


def decode(record: Record):
    """The event a record carries, by topic. Raises ValueError for anything undecodable."""
    try:
        if record.topic == topics.COMPLETIONS:
            event = events_pb2.CompletionServed.FromString(record.value)
            if not event.completion_id:
                raise ValueError("CompletionServed without completion_id")
        elif record.topic == topics.FEEDBACK:
            event = events_pb2.FeedbackEvent.FromString(record.value)
            if event.WhichOneof("event") is None:
                raise ValueError("FeedbackEvent without an event")
        else:
            raise ValueError(f"unexpected topic {record.topic!r}")
    except DecodeError as exc:
        raise ValueError(f"undecodable {record.topic} event: {exc}") from exc
    return event


class Ingestor:
    """Poll → decode → one database transaction → dead letters → commit offsets. One thread."""

    def __init__(self, consumer: EventConsumer, store, *, dead_letters: EventPublisher | None = None,
                 max_records: int = 500, poll_timeout: float = 0.5, max_backoff: float = 10.0,
                 park_timeout: float = 30.0) -> None:
        self.consumer = consumer
        self.store = store
        self.dead_letters = dead_letters
        self.max_records, self.poll_timeout, self.max_backoff = max_records, poll_timeout, max_backoff
        self.park_timeout = park_timeout
        self.park_retry_interval = min(0.5, park_timeout / 4)
        self.stats = IngestStats()
        self._parked: list[tuple[Record, object, float]] = []  # (record, event, parked since)
        self._uncommitted = False
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self, until_idle: float | None = None) -> IngestStats:
        """Ingest until stop() (or, with `until_idle`, until nothing arrived for that many seconds)."""
        idle_since = last_retry = time.monotonic()
        while not self._stop.is_set():
            records = self.consumer.poll(max_records=self.max_records, timeout=self.poll_timeout)
            now = time.monotonic()
            if not records:
                if until_idle is not None and now - idle_since > until_idle:
                    break
                if not self._parked or now - last_retry < self.park_retry_interval:
                    continue
            else:
                idle_since = now
                self._uncommitted = True
            last_retry = now
            if not self._write_with_retry(records):
                break  # stopped while the database was down: nothing committed, redelivered later
            if self._uncommitted and not self._parked:
                self.consumer.commit()
                self._uncommitted = False
            self.stats.batches += 1
        return self.stats

    @property
    def parked(self) -> int:
        return len(self._parked)

    def _write_with_retry(self, records: list[Record]) -> bool:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._write(records)
                return True
            except Exception as exc:  # database unreachable, deadlock, …: same batch again
                self.stats.db_retries += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("store write failed; retrying", extra={"fl_error": self.stats.last_error,
                                                                   "fl_backoff_s": backoff})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        return False

    def _write(self, records: list[Record]) -> None:
        now = time.monotonic()
        # Parked events first: retried in the same transaction as the new batch.
        events = [event for _, event, _ in self._parked]
        source = {id(event): (record, since) for record, event, since in self._parked}
        undecodable = []
        for record in records:
            try:
                event = decode(record)
            except ValueError as exc:
                undecodable.append((record, str(exc)))
                continue
            events.append(event)
            source[id(event)] = (record, now)
        result = self.store.write_events(events) if events else None
        parked, dead = [], list(undecodable)
        for event, reason in (result.rejected if result else []):
            record, since = source[id(event)]
            if reason.startswith("unknown_completion") and now - since < self.park_timeout:
                parked.append((record, event, since))
            else:
                dead.append((record, reason))
        self._parked = parked
        if dead:
            self.store.write_dead_letters([DeadLetterRecord(raw=r.value, reason=reason, topic=r.topic,
                                                            partition=r.partition, offset=r.offset, key=r.key)
                                           for r, reason in dead])
            if self.dead_letters is not None:
                for r, reason in dead:
                    self.dead_letters.publish(topics.DEAD_LETTERS, r.key, r.value,
                                              {"reason": reason.encode(), "source_topic": r.topic.encode()})
        if result:
            self.stats.inserted += result.inserted
            self.stats.duplicates += result.duplicates
        self.stats.dead_lettered += len(dead)


def serve_metrics(ingestor: Ingestor, host: str, port: int) -> None:
    """Prometheus metrics of an ingestor on host:port (a daemon thread)."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    for name, doc in (("inserted", "Events written to the store"), ("duplicates", "Redelivered events skipped"),
                      ("dead_lettered", "Events dead-lettered"), ("db_retries", "Store write retries"),
                      ("batches", "Batches committed")):
        Gauge(f"feedloop_ingest_{name}", doc, registry=registry).set_function(
            lambda name=name: getattr(ingestor.stats, name))
    Gauge("feedloop_ingest_parked", "Feedback waiting for its completion", registry=registry).set_function(
        lambda: ingestor.parked)
    start_http_server(port, addr=host, registry=registry)
