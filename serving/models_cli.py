"""`feedloop models list|register|promote|canary|rollback|history`: the model registry from a shell.

Works on the store directly (`--database-url`, default as `feedloop data export`: FEEDLOOP_DATABASE_URL,
else SQLite in the data directory); running gateways apply the changes at their next poll
(serving/deployment.py). A change the registry refuses (unknown or rejected version, nothing to roll
back to) prints the reason on stderr and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ACTOR = "cli"


def store_command(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand working on the store: `--database-url` and `--json` (also `feedloop pools`)."""
    p = commands.add_parser(name, help=help)
    p.add_argument("--database-url", default=None,
                   help="sqlite:///path or postgresql://… (default: FEEDLOOP_DATABASE_URL, else "
                        "<data dir>/feedloop.db)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def add_models_commands(subparsers) -> None:
    models = subparsers.add_parser("models", help="the model registry: list, register, promote, canary, rollback")
    commands = models.add_subparsers(dest="models_command", required=True)

    def command(name: str, help: str):
        return store_command(commands, name, help)

    p = command("list", "registered versions, with the deployments")
    p.add_argument("--role", choices=("policy", "reward"))
    p.add_argument("--status")
    p.set_defaults(func=run_list)

    p = command("register", "add a checkpoint directory to the registry (as a candidate)")
    p.add_argument("path", help="checkpoint directory (HF format)")
    p.add_argument("--role", choices=("policy", "reward"), help="default: reward for stage rm, else policy")
    p.add_argument("--stage", help="base | sft | rm | ppo | dpo (default: the manifest's, else base)")
    p.add_argument("--version", help="default: the manifest's model_version, else <dirname>-<weights hash>")
    p.add_argument("--parent", help="the version it was trained from (default: the manifest's parent_version)")
    p.set_defaults(func=run_register)

    p = command("promote", "serve VERSION to all traffic")
    p.add_argument("version")
    p.add_argument("--reason", default="")
    p.set_defaults(func=run_promote)

    p = command("canary", "send PERCENT of new requests to VERSION")
    p.add_argument("version")
    p.add_argument("--percent", type=float, required=True)
    p.add_argument("--reason", default="")
    p.set_defaults(func=run_canary)

    p = command("rollback", "withdraw the role's canary, else return to the version the serving one replaced")
    p.add_argument("--role", choices=("policy", "reward"), default="policy")
    p.add_argument("--reason", default="")
    p.set_defaults(func=run_rollback)

    p = command("history", "the registry's audit log, newest first")
    p.add_argument("--role", choices=("policy", "reward"))
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=run_history)


def _with_registry(args: argparse.Namespace, action, command: str | None = None) -> int:
    """Open the store, run `action(registry)`, map RegistryError to exit code 2 (its message on stderr,
    after `command`: default `feedloop models <subcommand>`)."""
    from feedback.datasets.cli import default_database_url
    from feedback.store import FeedbackStore
    from feedback.store.registry import ModelRegistry, RegistryError
    from feedback.store.store import VersionConflict

    store = FeedbackStore(args.database_url or default_database_url())
    try:
        store.migrate()
        return action(ModelRegistry(store))
    except (RegistryError, VersionConflict) as exc:
        print(f"{command or 'feedloop models ' + args.models_command}: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _version_dict(row) -> dict:
    return {"version": row.version, "role": row.role, "stage": row.stage, "status": row.status,
            "parent_version": row.parent_version, "checkpoint_path": row.checkpoint_path, "metrics": row.metrics,
            "created_at": row.created_at.isoformat()}


def run_list(args: argparse.Namespace) -> int:
    def action(registry) -> int:
        rows = [_version_dict(r) for r in registry.store.list_versions(role=args.role, status=args.status)]
        deployments = {role: registry.deployment(role) for role in ("policy", "reward")}
        if args.json:
            print(json.dumps({"versions": rows, "deployments": {
                role: state.to_dict() if state else None for role, state in deployments.items()}}))
            return 0
        for row in rows:
            state = deployments[row["role"]]
            row["traffic"] = ("" if state is None else f"{100 - state.canary_percent:g}%"
                              if row["version"] == state.serving_version else f"{state.canary_percent:g}%"
                              if row["version"] == state.canary_version else "")
        print(_table(rows, ["version", "role", "stage", "status", "traffic", "parent_version", "created_at"]))
        return 0

    return _with_registry(args, action)


def run_register(args: argparse.Namespace) -> int:
    from serving.checkpoint import checksums, model_version_of, read_manifest, verify_checkpoint

    path = Path(args.path).resolve()
    if not (path / "config.json").exists():
        print(f"feedloop models register: {path} is not an HF checkpoint directory (no config.json)",
              file=sys.stderr)
        return 2
    bad = verify_checkpoint(path)
    if bad:
        print(f"feedloop models register: {path} fails its manifest checksums: {', '.join(bad)}", file=sys.stderr)
        return 2
    manifest = read_manifest(path) or {}
    role = args.role or ("reward" if (args.stage or manifest.get("stage")) == "rm" else "policy")
    stage = args.stage or manifest.get("stage") or ("rm" if role == "reward" else "base")
    version = args.version or model_version_of(path)

    def action(registry) -> int:
        row = registry.store.register_version(
            version, stage=stage, checkpoint_path=str(path), checksums=checksums(path),
            parent_version=args.parent or manifest.get("parent_version"), role=role)
        out = _version_dict(row)
        print(json.dumps(out) if args.json else _table([out], ["version", "role", "stage", "status", "checkpoint_path"]))
        return 0

    return _with_registry(args, action)


def _print_state(args: argparse.Namespace, state) -> int:
    data = state.to_dict()
    print(json.dumps(data) if args.json else _table([data], ["role", "serving_version", "canary_version",
                                                             "canary_percent", "revision"]))
    return 0


def run_promote(args: argparse.Namespace) -> int:
    return _with_registry(args, lambda registry: _print_state(
        args, registry.promote(args.version, actor=ACTOR, reason=args.reason)))


def run_canary(args: argparse.Namespace) -> int:
    return _with_registry(args, lambda registry: _print_state(
        args, registry.start_canary(args.version, args.percent, actor=ACTOR, reason=args.reason)))


def run_rollback(args: argparse.Namespace) -> int:
    return _with_registry(args, lambda registry: _print_state(
        args, registry.rollback(args.role, reason=args.reason, actor=ACTOR)))


def run_history(args: argparse.Namespace) -> int:
    def action(registry) -> int:
        rows = [{"id": e.id, "role": e.role, "action": e.action, "version": e.version,
                 "previous_version": e.previous_version, "canary_percent": e.canary_percent, "reason": e.reason,
                 "actor": e.actor, "created_at": e.created_at.isoformat()}
                for e in registry.history(args.role, args.limit)]
        print(json.dumps(rows) if args.json else _table(rows, ["id", "role", "action", "version",
                                                               "previous_version", "actor", "reason"]))
        return 0

    return _with_registry(args, action)
