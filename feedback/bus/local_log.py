"""The embedded bus (no Kafka configured): a durable log in one SQLite file, `<data_dir>/bus/log.db`.

    log_<topic>(seq INTEGER PRIMARY KEY AUTOINCREMENT, key, value, headers)   one table per topic
    committed(group_id, topic, next_offset)                                       consumer-group offsets

It works across processes on one machine (`feedloop serve` appends, `feedloop ingest` reads) through
SQLite's own locking. One partition per topic: the log is totally ordered, so per-key order holds.
A group has one active member at a time (Kafka with one partition does the same): a member holds
an exclusive `flock` on `<group>.lock`; another member of the same group gets no records until the
holder closes or dies. A restarted member resumes at the group's committed offset, so records it had
polled but not committed are read again and nothing uncommitted is skipped.
Records are kept (no retention yet): a new group reads every topic from the start.
"""
from __future__ import annotations

import fcntl
import json
import re
import threading
import time
from pathlib import Path
from typing import Sequence

from feedback.bus import sqlite_wal
from feedback.bus.base import EventConsumer, EventPublisher, Record

_COMMITTED = """
CREATE TABLE IF NOT EXISTS committed (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic)
)
"""


def log_path(data_dir: Path) -> Path:
    return Path(data_dir) / "bus" / "log.db"


def _table(topic: str) -> str:
    # Topic names are ours ("feedloop.completions"); map them to safe, distinct identifiers.
    return "log_" + re.sub(r"[^A-Za-z0-9]", lambda m: f"_{ord(m.group()):02x}", topic)


def _create_topic(db, topic: str) -> None:
    db.execute(f'CREATE TABLE IF NOT EXISTS "{_table(topic)}" ('
               "seq INTEGER PRIMARY KEY AUTOINCREMENT, key BLOB, value BLOB NOT NULL, "
               "headers TEXT NOT NULL DEFAULT '{}')")


class LocalLogPublisher(EventPublisher):
    """Appends to the local log. Delivery is the append itself: `pending` is 0, `flush` is immediate."""

    def __init__(self, data_dir: Path, synchronous: str = "NORMAL"):
        self.path = log_path(data_dir)
        self._lock = threading.Lock()
        self._db = sqlite_wal.connect(self.path, synchronous)
        self._db.execute(_COMMITTED)
        self._known: set[str] = set()
        self._checkpointer = sqlite_wal.Checkpointer(self.path)

    def publish(self, topic: str, key: bytes | None, value: bytes, headers: dict[str, bytes] | None = None) -> None:
        encoded = json.dumps({k: v.hex() for k, v in (headers or {}).items()})
        with self._lock:
            if topic not in self._known:
                _create_topic(self._db, topic)
                self._known.add(topic)
            self._db.execute(f'INSERT INTO "{_table(topic)}" (key, value, headers) VALUES (?, ?, ?)',
                             (key, value, encoded))

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        self._checkpointer.close()
        with self._lock:
            self._db.close()


class LocalLogConsumer(EventConsumer):
    """A consumer-group member over the local log (see the module docstring for the group rules)."""

    def __init__(self, data_dir: Path, group_id: str, topics: Sequence[str], poll_interval: float = 0.02):
        self.path = log_path(data_dir)
        self._group_id = group_id
        self._topics = list(topics)
        self._poll_interval = poll_interval
        self._db = sqlite_wal.connect(self.path)
        self._db.execute(_COMMITTED)
        for topic in self._topics:
            _create_topic(self._db, topic)
        safe_group = re.sub(r"[^A-Za-z0-9._-]", "_", group_id)
        self._lock_file = open(self.path.with_name(f"{safe_group}.lock"), "a+")
        self._active = False
        self._position: dict[str, int] = {}  # next offset to read, per topic
        self._returned: dict[str, int] = {}  # next offset after what poll returned (commit target)
        self._next_topic = 0  # round-robin start, so one busy topic cannot starve the others

    def _join(self) -> bool:
        if not self._active:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self._active = True
            committed = dict(self._db.execute("SELECT topic, next_offset FROM committed WHERE group_id = ?",
                                              (self._group_id,)).fetchall())
            self._position = {t: committed.get(t, 1) for t in self._topics}  # seq (the offset) starts at 1
            self._returned = dict(self._position)
        return True

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            if self._join():
                records = self._read(max_records)
                if records:
                    return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(self._poll_interval, remaining))

    def _read(self, max_records: int) -> list[Record]:
        records: list[Record] = []
        n = len(self._topics)
        for i in range(n):
            topic = self._topics[(self._next_topic + i) % n]
            if len(records) >= max_records:
                break
            rows = self._db.execute(f'SELECT seq, key, value, headers FROM "{_table(topic)}" '
                                    "WHERE seq >= ? ORDER BY seq LIMIT ?",
                                    (self._position[topic], max_records - len(records))).fetchall()
            for offset, key, value, headers in rows:
                records.append(Record(topic, 0, offset, key, value,
                                      {k: bytes.fromhex(v) for k, v in json.loads(headers).items()}))
            if rows:
                self._position[topic] = rows[-1][0] + 1
                self._returned[topic] = self._position[topic]
        self._next_topic = (self._next_topic + 1) % max(1, n)
        return records

    def commit(self) -> None:
        if not self._active:
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany(
            "INSERT INTO committed (group_id, topic, next_offset) VALUES (?, ?, ?) "
            "ON CONFLICT (group_id, topic) DO UPDATE SET next_offset = excluded.next_offset",
            [(self._group_id, t, o) for t, o in self._returned.items()])
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
        self._lock_file.close()  # releases the group's flock
        self._active = False
