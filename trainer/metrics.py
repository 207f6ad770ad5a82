"""Training metrics: one JSON line per logged step in `output_dir/metrics.jsonl`, and a progress bar.

A resumed run first drops the lines past the step it resumes from (they were logged after the last
saved state and will be logged again), so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL of step metrics (step, epoch, loss, lr, grad_norm, tokens_per_s, …)."""

    def __init__(self, output_dir: Path, resume_step: int = 0):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        # A fresh run starts an empty file; a resumed one keeps the lines up to its step.
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, stage: str) -> tqdm:
    """Optimizer steps on stderr (the loss and lr go in the postfix)."""
    return tqdm(total=total, initial=initial, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True)


class Throughput:
    """Tokens per second between two log points (wall clock, so it includes data and logging)."""

    def __init__(self):
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return rate


class PhaseTimer:
    """Wall seconds spent in each named phase of a step, reported as `<phase>_s` metrics.

    On CUDA the device is synchronised at each phase boundary, so a phase is charged for its own
    kernels rather than for whatever the next phase waits on (a few syncs per step: negligible next to
    a training step's work).
    """

    def __init__(self, device: torch.device | str | None = None):
        self.sync = torch.device(device).type == "cuda" if device is not None else False
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """{`<phase>_s`: seconds} since the last take (phases in the order first timed), then reset."""
        out = {f"{name}_s": round(seconds, 4) for name, seconds in self.seconds.items()}
        self.seconds = {}
        return out
