"""`feedloop bench train`: wall time and samples/s of ONE PPO step and ONE reward-model epoch on the
bundled SmolLM2, broken down by phase, plus the rollout generator against HF `generate`.

Data is synthetic (built in a temporary directory): P chat prompts for PPO, and G ranking groups of
K = 2..4 short completions for the RM. Models are built as `run_ppo` / `run_rm` build them: the policy
and the frozen reference are the bundled model; the reward model (frozen) and the value model
(trained) are the bundled body with a fresh scalar head (seeded), as `run_rm` starts one.

PPO phases follow `trainer.ppo.ppo_step` in its order, calling the same functions (trainer/ppo.py is
not instrumented, so its boundaries are replicated here):
  rollout  — `trainer.rollouts.generate`: the serving `LocalEngine`'s continuous batching;
  score    — `score_rollouts` (the RM's score, as /v1/score);
  logprobs — old/reference log-probs and old values (three forwards), KL, rewards, GAE;
  update   — ppo_epochs × mini-batches of clipped policy + value loss, backward, clip, AdamW step.
RM phases (one pass over the groups, as `run_rm`'s loop): forward (`group_rewards` + `ranking_loss`),
backward, optimizer step (clip, AdamW, schedule).

Rollout baseline: HF `generate` on a separate copy of the policy (the engine switches its model's
attention function), the same prompts as ONE static left-padded batch, the same max_new_tokens,
sampling at temperature 1 (top-k/top-p off, as the engine's rollouts). Both stop rows at eos, so
tokens/s counts each row's generated tokens up to and including eos.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.serve import QUESTIONS, on_fresh_thread, write_section
from serving.models import ensure_bundled_model, resolve_device
from serving.paths import data_dir_from_env

TOPICS = ["the sea", "a cat", "prime numbers", "the moon", "bread", "rain", "a library", "trains"]


def write_data(directory: Path, prompts: int, groups: int) -> tuple[Path, Path]:
    """prompts.jsonl ({prompt}) and rm.jsonl ({prompt, completions best→worst}, K cycling 2..4)."""
    prompt_path, rm_path = directory / "prompts.jsonl", directory / "rm.jsonl"
    with prompt_path.open("w") as f:
        for i in range(prompts):
            f.write(json.dumps({"prompt": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}) + "\n")
    with rm_path.open("w") as f:
        for i in range(groups):
            topic = TOPICS[i % len(TOPICS)]
            k = 2 + i % 3
            completions = [f"Here is a short, clear note about {topic}. It is accurate and kind.",
                           f"Something about {topic}, I guess.", f"{topic}?", "No."][:k]
            f.write(json.dumps({"prompt": f"Tell me about {topic} (#{i}).", "completions": completions}) + "\n")
    return prompt_path, rm_path


class Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, name: str):
        phases = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                phases.seconds[name] = phases.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Timer()


def bench_ppo(args, prompt_path: Path, model_path: Path) -> dict:
    """One PPO step, phases timed; models built as in `run_ppo` step 2."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from serving.engine.engine import LocalEngine
    from trainer.config import PPOConfig, config_from_dict
    from trainer.dpo import load_frozen
    from trainer.maths import (FixedKLController, gae, kl_penalty, masked_sum, next_token_logprobs,
                               per_token_rewards, policy_loss, value_loss, whiten_advantages)
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.ppo import policy_logits, token_values
    from trainer.rollouts import collate_rollouts, generate, load_prompts, score_rollouts

    config = config_from_dict({"stage": "ppo", "policy": str(model_path), "reward_model": str(model_path),
                               "max_new_tokens": args.new_tokens, "ppo_epochs": args.ppo_epochs,
                               "data": {"train": str(prompt_path), "batch_size": args.prompts,
                                        "mini_batch_size": args.mini_batch_size, "max_length": 512},
                               "run": {"output_dir": str(prompt_path.parent / "ppo"), "device": args.device}},
                              PPOConfig)
    torch.manual_seed(config.run.seed)
    random.seed(config.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_prompt = config.data.max_length - config.max_new_tokens
    prompts = load_prompts(config.data.train, tokenizer, max_prompt)
    device, compute_dtype = resolve_device(config.run.device, config.run.dtype)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    reference = load_frozen(model_path, device)
    reward_model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    reward_model.config.pad_token_id = pad_id
    reward_model = reward_model.to(device).eval().requires_grad_(False)
    value_model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    value_model.config.pad_token_id = pad_id
    value_model = value_model.to(device).eval()
    models = torch.nn.ModuleDict({"policy": policy, "value_model": value_model})
    eos = policy.generation_config.eos_token_id if policy.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    engine = LocalEngine(policy, tokenizer, tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
                         max_batch_size=max(config.data.batch_size, 1), max_queue=len(prompts),
                         max_input_tokens=max_prompt, max_total_tokens=config.data.max_length)
    updates = config.ppo_epochs * -(-len(prompts) // config.data.mini_batch_size)
    optimizer = build_optimizer(models, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, updates)
    kl_controller = FixedKLController(config.init_kl_coef)

    generate(engine, prompts[:1], 4, config.temperature, config.run.seed, -1)  # warm-up: pages in the weights
    phases = Phases()
    seed, step = config.run.seed, 0
    start = time.perf_counter()
    with phases.time("rollout"):
        rollouts = generate(engine, prompts, config.max_new_tokens, config.temperature, seed, step)
    input_ids, attention_mask, mask = (t.to(device) for t in collate_rollouts(rollouts, pad_id))
    with torch.no_grad():
        with phases.time("score"):
            scores = score_rollouts(reward_model, tokenizer, rollouts, pad_id, device, autocast_dtype,
                                    config.data.max_length)
        with phases.time("logprobs"):
            old_logprobs = next_token_logprobs(
                policy_logits(policy, input_ids, attention_mask, config.temperature, autocast_dtype), input_ids)
            ref_logprobs = next_token_logprobs(
                policy_logits(reference, input_ids, attention_mask, config.temperature, autocast_dtype), input_ids)
            old_values = token_values(value_model, input_ids, attention_mask, autocast_dtype)
            kl = kl_penalty(old_logprobs, ref_logprobs, config.kl_estimator)
            rewards = per_token_rewards(scores, kl, mask, kl_controller.value, config.score_clip,
                                        config.whiten_rewards)
            advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
            if config.whiten_advantages:
                advantages = whiten_advantages(advantages, mask)
    n = len(rollouts)
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    max_norm = config.optim.grad_clip if config.optim.grad_clip is not None else float("inf")
    with phases.time("update"):
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + epoch))
            for start_mb in range(0, n, config.data.mini_batch_size):
                mb = order[start_mb:start_mb + config.data.mini_batch_size].to(device)
                ids, attn, m = input_ids[mb], attention_mask[mb], mask[mb]
                logits = policy_logits(policy, ids, attn, config.temperature, autocast_dtype)
                pl = policy_loss(next_token_logprobs(logits, ids), old_logprobs[mb], advantages[mb], m,
                                 config.clip_range)
                vl = value_loss(token_values(value_model, ids, attn, autocast_dtype), old_values[mb], returns[mb], m,
                                config.value_clip)
                (pl.loss + config.value_loss_coef * vl.loss).backward()
                torch.nn.utils.clip_grad_norm_(policy_params, max_norm)
                torch.nn.utils.clip_grad_norm_(value_params, max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    wall = time.perf_counter() - start
    generated = sum(len(r.response_ids) for r in rollouts)
    return {"wall": wall, "phases": phases.seconds, "samples": n, "generated": generated,
            "rollout_tok_s": generated / phases.seconds["rollout"], "updates": updates,
            "sequence_tokens": int(attention_mask.sum()), "mean_score": scores.mean().item(),
            "texts": [tokenizer.decode(p.ids) for p in prompts], "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature, "lengths": [len(r.response_ids) for r in rollouts]}


def bench_hf_generate(model_path: Path, texts: list[str], new_tokens: int, temperature: float, device: str) -> dict:
    """HF `generate` on a separate copy: one static left-padded batch, sampling at `temperature`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, _ = resolve_device(device, "auto")
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(dev).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    torch.manual_seed(0)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None, pad_token_id=pad_id)
    with torch.inference_mode():
        warm = tok(texts[:1], return_tensors="pt", add_special_tokens=False).to(dev)
        model.generate(**warm, max_new_tokens=4, **kwargs)  # warm-up: pages in the weights
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, **kwargs)
        wall = time.perf_counter() - start
    lengths = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        lengths.append(ends[0] + 1 if ends else len(row))
    return {"wall": wall, "generated": sum(lengths), "lengths": lengths, "tok_s": sum(lengths) / wall}


def bench_rm(args, rm_path: Path, model_path: Path) -> dict:
    """One RM epoch (every group once), phases timed; model and loop as in `run_rm`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.config import RMConfig, config_from_dict
    from trainer.distributed import build_engine
    from trainer.maths import ranking_loss
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.reward import group_rewards, load_rankings

    config = config_from_dict({"stage": "rm", "model": str(model_path),
                               "data": {"train": str(rm_path), "batch_size": args.rm_batch_size, "max_length": 512},
                               "run": {"output_dir": str(rm_path.parent / "rm"), "device": args.device}}, RMConfig)
    torch.manual_seed(config.run.seed)
    random.seed(config.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = load_rankings(config.data.train, tokenizer, config.data.max_length)
    device, compute_dtype = resolve_device(config.run.device, config.run.dtype)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_id
    model = model.to(device).train()
    batch_size = config.data.batch_size
    batches = [train[i:i + batch_size] for i in range(0, len(train), batch_size)]
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, len(batches))
    engine = build_engine(model, optimizer, scheduler, grad_clip=config.optim.grad_clip, batch_size=batch_size,
                          accumulation=1)
    with torch.no_grad():  # warm-up: pages in the weights
        group_rewards(model, batches[0][:1], pad_id, device, autocast_dtype)
    phases = Phases()
    start = time.perf_counter()
    for groups in batches:
        with phases.time("forward"):
            rewards, mask = group_rewards(model, groups, pad_id, device, autocast_dtype)
            loss = ranking_loss(rewards, mask)
        with phases.time("backward"):
            engine.backward(loss, last=True)
        with phases.time("optimizer"):
            engine.step()
    wall = time.perf_counter() - start
    return {"wall": wall, "phases": phases.seconds, "groups": len(train),
            "sequences": sum(len(g.sequences) for g in train), "steps": len(batches),
            "tokens": sum(len(s) for g in train for s in g.sequences)}


def render(ppo: dict, hf: dict, rm: dict, args, device: str, model_version: str) -> str:
    def row(name: str, seconds: float, wall: float, samples: int, note: str = "") -> str:
        return f"| {name} | {seconds:.2f} | {seconds / wall:.0%} | {samples / seconds:.2f} | {note} |"

    ph, rp = ppo["phases"], rm["phases"]
    lines = [
        f"### `feedloop bench train` — {datetime.date.today().isoformat()}, {device}",
        "",
        f"Command: `{' '.join(['feedloop bench train', *args.argv])}`  ",
        f"Model: {model_version} (torch.float32) as policy, reference, reward and value model (the last two with "
        f"a fresh scalar head), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}. Synthetic data: {ppo['samples']} prompts; {rm['groups']} ranking "
        f"groups of K = 2..4 ({rm['sequences']} sequences).",
        "",
        f"**One PPO step**: {ppo['samples']} rollouts (≤ {ppo['max_new_tokens']} new tokens, temperature "
        f"{ppo['temperature']:g}; {ppo['generated']} generated), {args.ppo_epochs} PPO epochs × mini-batches of "
        f"{args.mini_batch_size} = {ppo['updates']} optimizer steps. Wall {ppo['wall']:.2f} s, "
        f"{ppo['samples'] / ppo['wall']:.2f} samples/s.",
        "",
        "| phase | seconds | share | samples/s | |",
        "|---|---:|---:|---:|---|",
        row("rollout (engine)", ph["rollout"], ppo["wall"], ppo["samples"], f"{ppo['rollout_tok_s']:.1f} tok/s"),
        row("score (reward model)", ph["score"], ppo["wall"], ppo["samples"]),
        row("old + ref log-probs, values, GAE", ph["logprobs"], ppo["wall"], ppo["samples"]),
        row("update (policy + value)", ph["update"], ppo["wall"], ppo["samples"] * args.ppo_epochs,
            f"{ppo['updates']} optimizer steps; samples/s counts each epoch's pass"),
        row("**total**", ppo["wall"], ppo["wall"], ppo["samples"]),
        "",
        f"Rollout generation on the same {ppo['samples']} prompts in this run: engine (trainer/rollouts.py "
        f"`generate`, continuous batching) **{ppo['rollout_tok_s']:.1f} tok/s** ({ppo['generated']} tokens in "
        f"{ph['rollout']:.2f} s) vs HF `generate` **{hf['tok_s']:.1f} tok/s** ({hf['generated']} tokens in "
        f"{hf['wall']:.2f} s): {ppo['rollout_tok_s'] / hf['tok_s']:.2f}×. HF baseline: one static left-padded "
        f"batch on a separate copy of the model, same max_new_tokens, sampling at temperature 1 (top-k/top-p off); "
        "rows stop at eos in both, so the samples and their lengths differ and tokens count up to eos "
        f"(tokens per row: engine {ppo['lengths']}, HF {hf['lengths']}). HF's wall runs until its longest row "
        "is done; the engine's, until its last request is.",
        "",
        f"**One RM epoch**: {rm['groups']} groups in {rm['steps']} optimizer steps of {args.rm_batch_size} groups "
        f"({rm['tokens']} tokens). Wall {rm['wall']:.2f} s, {rm['groups'] / rm['wall']:.2f} groups/s, "
        f"{rm['tokens'] / rm['wall']:.0f} tokens/s.",
        "",
        "| phase | seconds | share | groups/s | |",
        "|---|---:|---:|---:|---|",
        row("forward (all K of each group) + ranking loss", rp["forward"], rm["wall"], rm["groups"]),
        row("backward", rp["backward"], rm["wall"], rm["groups"]),
        row("optimizer (clip, AdamW, schedule)", rp["optimizer"], rm["wall"], rm["groups"]),
        row("**total**", rm["wall"], rm["wall"], rm["groups"]),
        "",
        "Phases replicate `ppo_step` and `run_rm`'s loop with the same trainer functions in the same order "
        "(bench/train.py); after one warm-up pass each. Checkpointing, evaluation and RM centring are not timed.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] == "train":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="feedloop bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the bundled SmolLM2)")
    p.add_argument("--prompts", type=int, default=16, help="rollouts in the PPO step")
    p.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens of the rollouts")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--rm-groups", type=int, default=16)
    p.add_argument("--rm-batch-size", type=int, default=4, help="groups per RM optimizer step")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    model_path = Path(args.model) if args.model else on_fresh_thread(ensure_bundled_model, data_dir_from_env())
    with tempfile.TemporaryDirectory(prefix="feedloop-bench-train-") as tmp:
        prompt_path, rm_path = write_data(Path(tmp), args.prompts, args.rm_groups)
        ppo = on_fresh_thread(bench_ppo, args, prompt_path, model_path)
        print(f"ppo step: {ppo['wall']:.2f}s {ppo['phases']}, engine {ppo['rollout_tok_s']:.1f} tok/s", flush=True)
        hf = on_fresh_thread(bench_hf_generate, model_path, ppo["texts"], ppo["max_new_tokens"], ppo["temperature"],
                             args.device)
        print(f"hf generate: {hf['tok_s']:.1f} tok/s; lengths engine {ppo['lengths']} hf {hf['lengths']}", flush=True)
        rm = on_fresh_thread(bench_rm, args, rm_path, model_path)
        print(f"rm epoch: {rm['wall']:.2f}s {rm['phases']}", flush=True)
    dev, _ = resolve_device(args.device, "auto")
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    from serving.checkpoint import model_version_of

    section = render(ppo, hf, rm, args, device_name, model_version_of(model_path))
    print(section)
    if not args.no_write:
        write_section(section, Path(args.out), "bench train", "## Training")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
