"""`feedloop train <stage> --config FILE.yaml [--resume] [--deepspeed CONFIG]`."""
from __future__ import annotations

import argparse
import logging
import sys

from trainer.config import ConfigError, load_config
from trainer.data import DatasetError


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import STAGE_CONFIGS

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, STAGE_CONFIGS[args.stage])
        runner = STAGE_RUNNERS[args.stage]()
        if args.deepspeed:
            if args.stage not in DEEPSPEED_STAGES:
                # Refusing beats silently training without it (a stage whose runner takes no `deepspeed`).
                raise ConfigError(f"--deepspeed is not yet supported for the {args.stage} stage; "
                                  "run without it (plain torch)")
            from trainer.distributed import load_deepspeed_config

            load_deepspeed_config(args.deepspeed)  # a missing or unreadable file fails before any model loads
            path = runner(config, resume=args.resume, deepspeed=args.deepspeed)
        else:
            path = runner(config, resume=args.resume)
    except (ConfigError, DatasetError, FileExistsError) as e:
        print(f"feedloop train {args.stage}: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _sft_runner():
    from trainer.sft import run_sft  # torch + transformers load only when a stage runs

    return run_sft


# Stage → a function returning its `run_<stage>(config, resume=...) -> Path`. Other stages add theirs.
STAGE_RUNNERS = {"sft": _sft_runner}
# Stages whose runner takes `deepspeed=CONFIG` (trainer.distributed: DeepSpeed ZeRO 0-2).
DEEPSPEED_STAGES = {"sft", "rm", "dpo", "ppo"}


def add_train_commands(subparsers) -> None:
    """Register `train <stage>` on the `feedloop` command's subparsers."""
    train = subparsers.add_parser("train", help="train a stage: `feedloop train sft --config FILE.yaml`")
    stages = train.add_subparsers(dest="stage", required=True)
    for stage in STAGE_RUNNERS:
        p = stages.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--config", required=True, help="YAML recipe (see trainer/configs/ and docs/training.md)")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from the newest state in run.output_dir/state/")
        p.add_argument("--deepspeed", metavar="CONFIG",
                       help="train under DeepSpeed ZeRO with this config, e.g. trainer/configs/deepspeed/"
                            "zero2-cpu.json; plain torch without it")
        p.add_argument("--log-level", default="INFO")
        p.set_defaults(func=cmd_train)


def _dpo_runner():
    from trainer.dpo import run_dpo

    return run_dpo


STAGE_RUNNERS["dpo"] = _dpo_runner


def _rm_runner():
    from trainer.reward import run_rm

    return run_rm


STAGE_RUNNERS["rm"] = _rm_runner


def _ppo_runner():
    from trainer.ppo import run_ppo

    return run_ppo


STAGE_RUNNERS["ppo"] = _ppo_runner
