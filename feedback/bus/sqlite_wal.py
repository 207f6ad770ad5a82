"""SQLite files in WAL mode, as the outbox and the local log use them.

Why SQLite in WAL mode: an append is one small INSERT whose commit appends a frame to the WAL (no
rewrite of the database file), several processes can share the file (the gateway appends, the
ingestor reads), and a crashed writer leaves nothing half-written.

Why `synchronous=NORMAL` by default: in WAL mode a NORMAL commit is durable against a crash of the
*process* (SIGKILL, OOM kill, an exception) because the frame is in the OS page cache the moment the
commit returns; only a crash of the whole *machine* (power, kernel) can lose the last commits. FULL
adds an fsync of the WAL to every commit, which costs a disk flush per event (see
`python -m feedback.bus.bench` for the numbers on this machine) — use it where the host itself is
the failure to survive and there is no replicated broker behind the outbox.

Why checkpoints run on a thread of their own: SQLite's automatic checkpoint runs inside whichever
commit crosses the WAL threshold, and a checkpoint fsyncs the database file — a multi-millisecond
stall landing on one unlucky request. Appending connections turn it off (`wal_autocheckpoint=0`) and
`Checkpointer` copies the WAL back in the background (PASSIVE: it never blocks writers).
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def connect(path: Path, synchronous: str = "NORMAL", autocheckpoint: bool = False,
            busy_timeout_ms: int = 10_000) -> sqlite3.Connection:
    """A connection in autocommit mode (each statement its own transaction unless BEGIN is used).

    The connection may be used from several threads, one at a time (callers hold a lock)."""
    if synchronous.upper() not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=busy_timeout_ms / 1000)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute(f"PRAGMA wal_autocheckpoint={1000 if autocheckpoint else 0}")
    return conn


class Checkpointer:
    """Copies the WAL back into the database file every `interval` seconds, off the request path."""

    def __init__(self, path: Path, interval: float = 1.0):
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"wal-checkpoint:{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = connect(self._path)
        try:
            while not self._stop.wait(self._interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.OperationalError:
                    pass  # busy: the next round will do it
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
