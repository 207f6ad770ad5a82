"""The in-process engine: continuous batching over HF causal LMs, on a thread of its own.

One lane per loaded model version (`serving/engine/batch.py`: model, KV cache, running requests).
Each loop iteration (one "step"):
  0. run jobs other components queued for this thread (reward scoring);
  1. drop requests that were cancelled (their slots free at once);
  2. admit waiting requests while slots are free (over all lanes): prefill them per lane — a request
     prefilled alone gets exactly the first token HF `generate` gives — and copy each one's KV cache
     into its lane's running batch;
  3. one decode step per non-empty lane: a single forward of (B, 1) tokens;
  4. per request: choose a token, detokenise incrementally, check eos / stop / length, emit.
Before all that, lanes the routing no longer names are dropped once nothing runs or waits on them.
Requests therefore join and leave the batch between decode steps. A request's lane (model version)
is fixed at submit: the routing decides it then, and later routing changes apply to new requests.

Failures are isolated per lane: when a lane's prefill or decode raises (a broken candidate, an OOM),
that lane's running requests and the newcomers being prefilled into it fail with `LaneFailed` (a
GenerationError that names the version) and its KV cache is freed; the other lanes go on as if
nothing happened. Only a failure outside the lanes' forwards (a bug in the loop) fails everyone.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import random
import threading
from collections.abc import Callable

import torch

from serving.engine.batch import Lane, Request
from serving.engine.types import Routing, StepOutput
from serving.errors import EngineUnavailable, GenerationError, Overloaded, PromptTooLong, UnknownModelVersion

__all__ = ["LaneFailed", "LocalEngine", "Request"]

log = logging.getLogger(__name__)


class LaneFailed(GenerationError):
    """A request failed while running on `model_version` (its lane's prefill or decode raised).

    Raised to the request's caller in place of its next output; `model_version` is the version the
    request was routed to, known even when the failure comes before its first token."""

    def __init__(self, message: str, model_version: str | None) -> None:
        super().__init__(message)
        self.model_version = model_version


class LocalEngine:
    """Continuous-batching generation engine over one lane per loaded model version.

    Thread-safe: `submit`, `abort`, `run_job`, `add_lane`, `retire_lane`, `set_routing`, `routing`,
    `versions`, `stats`. `run` is the loop (or call `step` yourself on one thread, as the trainer does).
    The model given here is the first lane, `model_version`, and the routing serves it.
    """

    def __init__(self, model, tokenizer, eos_token_ids: tuple[int, ...], *, model_version: str = "local",
                 max_batch_size: int = 32, max_queue: int = 128, max_input_tokens: int = 2048,
                 max_total_tokens: int = 4096, prefill_token_budget: int = 4096,
                 on_lane_dropped: Callable[[str], None] | None = None) -> None:
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_input_tokens, self.max_total_tokens = max_input_tokens, max_total_tokens
        self.prefill_token_budget = prefill_token_budget
        self.on_lane_dropped = on_lane_dropped  # called on the engine thread with the version dropped
        # _lanes and _routing change under _cv only; the engine thread reads them through snapshots.
        self._lanes: dict[str, Lane] = {
            model_version: Lane(model_version, model, tokenizer, eos_token_ids, max_batch_size)}
        self._routing = Routing(model_version)
        self._retiring = False  # some lane waits to be dropped (wakes the loop)
        self._draw = random.Random()  # the canary draw; not torch's RNG, which seeded requests use
        self._waiting: collections.deque[Request] = collections.deque()
        self._jobs: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- client side (any thread) -----------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request and fix its model version (the routing's pick unless it names one).
        Raises PromptTooLong, UnknownModelVersion or Overloaded at once (nothing is queued then)."""
        n = len(request.prompt_ids)
        if n == 0:
            raise PromptTooLong("`inputs` must not be empty")
        if n > self.max_input_tokens:
            raise PromptTooLong(f"`inputs` must have less than {self.max_input_tokens} tokens. "
                                f"Given: {n}")
        if n + request.params.max_new_tokens > self.max_total_tokens:
            raise PromptTooLong(f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                                f"Given: {n} `inputs` tokens and {request.params.max_new_tokens} "
                                "`max_new_tokens`")
        with self._cv:
            if self._stopping:
                raise EngineUnavailable("engine is shutting down")
            version = request.model_version
            if version is None:
                version = self._routing.pick(self._draw.random())
            elif version not in self._lanes:
                raise UnknownModelVersion(f"model version {version!r} is not loaded here; loaded: "
                                          f"{', '.join(map(repr, self._lanes))}")
            free_slots = self.max_batch_size - self._running_count()
            if len(self._waiting) - max(free_slots, 0) >= self.max_queue:
                raise Overloaded("Model is overloaded")
            request.model_version = version
            self._waiting.append(request)
            self._cv.notify()

    def abort(self, request: Request) -> None:
        """Cancel a request (client gone). Its slot is freed before the next decode step."""
        with self._cv:
            request.cancelled = True
            self._cv.notify()

    def run_job(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between two steps (e.g. reward scoring).

        All torch work of the process runs on this one thread: with libgomp, a second thread that
        has run parallel torch ops keeps its OpenMP team, the pool then outnumbers the cores, and
        libgomp stops spinning between parallel regions — small ops (a decode step's matmuls) get
        ~4x slower (measured here: 34 µs → 141 µs per MLP-sized linear; decode 29 → 17.5 tok/s).
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise EngineUnavailable("engine is shutting down")
            self._jobs.append((fn, future))
            self._cv.notify()
        return future

    def add_lane(self, model_version: str, model, tokenizer, eos_token_ids: tuple[int, ...]) -> bool:
        """Make a loaded model available under `model_version` (not routed yet). False, and nothing
        changes, if that version is loaded already. Runs no torch ops: any thread may call it."""
        with self._cv:
            if model_version in self._lanes:
                return False
        lane = Lane(model_version, model, tokenizer, eos_token_ids, self.max_batch_size)
        with self._cv:
            if model_version in self._lanes:  # another caller added it meanwhile
                return False
            self._lanes[model_version] = lane
        log.info("model version %s loaded", model_version, extra={"fl_model_version": model_version})
        return True

    def retire_lane(self, model_version: str) -> None:
        """Unload a version the routing does not name, once nothing runs or waits on it."""
        with self._cv:
            if model_version in self._routing.versions:
                raise ValueError(f"model version {model_version!r} is routed ({self._routing}); "
                                 "route traffic elsewhere first")
            if model_version in self._lanes:
                self._lanes[model_version].retiring = self._retiring = True
                self._cv.notify()

    @property
    def routing(self) -> Routing:
        return self._routing

    def set_routing(self, routing: Routing) -> None:
        """Route new requests; requests already submitted keep their version. Lanes that were routed
        and are not any more are dropped once drained. KeyError if a version is not loaded."""
        with self._cv:
            missing = [v for v in routing.versions if v not in self._lanes]
            if missing:
                raise KeyError(f"model version(s) {', '.join(map(repr, missing))} not loaded; loaded: "
                               f"{', '.join(map(repr, self._lanes))} (add the version before routing to it)")
            previous = self._routing.versions
            for version, lane in self._lanes.items():
                if version in routing.versions:
                    lane.retiring = False
                elif version in previous:
                    lane.retiring = True
            self._routing = routing
            self._retiring = any(lane.retiring for lane in self._lanes.values())
            self._cv.notify()
        log.info("routing: %s", routing.as_dict(), extra={"fl_model_version": routing.serving})

    def versions(self) -> dict[str, dict]:
        """Per loaded version: running and waiting requests, and its percent of new traffic."""
        with self._cv:
            waiting = collections.Counter(r.model_version for r in self._waiting if not r.cancelled)
            return {v: {"running": len(lane.running), "waiting": waiting[v], "share": self._routing.share(v)}
                    for v, lane in self._lanes.items()}

    @property
    def alive(self) -> bool:
        """The decode loop is running and accepting requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> dict:
        return {"queue_size": len(self._waiting), "batch_size": self._running_count(), "steps": self.steps}

    def _running_count(self) -> int:
        return sum(len(lane.running) for lane in list(self._lanes.values()))

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="feedloop-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while (not self._stopping and not self._waiting and not self._jobs and not self._retiring
                       and not self._running_count()):
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # a bug outside the lanes' forwards: fail everyone, keep serving
                log.exception("engine step failed")
                message = f"generation failed: {type(exc).__name__}: {exc}"
                self._fail_all(lambda version: LaneFailed(message, version))
        self._fail_all(lambda version: EngineUnavailable("engine stopped"))

    def _fail_all(self, error: Callable[[str | None], BaseException]) -> None:
        """Fail every job and every running or waiting request of every lane, each with its own
        exception (`error(model_version)`; one exception object must not be raised in many tasks)."""
        with self._cv:
            lanes = list(self._lanes.values())
            doomed = [r for lane in lanes for r in lane.running] + list(self._waiting)
            self._waiting.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(error(None))
        for lane in lanes:
            lane.clear()
        for req in doomed:
            if not req.finished:
                req.finished = True
                req.emit(error(req.model_version))

    def _fail_lane(self, lane: Lane, exc: Exception, phase: str,
                   newcomers: list[Request] | tuple[()] = ()) -> None:
        """`lane`'s prefill or decode raised: fail its running requests and `newcomers` (the ones
        being prefilled into it), free its KV cache, and leave every other lane alone. Its waiting
        requests stay queued (each gets its own try; a lane that keeps failing is for the deployment
        watcher to roll back). None of these requests' outputs from the failed call went out: outputs
        are emitted only after a lane's call returns."""
        version = lane.model_version
        doomed = list(dict.fromkeys([*lane.running, *newcomers]))  # running may hold some newcomers
        lane.clear()
        log.error("model version %s failed its %s: %s: %s (%d requests failed; other versions unaffected)",
                  version, phase, type(exc).__name__, exc, len(doomed), exc_info=exc,
                  extra={"fl_model_version": version})
        message = f"generation failed on model version {version}: {type(exc).__name__}: {exc}"
        for req in doomed:
            req.finished = True
            req.emit(LaneFailed(message, version))

    # -- the loop body ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        # lanes the routing left, once drained (first, while this frame holds no lane: its weights go)
        if self._retiring:
            self._drop_drained_lanes()
        # 0. jobs other components asked to run on this thread (reward scoring)
        while self._jobs:
            with self._cv:
                fn, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the job's caller gets its own error
                    future.set_exception(exc)
        # 1. cancelled requests leave first, so their slots are reused in this very step
        with self._cv:
            lanes = list(self._lanes.values())
        for lane in lanes:
            for req in [r for r in lane.running if r.cancelled]:
                lane.leave(req)
        with self._cv:
            if any(r.cancelled for r in self._waiting):
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            # 2. admit newcomers while slots are free (over all lanes), within a prefill token budget
            lanes = list(self._lanes.values())  # a lane added since holds no request yet, or is here
            running = sum(len(lane.running) for lane in lanes)
            newcomers: dict[Lane, list[Request]] = {}
            admitted, budget = 0, self.prefill_token_budget
            while self._waiting and running + admitted < self.max_batch_size and budget > 0:
                req = self._waiting.popleft()
                budget -= len(req.prompt_ids)
                newcomers.setdefault(self._lanes[req.model_version], []).append(req)
                admitted += 1
        # their first tokens go out before the decode step, for a short TTFT. A lane that raises
        # fails its own requests only (failure isolation between versions: a broken candidate
        # must not fail the serving version's requests).
        for lane, reqs in newcomers.items():
            try:
                results = lane.prefill(reqs)
            except Exception as exc:
                self._fail_lane(lane, exc, "prefill", reqs)
                continue
            self._emit(results)
        # 3-4. one decode step per lane for everyone running (newcomers included)
        for lane in lanes:
            if lane.running:
                try:
                    results = lane.decode()
                except Exception as exc:
                    self._fail_lane(lane, exc, "decode")
                    continue
                self._emit(results)
        self.steps += 1

    @staticmethod
    def _emit(results: list[tuple[Request, StepOutput]]) -> None:
        for req, out in results:
            if not req.cancelled:
                req.emit(out)

    def _drop_drained_lanes(self) -> None:
        """Forget retiring lanes with nothing running or waiting, so their weights can be freed."""
        with self._cv:
            waiting = {r.model_version for r in self._waiting}
            drained = [v for v, lane in self._lanes.items()
                       if lane.retiring and not lane.running and v not in waiting]
            dropped = [self._lanes.pop(v) for v in drained]
            self._retiring = any(lane.retiring for lane in self._lanes.values())
        on_cuda = any(lane.device.type == "cuda" for lane in dropped)
        versions = [lane.model_version for lane in dropped]
        del dropped  # the last references to the lanes (and so to their models and KV caches)
        for version in versions:
            log.info("model version %s unloaded (no longer routed, drained)", version,
                     extra={"fl_model_version": version})
            if self.on_lane_dropped is not None:
                self.on_lane_dropped(version)
        if on_cuda:
            torch.cuda.empty_cache()  # give the freed weights and KV buffers back to the device
