"""Interfaces of the bus. Implementations: Kafka (feedback/bus/kafka.py) and the local log
(feedback/bus/local_log.py), chosen by URL (`kafka://host:port[,host:port]` or `local`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    """One event as consumed: where it sits on the bus and its bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)


class EventPublisher(ABC):
    """Publishes events in order per key. Implementations are thread-safe.

    `publish` returns once the event is durable on this machine (the outbox or the local log): it
    never waits for the broker, so a broker outage does not fail or slow requests. Delivery to the
    broker happens in the background, in order, and survives a restart of the process.
    """

    @abstractmethod
    def publish(self, topic: str, key: bytes | None, value: bytes, headers: dict[str, bytes] | None = None) -> None:
        """Make the event durable locally and queue it for delivery."""

    @abstractmethod
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything published so far is delivered (acked by the broker). True if it was."""

    @abstractmethod
    def pending(self) -> int:
        """Events published but not yet delivered (the outbox depth)."""

    @abstractmethod
    def close(self) -> None:
        """Stop background delivery; undelivered events stay in the outbox for the next start."""


class EventConsumer(ABC):
    """A member of a consumer group. Offsets are committed only when `commit` is called, so the
    ingestor commits after its database transaction (at-least-once delivery + idempotent writes =
    each event stored exactly once)."""

    @abstractmethod
    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """The next records of the assigned partitions (possibly none)."""

    @abstractmethod
    def commit(self) -> None:
        """Commit the offsets of every record returned by `poll` so far."""

    @abstractmethod
    def close(self) -> None: ...
