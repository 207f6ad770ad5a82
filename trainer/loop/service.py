"""`feedloop loop`: watch the store; when enough new feedback has arrived (or on a schedule), run the
stages it calls for, gate the candidate and promote it. One run at a time (a lock file in the runs
directory, and the store's `running` row); a run interrupted by a crash is resumed first."""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from feedback.store.registry import ModelRegistry
from feedback.store.runs import TrainingRuns
from feedback.store.store import FeedbackStore
from feedback.store.tables import TrainingRun
from feedback.store.types import utcnow
from trainer.loop.config import LoopConfig
from trainer.loop.plan import plan_run
from trainer.loop.runner import RunExecutor

log = logging.getLogger("feedloop.loop")


class LoopBusy(RuntimeError):
    """Another `feedloop loop` holds the runs directory."""


class LoopService:
    def __init__(self, store: FeedbackStore, config: LoopConfig, runs_dir: Path, stage_runners: dict | None = None,
                 metrics=None) -> None:
        self.store = store
        self.config = config
        self.runs_dir = Path(runs_dir)
        self.runs = TrainingRuns(store)
        self.registry = ModelRegistry(store)
        self.executor = RunExecutor(store, config, self.runs_dir, stage_runners)
        self.metrics = metrics
        self._stop = threading.Event()
        self._lock_file = None
        self.busy = False  # a run is executing

    # -- one process per runs directory -------------------------------------------------------
    def acquire(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.runs_dir / ".loop.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise LoopBusy(f"another feedloop loop is running on {self.runs_dir}") from None
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- the loop -----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        log.info("loop watching", extra={"fl_runs_dir": str(self.runs_dir), "fl_poll_s": self.config.poll_seconds,
                                         "fl_policy_stage": self.config.policy_stage})
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the store is down, a bug: log, wait, try again (the run row says where it was)
                log.exception("loop tick failed")
            self._stop.wait(self.config.poll_seconds)

    def tick(self) -> TrainingRun | None:
        """Resume an interrupted run, or start one if it is due. Returns the run it worked on."""
        active = self.runs.active()
        if active is not None:
            log.info("resuming interrupted run", extra={"fl_run_id": active.run_id, "fl_stage": active.stage})
            return self._execute(self.runs.update(active.run_id, attempts=active.attempts + 1))
        policy = self.registry.deployment("policy")
        if policy is None:
            log.info("waiting: no policy deployed yet (start the gateway)")
            return None
        last = self.runs.latest()
        now = utcnow()
        counts = self.runs.feedback_since(last.data_until if last else None, until=now)
        trigger = plan_run(counts, self.config, last_run_at=last.created_at if last else None, now=now)
        if trigger is None:
            return None
        reward = self.registry.deployment("reward")
        run = self.runs.create(f"run-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}", plan=list(trigger.stages),
                               trigger=trigger.to_dict(), data_until=now, base_policy_version=policy.serving_version,
                               base_reward_version=reward.serving_version if reward else None)
        log.info("run due", extra={"fl_run_id": run.run_id, "fl_plan": run.plan, "fl_reason": trigger.reason})
        return self._execute(run)

    def _execute(self, run: TrainingRun) -> TrainingRun:
        start = time.perf_counter()
        self.busy = True
        try:
            run = self.executor.execute(run)
        except Exception as exc:
            log.exception("run failed", extra={"fl_run_id": run.run_id})
            run = self.runs.update(run.run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.busy = False
        elapsed = time.perf_counter() - start
        log.info("run finished", extra={"fl_run_id": run.run_id, "fl_status": run.status, "fl_seconds": round(elapsed, 1),
                                        "fl_policy_version": run.policy_version, "fl_reward_version": run.reward_version})
        if self.metrics is not None:
            self.metrics.observe(run, elapsed)
        return run


class LoopMetrics:
    """Prometheus metrics of the loop (served with --metrics-port)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.runs = Counter("feedloop_loop_runs", "training runs finished, by final status", ["status"],
                            registry=self.registry)
        self.duration = Histogram("feedloop_loop_run_seconds", "wall time of a training run",
                                  buckets=(30, 60, 120, 300, 600, 1800, 3600, 7200, 21600), registry=self.registry)
        self.last_finished = Gauge("feedloop_loop_last_run_timestamp_seconds", "when the last run finished",
                                   registry=self.registry)

    def observe(self, run: TrainingRun, seconds: float) -> None:
        self.runs.labels(run.status).inc()
        self.duration.observe(seconds)
        self.last_finished.set_to_current_time()

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)
