"""Reward model (InstructGPT step 2): a scalar head on the SFT model, trained with the K-way ranking loss.

`run_rm(config)` reads top to bottom: 1. data, 2. model, 3. plan and optimizer, 4. resume, 5. train,
6. centre, 7. evaluate, 8. checkpoint. Every input is checked in 1–4, before the first step.

A sequence's reward is serving's: `render_pair` (chat template over prompt + completion), tokenised
without added special tokens as `/v1/score` does, right-padded, scored by `reward_scores`. A group's K
completions go through the same forward; the loss of an optimizer step is `ranking_loss` (the mean over
its prompts of the mean over each prompt's C(K,2) pairs), so accumulation equals one big batch.

The centring (6): HF's sequence-classification head has no bias, so the constant that makes the
demonstrations score 0 on average is stored as `config.feedloop_reward_bias`, which `reward_scores`
adds. Demonstrations are `data.demonstrations` (an SFT file) when set, else the best completion of
each training ranking (what people preferred: the closest thing to a demonstration the rm file has).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.checkpoint import model_version_of
from serving.engine.reward import render_pair, reward_scores
from serving.models import resolve_device
from trainer.checkpointing import dataset_hash, write_stage_checkpoint
from trainer.config import ConfigError, RMConfig, config_to_dict
from trainer.data import Records, TooLong, skipped_metrics, tokenize_records
from trainer.maths import pad_groups, pairwise_accuracy, ranking_loss
from trainer.metrics import MetricsLog, PhaseTimer, Throughput, progress_bar
from trainer.models import check_context, load_scalar_head, pad_token_id, resolve_model_path
from trainer.stage import StepInterrupts, begin_stage, make_trainable, prepare_training

log = logging.getLogger(__name__)

BIAS_KEY = "feedloop_reward_bias"  # model config attribute `reward_scores` adds to every score


@dataclass
class RankingGroup:
    sequences: list[list[int]]  # K token-id lists, best completion first


def encode_pair(tokenizer, prompt, response: str, max_length: int, where: str) -> list[int]:
    """Token ids of (prompt, response) exactly as serving's reward client builds them."""
    ids = tokenizer.encode(render_pair(tokenizer, prompt, response), add_special_tokens=False)
    if len(ids) > max_length:
        raise TooLong(f"{where}: {len(ids)} tokens exceed data.max_length {max_length}")
    return ids


def load_rankings(path, tokenizer, max_length: int, too_long: str = "error") -> Records:
    """Read, validate and tokenise an rm file ({prompt, completions best→worst}, K >= 2). A ranking
    with one completion over the limit is too long as a whole (skipped whole, never cut to fewer)."""
    return tokenize_records(path, "rm", lambda r, where: RankingGroup(
        [encode_pair(tokenizer, r["prompt"], c, max_length, where) for c in r["completions"]]), too_long)


def load_demonstrations(path, tokenizer, max_length: int, too_long: str = "error") -> Records:
    return tokenize_records(path, "sft", lambda r, where: encode_pair(tokenizer, r["prompt"], r["response"],
                                                                       max_length, where), too_long)


def collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: input_ids (N, T) int64 and attention_mask (N, T), 1 on real tokens."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
    return input_ids, attention_mask


def score(model, sequences: list[list[int]], pad_id: int, device, autocast_dtype) -> torch.Tensor:
    """(N,) float32 rewards of `sequences`, in one forward (serving's `reward_scores`)."""
    input_ids, attention_mask = collate(sequences, pad_id)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return reward_scores(model, input_ids.to(device), attention_mask.to(device))


def group_rewards(model, groups: list[RankingGroup], pad_id: int, device, autocast_dtype):
    """rewards (P, K_max) and mask (P, K_max) of `groups`, columns best first (`pad_groups`)."""
    scores = score(model, [s for g in groups for s in g.sequences], pad_id, device, autocast_dtype)
    return pad_groups(scores, [len(g.sequences) for g in groups])


@torch.no_grad()
def evaluate(model, groups: list[RankingGroup], batch_size: int, pad_id: int, device, autocast_dtype) -> dict:
    """Held-out pairwise accuracy (every pair counts once) and ranking loss (prompts weigh the same)."""
    model.eval()
    flat = torch.cat([score(model, [s for g in groups[i:i + batch_size] for s in g.sequences], pad_id, device,
                            autocast_dtype).cpu() for i in range(0, len(groups), batch_size)])  # (N,)
    model.train()
    rewards, mask = pad_groups(flat, [len(g.sequences) for g in groups])
    return {"heldout_accuracy": pairwise_accuracy(rewards, mask).item(),
            "heldout_loss": ranking_loss(rewards, mask).item()}


@torch.no_grad()
def centre_on(model, demonstrations: list[list[int]], batch_size: int, pad_id: int, device) -> float:
    """Set the reward bias so that `demonstrations` score 0 on average (fp32); returns the bias."""
    model.eval()
    setattr(model.config, BIAS_KEY, 0.0)
    total = sum(score(model, demonstrations[i:i + batch_size], pad_id, device, None).double().sum().item()
                for i in range(0, len(demonstrations), batch_size))
    bias = -total / len(demonstrations)
    setattr(model.config, BIAS_KEY, bias)
    return bias


def check_same_tokenizer(tokenizer, policy: str) -> None:
    """The reward model must read text as the policy writes it: same vocabulary and chat template."""
    from transformers import AutoTokenizer

    policy_tok = AutoTokenizer.from_pretrained(resolve_model_path(policy))
    if policy_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the reward model's tokenizer does not match the policy's ({policy}): "
                          f"vocabularies differ ({len(tokenizer)} vs {len(policy_tok)} tokens)")
    if getattr(policy_tok, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the reward model's tokenizer does not match the policy's ({policy}): "
                          "chat templates differ")


def run_rm(config: RMConfig, resume: bool = False, stop_at_step: int | None = None,
           deepspeed: str | Path | None = None) -> Path:
    """Run the reward-model stage; returns the checkpoint directory (`run.output_dir/checkpoint`).

    resume, stop_at_step, deepspeed: as for `trainer.sft.run_sft`.
    """
    from transformers import AutoTokenizer

    out, final_dir = begin_stage(config.run, resume)

    # 1. data: the tokenizer check, then every ranking read, validated and tokenised before any weights load.
    model_path = resolve_model_path(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if config.policy is not None:
        check_same_tokenizer(tokenizer, config.policy)
    pad_id = pad_token_id(tokenizer)
    check_context(model_path, config.data.max_length)
    max_length, too_long = config.data.max_length, config.data.too_long
    train = load_rankings(config.data.train, tokenizer, max_length, too_long)
    heldout = load_rankings(config.data.heldout, tokenizer, max_length, too_long) if config.data.heldout else []
    demonstrations = (load_demonstrations(config.data.demonstrations, tokenizer, max_length, too_long)
                      if config.data.demonstrations else [g.sequences[0] for g in train])
    data_hash = dataset_hash(config.data.files())
    config_dict = config_to_dict(config)

    # 2. model: the body of `model`, its LM head replaced by a fresh one-output head (seeded above).
    device, compute_dtype = resolve_device(config.run.device, config.run.dtype)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    model = load_scalar_head(model_path, pad_id, device)
    make_trainable(model, config.run.gradient_checkpointing)

    # 3-4. plan, optimizer, resume (trainer/stage.py): a micro-batch is `data.batch_size` groups; a
    # step, `grad_accumulation` of them.
    plan, engine, position, save_state = prepare_training(
        model, config, len(train), out, config_dict, data_hash, resume=resume, deepspeed=deepspeed, log=log)
    total_steps = plan.total_steps

    # 5. train
    metrics_log = MetricsLog(out, resume_step=position.step)
    throughput = Throughput()
    last_loss = None
    timer = PhaseTimer(device)  # forward, backward and optimizer seconds of each step, in its metrics line
    bar = progress_bar(total_steps, position.step, "rm")
    step = position.step
    interrupts = StepInterrupts(log)
    try:
        while step < total_steps:
            step_start = time.perf_counter()
            epoch, window = plan.window(step)  # the order depends only on (seed, epoch)
            window_groups = [[train[i] for i in indices] for indices in window]
            n_prompts = sum(len(groups) for groups in window_groups)
            window_loss, correct = 0.0, []
            for i, groups in enumerate(window_groups):
                with timer.phase("forward"):
                    rewards, mask = group_rewards(model, groups, pad_id, device, autocast_dtype)  # (P, K_max)
                    loss = ranking_loss(rewards, mask) * (len(groups) / n_prompts)  # this micro-batch's share
                with timer.phase("backward"):
                    engine.backward(loss, last=i == len(window_groups) - 1)
                window_loss += loss.item()
                correct.append(pairwise_accuracy(rewards, mask).item())
                throughput.add(sum(len(s) for g in groups for s in g.sequences))
            with timer.phase("optimizer"):
                grad_norm, lr = engine.step()  # clip, update, schedule, zero_grad (plain torch or DeepSpeed)
            phases = {**timer.take(), "step_s": round(time.perf_counter() - step_start, 4)}  # this step's
            step += 1
            last_loss = window_loss
            bar.update(1)
            bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{lr:.2e}")
            if step % config.run.log_every == 0 or step == total_steps:
                metrics_log.write({"step": step, "epoch": epoch, "loss": window_loss,
                                   "accuracy": sum(correct) / len(correct), "lr": lr, "grad_norm": grad_norm,
                                   "tokens_per_s": round(throughput.take(), 1), **phases})
            if stop_at_step is not None and step >= stop_at_step and step < total_steps:
                return save_state(step)
            if config.run.save_every and step % config.run.save_every == 0 and step < total_steps:
                save_state(step)
            interrupts.at_step_end()  # a Ctrl-C during the step takes effect here
    except KeyboardInterrupt:
        if step > position.step and interrupts.whole_steps:  # keep the finished steps
            log.warning("interrupted: training state saved at %s", save_state(step))
        raise
    finally:
        interrupts.close()
        bar.close()

    # 6. centre: demonstrations score 0 on average (rankings only fix differences, not the level).
    if config.run.gradient_checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
    bias = centre_on(model, demonstrations, config.data.batch_size, pad_id, device)

    # 7. evaluate: held-out pairwise accuracy and loss with the final (centred) model.
    metrics = {"steps": total_steps, "epochs": config.epochs, "train_groups": len(train), "final_loss": last_loss,
               "reward_bias": bias, "demonstrations": len(demonstrations),
               **skipped_metrics(train=train, heldout=heldout, demonstrations=demonstrations)}
    if heldout:
        metrics.update(evaluate(model, heldout, config.data.batch_size, pad_id, device, autocast_dtype))
        metrics_log.write({"step": total_steps, "heldout_accuracy": metrics["heldout_accuracy"],
                           "heldout_loss": metrics["heldout_loss"]})

    # 8. checkpoint: HF files (config.json carries the bias) + manifest stage "rm"; serving's load_reward
    # loads it as a trained reward model.
    model.eval()
    return write_stage_checkpoint(final_dir, model, tokenizer, stage="rm",
                                  parent_version=model_version_of(model_path), data_hash=data_hash,
                                  config=config_dict, metrics=metrics)
