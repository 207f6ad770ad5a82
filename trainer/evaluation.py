"""Measurements of checkpoints on held-out data: what the promotion gates (trainer/gates.py) compare.

Each function takes checkpoint directories and dataset files (docs/datasets.md), loads the models
as serving loads them (`serving.models.load_policy` / `load_reward`: checksums verified, weights in
the serving dtype), measures, and returns plain numbers. Nothing here decides anything.

- `rm_heldout_accuracy`: pairwise accuracy over all C(K, 2) ordered pairs of held-out rankings, the
  number `run_rm` reports (its `load_rankings` + `evaluate`: `render_pair` + `reward_scores`).
- `win_rate`: both policies answer the same prompts with the same per-request seeds (the serving
  engine's continuous batching, trainer/rollouts.py), a judge reward model scores each answer as
  `/v1/score` does; a win is a strictly higher score.
- `kl_to_reference`: mean over the policy's own sampled answers of Σ_t log π(y_t) − log π_ref(y_t)
  (k1, nats per sequence): the estimator PPO's `kl` metric uses.
- `ptx_loss`: mean next-token NLL per token on ptx text, as PPO-ptx measures it (`ptx_nll`).

Prompts files are read with `trainer.rollouts.load_prompts` (chat template, generation prompt); a
prompt longer than `max_length − max_new_tokens` tokens, like any record over `max_length`, is a
`DatasetError` (`too_long="error"`) or left out (`"skip"`: `trainer.data.tokenize_records`), never truncated.
`limit` takes the first N records: export orders prompts by `prompt_key`, a hash, so the first N are
an unbiased sample that stays the same from run to run.

Sampling seeds: answer i (prompt i mod N, sample i // N) draws with `rollout_seed(seed, 0, i)`, so two
policies see the same random numbers (common random numbers: a fairer comparison with fewer prompts),
and a policy compared with itself gives identical answers: all ties, win rate exactly 0.5.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.engine.engine import LocalEngine
from serving.models import LoadedPolicy, LoadedReward, load_policy, load_reward
from trainer.maths import kl_k1, masked_sum, next_token_logprobs
from trainer.ppo import policy_logits, ptx_nll
from trainer.reward import check_same_tokenizer, evaluate, load_rankings
from trainer.rollouts import Prompt, Rollout, collate_rollouts, generate, load_prompts, load_ptx, score_rollouts

log = logging.getLogger(__name__)

PathLike = str | Path
ANSWER_STEP = 0  # the `step` of `rollout_seed(seed, step, index)` for evaluation answers


@dataclass(frozen=True)
class RMAccuracy:
    accuracy: float  # share of ordered pairs scored in the labelled order (a tie counts as wrong)
    pairs: int  # Σ C(K, 2) over the groups: every pair counts once
    groups: int  # held-out rankings (prompts)


@dataclass(frozen=True)
class WinRate:
    wins: int  # answers the judge scores strictly higher for the candidate
    losses: int
    ties: int  # equal scores (identical answers score identically)
    n: int  # answers compared: prompts × samples_per_prompt
    rate: float  # (wins + ties / 2) / n
    candidate_score: float  # mean judge score of the candidate's answers
    baseline_score: float  # … and of the baseline's


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def rm_heldout_accuracy(reward_dir: PathLike, rm_heldout_file: PathLike, max_length: int = 1024, *,
                        batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                        too_long: str = "error") -> RMAccuracy:
    """Held-out pairwise accuracy of a reward checkpoint on an rm file ({prompt, completions best→worst}).

    Scored exactly as serving scores (`render_pair`, `reward_scores`, the config bias included) and
    computed by `trainer.reward.evaluate`, so it equals the `heldout_accuracy` `run_rm` reports for
    the same file (in the same dtype). `batch_size` counts ranking groups per forward.
    """
    reward = load_reward(Path(reward_dir), None, device=device, dtype=dtype)
    groups = load_rankings(rm_heldout_file, reward.tokenizer, max_length, too_long)
    pad_id = reward.model.config.pad_token_id
    result = evaluate(reward.model, groups, batch_size, pad_id, _device_of(reward.model), None)
    reward.model.eval()  # `evaluate` hands the model back in train mode, as the trainer wants it
    pairs = sum(len(g.sequences) * (len(g.sequences) - 1) // 2 for g in groups)
    return RMAccuracy(result["heldout_accuracy"], pairs, len(groups))


def sample_answers(policy: LoadedPolicy, prompts: PathLike, *, limit: int | None = None,
                   samples_per_prompt: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
                   seed: int = 0, max_length: int = 1024, batch_size: int = 16,
                   too_long: str = "error") -> list[Rollout]:
    """The policy's answers to the first `limit` prompts of a prompts file, `samples_per_prompt` each.

    Generated by the serving engine (continuous batching, at most `batch_size` running); answer i is
    prompt i mod N, sample i // N, seeded by `rollout_seed(seed, ANSWER_STEP, i)`.
    Returns N × samples_per_prompt rollouts in that order.
    """
    max_prompt = max_length - max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in max_length {max_length}")
    loaded: list[Prompt] = load_prompts(prompts, policy.tokenizer, max_prompt, too_long)[:limit]
    requests = loaded * samples_per_prompt
    engine = LocalEngine(policy.model, policy.tokenizer, policy.eos_token_ids, max_batch_size=batch_size,
                         max_queue=len(requests), max_input_tokens=max_prompt, max_total_tokens=max_length)
    return generate(engine, requests, max_new_tokens, temperature, seed, ANSWER_STEP)


def judge_scores(judge: LoadedReward, rollouts: list[Rollout], max_length: int, batch_size: int) -> torch.Tensor:
    """(N,) float32 scores of the rollouts' (prompt, answer) pairs, as `/v1/score` scores them."""
    device, pad_id = _device_of(judge.model), judge.model.config.pad_token_id
    return torch.cat([score_rollouts(judge.model, judge.tokenizer, rollouts[i:i + batch_size], pad_id, device, None,
                                     max_length).cpu() for i in range(0, len(rollouts), batch_size)])


def win_rate(candidate_dir: PathLike, baseline_dir: PathLike, judge_reward_dir: PathLike, prompts: PathLike, *,
             limit: int | None = None, samples_per_prompt: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, seed: int = 0, max_length: int = 1024, batch_size: int = 16,
             device: str = "auto", dtype: str = "auto", too_long: str = "error") -> WinRate:
    """How often the judge prefers the candidate's answer to the baseline's on the same prompt and seed.

    Both policies answer the first `limit` prompts of the prompts file `samples_per_prompt` times
    (`sample_answers`, the same seeds for both); the judge (a reward checkpoint) scores every
    (prompt, answer) as serving does. Answer k of the candidate is compared with answer k of the
    baseline: win if its score is strictly higher, tie if equal. rate = (wins + ties / 2) / n.
    The policies are loaded one at a time (peak memory: one policy + the judge).
    """
    judge = load_reward(Path(judge_reward_dir), None, device=device, dtype=dtype)
    scores = {}
    for side, path in (("candidate", candidate_dir), ("baseline", baseline_dir)):
        log.info("win rate: %s %s answers the held-out prompts", side, path)
        policy = load_policy(Path(path), device=device, dtype=dtype)
        answers = sample_answers(policy, prompts, limit=limit, samples_per_prompt=samples_per_prompt,
                                 max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                 max_length=max_length, batch_size=batch_size, too_long=too_long)
        del policy
        scores[side] = judge_scores(judge, answers, max_length, batch_size)  # (n,)
    candidate, baseline = scores["candidate"], scores["baseline"]
    wins, losses = int((candidate > baseline).sum()), int((candidate < baseline).sum())
    n = len(candidate)
    ties = n - wins - losses
    return WinRate(wins, losses, ties, n, (wins + ties / 2) / n, candidate.mean().item(), baseline.mean().item())


@torch.no_grad()
def sequence_kl(policy, reference, rollouts: list[Rollout], pad_id: int, temperature: float,
                batch_size: int) -> torch.Tensor:
    """(N,) k1 KL of each rollout's answer, summed over its tokens (nats per sequence).

    Log-probs of both models are those of the tempered distribution the answers were sampled from,
    as PPO computes them (`policy_logits`); prompt and padding positions are masked out.
    """
    device = _device_of(policy)  # the reference is loaded on the same device
    kls = []
    for i in range(0, len(rollouts), batch_size):
        ids, attn, mask = (t.to(device) for t in collate_rollouts(rollouts[i:i + batch_size], pad_id))
        logprobs = next_token_logprobs(policy_logits(policy, ids, attn, temperature, None), ids)  # (B, T-1)
        ref_logprobs = next_token_logprobs(policy_logits(reference, ids, attn, temperature, None), ids)
        kls.append(masked_sum(kl_k1(logprobs, ref_logprobs), mask, dim=-1).cpu())  # (B,)
    return torch.cat(kls)


def kl_to_reference(policy_dir: PathLike, reference_dir: PathLike, prompts: PathLike, *, limit: int | None = None,
                    samples_per_prompt: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                    max_length: int = 1024, batch_size: int = 16, device: str = "auto", dtype: str = "auto",
                    too_long: str = "error") -> float:
    """Mean KL(π ‖ π_ref) per answer in nats: the k1 estimate Σ_t log π(y_t) − log π_ref(y_t) over the
    policy's own sampled answers (`sample_answers`), PPO's `kl` metric. 0 when the two are the same
    weights; the two checkpoints must share a tokenizer (KL compares token ids).
    """
    policy = load_policy(Path(policy_dir), device=device, dtype=dtype)
    reference = load_policy(Path(reference_dir), device=device, dtype=dtype)
    check_same_tokenizer(reference.tokenizer, str(policy_dir))
    answers = sample_answers(policy, prompts, limit=limit, samples_per_prompt=samples_per_prompt,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, max_length=max_length,
                             batch_size=batch_size, too_long=too_long)
    kl = sequence_kl(policy.model, reference.model, answers, _pad_id(policy.tokenizer), temperature, batch_size)
    return kl.double().mean().item()


def ptx_loss(policy_dir: PathLike, ptx_file: PathLike, max_length: int = 1024, batch_size: int = 8, *,
             device: str = "auto", dtype: str = "auto", too_long: str = "error") -> float:
    """Mean next-token NLL (nats per predicted token, over every text of the file) of a policy on ptx
    text ({text}), PPO-ptx's `ptx_nll`: each text tokenised without special tokens, every token after
    the first predicted, padding masked. A text over `max_length` tokens: see `too_long`.
    """
    policy = load_policy(Path(policy_dir), device=device, dtype=dtype)
    texts = load_ptx(ptx_file, policy.tokenizer, max_length, too_long)
    return ptx_nll(policy.model, texts, batch_size, _pad_id(policy.tokenizer), _device_of(policy.model), None)
