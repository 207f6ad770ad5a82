"""Logits processing and token choice, per request, in the order HF `generate` applies them
(repetition penalty, then temperature, top-k, top-p), so greedy and seeded outputs match it."""
from __future__ import annotations

import torch

from serving.engine.types import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the sequence (prompt included), as HF does.

    logits: (V,) ; seen_ids: (L,) long. Positive logits are divided by `penalty`, negative multiplied.
    """
    score = logits.gather(0, seen_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen_ids, score)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of one row of logits (V,); filtered → -inf."""
    if params.temperature not in (0.0, 1.0):
        logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - params.top_p)
        remove_sorted[-1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(0, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose_token(logits: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor,
                 generator: torch.Generator | None) -> int:
    """Pick the next token id for one request from its raw logits (V,)."""
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = warp(logits.float(), params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
