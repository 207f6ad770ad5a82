"""Supervised fine-tuning (InstructGPT step 1): next-token loss on the demonstrations' response tokens.

`run_sft(config)` reads top to bottom: 1. data, 2. model, 3. plan and optimizer, 4. resume,
5. train, 6. evaluate, 7. checkpoint. Every input is checked in 1–4, before the first step.
The loss is the mean negative log-likelihood per response token over the whole optimizer step (all
its micro-batches), so gradient accumulation gives the gradient one big batch would.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from serving.checkpoint import model_version_of
from serving.models import resolve_device
from trainer.checkpointing import dataset_hash, write_stage_checkpoint
from trainer.config import SFTConfig, config_to_dict
from trainer.data import IGNORE_INDEX, SFTExample, collate_sft, load_sft, skipped_metrics
from trainer.maths import masked_sum, next_token_logprobs
from trainer.metrics import MetricsLog, Throughput, progress_bar
from trainer.models import check_context, pad_token_id, resolve_model_path
from trainer.stage import StepInterrupts, begin_stage, make_trainable, prepare_training

log = logging.getLogger(__name__)

def response_nll_sum(model, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Summed negative log-likelihood (nats) of the batch's response tokens (labels != IGNORE_INDEX).

    batch: input_ids, attention_mask, labels, each (B, T).
    """
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logprobs = next_token_logprobs(logits, batch["input_ids"])  # (B, T-1), float32
    targets = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1): response tokens being predicted
    return -masked_sum(logprobs, targets)


def count_targets(examples: list[SFTExample]) -> int:
    """Response tokens the loss covers (the first token is never a target: nothing predicts it)."""
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples)


@torch.no_grad()
def evaluate(model, examples: list[SFTExample], batch_size: int, pad_id: int, device, autocast_dtype) -> float:
    """Mean NLL per response token (nats) over `examples`."""
    model.eval()
    total = 0.0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_sft(examples[i:i + batch_size], pad_id).items()}
        total += response_nll_sum(model, batch, autocast_dtype).item()
    model.train()
    return total / max(count_targets(examples), 1)


def run_sft(config: SFTConfig, resume: bool = False, stop_at_step: int | None = None,
            deepspeed: str | Path | None = None) -> Path:
    """Run the SFT stage; returns the checkpoint directory (`run.output_dir/checkpoint`).

    resume: continue from the newest state in `run.output_dir/state/` (same result as never stopping).
    stop_at_step: stop once this many optimizer steps are done, save the training state and return its
        directory instead (splitting a run across time slots; the tests' interruption).
    deepspeed: a DeepSpeed config file: apply the updates with DeepSpeed ZeRO (trainer.distributed).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, final_dir = begin_stage(config.run, resume)

    # 1. data: read, validate and tokenise every record before loading any weights.
    model_path = resolve_model_path(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = pad_token_id(tokenizer)
    check_context(model_path, config.data.max_length)
    too_long = config.data.too_long
    train = load_sft(config.data.train, tokenizer, config.data.max_length, too_long)
    heldout = load_sft(config.data.heldout, tokenizer, config.data.max_length, too_long) if config.data.heldout else []
    data_hash = dataset_hash(config.data.files())
    config_dict = config_to_dict(config)

    # 2. model: fp32 weights and optimizer state; bf16 only as autocast compute (run.dtype).
    device, compute_dtype = resolve_device(config.run.device, config.run.dtype)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    make_trainable(model, config.run.gradient_checkpointing)

    # 3-4. plan, optimizer, resume (trainer/stage.py): a step = `grad_accumulation` micro-batches; the
    # last step of an epoch may take fewer.
    plan, engine, position, save_state = prepare_training(
        model, config, len(train), out, config_dict, data_hash, resume=resume, deepspeed=deepspeed, log=log)
    total_steps = plan.total_steps

    # 5. train
    metrics_log = MetricsLog(out, resume_step=position.step)
    throughput = Throughput()
    last_loss = None
    bar = progress_bar(total_steps, position.step, "sft")
    step = position.step
    interrupts = StepInterrupts(log)
    try:
        while step < total_steps:
            epoch, window = plan.window(step)  # the order depends only on (seed, epoch): nothing to replay
            window_examples = [[train[i] for i in indices] for indices in window]
            n_targets = max(count_targets([e for mb in window_examples for e in mb]), 1)
            window_loss = 0.0
            for i, examples in enumerate(window_examples):
                batch = {k: v.to(device) for k, v in collate_sft(examples, pad_id).items()}
                loss = response_nll_sum(model, batch, autocast_dtype) / n_targets  # this micro-batch's share
                engine.backward(loss, last=i == len(window_examples) - 1)
                window_loss += loss.item()
                throughput.add(int(batch["attention_mask"].sum()))
            grad_norm, lr = engine.step()  # clip, update, schedule, zero_grad (plain torch or DeepSpeed)
            step += 1
            last_loss = window_loss
            bar.update(1)
            bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{lr:.2e}")
            if step % config.run.log_every == 0 or step == total_steps:
                metrics_log.write({"step": step, "epoch": epoch, "loss": window_loss, "lr": lr,
                                   "grad_norm": grad_norm, "tokens_per_s": round(throughput.take(), 1)})
            if stop_at_step is not None and step >= stop_at_step and step < total_steps:
                return save_state(step)
            if config.run.save_every and step % config.run.save_every == 0 and step < total_steps:
                save_state(step)
            interrupts.at_step_end()  # a Ctrl-C during the step takes effect here
    except KeyboardInterrupt:
        # Keep the work done: the steps finished so far are saved, the partial one is redone on resume.
        if step > position.step and interrupts.whole_steps:
            log.warning("interrupted: training state saved at %s", save_state(step))
        raise
    finally:
        interrupts.close()
        bar.close()

    # 6. evaluate: held-out loss per response token, if a held-out file is given.
    metrics = {"steps": total_steps, "epochs": config.epochs, "train_examples": len(train),
               "final_loss": last_loss, **skipped_metrics(train=train, heldout=heldout)}
    if heldout:
        metrics["heldout_loss"] = evaluate(model, heldout, config.data.batch_size, pad_id, device, autocast_dtype)
        metrics_log.write({"step": total_steps, "heldout_loss": metrics["heldout_loss"]})

    # 7. checkpoint: HF files + manifest, atomically; serving loads it as a policy.
    model.eval()
    if config.run.gradient_checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True  # serving wants the cache back
    return write_stage_checkpoint(final_dir, model, tokenizer, stage="sft",
                                  parent_version=model_version_of(model_path), data_hash=data_hash,
                                  config=config_dict, metrics=metrics)
