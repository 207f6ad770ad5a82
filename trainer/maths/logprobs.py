"""Log-probabilities of given tokens, without materialising a (B, T, V) log-softmax.

`log p(token) = logit[token] − logsumexp(logits)`: the gather reads one logit per position and
`logsumexp` reduces over the vocabulary, so the only (B, T, V) tensor alive is the logits
themselves. Low-precision logits are promoted to float32 one sequence at a time: a bf16 log-softmax
is off by ~1e-2 nats, and promoting the whole batch at once would double the peak memory.
"""
from __future__ import annotations

import torch

from trainer.maths.masked import masked_sum


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of `token_ids[b, t]` under the distribution `logits[b, t]`.

    The caller aligns positions: for a causal LM, use `next_token_logprobs`.

    Args:
        logits: (B, T, V), any float dtype.
        token_ids: (B, T) int64 indices into V.

    Returns:
        (B, T) float32 log-probabilities (nats), differentiable with respect to `logits`.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        return (picked - logits.logsumexp(-1)).float()
    rows = []
    for row_logits, row_ids in zip(logits, token_ids):  # one (T, V) float32 copy at a time
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - row_logits.logsumexp(-1))
    return torch.stack(rows)


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given the ones before it (causal-LM alignment).

    Args:
        logits: (B, T, V), the model's output for `input_ids`.
        input_ids: (B, T).

    Returns:
        (B, T − 1) float32: entry t is log p(input_ids[:, t + 1] | input_ids[:, :t + 1]). Pair it
        with `mask[:, 1:]`, the mask of the predicted tokens.
    """
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


def sequence_logprobs(token_logprobs: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each completion: token log-probs summed over completion tokens only.

    Args:
        token_logprobs: (B, T) from `token_logprobs` / `next_token_logprobs`.
        completion_mask: (B, T), true on completion tokens (prompt and padding false).

    Returns:
        (B,) float32 summed log-probabilities (nats); the inputs of `dpo_loss`.
    """
    return masked_sum(token_logprobs, completion_mask, dim=-1)
