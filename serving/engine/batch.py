"""One model version's running batch (a "lane"): its model, its KV cache, its running requests.

The engine holds one lane per loaded model version. A request belongs to one lane from submit to
finish, so its KV cache, every forward it takes part in and every token it gets come from one set
of weights: a request never mixes versions. Lanes never share a forward (different weights), so the
engine runs one prefill and one decode forward per non-empty lane each step.
"""
from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serving.engine.attention import use_gqa_decode_attention
from serving.engine.detokenize import IncrementalDetokenizer
from serving.engine.kv_cache import BatchKVCache
from serving.engine.sampling import choose_token
from serving.engine.types import SamplingParams, StepOutput, Token


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[StepOutput | BaseException], None]  # called on the engine thread
    # The lane it runs on; None means "whatever the routing picks", resolved once, at submit.
    model_version: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    seed: int | None = None
    generator: torch.Generator | None = None
    seen_ids: torch.Tensor | None = None  # (L,) prompt + generated, for the repetition penalty
    generated: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    text: str = ""
    cancelled: bool = False
    finished: bool = False


class Lane:
    """The running batch of one model version. Used on the engine thread only (after __init__)."""

    def __init__(self, model_version: str, model, tokenizer, eos_token_ids: tuple[int, ...] | frozenset[int],
                 max_batch_size: int) -> None:
        self.model_version = model_version
        self.model = model
        use_gqa_decode_attention(model)
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []))
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        # Prefill needs the logits of the last position only; computing the LM head over every
        # prompt token (B·L·V) costs more than the rest of the prefill. HF generate does the same.
        self._last_logits_only = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
        self.running: list[Request] = []  # row i of the KV cache belongs to running[i]
        self._cache: BatchKVCache | None = None
        self._last_tokens: torch.Tensor | None = None  # (B,) next input token per row
        self._positions: torch.Tensor | None = None  # (B,) position id of that token
        # Set when the routing stops sending new requests here: dropped once nothing runs or waits.
        self.retiring = False

    def clear(self) -> None:
        """Forget every running request and free the KV cache (after this lane's prefill or decode
        failed, or every lane's; the engine fails the requests). The lane stays usable: the next
        prefill starts a fresh batch."""
        self.running.clear()
        self._cache = None
        self._last_tokens = self._positions = None

    def prefill(self, reqs: list[Request]) -> list[tuple[Request, StepOutput]]:
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
            self.running.append(req)
            new_tok = torch.tensor([token_id], device=self.device)
            new_pos = torch.tensor([len(req.prompt_ids)], device=self.device)
            if len(self.running) == 1:
                self._last_tokens, self._positions = new_tok, new_pos
            else:
                self._last_tokens = torch.cat([self._last_tokens, new_tok])
                self._positions = torch.cat([self._positions, new_pos])
        return results

    def decode(self) -> list[tuple[Request, StepOutput]]:
        """One decode step for the running batch: a single forward of (B, 1) tokens."""
        cache = self._cache
        mask = cache.step_mask()  # (B, T+1)
        out = self.model(input_ids=self._last_tokens[:, None], attention_mask=mask,
                         position_ids=self._positions[:, None], past_key_values=cache.cache, use_cache=True)
        cache.after_step()
        token_ids, logprobs = self._choose(self.running, out.logits[:, -1])
        results = [(req, self._accept(req, token_ids[i], logprobs[i])) for i, req in enumerate(self.running)]
        self._last_tokens = torch.tensor(token_ids, device=self.device)
        self._positions = self._positions + 1
        for req in [r for r in self.running if r.finished]:
            self.leave(req)
        return results

    def leave(self, req: Request) -> None:
        row = self.running.index(req)
        moved = self._cache.remove(row)
        last = len(self.running) - 1
        if moved is not None:
            self.running[row] = self.running[last]
            self._last_tokens[row] = self._last_tokens[last]
            self._positions[row] = self._positions[last]
        self.running.pop()
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
        output = StepOutput(token, delta, finish, model_version=self.model_version)
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
