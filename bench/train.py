"""`feedloop bench train`: wall time and samples/s of ONE PPO step and ONE reward-model epoch on the
bundled SmolLM2, broken down by phase, plus the rollout generator against HF `generate`.

Data is synthetic (built in a temporary directory): chat prompts for PPO, and ranking groups of K = 2..4
short completions for the RM. The stages themselves run: `run_ppo` for `--ppo-steps` rollout batches and
`run_rm` for `--rm-epochs` epochs, with the bundled model as policy and reference, and its body with a
fresh scalar head (seeded) as reward and value model. The numbers are the stages' own phase timings from
their metrics lines (`ppo_step`: rollout, score, logprobs, advantages, update; the RM loop: forward,
backward, optimizer); the LAST PPO step and the LAST RM epoch are reported, so the earlier ones warm up
(first-call costs: allocator, kernels, the attention function switch). Loading, evaluation, RM
centring and checkpoint writing are outside the timed steps.

Rollout baseline: HF `generate` on a separate copy of the policy (the engine switches its model's
attention function), the reported step's prompts as ONE static left-padded batch, the same
max_new_tokens, sampling at temperature 1 (top-k/top-p off, as the engine's rollouts). Both stop rows
at eos, so tokens/s counts each row's generated tokens up to and including eos.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
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


def ppo_prompts(path: Path, model_path: Path, batch: int, step: int) -> list[str]:
    """The chat-templated texts the rollouts of PPO step `step` continued (data in file order)."""
    from transformers import AutoTokenizer

    from trainer.rollouts import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = load_prompts(path, tokenizer, 10 ** 6)[step * batch:(step + 1) * batch]
    return [tokenizer.decode(p.ids) for p in prompts]


def bench_ppo(args, prompt_path: Path, model_path: Path) -> dict:
    """`run_ppo` for `--ppo-steps` steps (one rollout batch of `--prompts` each); the last step's metrics."""
    from trainer.config import PPOConfig, config_from_dict
    from trainer.metrics import read_metrics
    from trainer.ppo import run_ppo

    out = prompt_path.parent / "ppo"
    config = config_from_dict({"stage": "ppo", "policy": str(model_path), "reward_model": str(model_path),
                               "max_new_tokens": args.new_tokens, "ppo_epochs": args.ppo_epochs,
                               "data": {"train": str(prompt_path), "batch_size": args.prompts, "shuffle": False,
                                        "mini_batch_size": args.mini_batch_size, "max_length": 512},
                               "run": {"output_dir": str(out), "device": args.device, "save_every": 0}},
                              PPOConfig)
    run_ppo(config)
    steps = [m for m in read_metrics(out) if "score" in m]
    last = steps[-1]
    generated = round(last["response_length"] * args.prompts)
    return {**last, "steps": steps, "samples": args.prompts, "generated": generated,
            "rollout_tok_s": generated / last["rollout_s"],
            "updates": args.ppo_epochs * -(-args.prompts // args.mini_batch_size),
            "texts": ppo_prompts(prompt_path, model_path, args.prompts, len(steps) - 1),
            "max_new_tokens": config.max_new_tokens, "temperature": config.temperature}


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
    """`run_rm` for `--rm-epochs` epochs; the last epoch's phase seconds (sums of its steps' metrics)."""
    from transformers import AutoTokenizer

    from trainer.config import RMConfig, config_from_dict
    from trainer.metrics import read_metrics
    from trainer.reward import load_rankings, run_rm

    out = rm_path.parent / "rm"
    config = config_from_dict({"stage": "rm", "model": str(model_path), "epochs": args.rm_epochs,
                               "data": {"train": str(rm_path), "batch_size": args.rm_batch_size, "max_length": 512},
                               "run": {"output_dir": str(out), "device": args.device, "save_every": 0}}, RMConfig)
    run_rm(config)
    steps = [m for m in read_metrics(out) if "loss" in m and m["epoch"] == args.rm_epochs - 1]
    phases = {k: sum(m[f"{k}_s"] for m in steps) for k in ("forward", "backward", "optimizer", "step")}
    sequences = [len(s) for g in load_rankings(rm_path, AutoTokenizer.from_pretrained(model_path), 512)
                 for s in g.sequences]
    return {"wall": phases.pop("step"), "phases": phases, "groups": args.rm_groups, "steps": len(steps),
            "sequences": len(sequences), "tokens": sum(sequences)}


def render(ppo: dict, hf: dict, rm: dict, args, device: str, model_version: str) -> str:
    def row(name: str, seconds: float, wall: float, samples: int, note: str = "") -> str:
        return f"| {name} | {seconds:.2f} | {seconds / wall:.0%} | {samples / seconds:.2f} | {note} |"

    wall, rp = ppo["step_s"], rm["phases"]
    earlier = ", ".join(f"{m['step_s']:.2f}" for m in ppo["steps"][:-1])
    lines = [
        f"### `feedloop bench train` — {datetime.date.today().isoformat()}, {device}",
        "",
        f"Command: `{' '.join(['feedloop bench train', *args.argv])}`  ",
        f"Model: {model_version} (torch.float32) as policy, reference, reward and value model (the last two with "
        f"a fresh scalar head), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}. Synthetic data: {ppo['samples']} prompts per PPO step; "
        f"{rm['groups']} ranking groups of K = 2..4 ({rm['sequences']} sequences).",
        "",
        f"**One PPO step** (`run_ppo`, step {len(ppo['steps'])} of {len(ppo['steps'])}"
        + (f"; the earlier took {earlier} s" if earlier else "") + f"): {ppo['samples']} rollouts "
        f"(≤ {ppo['max_new_tokens']} new tokens, temperature {ppo['temperature']:g}; {ppo['generated']} generated), "
        f"{args.ppo_epochs} PPO epochs × mini-batches of {args.mini_batch_size} = {ppo['updates']} optimizer "
        f"steps for the policy and for the value model. Wall {wall:.2f} s, {ppo['samples'] / wall:.2f} samples/s.",
        "",
        "| phase | seconds | share | samples/s | |",
        "|---|---:|---:|---:|---|",
        row("rollout (engine)", ppo["rollout_s"], wall, ppo["samples"], f"{ppo['rollout_tok_s']:.1f} tok/s"),
        row("score (reward model)", ppo["score_s"], wall, ppo["samples"]),
        row("old + reference log-probs, values", ppo["logprobs_s"], wall, ppo["samples"]),
        row("KL, rewards, GAE", ppo["advantages_s"], wall, ppo["samples"]),
        row("update (policy + value)", ppo["update_s"], wall, ppo["samples"] * args.ppo_epochs,
            f"{ppo['updates']} optimizer steps; samples/s counts each epoch's pass"),
        row("**step**", wall, wall, ppo["samples"]),
        "",
        f"Rollout generation on the same {ppo['samples']} prompts in this run: engine (trainer/rollouts.py "
        f"`generate`, continuous batching) **{ppo['rollout_tok_s']:.1f} tok/s** ({ppo['generated']} tokens in "
        f"{ppo['rollout_s']:.2f} s) vs HF `generate` **{hf['tok_s']:.1f} tok/s** ({hf['generated']} tokens in "
        f"{hf['wall']:.2f} s): {ppo['rollout_tok_s'] / hf['tok_s']:.2f}×. HF baseline: one static left-padded "
        f"batch on a separate copy of the model, same max_new_tokens, sampling at temperature 1 (top-k/top-p off); "
        "rows stop at eos in both, so the samples and their lengths differ and tokens count up to eos "
        f"(mean tokens per row: engine {ppo['response_length']:.1f}, HF {hf['generated'] / len(hf['lengths']):.1f}). "
        "HF's wall runs until its longest row is done; the engine's, until its last request is.",
        "",
        f"**One RM epoch** (`run_rm`, epoch {args.rm_epochs} of {args.rm_epochs}): {rm['groups']} groups in "
        f"{rm['steps']} optimizer steps of {args.rm_batch_size} groups ({rm['tokens']} tokens). Wall "
        f"{rm['wall']:.2f} s, {rm['groups'] / rm['wall']:.2f} groups/s, {rm['tokens'] / rm['wall']:.0f} tokens/s.",
        "",
        "| phase | seconds | share | groups/s | |",
        "|---|---:|---:|---:|---|",
        row("forward (all K of each group) + ranking loss", rp["forward"], rm["wall"], rm["groups"]),
        row("backward", rp["backward"], rm["wall"], rm["groups"]),
        row("optimizer (clip, AdamW, schedule)", rp["optimizer"], rm["wall"], rm["groups"]),
        row("**epoch**", rm["wall"], rm["wall"], rm["groups"]),
        "",
        "Seconds are the stages' own phase timings (`<phase>_s` and `step_s` in metrics.jsonl: `ppo_step` "
        "and `run_rm`'s loop); the step/epoch total also holds what falls between phases (collation, metrics). "
        "The last PPO step and RM epoch are reported, the earlier ones warm up. Loading, evaluation, RM "
        "centring and checkpoint writing are not timed.",
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
    p.add_argument("--prompts", type=int, default=16, help="rollouts per PPO step")
    p.add_argument("--ppo-steps", type=int, default=2, help="PPO steps run (the last is reported)")
    p.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens of the rollouts")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--rm-groups", type=int, default=16)
    p.add_argument("--rm-batch-size", type=int, default=4, help="groups per RM optimizer step")
    p.add_argument("--rm-epochs", type=int, default=2, help="RM epochs run (the last is reported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    model_path = Path(args.model) if args.model else on_fresh_thread(ensure_bundled_model, data_dir_from_env())
    with tempfile.TemporaryDirectory(prefix="feedloop-bench-train-") as tmp:
        prompt_path, rm_path = write_data(Path(tmp), args.prompts * args.ppo_steps, args.rm_groups)
        ppo = on_fresh_thread(bench_ppo, args, prompt_path, model_path)
        print(f"ppo steps: {[{k: v for k, v in m.items() if k.endswith('_s')} for m in ppo['steps']]}, "
              f"engine {ppo['rollout_tok_s']:.1f} tok/s", flush=True)
        hf = on_fresh_thread(bench_hf_generate, model_path, ppo["texts"], ppo["max_new_tokens"], ppo["temperature"],
                             args.device)
        print(f"hf generate: {hf['tok_s']:.1f} tok/s; lengths hf {hf['lengths']}", flush=True)
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
