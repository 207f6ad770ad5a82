"""`feedloop bench serve`: throughput and time-to-first-token of the engine against two baselines
run in the same process on the same model and prompts:

  * per-request — HF `generate` called once per request, one at a time (a naive server);
  * static batch — HF `generate` on the whole batch at once (padded; returns when all are done).

Workload: C clients arrive together, each asks for a chat completion of exactly N new tokens
(eos ignored everywhere so every system does the same work). Results are ratios to the baselines
measured in this run, and go into docs/benchmarks.md with the command that produced them.

The per-request baseline runs sequentially at a fixed rate, so it is measured on a few requests and
its queueing is computed: client i's first token comes after the i-1 requests before it finished.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from serving.engine.local import LocalEngineClient
from serving.engine.types import SamplingParams
from serving.models import ensure_bundled_model, load_policy
from serving.paths import data_dir_from_env

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis simply.",
             "Give me three tips for learning Python.", "Why is the sky blue?", "What is a prime number?",
             "Describe a cat to someone who has never seen one.", "How do airplanes stay in the air?"]


def on_fresh_thread(fn, *args):
    """Run `fn` on a thread that ends afterwards. The process never runs torch on its main thread:
    two live threads with OpenMP teams slow small ops ~4x (see LocalEngine.run_job), which would
    handicap whichever system ran second."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    thread.join()
    return result[0]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# Shapes for random-init models (GPU benchmarks without downloading weights).
RANDOM_SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=True),
}
# HBM bandwidth (GB/s) by device name, for the fraction of the memory-bandwidth limit.
HBM_GBPS = {"H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100": 2039}


def random_policy(shape: str, tokenizer_dir: str | None, device: str, dtype: str):
    """A random-init model of a known shape with the bundled (or given) tokenizer, and a copy of
    it with the same weights for the baselines."""
    import copy

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from serving.models import LoadedPolicy, load_bundled_tokenizer, resolve_device

    dev, torch_dtype = resolve_device(device, dtype)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else load_bundled_tokenizer()
    config = LlamaConfig(**RANDOM_SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(config).to(torch_dtype).eval()
    reference = copy.deepcopy(model)
    make = lambda m: LoadedPolicy(m, tok, (tok.eos_token_id,), f"random-{shape}", shape, Path(shape))  # noqa: E731
    return make(model), make(reference)


def bandwidth_fraction(tok_s: float, clients: int, policy, device) -> float | None:
    """Measured tok/s over the bound set by reading every weight once per decode step."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    gbps = next((v for k, v in HBM_GBPS.items() if k in name), None)
    if gbps is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    return tok_s / (clients * gbps * 1e9 / weight_bytes)


def make_prompts(tokenizer, n: int) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}],
                                          tokenize=False, add_generation_prompt=True) for i in range(n)]


async def bench_engine(policy, prompts: list[str], new_tokens: int) -> dict:
    client = LocalEngineClient(policy, max_batch_size=max(len(prompts), 1), max_queue=len(prompts))
    await client.start()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    try:
        # warm-up: first pass over fresh weights maps pages in
        async for _ in client.generate(prompts[0], SamplingParams(max_new_tokens=4), "warm"):
            pass
        start = time.perf_counter()

        async def one(i: int) -> tuple[float, int]:
            ttft, n = None, 0
            async for _ in client.generate(prompts[i], params, f"b{i}"):
                if ttft is None:
                    ttft = time.perf_counter() - start
                n += 1
            return ttft, n

        results = await asyncio.gather(*[one(i) for i in range(len(prompts))])
        wall = time.perf_counter() - start
    finally:
        await client.stop()
    ttfts = [r[0] for r in results]
    return {"tok_s": sum(r[1] for r in results) / wall, "ttft_p50": percentile(ttfts, 50),
            "ttft_p99": percentile(ttfts, 99), "wall": wall}


def _hf_generate(policy, texts: list[str], new_tokens: int) -> float:
    tok = policy.tokenizer
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.inference_mode():
        out = policy.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    return time.perf_counter() - start


def bench_per_request(policy, prompts: list[str], new_tokens: int, sample: int) -> dict:
    durations = [_hf_generate(policy, [p], new_tokens) for p in prompts[:sample]]
    mean = statistics.mean(durations)
    prefill = _hf_generate(policy, [prompts[0]], 1)
    ttfts = [i * mean + prefill for i in range(len(prompts))]  # client i waits for the i before it
    return {"tok_s": new_tokens / mean, "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "wall": mean * len(prompts)}


def bench_static_batch(policy, prompts: list[str], new_tokens: int) -> dict:
    wall = _hf_generate(policy, prompts, new_tokens)
    # generate() answers when the whole batch is done: that is when each client sees its first token
    return {"tok_s": len(prompts) * new_tokens / wall, "ttft_p50": wall, "ttft_p99": wall, "wall": wall}


def render(rows: list[tuple[int, dict, dict, dict]], args, policy, device: str) -> str:
    lines = [
        f"### `feedloop bench serve` — {datetime.date.today().isoformat()}, {device}",
        "",
        f"Command: `feedloop bench serve {' '.join(args.argv)}`".rstrip() + "  ",
        f"Model: {policy.model_version} ({next(policy.model.parameters()).dtype}), "
        f"{args.new_tokens} new tokens per request (eos ignored), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}.",
        "",
        "| clients | engine tok/s | per-request HF tok/s | static-batch HF tok/s | × per-request | × static |"
        " engine TTFT p50 / p99 (s) | per-request TTFT p50 / p99 (s) | static TTFT p50 / p99 (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, eng, per, stat in rows:
        lines.append(
            f"| {c} | {eng['tok_s']:.1f} | {per['tok_s']:.1f} | {stat['tok_s']:.1f} | "
            f"{eng['tok_s'] / per['tok_s']:.1f}× | {eng['tok_s'] / stat['tok_s']:.2f}× | "
            f"{eng['ttft_p50']:.2f} / {eng['ttft_p99']:.2f} | {per['ttft_p50']:.2f} / {per['ttft_p99']:.2f} | "
            f"{stat['ttft_p50']:.2f} / {stat['ttft_p99']:.2f} |")
    fractions = [(c, eng["bw_fraction"]) for c, eng, _, _ in rows if eng.get("bw_fraction") is not None]
    if fractions:
        lines += ["", "Engine tok/s as a fraction of the memory-bandwidth limit (every weight read once per step): "
                  + ", ".join(f"{c} clients {f:.1%}" for c, f in fractions) + "."]
    lines += ["", "Baselines run HF `generate` on a separate copy of the model with HF's own `sdpa` attention. "
              "Per-request TTFT is computed from the measured per-request time (clients queue behind each "
              "other); static-batch TTFT is the batch's wall time (generate() answers when all rows are done).", ""]
    return "\n".join(lines)


def write_section(section: str, path: Path, name: str, heading: str) -> None:
    """Put `section` between `<!-- name -->` markers in `path` (replacing an earlier run's), under
    `heading` when the markers are new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start in text:
        head, _, rest = text.partition(start)
        rest = rest.split(end, 1)[-1]
        text = head + start + "\n" + section + end + rest
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n{start}\n{section}{end}\n"
    path.write_text(text)


def write_results(section: str, path: Path) -> None:
    write_section(section, path, "bench serve", "## Serving")


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="feedloop bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the bundled SmolLM2)")
    p.add_argument("--random-init", choices=sorted(RANDOM_SHAPES), help="a random-init model of this shape instead")
    p.add_argument("--tokenizer", help="tokenizer directory for --random-init (default: the bundled one)")
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--per-request-sample", type=int, default=3, help="requests timed for the per-request baseline")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    if args.random_init:
        policy, reference = on_fresh_thread(random_policy, args.random_init, args.tokenizer, args.device, args.dtype)
    else:
        path = Path(args.model) if args.model else on_fresh_thread(ensure_bundled_model, data_dir_from_env())
        policy = on_fresh_thread(load_policy, path, args.device, args.dtype)
        # The baselines get their own copy, as HF made it: the engine switches its model's attention
        # function (serving/engine/attention.py), which would speed the baselines up too.
        reference = on_fresh_thread(load_policy, path, args.device, args.dtype)
    device = next(policy.model.parameters()).device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    on_fresh_thread(_hf_generate, reference, make_prompts(policy.tokenizer, 1), 8)  # warm-up: pages in the weights
    rows = []
    for c in [int(x) for x in args.clients.split(",")]:
        prompts = make_prompts(policy.tokenizer, c)
        eng = asyncio.run(bench_engine(policy, prompts, args.new_tokens))
        per = on_fresh_thread(bench_per_request, reference, prompts, args.new_tokens, min(args.per_request_sample, c))
        stat = on_fresh_thread(bench_static_batch, reference, prompts, args.new_tokens)
        eng["bw_fraction"] = bandwidth_fraction(eng["tok_s"], c, policy, device)
        rows.append((c, eng, per, stat))
        print(f"clients={c}: engine {eng['tok_s']:.1f} tok/s (TTFT p99 {eng['ttft_p99']:.2f}s), per-request "
              f"{per['tok_s']:.1f}, static {stat['tok_s']:.1f} (TTFT {stat['ttft_p99']:.2f}s)", flush=True)
    section = render(rows, args, policy, device_name)
    print(section)
    if not args.no_write:
        write_results(section, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
