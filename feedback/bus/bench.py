"""What `publish` costs a request: `python -m feedback.bus.bench [--url kafka://h:p] [--rate 2000]`.

Publishes `--events` events of `--size` bytes at a steady `--rate` per second (as requests would,
not in one burst) from the calling thread and reports the latency of each `publish` call (p50, p99,
max), then how long delivery took. With `--url kafka://…` the events go through the outbox to the
broker (the delivery thread runs concurrently, as in the gateway); without, into the local log.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from feedback import topics
from feedback.bus.factory import open_publisher


def bench_publish(url: str | None, data_dir: Path, events: int = 5000, size: int = 400, rate: float = 2000.0,
                  synchronous: str = "NORMAL") -> dict:
    publisher = open_publisher(url, data_dir, "bench", synchronous=synchronous)
    value = b"x" * size
    latencies = []
    interval = 1.0 / rate if rate > 0 else 0.0
    start = time.perf_counter()
    try:
        for i in range(events):
            due = start + i * interval
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.0005, due - now))
            t0 = time.perf_counter()
            publisher.publish(topics.COMPLETIONS, b"prompt-%d" % (i % 97), value, {"event_id": b"%d" % i})
            latencies.append(time.perf_counter() - t0)
        published = time.perf_counter()
        delivered = publisher.flush(timeout=60)
        done = time.perf_counter()
    finally:
        publisher.close()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {"url": url or "local", "synchronous": synchronous, "events": events, "rate": rate,
            "p50_us": q[49] * 1e6, "p99_us": q[98] * 1e6, "max_us": latencies[-1] * 1e6,
            "delivered": delivered, "drain_s": done - published, "total_s": done - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="kafka://host:port (default: the local log)")
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--size", type=int, default=400, help="bytes per event")
    parser.add_argument("--rate", type=float, default=2000.0, help="events/s (0: as fast as possible)")
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_publish(args.url, args.data_dir or Path(tmp), args.events, args.size, args.rate,
                               args.synchronous)
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
