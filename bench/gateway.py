"""`feedloop bench gateway`: what the gateway adds in front of an upstream — latency and the requests/s
it can route — against calling the upstream directly, in one run.

Processes, as deployed: one `feedloop worker --role policy` (the upstream) and one `feedloop serve`
with `FEEDLOOP_UPSTREAMS` naming it (the gateway; recording on, to the embedded local log as in
production), plus this one (the clients: httpx async). The worker serves a tiny random-init checkpoint
(2-layer Llama, the bundled tokenizer) so its answers cost almost nothing and the gateway's own work
shows; answers are greedy and the prompts are checked beforehand to run to exactly `max_new_tokens`
(directly and through the gateway, with the same text), so both paths do the same work.

For each answer length, route (TGI `/generate`, `/generate_stream`) and concurrency N: rounds of
`--round-seconds` in which N closed-loop clients send requests (client c's j-th request has the same
body in every round), alternating direct and gateway rounds (D G G D D G …) so drift hits both.
Reported per cell: latency p50/p99 each way (for streams: time to first token and to the last), the
added latency as the difference of the percentiles and as the median of paired differences (request
(c, j) of a gateway round minus the same request of its paired direct round), and requests/s. The
most requests/s each way over the concurrency levels is the throughput at saturation.

Everything (worker, gateway, clients) shares this machine's cores; the worker runs one torch thread.

    feedloop bench gateway [--clients 1,8,32] [--lengths 2,64] [--rounds 4] [--round-seconds 3] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.ingest import _free_port, _wait_healthy
from bench.serve import QUESTIONS, percentile, write_section
from bench.tiny import make_tiny_checkpoint

ROUTES = ("generate", "generate_stream")


# --- processes ---------------------------------------------------------------------------------------

def _start(args: list[str], env: dict, log_path: Path) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- load --------------------------------------------------------------------------------------------

@dataclass
class Round:
    mode: str                      # direct | gateway
    wall: float
    # (client, j) -> (latency s, ttft s or None)
    samples: dict[tuple[int, int], tuple[float, float | None]] = field(default_factory=dict)
    errors: int = 0
    first_error: str | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds used during the round


def bodies_for(prompts: list[str], length: int) -> list[dict]:
    return [{"inputs": p, "parameters": {"max_new_tokens": length}} for p in prompts]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (this one when pid is None)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_round(http: httpx.AsyncClient, mode: str, route: str, bodies: list[dict], clients: int,
                    seconds: float, pids: dict[str, int | None] | None = None) -> Round:
    rnd = Round(mode, 0.0)
    pids = pids or {}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    deadline = start + seconds

    async def client(c: int) -> None:
        j = 0
        while time.perf_counter() < deadline:
            body = bodies[(c * 7 + j) % len(bodies)]
            t0 = time.perf_counter()
            ttft = None
            try:
                if route == "generate":
                    r = await http.post("/generate", json=body)
                    r.raise_for_status()
                else:
                    async with http.stream("POST", "/generate_stream", json=body) as r:
                        r.raise_for_status()
                        async for line in r.aiter_lines():
                            if ttft is None and line.startswith("data:"):
                                ttft = time.perf_counter() - t0
                rnd.samples[(c, j)] = (time.perf_counter() - t0, ttft)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                rnd.errors += 1
                rnd.first_error = rnd.first_error or f"{type(exc).__name__}: {exc}"[:300]
                await asyncio.sleep(0.05)
            j += 1

    await asyncio.gather(*[client(c) for c in range(clients)])
    rnd.wall = time.perf_counter() - start
    rnd.cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    return rnd


async def measure_cell(urls: dict[str, str], route: str, bodies: list[dict], clients: int, rounds: int,
                       seconds: float, pids: dict[str, int | None]) -> dict:
    """`rounds` rounds each way, alternating D G G D D G …; the k-th direct round is paired with the
    k-th gateway round."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    https = {m: httpx.AsyncClient(base_url=u, timeout=120, limits=limits) for m, u in urls.items()}
    by_mode: dict[str, list[Round]] = {"direct": [], "gateway": []}
    try:
        for m, http in https.items():  # warm the connections (and the paths) outside the timed rounds
            await one_round(http, m, route, bodies, clients, min(seconds, 0.5))
        for k in range(rounds):
            order = ("direct", "gateway") if k % 2 == 0 else ("gateway", "direct")
            for m in order:
                by_mode[m].append(await one_round(https[m], m, route, bodies, clients, seconds, pids))
    finally:
        for http in https.values():
            await http.aclose()
    return summarise(by_mode)


def summarise(by_mode: dict[str, list["Round"]]) -> dict:
    out: dict = {}
    for m, rounds in by_mode.items():
        lat = [s[0] for r in rounds for s in r.samples.values()]
        ttft = [s[1] for r in rounds for s in r.samples.values() if s[1] is not None]
        n = len(lat)
        out[m] = {"n": n, "errors": sum(r.errors for r in rounds),
                  "first_error": next((r.first_error for r in rounds if r.first_error), None),
                  "p50": percentile(lat, 50) if lat else None, "p99": percentile(lat, 99) if lat else None,
                  "ttft_p50": percentile(ttft, 50) if ttft else None,
                  "ttft_p99": percentile(ttft, 99) if ttft else None,
                  "rps": n / sum(r.wall for r in rounds),
                  # CPU ms per answered request, per process
                  "cpu_ms": {name: 1000 * sum(r.cpu.get(name, 0.0) for r in rounds) / max(n, 1)
                             for name in (rounds[0].cpu if rounds else {})}}
    diffs, tdiffs = [], []
    for d, g in zip(by_mode["direct"], by_mode["gateway"]):
        for key in d.samples.keys() & g.samples.keys():
            diffs.append(g.samples[key][0] - d.samples[key][0])
            if d.samples[key][1] is not None and g.samples[key][1] is not None:
                tdiffs.append(g.samples[key][1] - d.samples[key][1])
    out["paired"] = {"n": len(diffs), "median": statistics.median(diffs) if diffs else None,
                     "ttft_median": statistics.median(tdiffs) if tdiffs else None}
    return out


# --- setup checks ------------------------------------------------------------------------------------

def pick_prompts(urls: dict[str, str], candidates: list[str], length: int, want: int) -> list[str]:
    """Prompts whose greedy answer runs to exactly `length` tokens, and whose answer through the gateway
    equals the worker's (same text, same count): both paths then do the same work."""
    chosen = []
    with httpx.Client(timeout=60) as http:
        for p in candidates:
            body = {"inputs": p, "parameters": {"max_new_tokens": length, "details": True}}
            answers = {}
            for m, u in urls.items():
                r = http.post(f"{u}/generate", json=body)
                r.raise_for_status()
                answers[m] = r.json()
            d, g = answers["direct"], answers["gateway"]
            if d["generated_text"] != g["generated_text"] or d["details"]["generated_tokens"] != g["details"]["generated_tokens"]:
                raise RuntimeError(f"the gateway's answer differs from the worker's for {p!r}: {g} vs {d}")
            if d["details"]["generated_tokens"] == length:
                chosen.append(p)
            if len(chosen) == want:
                return chosen
    raise RuntimeError(f"only {len(chosen)} of {len(candidates)} prompts run to {length} tokens")


# --- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] == "gateway":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="feedloop bench gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--lengths", default="2,64", help="comma-separated max_new_tokens (answers run to it)")
    p.add_argument("--routes", default=",".join(ROUTES), help="generate,generate_stream")
    p.add_argument("--rounds", type=int, default=4, help="rounds each way per cell (alternating)")
    p.add_argument("--round-seconds", type=float, default=3.0)
    p.add_argument("--prompts", type=int, default=16, help="distinct request bodies")
    p.add_argument("--worker-threads", type=int, default=1, help="OMP/torch threads of the worker")
    p.add_argument("--quick", action="store_true", help="smoke run: clients 1,4, lengths 2, 1 round of 0.5 s; no write")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.lengths, args.rounds, args.round_seconds, args.prompts = "1,4", "2", 1, 0.5, 4
        args.no_write = True
    clients = [int(c) for c in args.clients.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    routes = [r for r in args.routes.split(",") if r]
    load_before = _loadavg()
    started = time.time()

    tmp = Path(tempfile.mkdtemp(prefix="feedloop-bench-gateway-"))
    procs: list[tuple[subprocess.Popen, object]] = []
    try:
        model = make_tiny_checkpoint(tmp / "tiny")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "FEEDLOOP_ADMIN_TOKEN": ""}
        env.pop("FEEDLOOP_UPSTREAMS", None)
        wport, gport = _free_port(), _free_port()
        worker_url, gateway_url = f"http://127.0.0.1:{wport}", f"http://127.0.0.1:{gport}"
        wenv = {**env, "OMP_NUM_THREADS": str(args.worker_threads)}
        procs.append(_start(["worker", "--role", "policy", "--model", str(model), "--port", str(wport), "--no-grpc",
                             "--device", "cpu", "--data-dir", str(tmp / "worker"), "--max-batch-size", "64",
                             "--max-queue", "256", "--log-level", "WARNING"], wenv, tmp / "worker.log"))
        upstreams = {"policy": [{"url": worker_url, "kind": "feedloop"}], "tokenizer": str(model)}
        genv = {**env, "FEEDLOOP_UPSTREAMS": json.dumps(upstreams)}
        _wait_healthy(worker_url, procs[0][0])
        _progress(started, f"worker healthy at {worker_url}")
        procs.append(_start(["serve", "--port", str(gport), "--no-grpc", "--data-dir", str(tmp / "gateway"),
                             "--max-queue", "256", "--log-level", "WARNING"], genv, tmp / "gateway.log"))
        _wait_healthy(gateway_url, procs[1][0])
        _progress(started, f"gateway healthy at {gateway_url}")
        urls = {"direct": worker_url, "gateway": gateway_url}
        pids = {"worker": procs[0][0].pid, "gateway": procs[1][0].pid, "client": None}

        candidates = [f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})" for i in range(4 * args.prompts + 32)]
        results: dict = {}
        loads: list[float] = []
        for length in lengths:
            prompts = pick_prompts(urls, candidates, length, args.prompts)
            bodies = bodies_for(prompts, length)
            _progress(started, f"{len(prompts)} prompts run to {length} tokens both ways")
            for route in routes:
                for n in clients:
                    cell = asyncio.run(measure_cell(urls, route, bodies, n, args.rounds, args.round_seconds, pids))
                    results[(length, route, n)] = cell
                    loads.append(float(_loadavg().split()[0]))
                    print(_cell_line(length, route, n, cell), flush=True)
        try:
            recorded = _count_recorded(gateway_url)
        except Exception:  # noqa: BLE001 - the numbers above stand without it
            recorded = {"ok": "?", "published": "?", "dropped": "?"}
    except BaseException:
        for proc, log in procs:
            log.flush()
        for name in ("worker.log", "gateway.log"):
            if (tmp / name).exists():
                print(f"--- {name} (tail) ---\n{(tmp / name).read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        for proc, log in reversed(procs):
            _stop(proc)
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.time() - started
    load_after = _loadavg() + (f"; highest 1-min load seen after a row: {max(loads):.2f}" if loads else "")
    section = render(args, argv, results, clients, lengths, routes, load_before, load_after, wall, recorded)
    print(section)
    if not args.no_write:
        write_section(section, Path(args.out), "bench gateway", "## Gateway")
    return 0


def _progress(started: float, what: str) -> None:
    print(f"[{time.time() - started:6.1f} s] {what}", file=sys.stderr, flush=True)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _count_recorded(gateway_url: str) -> dict:
    """From the gateway's /metrics: requests answered ok, events made durable, events dropped."""
    import re

    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text

    def total(pattern: str) -> int:
        return int(sum(float(m.group(1)) for m in re.finditer(pattern + r" ([0-9.eE+-]+)$", text, re.M)))

    return {"ok": total(r'^feedloop_requests_total\{[^}]*outcome="ok"[^}]*\}'),
            "published": total(r"^feedloop_events_published_total\{[^}]*\}"),
            "dropped": total(r"^feedloop_events_dropped_total\{[^}]*\}")}


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{1000 * v:.2f}"


def _cpu(mode: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in mode["cpu_ms"].items())


def _cell_line(length: int, route: str, n: int, cell: dict) -> str:
    d, g = cell["direct"], cell["gateway"]
    return (f"len {length} {route} c={n}: direct p50 {_ms(d['p50'])} p99 {_ms(d['p99'])} ms {d['rps']:.0f} rps "
            f"({d['n']}, err {d['errors']}) | gateway p50 {_ms(g['p50'])} p99 {_ms(g['p99'])} ms {g['rps']:.0f} rps "
            f"({g['n']}, err {g['errors']}) | paired median +{_ms(cell['paired']['median'])} ms"
            + (f" | ttft d {_ms(d['ttft_p50'])}/{_ms(d['ttft_p99'])} g {_ms(g['ttft_p50'])}/{_ms(g['ttft_p99'])}"
               if d["ttft_p50"] is not None else "")
            + f" | cpu ms/req d {_cpu(d)} g {_cpu(g)}"
            + (f" | first error: {d['first_error'] or g['first_error']}" if d["errors"] or g["errors"] else ""))


def render(args, argv, results, clients, lengths, routes, load_before, load_after, wall, recorded) -> str:
    import torch

    today = datetime.date.today().isoformat()
    shown, skip = [], False
    for a in argv:  # where the results went is not part of the command that produced them
        if skip or a == "--no-write":
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if not a.startswith("--out="):
            shown.append(a)
    cmd = " ".join(["feedloop bench gateway", *shown])
    errors = sum(c[m]["errors"] for c in results.values() for m in ("direct", "gateway"))
    lines = [f"### `feedloop bench gateway` — {today}, CPU ({platform.machine()}, {os.cpu_count()} cores, no GPU)", "",
             f"Command: `{cmd}` ({wall / 60:.1f} min wall; `date`: {time.strftime('%a %d %b %Y %H:%M:%S %Z')})  ",
             f"Upstream: one `feedloop worker --role policy` process on a tiny random-init checkpoint (2-layer Llama, "
             f"hidden 64, the bundled tokenizer; {args.worker_threads} torch thread), greedy, every answer exactly "
             f"max_new_tokens long (prompts checked: the gateway's answer equals the worker's). Gateway: `feedloop serve` "
             f"with `FEEDLOOP_UPSTREAMS` naming the worker, recording every completion to the embedded local log "
             f"({recorded['ok']} requests answered, {recorded['published']} events made durable, {recorded['dropped']} dropped). Clients: httpx async in a third process, N closed-loop "
             f"clients, {args.prompts} request bodies, {args.rounds} rounds of {args.round_seconds:g} s each way per row, "
             f"direct and gateway rounds alternating (D G G D …). Worker, gateway and clients share the {os.cpu_count()} "
             f"cores. torch {torch.__version__}, Python {platform.python_version()}. Load average (1/5/15 min) "
             f"before: {load_before}, after: {load_after}. Errors: {errors}.", ""]
    for length in lengths:
        lines += [f"**{length} new token{'s' if length != 1 else ''} per answer**", "",
                  "| route | clients | direct p50 / p99 (ms) | gateway p50 / p99 (ms) | added p50 / p99 (ms) | "
                  "paired median added (ms) | direct req/s | gateway req/s | gateway / direct |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for route in routes:
            for n in clients:
                c = results[(length, route, n)]
                d, g = c["direct"], c["gateway"]
                for what, key, paired in (("", "", "median"), (" TTFT", "ttft_", "ttft_median")):
                    if d[f"{key}p50"] is None:
                        continue
                    label = f"`/{route}`{what}" + ("" if route == "generate" or what else " (whole)")
                    lines.append(
                        f"| {label} | {n} | {_ms(d[f'{key}p50'])} / {_ms(d[f'{key}p99'])} | "
                        f"{_ms(g[f'{key}p50'])} / {_ms(g[f'{key}p99'])} | "
                        f"{_ms(g[f'{key}p50'] - d[f'{key}p50'])} / {_ms(g[f'{key}p99'] - d[f'{key}p99'])} | "
                        f"{_ms(c['paired'][paired])} | "
                        + (f"{d['rps']:.0f} | {g['rps']:.0f} | {g['rps'] / d['rps']:.2f} |" if not what else "| | |"))
        lines += ["", "CPU per answered request (ms; from /proc, over the same rounds) and what the gateway's own CPU "
                  "cost would allow (1000 / gateway ms = req/s per fully used core):", "",
                  "| route | clients | direct: worker / client | through gateway: worker / gateway / client | "
                  "gateway req/s per core |", "|---|---:|---:|---:|---:|"]
        for route in routes:
            for n in clients:
                d, g = results[(length, route, n)]["direct"]["cpu_ms"], results[(length, route, n)]["gateway"]["cpu_ms"]
                per_core = 1000 / g["gateway"] if g.get("gateway") else None
                lines.append(f"| `/{route}` | {n} | {d['worker']:.2f} / {d['client']:.2f} | "
                             f"{g['worker']:.2f} / **{g['gateway']:.2f}** / {g['client']:.2f} | "
                             f"{'–' if per_core is None else f'{per_core:.0f}'} |")
        lines.append("")
        sat = []
        for route in routes:
            best = {m: max(results[(length, route, n)][m]["rps"] for n in clients) for m in ("direct", "gateway")}
            sat.append(f"`/{route}` direct **{best['direct']:.0f}** req/s, through the gateway **{best['gateway']:.0f}** req/s")
        lines += ["Most requests/s over the concurrency levels: " + "; ".join(sat) + ".", ""]
    lines += ["Added latency: gateway minus direct, as the difference of the percentiles and as the median of "
              "paired differences (the same request — client, index, body — in a gateway round and its paired "
              "direct round). req/s: requests answered over the rounds' wall time; closed-loop clients, so at the "
              "top level it is the throughput at saturation of whichever part saturates first on the shared cores.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
