"""`feedloop bench swap`: promotion to new-version serving under a steady load.

A gateway (`feedloop serve`, its own process, the bundled model unless --model) serves a steady load
of concurrent clients. A candidate — the same model with its weights nudged, written as a checkpoint
with a manifest and registered — is promoted through the admin route. Reported:

- swap time: promotion (the admin call returns) → the first answer from the new version, beside the
  gateway's own load-and-verify time of the checkpoint (`feedloop_model_load_seconds`); target: swap
  ≤ load + 100 ms;
- latency p50/p99 and errors of the steady load before (the `--before` seconds up to the promotion),
  during (promotion → first new answer + 1 s) and after the swap; target: p99 during ≤ 2× before, zero errors.

    feedloop bench swap [--model DIR] [--clients 4] [--before 20] [--after 20] [--new-tokens 16]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.ingest import _free_port, _wait_healthy
from bench.serve import write_section


def make_candidate(source: Path, out: Path) -> tuple[str, Path]:
    """`source` with every weight nudged by 1e-4 relative noise: a different version, the same behaviour
    to within sampling, the same load cost."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.checkpoint import write_checkpoint

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-4 * torch.randn_like(p))

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    def manifest(files: dict[str, str]) -> dict:
        import hashlib

        weights = "".join(files[k] for k in sorted(files) if k.endswith(".safetensors"))
        return {"stage": "sft", "model_version": f"bench-{hashlib.sha256(weights.encode()).hexdigest()[:12]}",
                "parent_version": None}

    path = write_checkpoint(out, save, manifest)
    from serving.checkpoint import model_version_of

    return model_version_of(path), path


def gateway_load_seconds(url: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r'^feedloop_model_load_seconds_sum\{role="policy"\} ([0-9.eE+-]+)$', text, re.M)
    return float(match.group(1)) if match else None


async def run_load(url: str, version: str, clients: int, before: float, after: float, new_tokens: int) -> dict:
    from simulate.load import SteadyLoad

    load = SteadyLoad(url, clients=clients, api="tgi", prompt="Write a short poem about the sea.",
                      max_new_tokens=new_tokens)
    await load.start()
    try:
        await asyncio.sleep(before)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            r = await client.post(f"/v1/admin/models/{version}/promote", json={"reason": "bench swap"})
            promoted = time.time()
            r.raise_for_status()
        while load.first_answer_from(version) is None and time.time() - promoted < 300:
            await asyncio.sleep(0.01)
        served = load.first_answer_from(version)
        if served is None:
            raise RuntimeError("the new version never answered")
        await asyncio.sleep(after)
    finally:
        await load.stop()
    start = min(s.started_at for s in load.samples)
    windows = {"before": (start + 2, promoted), "during": (promoted, served + 1.0), "after": (served + 1.0, None)}
    # The switch happened between the last request sent to the old version and the first sent to the new
    # one (the client's resolution: clients send back to back, so a request starts every p50 / clients).
    switched = min(s.started_at for s in load.samples if s.ok and s.model_version == version)
    last_old = max((s.started_at for s in load.samples if s.model_version not in (None, version)), default=None)
    out = {"promoted": promoted, "served": served, "switched": switched, "last_old": last_old,
           "samples": len(load.samples), "errors": load.errors(), "versions": dict(load.versions())}
    for name, (since, until) in windows.items():
        lat = load.latency(since, until)
        out[name] = {"n": lat.count, "p50": lat.p50_s, "p99": lat.p99_s, "errors": lat.errors}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] == "swap":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="feedloop bench swap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the bundled SmolLM2)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--before", type=float, default=20.0, help="seconds of steady load before the promotion")
    p.add_argument("--after", type=float, default=20.0, help="seconds of load after the new version answered")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from feedback.store import FeedbackStore
    from serving.models import ensure_bundled_model

    with tempfile.TemporaryDirectory(prefix="feedloop-bench-swap-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        source = Path(args.model) if args.model else ensure_bundled_model(data)
        version, candidate = make_candidate(source, tmp / "candidate")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(tmp / "gateway.log", "w")
        gateway = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--model", str(source),
                                    "--data-dir", str(data), "--port", str(port), "--no-grpc",
                                    "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, gateway)
            store = FeedbackStore(f"sqlite:///{data / 'feedloop.db'}")
            from serving.checkpoint import read_manifest

            store.register_version(version, stage="sft", checkpoint_path=str(candidate),
                                   checksums=read_manifest(candidate)["files"])
            store.close()
            result = asyncio.run(run_load(url, version, args.clients, args.before, args.after, args.new_tokens))
            result["load_s"] = gateway_load_seconds(url)
        finally:
            gateway.terminate()
            gateway.wait(60)
            log.close()

    swap_s = result["switched"] - result["promoted"]
    section = render(args, result, swap_s)
    print(section)
    if not args.no_write:
        write_section(section, Path(args.out), "bench swap", "## Hot-swap")
    return 0


def render(args, r: dict, swap_s: float) -> str:
    def ms(v):
        return "–" if v is None else f"{1000 * v:.0f}"

    today = datetime.date.today().isoformat()
    before, during = r["before"]["p99"], r["during"]["p99"]
    ratio = (during / before) if before and during else None
    lines = [f"### `feedloop bench swap` — {today}, CPU ({platform.machine()}, 2 cores)", "",
             f"Command: `feedloop bench swap --clients {args.clients} --before {args.before:g} --after {args.after:g} "
             f"--new-tokens {args.new_tokens}`" + (f" `--model {args.model}`" if args.model else " (bundled SmolLM2-135M, fp32)"),
             "",
             f"- swap: promotion → the first request the new version answers was sent **{swap_s * 1000:.0f} ms** "
             f"later (the last request answered by the old version was sent at "
             f"{ms(r['last_old'] - r['promoted']) if r['last_old'] else '–'} ms); the gateway's load-and-verify of "
             f"the checkpoint took {ms(r['load_s'])} ms (target: swap ≤ load + 100 ms: "
             f"{'met' if r['load_s'] is not None and swap_s <= r['load_s'] + 0.1 else 'not met'}); "
             f"first answer from the new version {ms(r['served'] - r['promoted'])} ms after the promotion",
             f"- requests: {r['samples']}, errors: **{r['errors']}**; versions answered: "
             + ", ".join(f"{v}: {n}" for v, n in r["versions"].items()),
             "", "| window | requests | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    for name in ("before", "during", "after"):
        w = r[name]
        lines.append(f"| {name} | {w['n']} | {ms(w['p50'])} | {ms(w['p99'])} | {w['errors']} |")
    lines += ["", f"p99 during / before: **{ratio:.2f}×** (target ≤ 2×)." if ratio else "", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
