"""`feedloop bench ingest`: feedback events per second from the HTTP API through Kafka into
Postgres, end to end, with the count verified — and what recording costs a generate request.

Three processes, as deployed: `feedloop serve --kafka … --database-url …` (the gateway, on the
bundled model), `feedloop ingest` (the consumer group), and this one (the load). A Tansu broker and
a fresh Postgres database are started/created for the run and removed afterwards. The clock starts
at the first POST /v1/feedback and stops when the store holds every acknowledged event.

    feedloop bench ingest [--events 20000] [--batch 10] [--clients 8]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from feedback.bus.tansu import TansuBroker
from feedback.store import FeedbackStore

POSTGRES = os.environ.get("FEEDLOOP_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _feedloop(*args: str, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited during start-up (see its log)")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the gateway did not become healthy")


async def _load(url: str, completion_ids: list[str], events: int, batch: int, clients: int) -> tuple[int, float]:
    """POST `events` ratings in lists of `batch` from `clients` concurrent clients; returns the count
    acknowledged and the time to send them."""
    per_client = events // (batch * clients)
    acked = 0

    async def client(c: int) -> None:
        nonlocal acked
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for i in range(per_client):
                body = [{"type": "rating", "completion_id": completion_ids[(c + i + j) % len(completion_ids)],
                         "score": 1 if (i + j) % 2 else -1, "event_id": str(uuid.uuid4())} for j in range(batch)]
                r = await http.post("/v1/feedback", json=body)
                r.raise_for_status()
                acked += r.json()["accepted"]

    start = time.perf_counter()
    await asyncio.gather(*[client(c) for c in range(clients)])
    return acked, time.perf_counter() - start


def _generate_latency(url: str, n: int) -> list[float]:
    """Wall time of short non-streaming generations (p50/p99 reported; recording is on)."""
    out = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n):
            start = time.perf_counter()
            http.post("/generate", json={"inputs": f"Count to {i}", "parameters": {"max_new_tokens": 1}}).raise_for_status()
            out.append(time.perf_counter() - start)
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] == "ingest":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="feedloop bench ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=10, help="events per POST /v1/feedback")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--completions", type=int, default=20, help="answers served first (the ratings target them)")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    import psycopg

    db = f"feedloop_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    database_url = POSTGRES.rsplit("/", 1)[0] + "/" + db
    work = Path(tempfile.mkdtemp(prefix="feedloop-bench-"))
    data_dir = Path(os.environ.get("FEEDLOOP_DATA_DIR") or work / "data")
    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(data_dir)}
    procs: list[subprocess.Popen] = []
    log = open(work / "processes.log", "w")
    try:
        with TansuBroker() as broker:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            procs.append(_feedloop("serve", "--kafka", broker.bootstrap, "--database-url", database_url,
                                   "--port", str(port), "--no-grpc", env=env, log=log))
            _wait_healthy(url, procs[0])
            procs.append(_feedloop("ingest", "--kafka", broker.bootstrap, "--database-url", database_url,
                                   "--session-timeout-ms", "1000", env=env, log=log))
            with httpx.Client(base_url=url, timeout=60) as http:
                ids = [http.post("/generate", json={"inputs": f"Rate me {i}", "parameters": {"max_new_tokens": 2}})
                       .headers["x-completion-id"] for i in range(args.completions)]
            latency = _generate_latency(url, 50)
            store = FeedbackStore(database_url)
            start = time.perf_counter()
            acked, send_s = asyncio.run(_load(url, ids, args.events, args.batch, args.clients))
            deadline = time.monotonic() + 300
            while store.counts()["ratings"] < acked and time.monotonic() < deadline:
                time.sleep(0.05)
            end_to_end = time.perf_counter() - start
            stored = store.counts()["ratings"]
            store.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    ok = stored == acked
    rate = stored / end_to_end
    print(f"{acked} acknowledged, {stored} stored ({'all' if ok else 'MISMATCH'}); "
          f"{rate:.0f} events/s end to end; API {acked / send_s:.0f} events/s")
    section = "\n".join([
        f"### `feedloop bench ingest` — {datetime.date.today().isoformat()}, CPU ({platform.machine()}, "
        f"{os.cpu_count()} cores)",
        "",
        f"Command: `feedloop bench ingest {' '.join(argv)}`".rstrip() + "  ",
        f"Gateway (`feedloop serve --kafka`, bundled model), `feedloop ingest`, a Tansu broker, Postgres and the "
        f"load ({args.clients} clients, {args.batch} ratings per POST /v1/feedback) on the same 2 cores.",
        "",
        "| events acknowledged | stored (exactly once) | end to end events/s | API accepts events/s | "
        "generate p50 / p99 with recording (ms) |",
        "|---:|---:|---:|---:|---:|",
        f"| {acked} | {stored} | {rate:.0f} | {acked / send_s:.0f} | "
        f"{latency[len(latency) // 2] * 1000:.1f} / {latency[int(len(latency) * 0.99) - 1] * 1000:.1f} |",
        "",
        "End to end: from the first POST until the store holds every acknowledged event. The cost recording "
        "adds to a request is measured apart, with the engine taken out (`python -m bench.recording`).",
        "",
    ])
    if not args.no_write:
        from bench.serve import write_section

        write_section(section, Path(args.out), "bench ingest", "## Feedback")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
