"""Direct preference optimisation (Rafailov et al. 2023): the policy learns the rankings directly,
without a reward model or rollouts, as the simpler alternative to RM + PPO.

`run_dpo(config)` reads top to bottom like `run_sft`: 1. data, 2. models, 3. plan and optimizer,
4. resume, 5. train, 6. evaluate, 7. checkpoint. Every input is checked in 1–4, before the first step.

Data are the reward model's ranking groups `{prompt, completions: [best, …, worst]}`. A group of K
completions gives all C(K, 2) pairs (i better than j for i < j): a ranking says as much about 1st vs
3rd as about 1st vs 2nd, and each completion is forwarded once however many pairs it is in. Each
group's loss is the mean over its pairs and the step's loss the mean over its groups, so a prompt
ranked 9 ways weighs the same as a comparison of 2 (as the ranking loss does for the reward model).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.checkpoint import model_version_of
from serving.models import resolve_device
from trainer.checkpointing import dataset_hash, write_stage_checkpoint
from trainer.config import DPOConfig, config_to_dict
from trainer.data import IGNORE_INDEX, Records, SFTExample, collate_sft, skipped_metrics, tokenize_records, tokenize_sft
from trainer.maths import dpo_loss, next_token_logprobs, sequence_logprobs
from trainer.metrics import MetricsLog, Throughput, progress_bar
from trainer.models import check_context, load_frozen, pad_token_id, resolve_model_path
from trainer.stage import StepInterrupts, begin_stage, make_trainable, prepare_training

log = logging.getLogger(__name__)

STATS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")  # per-group means, logged per step


@dataclass
class PreferenceGroup:
    """One ranking: each completion tokenised with its prompt (chat template, prompt masked), best first."""

    completions: list[SFTExample]

    @property
    def pairs(self) -> int:
        return len(self.completions) * (len(self.completions) - 1) // 2


def load_preferences(path: str | Path, tokenizer, max_length: int, too_long: str = "error") -> Records:
    """Read, validate (rm format: ≥ 2 completions) and tokenise a whole ranking file (a ranking with a
    completion over the limit: see `tokenize_records`)."""
    return tokenize_records(path, "rm", lambda r, where: PreferenceGroup(
        [tokenize_sft({"prompt": r["prompt"], "response": c}, tokenizer, max_length, f"{where}: completion {i}")
         for i, c in enumerate(r["completions"])]), too_long)


def completion_logprobs(model, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """(N,) summed log-probs (nats) of each sequence's completion tokens (labels != IGNORE_INDEX).

    batch: input_ids, attention_mask, labels, each (N, T), from `collate_sft`.
    """
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, T, V)
    logprobs = next_token_logprobs(logits, batch["input_ids"])  # (N, T-1), float32
    return sequence_logprobs(logprobs, batch["labels"][:, 1:] != IGNORE_INDEX)


def preference_losses(policy, reference, groups: list[PreferenceGroup], config: DPOConfig, pad_id: int, device,
                      autocast_dtype) -> tuple[torch.Tensor, dict[str, float], int]:
    """DPO over a micro-batch of groups: (sum of the groups' mean pair losses, sums of STATS, tokens).

    The reference's log-probs are computed under no_grad (it is frozen); the sum is differentiable.
    """
    batch = {k: v.to(device) for k, v in collate_sft([e for g in groups for e in g.completions], pad_id).items()}
    policy_lp = completion_logprobs(policy, batch, autocast_dtype)  # (N,), N = Σ K
    with torch.no_grad():
        reference_lp = completion_logprobs(reference, batch, autocast_dtype)  # (N,)
    total, stats, start = policy_lp.new_zeros(()), dict.fromkeys(STATS, 0.0), 0
    for group in groups:
        k = len(group.completions)
        better, worse = torch.triu_indices(k, k, offset=1, device=device)  # (C(K,2),) each: better < worse
        p, r = policy_lp[start:start + k], reference_lp[start:start + k]
        out = dpo_loss(p[better], p[worse], r[better], r[worse], beta=config.beta,
                       label_smoothing=config.label_smoothing, loss_type=config.loss_type)
        total = total + out.loss
        for name, value in (("loss", out.loss.detach()), ("accuracy", out.accuracy), ("margin", out.margin),
                            ("chosen_reward", out.chosen_rewards.mean()),
                            ("rejected_reward", out.rejected_rewards.mean())):
            stats[name] += value.item()
        start += k
    return total, stats, int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(policy, reference, groups: list[PreferenceGroup], config: DPOConfig, pad_id: int, device,
             autocast_dtype) -> dict[str, float]:
    """Mean over `groups` of each group's STATS (loss, pair accuracy, reward margin, rewards)."""
    policy.eval()
    totals = dict.fromkeys(STATS, 0.0)
    for i in range(0, len(groups), config.data.batch_size):
        _, stats, _ = preference_losses(policy, reference, groups[i:i + config.data.batch_size], config, pad_id,
                                        device, autocast_dtype)
        totals = {k: totals[k] + stats[k] for k in STATS}
    policy.train()
    return {k: v / len(groups) for k, v in totals.items()}


def run_dpo(config: DPOConfig, resume: bool = False, stop_at_step: int | None = None,
            deepspeed: str | Path | None = None) -> Path:
    """Run the DPO stage; returns the checkpoint directory (`run.output_dir/checkpoint`).

    resume / stop_at_step: as `run_sft` (continue from the newest saved state; stop and save after N steps).
    deepspeed: a DeepSpeed config file (the policy trains under ZeRO; the frozen reference stays plain).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, final_dir = begin_stage(config.run, resume)

    # 1. data: read, validate and tokenise every group before loading any weights.
    model_path = resolve_model_path(config.model)
    reference_path = resolve_model_path(config.reference) if config.reference else model_path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = pad_token_id(tokenizer)
    check_context(model_path, config.data.max_length)
    max_length, too_long = config.data.max_length, config.data.too_long
    train = load_preferences(config.data.train, tokenizer, max_length, too_long)
    heldout = load_preferences(config.data.heldout, tokenizer, max_length, too_long) if config.data.heldout else []
    data_hash = dataset_hash(config.data.files())
    config_dict = config_to_dict(config)

    # 2. models: the policy trains in fp32 (bf16 only as autocast compute); the reference is a separate
    # frozen copy of the initial checkpoint unless `reference` names another one.
    device, compute_dtype = resolve_device(config.run.device, config.run.dtype)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    reference = load_frozen(reference_path, device)
    make_trainable(policy, config.run.gradient_checkpointing)

    # 3-4. plan, optimizer, resume (trainer/stage.py): a step = `grad_accumulation` micro-batches of
    # `batch_size` groups.
    plan, engine, position, save_state = prepare_training(
        policy, config, len(train), out, config_dict, data_hash, resume=resume, deepspeed=deepspeed, log=log)
    total_steps = plan.total_steps

    # 5. train: the step's loss is the mean over its groups of each group's mean pair loss.
    metrics_log = MetricsLog(out, resume_step=position.step)
    throughput = Throughput()
    last: dict[str, float] = {}
    bar = progress_bar(total_steps, position.step, "dpo")
    step = position.step
    interrupts = StepInterrupts(log)
    try:
        while step < total_steps:
            epoch, window = plan.window(step)  # the order depends only on (seed, epoch): nothing to replay
            window_groups = [[train[i] for i in indices] for indices in window]
            n_groups = sum(len(groups) for groups in window_groups)
            totals = dict.fromkeys(STATS, 0.0)
            for i, groups in enumerate(window_groups):
                loss, stats, tokens = preference_losses(policy, reference, groups, config, pad_id, device,
                                                        autocast_dtype)
                engine.backward(loss / n_groups, last=i == len(window_groups) - 1)  # this micro-batch's share
                totals = {k: totals[k] + stats[k] for k in STATS}
                throughput.add(tokens)
            grad_norm, lr = engine.step()  # clip, update, schedule, zero_grad (plain torch or DeepSpeed)
            step += 1
            last = {k: v / n_groups for k, v in totals.items()}
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}", lr=f"{lr:.2e}")
            if step % config.run.log_every == 0 or step == total_steps:
                metrics_log.write({"step": step, "epoch": epoch, **last, "lr": lr, "grad_norm": grad_norm,
                                   "tokens_per_s": round(throughput.take(), 1)})
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

    # 6. evaluate: held-out loss, pair accuracy and reward margin, if a held-out file is given.
    metrics = {"steps": total_steps, "epochs": config.epochs, "train_groups": len(train),
               "train_pairs": sum(g.pairs for g in train), "reference_version": model_version_of(reference_path),
               **{f"final_{k}": v for k, v in last.items()}, **skipped_metrics(train=train, heldout=heldout)}
    if heldout:
        held = evaluate(policy, reference, heldout, config, pad_id, device, autocast_dtype)
        metrics.update({f"heldout_{k}": v for k, v in held.items()})
        metrics_log.write({"step": total_steps, **{f"heldout_{k}": v for k, v in held.items()}})

    # 7. checkpoint: HF files + manifest, atomically; serving loads it as a policy.
    policy.eval()
    if config.run.gradient_checkpointing:
        policy.gradient_checkpointing_disable()
        policy.config.use_cache = True
    return write_stage_checkpoint(final_dir, policy, tokenizer, stage="dpo",
                                  parent_version=model_version_of(model_path), data_hash=data_hash,
                                  config=config_dict, metrics=metrics)
