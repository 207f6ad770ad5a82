"""A durable local outbox in front of a broker: `publish` costs a local append, never a broker call.

    publish() ──INSERT──► outbox.db (SQLite, WAL) ──delivery thread──► Sender (Kafka producer)
                                  ▲                                         │ acks
                                  └──────────── DELETE delivered rows ◄─────┘

* **Durability.** `publish` returns after the row is committed to the outbox file (see
  `sqlite_wal` for why NORMAL synchronous is the default). Rows are deleted only after the broker
  acknowledged them, so a process that dies with undelivered events delivers them at its next start.
* **Order.** Rows are delivered in the order they were published (`seq`). A round sends a batch and
  waits for every ack; a failed row and every later row *of the same topic and key* stay in the
  outbox and go again next round, so a key's events never overtake each other.
* **At least once.** A send that timed out may still have reached the broker (a paused broker
  processes the requests queued in its socket when it resumes), and the retry then writes a second
  copy. Every event carries an `event_id`; the ingestor stores each id once.
* **Stuck producers.** After a SIGSTOP/SIGCONT pause of Tansu, a kafka-python producer kept timing out
  for minutes while a fresh one was acked at once; real brokers pause too (GC, network partitions).
  After `rebuild_after` consecutive failed rounds the sender is closed and built afresh.
* **One owner.** Two processes draining one outbox would deliver everything twice, so the file is
  held with an exclusive `flock` while open (the kernel drops it when the process dies).
"""
from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from feedback.bus import sqlite_wal
from feedback.bus.base import EventPublisher

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers TEXT NOT NULL DEFAULT '{}'
)
"""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


class Sender(Protocol):
    """Delivers a batch to the broker. Built by the outbox's `connect` callable, rebuilt when stuck."""

    def send(self, rows: Sequence[OutboxRow]) -> list[BaseException | None]:
        """Send `rows` in order and wait for the broker: per row None (acked) or the error."""

    def close(self) -> None: ...


@dataclass
class OutboxStats:
    """Counters for metrics (monotonic since the publisher opened, except `pending`)."""

    published: int = 0
    delivered: int = 0
    failed_rounds: int = 0  # delivery rounds with at least one row not acked (each one is retried)
    producer_rebuilds: int = 0
    connect_failures: int = 0
    pending: int = 0


class OutboxPublisher(EventPublisher):
    """`EventPublisher` that appends to `path` and delivers through the `Sender` that `connect` builds.

    Args:
        path: the outbox file (created with its directory).
        connect: builds a Sender (connects, creates topics); may raise while the broker is down.
        synchronous: SQLite synchronous level for appends: "NORMAL" (survives process crashes) or
            "FULL" (also survives machine crashes; one fsync per publish).
        batch_size: rows per delivery round.
        rebuild_after: consecutive failed rounds after which the sender is rebuilt.
        backoff_s, max_backoff_s: retry delay after a failed round, doubling up to the maximum.
        linger_s: how long a round waits for more events when the batch is not full.
    """

    def __init__(self, path: Path, connect: Callable[[], Sender], *, synchronous: str = "NORMAL",
                 batch_size: int = 500, rebuild_after: int = 2, backoff_s: float = 0.05,
                 max_backoff_s: float = 2.0, linger_s: float = 0.01):
        self.path = Path(path)
        self._connect = connect
        self._batch_size = batch_size
        self._rebuild_after = max(1, rebuild_after)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._linger_s = linger_s

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"outbox {self.path} is in use by another process") from None

        self._write_lock = threading.Lock()  # the append connection, shared by request threads
        self._db = sqlite_wal.connect(self.path, synchronous)
        self._db.execute(_SCHEMA)
        self._reader = sqlite_wal.connect(self.path, synchronous)  # the delivery thread's own
        self._checkpointer = sqlite_wal.Checkpointer(self.path)

        self._state = threading.Condition()  # guards stats and wakes `flush`
        self._stats = OutboxStats(pending=self._reader.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._oldest_pending = self._min_seq()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._wakeup.set()  # deliver what a previous run left behind
        self._thread = threading.Thread(target=self._deliver_forever, name=f"outbox:{self.path.name}", daemon=True)
        self._thread.start()

    # -- the request path ------------------------------------------------------------------------

    def publish(self, topic: str, key: bytes | None, value: bytes, headers: dict[str, bytes] | None = None) -> None:
        encoded = json.dumps({k: v.hex() for k, v in (headers or {}).items()})
        with self._write_lock:
            seq = self._db.execute("INSERT INTO outbox (topic, key, value, headers) VALUES (?, ?, ?, ?)",
                                   (topic, key, value, encoded)).lastrowid
        with self._state:
            self._stats.published += 1
            self._stats.pending += 1
            if self._oldest_pending is None or seq < self._oldest_pending:
                self._oldest_pending = seq
        self._wakeup.set()

    def pending(self) -> int:
        with self._state:
            return self._stats.pending

    def stats(self) -> OutboxStats:
        with self._state:
            return OutboxStats(**vars(self._stats))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row published before this call is acked (True) or `timeout` passes."""
        with self._write_lock:
            target = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while self._oldest_pending is not None and self._oldest_pending <= target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._state.wait(remaining)
        return True

    def close(self) -> None:
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout=30)
        self._checkpointer.close()
        with self._write_lock:
            self._db.close()
        self._reader.close()
        self._lock_file.close()  # releases the flock

    # -- the delivery thread ---------------------------------------------------------------------

    def _deliver_forever(self) -> None:
        sender: Sender | None = None
        failures = 0  # consecutive failed rounds
        try:
            while not self._stop.is_set():
                self._wakeup.clear()  # before reading, so a publish during the read is not missed
                rows = self._read_batch()
                if not rows:
                    self._wakeup.wait(0.5)
                    continue
                if len(rows) < self._batch_size and self._linger_s > 0:
                    # Gather a few more: one round per event would mean a delete transaction and a
                    # broker round trip per request, contending with publishers for the file and GIL.
                    self._stop.wait(self._linger_s)
                    rows = self._read_batch()
                if sender is None:
                    try:
                        sender = self._connect()
                    except Exception as exc:  # broker down: keep the rows, try again later
                        failures += 1
                        with self._state:
                            self._stats.connect_failures += 1
                        log.warning("outbox: cannot connect (%s); %d events pending", exc, self.pending())
                        self._stop.wait(self._delay(failures))
                        continue
                results = sender.send(rows)
                acked = _deliverable(rows, results)
                self._delete(acked)
                if len(acked) == len(rows):
                    failures = 0
                    continue
                failures += 1
                first_error = next(e for e in results if e is not None)
                with self._state:
                    self._stats.failed_rounds += 1
                log.warning("outbox: %d of %d events not acked (%r); retrying", len(rows) - len(acked),
                            len(rows), first_error)
                if failures % self._rebuild_after == 0:
                    _close_quietly(sender)
                    sender = None
                    with self._state:
                        self._stats.producer_rebuilds += 1
                self._stop.wait(self._delay(failures))
        finally:
            if sender is not None:
                _close_quietly(sender)

    def _delay(self, failures: int) -> float:
        return min(self._max_backoff_s, self._backoff_s * 2 ** (failures - 1))

    def _read_batch(self) -> list[OutboxRow]:
        cur = self._reader.execute("SELECT seq, topic, key, value, headers FROM outbox ORDER BY seq LIMIT ?",
                                   (self._batch_size,))
        return [OutboxRow(seq, topic, key, value, {k: bytes.fromhex(v) for k, v in json.loads(headers).items()})
                for seq, topic, key, value, headers in cur]

    def _delete(self, seqs: list[int]) -> None:
        if seqs and seqs[-1] - seqs[0] + 1 == len(seqs):  # the usual case: one contiguous run
            self._reader.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (seqs[0], seqs[-1]))
        elif seqs:
            self._reader.execute("BEGIN IMMEDIATE")
            self._reader.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
            self._reader.execute("COMMIT")
        with self._state:  # held across the query: a concurrent publish then updates after us
            self._oldest_pending = self._min_seq()
            self._stats.delivered += len(seqs)
            self._stats.pending -= len(seqs)
            self._state.notify_all()

    def _min_seq(self) -> int | None:
        return self._reader.execute("SELECT MIN(seq) FROM outbox").fetchone()[0]


def _deliverable(rows: Sequence[OutboxRow], results: Sequence[BaseException | None]) -> list[int]:
    """The seqs that may leave the outbox: acked, and no earlier row of the same topic+key failed
    (that one is re-sent first next round, and this one after it, so the key's order holds)."""
    blocked: set[tuple[str, bytes | None]] = set()
    acked = []
    for row, error in zip(rows, results):
        stream = (row.topic, row.key)
        if error is None and stream not in blocked:
            acked.append(row.seq)
        else:
            blocked.add(stream)
    return acked


def _close_quietly(sender: Sender) -> None:
    try:
        sender.close()
    except Exception:  # a stuck producer may fail to close cleanly; it is being replaced anyway
        log.debug("outbox: closing the old sender failed", exc_info=True)

