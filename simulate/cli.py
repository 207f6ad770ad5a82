"""`feedloop simulate`: simulated users chatting and giving feedback by a preference rule."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys


def add_simulate_commands(subparsers) -> None:
    """Register `simulate` on the `feedloop` command's subparsers."""
    p = subparsers.add_parser(
        "simulate", help="simulated users: compare, rank and rate answers by a preference rule, over the public API",
        description="Simulated users chat with a running gateway and give feedback by a preference rule "
                    "(a Python callable rule(prompt, answer) -> float; higher is preferred), with label noise.")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway (default http://127.0.0.1:8080)")
    p.add_argument("--rule", default="simulate.rules:prefers_banana",
                   help="module:function scoring (prompt, answer) -> float (default simulate.rules:prefers_banana; "
                        "also prefers_shorter, prefers_longer)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="label noise: probability a decided verdict is reversed (ties stay ties), 0 to 1")
    p.add_argument("--users", type=int, default=4, help="concurrent users (default 4)")
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--comparisons", type=int, metavar="N",
                      help="stop after N feedback events (of every kind in the mix)")
    stop.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--prompts", metavar="FILE", help='JSONL of {"prompt": …} lines (default: a built-in list)')
    p.add_argument("--mix", default="compare=1", help="shares of kinds, e.g. compare=0.7,rank=0.1,rate=0.2")
    p.add_argument("--rank-k", type=int, default=3, help="answers per ranking, 2 to 9 (default 3)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="rating: thumb up when the rule's score is above this (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length (default 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default 1)")
    p.add_argument("--raw-prompts", action="store_true",
                   help="send string prompts to /v1/compare as raw text, not as a user message (base models); "
                        "ratings always chat")
    p.add_argument("--max-retries", type=int, default=8, help="retries of a call answered 429/503 (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seeds the users' choices, noise and sampling (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulate.api import RetryPolicy
    from simulate.prompts import DEFAULT_PROMPTS, PromptsError, load_prompts
    from simulate.rules import RuleError, load_rule
    from simulate.users import Mix, SimulatedUsers, SimulationConfig

    def fail(message: str) -> int:
        print(f"feedloop simulate: {message}", file=sys.stderr)
        return 2

    try:
        rule = load_rule(args.rule)
        prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
        if args.max_retries < 0:
            raise ValueError("--max-retries must be >= 0")
        config = SimulationConfig(
            users=args.users, noise=args.noise, events=args.comparisons, duration_s=args.duration,
            mix=Mix.parse(args.mix), prompts=prompts, seed=args.seed, rank_k=args.rank_k,
            threshold=args.threshold, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            chat=not args.raw_prompts,
            retry=RetryPolicy(max_retries=args.max_retries))
    except (RuleError, PromptsError, ValueError) as exc:
        return fail(str(exc))

    progress = None if args.quiet else (lambda report: print(report.progress_line(), file=sys.stderr, flush=True))
    try:
        users = SimulatedUsers(args.url, rule, config, on_progress=progress)
    except ValueError as exc:
        return fail(str(exc))
    try:
        report = asyncio.run(users.run())
    except RuleError as exc:
        return fail(f"stopped: {exc}")
    except KeyboardInterrupt:
        return fail("interrupted")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.progress_line().replace("simulate:", "simulate done:", 1))
        for message in report.error_messages:
            print(f"  error: {message}")
    # Nothing got through (the gateway is down, or every call was refused): say so to scripts too.
    return 0 if report.total_accepted or not report.total_errors else 1
