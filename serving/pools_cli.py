"""`feedloop pools list|add|remove`: the upstream pools registered in the store (feedback/store/pools.py).

Blue/green from a shell, without touching a gateway's config: bring the new version's TGI (or vLLM)
Deployment up, `feedloop pools add`, `feedloop models promote` (or `canary`); gateways wait for its
health check, then move traffic; once the old pool has drained, `feedloop pools remove` it. Same
store options and exit codes as `feedloop models` (2: refused, with the reason on stderr).
"""
from __future__ import annotations

import argparse
import json

from feedback.store.registry import RegistryError
from feedback.store.tables import MODEL_ROLES, UPSTREAM_KINDS
from serving.models_cli import ACTOR, _table, _with_registry, store_command
from serving.upstreams.config import pool_spec_problem

COLUMNS = ["name", "role", "kind", "url", "discovery", "model_version", "actor", "created_at"]


def add_pools_commands(subparsers) -> None:
    pools = subparsers.add_parser("pools", help="upstream pools registered in the store (blue/green without "
                                                "restarting gateways): list, add, remove")
    commands = pools.add_subparsers(dest="pools_command", required=True)

    def command(name: str, help: str):
        return store_command(commands, name, help)

    p = command("list", "registered pools, oldest first")
    p.add_argument("--role", choices=MODEL_ROLES)
    p.set_defaults(func=run_list)

    p = command("add", "register a pool: gateways add its servers once they pass their health check")
    p.add_argument("name", help="a DNS label, e.g. tgi-v3 (pools are immutable: a change is a new name)")
    p.add_argument("--url", required=True, help="base URL; with --discovery, the headless Service's name")
    p.add_argument("--kind", choices=UPSTREAM_KINDS, required=True)
    p.add_argument("--role", choices=MODEL_ROLES, default="policy")
    p.add_argument("--model-version", help="the version its servers serve (required for tgi and openai)")
    p.add_argument("--discovery", choices=("dns", "srv"), help="members are the name's A/AAAA or SRV records")
    p.add_argument("--model", help="model name OpenAI-compatible servers expect (default: their first)")
    p.add_argument("--api-key-env", help="the gateways' environment variable holding the server's API key")
    p.add_argument("--reason", default="")
    p.set_defaults(func=run_add)

    p = command("remove", "unregister a pool: gateways send it no new requests and drop it once drained")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="even while its version is the serving or canary one")
    p.add_argument("--reason", default="")
    p.set_defaults(func=run_remove)


def _pools(registry):
    from feedback.store.pools import UpstreamPools

    return UpstreamPools(registry.store)


def _print(args: argparse.Namespace, records: list) -> int:
    rows = [r.to_dict() for r in records]
    print(json.dumps(rows if args.pools_command == "list" else rows[0]) if args.json else _table(rows, COLUMNS))
    return 0


def run_list(args: argparse.Namespace) -> int:
    return _with_registry(args, lambda registry: _print(args, _pools(registry).list(args.role)), "feedloop pools list")


def run_add(args: argparse.Namespace) -> int:
    problem = pool_spec_problem(args.url, args.kind, args.model_version, args.model, args.discovery)

    def action(registry) -> int:
        if problem is not None:
            raise RegistryError(problem)
        record = _pools(registry).add(args.name, role=args.role, kind=args.kind, url=args.url,
                                      discovery=args.discovery, model_version=args.model_version, model=args.model,
                                      api_key_env=args.api_key_env, actor=ACTOR, reason=args.reason)
        return _print(args, [record])

    return _with_registry(args, action, "feedloop pools add")


def run_remove(args: argparse.Namespace) -> int:
    return _with_registry(args, lambda registry: _print(args, [_pools(registry).remove(
        args.name, actor=ACTOR, reason=args.reason, force=args.force)]), "feedloop pools remove")
