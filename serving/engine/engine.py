"""The in-process engine: continuous batching over one HF causal LM, on a thread of its own.

Each loop iteration (one "step"):
  1. drop requests that were cancelled (their slots free at once);
  2. admit waiting requests while slots are free: prefill each alone (batch 1, so its first token
     is exactly what HF `generate` gives), then copy its KV cache into the running batch;
  3. one decode step for the whole running batch: a single forward of (B, 1) tokens;
  4. per request: choose a token, detokenise incrementally, check eos / stop / length, emit.
Requests therefore join and leave the batch between decode steps.
"""
from __future__ import annotations

import collections
import concurrent.futures
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serving.engine.attention import use_gqa_decode_attention
from serving.engine.detokenize import IncrementalDetokenizer
from serving.engine.kv_cache import BatchKVCache
from serving.engine.sampling import choose_token
from serving.engine.types import SamplingParams, StepOutput, Token
from serving.errors import EngineUnavailable, GenerationError, Overloaded, PromptTooLong

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[StepOutput | BaseException], None]  # called on the engine thread
    arrival: float = field(default_factory=time.perf_counter)
    seed: int | None = None
    generator: torch.Generator | None = None
    seen_ids: torch.Tensor | None = None  # (L,) prompt + generated, for the repetition penalty
    generated: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    text: str = ""
    cancelled: bool = False
    finished: bool = False


class LocalEngine:
    """Continuous-batching generation engine. Thread-safe `submit` / `abort`; `run` is the loop."""

    def __init__(self, model, tokenizer, eos_token_ids: tuple[int, ...], *, max_batch_size: int = 32,
                 max_queue: int = 128, max_input_tokens: int = 2048, max_total_tokens: int = 4096,
                 prefill_token_budget: int = 4096) -> None:
        self.model = model
        use_gqa_decode_attention(model)
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_input_tokens, self.max_total_tokens = max_input_tokens, max_total_tokens
        self.prefill_token_budget = prefill_token_budget
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []))
        # Prefill needs the logits of the last position only; computing the LM head over every
        # prompt token (B·L·V) costs more than the rest of the prefill. HF generate does the same.
        self._last_logits_only = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []  # row i of the KV cache belongs to _running[i]
        self._cache: BatchKVCache | None = None
        self._last_tokens: torch.Tensor | None = None  # (B,) next input token per row
        self._positions: torch.Tensor | None = None  # (B,) position id of that token
        self._jobs: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- client side (any thread) -----------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request. Raises PromptTooLong or Overloaded at once (nothing is queued then)."""
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
            free_slots = self.max_batch_size - len(self._running)
            if len(self._waiting) - max(free_slots, 0) >= self.max_queue:
                raise Overloaded("Model is overloaded")
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

    @property
    def alive(self) -> bool:
        """The decode loop is running and accepting requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> dict:
        return {"queue_size": len(self._waiting), "batch_size": len(self._running), "steps": self.steps}

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
                while not self._stopping and not self._waiting and not self._running and not self._jobs:
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # a bug or an OOM: fail the requests, keep serving the rest
                log.exception("engine step failed")
                self._fail_all(GenerationError(f"generation failed: {type(exc).__name__}: {exc}"))
        self._fail_all(EngineUnavailable("engine stopped"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            doomed = list(self._running) + list(self._waiting)
            self._waiting.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
        self._running.clear()
        self._cache = None
        for req in doomed:
            if not req.finished:
                req.finished = True
                req.emit(exc)

    # -- the loop body ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
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
        for req in [r for r in self._running if r.cancelled]:
            self._leave(req)
        with self._cv:
            if any(r.cancelled for r in self._waiting):
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            # 2. admit newcomers while slots are free, within a prefill token budget
            newcomers, budget = [], self.prefill_token_budget
            while self._waiting and len(self._running) + len(newcomers) < self.max_batch_size and budget > 0:
                req = self._waiting.popleft()
                budget -= len(req.prompt_ids)
                newcomers.append(req)
        if newcomers:  # their first tokens go out before the decode step, for a short TTFT
            self._emit(self._prefill(newcomers))
        # 3-4. one decode step for everyone running (newcomers included)
        if self._running:
            self._emit(self._decode())
        self.steps += 1

    @staticmethod
    def _emit(results: list[tuple[Request, StepOutput]]) -> None:
        for req, out in results:
            if not req.cancelled:
                req.emit(out)

    def _prefill(self, reqs: list[Request]) -> list[tuple[Request, StepOutput]]:
        """Prefill newcomers in one forward (left-padded when there are several) and choose each
        one's first token; those not finished join the running batch."""
        for req in reqs:
            params = req.params
            if not params.greedy:
                req.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
                req.generator = torch.Generator(device=self.device).manual_seed(req.seed)
            req.seen_ids = torch.tensor(req.prompt_ids, device=self.device)
            req.detok = IncrementalDetokenizer(self.tokenizer, self.special_ids)
        longest = max(len(r.prompt_ids) for r in reqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(reqs), longest), pad, dtype=torch.long, device=self.device)  # (k, L)
        mask = torch.zeros_like(ids)
        for j, req in enumerate(reqs):
            ids[j, longest - len(req.prompt_ids):] = torch.tensor(req.prompt_ids, device=self.device)
            mask[j, longest - len(req.prompt_ids):] = 1
        if len(reqs) == 1:  # alone: exactly the call HF generate makes for this prompt
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **self._last_logits_only)
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **self._last_logits_only)
        token_ids, logprobs = self._choose(reqs, out.logits[:, -1])
        results = []
        for j, req in enumerate(reqs):
            token_id = token_ids[j]
            results.append((req, self._accept(req, token_id, logprobs[j])))
            if req.finished:
                continue
            if self._cache is None:
                self._cache = BatchKVCache(len(out.past_key_values.layers), self.max_batch_size)
            self._cache.add(out.past_key_values, row=j, length=len(req.prompt_ids))
            self._running.append(req)
            new_tok = torch.tensor([token_id], device=self.device)
            new_pos = torch.tensor([len(req.prompt_ids)], device=self.device)
            if len(self._running) == 1:
                self._last_tokens, self._positions = new_tok, new_pos
            else:
                self._last_tokens = torch.cat([self._last_tokens, new_tok])
                self._positions = torch.cat([self._positions, new_pos])
        return results

    def _decode(self) -> list[tuple[Request, StepOutput]]:
        """One decode step for the running batch: a single forward of (B, 1) tokens."""
        cache = self._cache
        mask = cache.step_mask()  # (B, T+1)
        out = self.model(input_ids=self._last_tokens[:, None], attention_mask=mask,
                         position_ids=self._positions[:, None], past_key_values=cache.cache, use_cache=True)
        cache.after_step()
        token_ids, logprobs = self._choose(self._running, out.logits[:, -1])
        results = [(req, self._accept(req, token_ids[i], logprobs[i])) for i, req in enumerate(self._running)]
        self._last_tokens = torch.tensor(token_ids, device=self.device)
        self._positions = self._positions + 1
        for req in [r for r in self._running if r.finished]:
            self._leave(req)
        return results

    def _leave(self, req: Request) -> None:
        row = self._running.index(req)
        moved = self._cache.remove(row)
        last = len(self._running) - 1
        if moved is not None:
            self._running[row] = self._running[last]
            self._last_tokens[row] = self._last_tokens[last]
            self._positions[row] = self._positions[last]
        self._running.pop()
        self._last_tokens = self._last_tokens[:last]
        self._positions = self._positions[:last]
        req.finished = True

    def _choose(self, reqs: list[Request], logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """Next token and its log-prob for each row of logits (B, V).

        Plain greedy rows take one batched argmax; rows that sample or penalise repetition go
        through their own processors. Results come to the host in one transfer each (on a GPU a
        per-row `.item()` would synchronise B times per step).
        """
        logits = logits.float()
        chosen = logits.argmax(-1)  # (B,)
        for i, req in enumerate(reqs):
            p = req.params
            if not p.greedy or p.repetition_penalty not in (None, 1.0):
                chosen[i] = choose_token(logits[i], p, req.seen_ids, req.generator)
        logprobs = torch.log_softmax(logits, -1).gather(1, chosen[:, None])[:, 0]  # (B,)
        return chosen.tolist(), logprobs.tolist()

    def _accept(self, req: Request, token_id: int, logprob: float) -> StepOutput:
        """Stream the chosen token of `req`: detokenise it and decide whether the request is done."""
        params = req.params
        if not params.logprobs:
            logprob = 0.0
        req.generated.append(token_id)
        if params.repetition_penalty not in (None, 1.0):
            req.seen_ids = torch.cat([req.seen_ids, torch.tensor([token_id], device=self.device)])
        is_eos = token_id in self.eos_token_ids and not params.ignore_eos
        delta = req.detok.add(token_id)
        finish = None
        if is_eos:
            finish = "eos_token"
        else:
            req.text += delta
            if params.stop:
                hit = _find_stop(req.text, params.stop, len(delta))
                if hit is not None:
                    delta = delta[: len(delta) - (len(req.text) - hit)]
                    req.text = req.text[:hit]
                    finish = "stop_sequence"
        if finish is None and len(req.generated) >= params.max_new_tokens:
            finish = "length"
        if finish is not None and finish != "stop_sequence":
            tail = req.detok.flush()
            delta += tail
            req.text += tail
        token = Token(token_id, req.detok.token_text(token_id), logprob, token_id in self.special_ids)
        output = StepOutput(token, delta, finish)
        if finish is not None:
            req.finished = True
            output.generated_text = req.text
            output.generated_tokens = len(req.generated)
            output.prompt_tokens = len(req.prompt_ids)
            output.seed = req.seed
        return output


def _find_stop(text: str, stops: tuple[str, ...], new_chars: int) -> int | None:
    """End index (exclusive) of the earliest stop sequence that the last `new_chars` completed."""
    best = None
    for s in stops:
        start = max(0, len(text) - new_chars - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i + len(s) < best):
            best = i + len(s)
    return best
