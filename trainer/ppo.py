"""PPO-ptx (InstructGPT step 3): the SFT policy maximises the reward model's score of its own rollouts,
minus β · KL to the frozen SFT reference per token, plus γ_ptx times the next-token loss on ptx text.

`run_ppo(config)` reads top to bottom: 1. data, 2. models, 3. plan and optimizer, 4. resume, 5. train
(one `ppo_step` per rollout batch), 6. evaluate, 7. checkpoint. `ppo_step` reads as the algorithm:
1. rollouts, 2. rewards and KL, 3. advantages, 4. PPO epochs, 5. ptx (inside each mini-batch).

Models:
- policy: the SFT checkpoint, trained; the serving engine (`LocalEngine`) wraps this very object and
  generates the rollouts with its continuous batching (trainer/rollouts.py).
- reference: a frozen copy of the SFT checkpoint (or `reference`): the KL anchor.
- reward model: the RM checkpoint, frozen; scores exactly as `/v1/score` (render_pair, reward_scores,
  the config's `feedloop_reward_bias` included).
- value model: a second copy of the RM, trained: its body and scalar head `score` applied to EVERY
  position's hidden state (plus the RM's bias), so V(s_t) starts as "the RM's score if the text ended
  here". `token_values` is that per-token read-out; the value model has its own weights (no shared body).

Training: the policy and the value model each have their own engine (trainer/distributed.py: plain
torch, or DeepSpeed ZeRO with `--deepspeed`), AdamW and schedule, from the same recipe; their losses
touch disjoint weights, so each engine gets its own half of the objective and clips its own gradient
norm. The reference and the reward model are plain frozen modules (no engine, no optimizer state).

Resume: both engines' states, β and the RNG are one training state (`EngineGroup`); rollouts draw
from per-request seeds of (seed, step, index) and mini-batch orders from generators of (seed, step,
epoch), so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from serving.checkpoint import model_version_of
from serving.engine.engine import LocalEngine
from serving.models import resolve_device
from trainer.checkpointing import Position, StepPlan, dataset_hash, resume_training, write_stage_checkpoint
from trainer.config import PPOConfig, config_to_dict
from trainer.data import skipped_metrics
from trainer.distributed import EngineGroup, build_engine
from trainer.maths import (AdaptiveKLController, FixedKLController, entropy, gae, kl_penalty, masked_sum,
                           next_token_logprobs, per_token_rewards, policy_loss, ptx_loss, value_loss,
                           whiten_advantages)
from trainer.metrics import MetricsLog, PhaseTimer, Throughput, progress_bar
from trainer.models import check_context, load_frozen, load_scalar_head, pad_token_id, resolve_model_path
from trainer.optim import build_optimizer, build_scheduler
from trainer.reward import check_same_tokenizer
from trainer.rollouts import collate_rollouts, generate, load_prompts, load_ptx, score_rollouts
from trainer.stage import StepInterrupts, begin_stage

log = logging.getLogger(__name__)


def policy_logits(policy, input_ids, attention_mask, temperature: float, autocast_dtype) -> torch.Tensor:
    """(B, T, V) logits of the sampling distribution (divided by the rollout temperature)."""
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits / temperature if temperature != 1.0 else logits


def token_values(value_model, input_ids, attention_mask, autocast_dtype) -> torch.Tensor:
    """(B, T − 1) float32 V(s_t): the RM head on the hidden state at t, the state before token t + 1."""
    body = getattr(value_model, value_model.base_model_prefix)
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        values = value_model.score(hidden).squeeze(-1).float()  # (B, T)
    bias = getattr(value_model.config, "feedloop_reward_bias", None) or 0.0
    return values[:, :-1] + bias


def ptx_batch(ptx: list[list[int]], indices: list[int], pad_id: int, device):
    """Right-padded ptx texts: input_ids (N, T), mask (N, T)."""
    width = max(len(ptx[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.bool)
    for row, i in enumerate(indices):
        ids[row, :len(ptx[i])] = torch.tensor(ptx[i])
        mask[row, :len(ptx[i])] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def ptx_nll(policy, ptx: list[list[int]], batch_size: int, pad_id: int, device, autocast_dtype) -> float:
    """Mean next-token NLL (nats per token) of the policy on all ptx texts: the 'pretraining loss'."""
    total, count = 0.0, 0
    for start in range(0, len(ptx), batch_size):
        ids, mask = ptx_batch(ptx, list(range(start, min(start + batch_size, len(ptx)))), pad_id, device)
        logprobs = next_token_logprobs(policy_logits(policy, ids, mask.long(), 1.0, autocast_dtype), ids)
        total += -masked_sum(logprobs, mask[:, 1:]).item()
        count += int(mask[:, 1:].sum())
    return total / max(count, 1)


@torch.no_grad()
def evaluate_rollouts(engine, policy, reference, reward_model, tokenizer, prompts, config: PPOConfig, pad_id,
                      device, autocast_dtype, step: int) -> dict[str, float]:
    """Fresh rollouts of the current policy on `prompts`: mean RM score and mean KL (k1, nats per sequence)."""
    rollouts = generate(engine, prompts, config.max_new_tokens, config.temperature, config.run.seed, step)
    scores = score_rollouts(reward_model, tokenizer, rollouts, pad_id, device, autocast_dtype, config.data.max_length)
    ids, attn, mask = (t.to(device) for t in collate_rollouts(rollouts, pad_id))
    logprobs = next_token_logprobs(policy_logits(policy, ids, attn, config.temperature, autocast_dtype), ids)
    ref_logprobs = next_token_logprobs(policy_logits(reference, ids, attn, config.temperature, autocast_dtype), ids)
    kl = masked_sum(logprobs - ref_logprobs, mask, dim=-1)  # (B,)
    return {"score": scores.mean().item(), "kl": kl.mean().item()}


def ppo_step(step: int, prompts, *, engine, engines: EngineGroup, reference, reward_model, kl_controller, ptx,
             tokenizer, config: PPOConfig, pad_id: int, device, autocast_dtype) -> dict[str, float]:
    """One PPO step on a rollout batch of `prompts`; returns the step's metrics, with the wall seconds of
    its phases (`rollout_s`, `score_s`, `logprobs_s`, `advantages_s`, `update_s`, `step_s`: bench/train.py
    reports them).

    engine: the serving engine around the policy; engines: the policy's and the value model's training
    engines (`engines["policy"].module` is the very policy object the serving engine generates with).
    """
    policy, value_model = engines["policy"].module, engines["value_model"].module
    seed = config.run.seed
    timer = PhaseTimer(device)
    step_start = time.perf_counter()

    # 1. rollouts: the engine samples one completion per prompt from the current weights; the reward
    # model scores them; old log-probs, the reference's log-probs and the values are one forward each.
    with timer.phase("rollout"):
        rollouts = generate(engine, prompts, config.max_new_tokens, config.temperature, seed, step)
    input_ids, attention_mask, mask = (t.to(device) for t in collate_rollouts(rollouts, pad_id))  # (B, T), (B, T), (B, T-1)
    with torch.no_grad():
        with timer.phase("score"):
            scores = score_rollouts(reward_model, tokenizer, rollouts, pad_id, device, autocast_dtype,
                                    config.data.max_length)  # (B,)
        with timer.phase("logprobs"):
            old_logprobs = next_token_logprobs(
                policy_logits(policy, input_ids, attention_mask, config.temperature, autocast_dtype), input_ids)  # (B, T-1)
            ref_logprobs = next_token_logprobs(
                policy_logits(reference, input_ids, attention_mask, config.temperature, autocast_dtype), input_ids)
            old_values = token_values(value_model, input_ids, attention_mask, autocast_dtype)  # (B, T-1)

    with timer.phase("advantages"):
        # 2. rewards and KL: the score at each completion's last token, −β · KL at every token.
        beta = kl_controller.value
        kl = kl_penalty(old_logprobs, ref_logprobs, config.kl_estimator)  # (B, T-1)
        rewards = per_token_rewards(scores, kl, mask, beta, config.score_clip, config.whiten_rewards)  # (B, T-1)
        sequence_kl = masked_sum(kl, mask, dim=-1).mean().item()  # nats per sequence

        # 3. advantages: GAE over each completion, whitened over the batch.
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)  # (B, T-1) each
        if config.whiten_advantages:
            advantages = whiten_advantages(advantages, mask)

    # 4. PPO epochs: shuffled mini-batches, clipped policy and value losses, one optimizer step each
    # for the policy and for the value model (separate weights and losses, gradient norms clipped per model).
    n = len(rollouts)
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction", "entropy",
                                                     "approx_kl", "value_clip_fraction", "ptx_loss")}
    with timer.phase("update"):
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + epoch))
            for k, start in enumerate(range(0, n, config.data.mini_batch_size)):
                mb = order[start:start + config.data.mini_batch_size].to(device)
                ids, attn, m = input_ids[mb], attention_mask[mb], mask[mb]
                logits = policy_logits(policy, ids, attn, config.temperature, autocast_dtype)  # (b, T, V)
                pl = policy_loss(next_token_logprobs(logits, ids), old_logprobs[mb], advantages[mb], m,
                                 config.clip_range)
                vl = value_loss(token_values(value_model, ids, attn, autocast_dtype), old_values[mb], returns[mb], m,
                                config.value_clip)
                policy_side = pl.loss
                with torch.no_grad():
                    stats["entropy"].append(entropy(logits[:, :-1], m).item())

                # 5. ptx: γ_ptx · next-token loss on a ptx batch, in the same update (InstructGPT eq. 2).
                if ptx:
                    g = torch.Generator().manual_seed(seed * 7_919 + step * 1_009 + epoch * 101 + k)
                    chosen = torch.randint(len(ptx), (config.data.ptx_batch_size,), generator=g).tolist()
                    ptx_ids, ptx_mask = ptx_batch(ptx, chosen, pad_id, device)
                    with torch.set_grad_enabled(config.ptx_coef > 0):  # coef 0: measured, not trained
                        px = ptx_loss(policy_logits(policy, ptx_ids, ptx_mask.long(), 1.0, autocast_dtype), ptx_ids,
                                      ptx_mask, config.ptx_coef)
                    if config.ptx_coef > 0:
                        policy_side = policy_side + px.loss
                    stats["ptx_loss"].append(px.nll.item())

                # The objective is policy_side + c·value loss; each half's gradient reaches only its model.
                engines["policy"].backward(policy_side)
                engines["value_model"].backward(config.value_loss_coef * vl.loss)
                engines["policy"].step()  # clip, update, schedule, zero_grad (plain torch or DeepSpeed)
                engines["value_model"].step()
                for name, value in (("policy_loss", pl.loss), ("value_loss", vl.loss),
                                    ("clip_fraction", pl.clip_fraction), ("approx_kl", pl.approx_kl),
                                    ("value_clip_fraction", vl.clip_fraction)):
                    stats[name].append(value.item())

    kl_controller.update(sequence_kl, n)
    means = {k: (sum(v) / len(v) if v else None) for k, v in stats.items()}
    return {"score": scores.mean().item(), "score_std": scores.std().item() if n > 1 else 0.0, "kl": sequence_kl,
            "kl_coef": beta, **means, "response_length": mask.sum(-1).float().mean().item(),
            "tokens": int(attention_mask.sum()), **timer.take(),
            "step_s": round(time.perf_counter() - step_start, 4)}


def run_ppo(config: PPOConfig, resume: bool = False, stop_at_step: int | None = None,
            deepspeed: str | Path | None = None) -> Path:
    """Run the PPO stage; returns the checkpoint directory (`run.output_dir/checkpoint`).

    resume, stop_at_step: as for `trainer.sft.run_sft` (a PPO step is one rollout batch).
    deepspeed: a DeepSpeed config file: the policy and the value model train under DeepSpeed ZeRO, one
        engine each; the frozen reference and reward model stay plain modules.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, final_dir = begin_stage(config.run, resume)

    # 1. data: tokenizers must match (the RM reads what the policy writes); prompts and ptx text checked.
    policy_path = resolve_model_path(config.policy)
    reward_path = resolve_model_path(config.reward_model)
    reference_path = resolve_model_path(config.reference) if config.reference else policy_path
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    check_same_tokenizer(AutoTokenizer.from_pretrained(reward_path), config.policy)
    pad_id = pad_token_id(tokenizer)
    check_context(policy_path, config.data.max_length)
    max_prompt = config.data.max_length - config.max_new_tokens
    too_long = config.data.too_long
    train = load_prompts(config.data.train, tokenizer, max_prompt, too_long)
    heldout = load_prompts(config.data.heldout, tokenizer, max_prompt, too_long) if config.data.heldout else []
    ptx = load_ptx(config.data.ptx, tokenizer, config.data.max_length, too_long) if config.data.ptx else []
    data_hash = dataset_hash(config.data.files())
    config_dict = config_to_dict(config)

    # 2. models: policy and value model train in fp32; reference and reward model are frozen.
    device, compute_dtype = resolve_device(config.run.device, config.run.dtype)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).to(device)
    reference = load_frozen(reference_path, device)
    reward_model = load_scalar_head(reward_path, pad_id, device).eval().requires_grad_(False)
    value_model = load_scalar_head(reward_path, pad_id, device)
    if config.run.gradient_checkpointing:
        for model in (policy, value_model):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # 3. plan and optimizers: a PPO step per rollout batch; ppo_epochs × mini-batches optimizer steps each,
    # for the policy and for the value model, each with its own AdamW and schedule (the same recipe).
    plan = StepPlan(len(train), batch_size=config.data.batch_size, accumulation=1, epochs=config.epochs,
                    seed=config.run.seed, shuffle=config.data.shuffle, max_steps=config.run.max_steps)
    total_steps = plan.total_steps
    updates = total_steps * config.ppo_epochs * -(-config.data.batch_size // config.data.mini_batch_size)
    engines = EngineGroup({})
    for name, model in (("policy", policy), ("value_model", value_model)):
        optimizer = build_optimizer(model, config.optim)
        engines.engines[name] = build_engine(model, optimizer, build_scheduler(optimizer, config.optim, updates),
                                             grad_clip=config.optim.grad_clip, batch_size=config.data.mini_batch_size,
                                             accumulation=1, deepspeed_config=deepspeed)
    # eval mode throughout: no dropout, so the rollout's log-probs and the update's agree
    policy.eval()
    value_model.eval()
    # The serving engine generates with the trained policy object itself (under DeepSpeed, the engine's
    # module: ZeRO-2 updates its parameters in place), so every rollout samples from the current weights.
    assert engines["policy"].module is policy
    eos = policy.generation_config.eos_token_id if policy.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    engine = LocalEngine(policy, tokenizer, tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
                         max_batch_size=max(config.data.batch_size, 1), max_queue=max(len(train), len(heldout), 1),
                         max_input_tokens=max_prompt, max_total_tokens=config.data.max_length)

    # 4. resume: policy, value model, their optimizers and schedules, β, RNG and the step.
    position = Position(step=0, epoch=0, batch_index=0)
    engines.extra["kl_coef"] = config.init_kl_coef
    if resume:
        position, state_dir = resume_training(out, config_dict, data_hash, engine=engines)
        log.info("resuming from %s (step %d of %d)", state_dir, position.step, total_steps)
    kl_coef = engines.extra["kl_coef"]
    kl_controller = (AdaptiveKLController(kl_coef, config.kl_target, config.kl_horizon)
                     if config.kl_target is not None else FixedKLController(kl_coef))

    def save_state(step: int) -> Path:
        engines.extra["kl_coef"] = kl_controller.value
        return plan.save_state(out, step, engine=engines, config=config_dict, data_hash=data_hash)

    # 5. train: one PPO step per rollout batch of prompts.
    metrics_log = MetricsLog(out, resume_step=position.step)
    throughput = Throughput()
    last: dict = {}
    bar = progress_bar(total_steps, position.step, "ppo")
    step = position.step
    interrupts = StepInterrupts(log)
    try:
        while step < total_steps:
            epoch, (batch,) = plan.window(step)  # the order depends only on (seed, epoch)
            last = ppo_step(step, [train[i] for i in batch], engine=engine, engines=engines, reference=reference,
                            reward_model=reward_model, kl_controller=kl_controller, ptx=ptx, tokenizer=tokenizer,
                            config=config, pad_id=pad_id, device=device, autocast_dtype=autocast_dtype)
            throughput.add(last.pop("tokens"))
            step += 1
            bar.update(1)
            bar.set_postfix(score=f"{last['score']:.3f}", kl=f"{last['kl']:.3f}")
            if step % config.run.log_every == 0 or step == total_steps:
                metrics_log.write({"step": step, "epoch": epoch, **last, "lr": engines["policy"].scheduler.get_last_lr()[0],
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

    # 6. evaluate: fresh rollouts on the held-out prompts; the policy's loss on the ptx text.
    if config.run.gradient_checkpointing:
        policy.gradient_checkpointing_disable()
    metrics = {"steps": total_steps, "epochs": config.epochs, "train_prompts": len(train),
               "reward_model_version": model_version_of(reward_path),
               "reference_version": model_version_of(reference_path), "final_kl_coef": kl_controller.value,
               **{f"final_{k}": v for k, v in last.items() if not k.endswith("_s")},
               **skipped_metrics(train=train, heldout=heldout, ptx=ptx)}
    if heldout:
        held = evaluate_rollouts(engine, policy, reference, reward_model, tokenizer, heldout, config, pad_id, device,
                                 autocast_dtype, step=-1)
        metrics.update({f"heldout_{k}": v for k, v in held.items()})
        metrics_log.write({"step": total_steps, **{f"heldout_{k}": v for k, v in held.items()}})
    if ptx:
        metrics["ptx_nll"] = ptx_nll(policy, ptx, config.data.ptx_batch_size, pad_id, device, autocast_dtype)

    # 7. checkpoint: the policy as HF files + manifest stage "ppo"; serving loads it as a policy.
    return write_stage_checkpoint(final_dir, policy, tokenizer, stage="ppo",
                                  parent_version=model_version_of(policy_path), data_hash=data_hash,
                                  config=config_dict, metrics=metrics)
