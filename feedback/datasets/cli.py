"""`feedloop data export`: registered on the main CLI's subparsers by `add_data_commands`."""
from __future__ import annotations

import argparse
import json
import os

from feedback.datasets.export import KINDS, export
from feedback.store import FeedbackStore
from serving.paths import data_dir_from_env


def default_database_url() -> str:
    """The serving settings' default: FEEDLOOP_DATABASE_URL, else SQLite in the data directory."""
    return os.environ.get("FEEDLOOP_DATABASE_URL") or f"sqlite:///{data_dir_from_env() / 'feedloop.db'}"


def add_data_commands(subparsers) -> None:
    """Add `data export …` to an argparse subparsers object; the parsed args carry `func`."""
    data = subparsers.add_parser("data", help="datasets exported from the feedback store")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    command = data_commands.add_parser("export", help="write a training set (JSONL) and record its snapshot")
    command.add_argument("--kind", choices=KINDS, required=True,
                         help="sft: demonstrations; rm: preference groups; prompts: PPO prompts; ptx: text for PPO-ptx")
    command.add_argument("--out", required=True, help="directory for <kind>.train.jsonl and <kind>.heldout.jsonl")
    command.add_argument("--database-url", default=None,
                         help="sqlite:///path or postgresql://… (default: FEEDLOOP_DATABASE_URL, else "
                              "<data dir>/feedloop.db)")
    command.add_argument("--heldout-fraction", type=float, default=0.1, help="share of prompts held out")
    command.add_argument("--seed", type=int, default=0, help="seed of the held-out split (and of thumb-pair sampling)")
    command.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    store = FeedbackStore(args.database_url or default_database_url())
    try:
        store.migrate()
        result = export(store, args.kind, args.out, args.heldout_fraction, args.seed)
    finally:
        store.close()
    print(json.dumps({"train": str(result.train_path), "heldout": str(result.heldout_path), "counts": result.counts,
                      "content_hash": result.content_hash, "snapshot_id": result.snapshot_id}))
    return 0
