"""The set-up every stage shares, so each stage's run_<stage> reads as its own numbered steps:
refuse a finished or unresumed output directory and seed (`begin_stage`), put a model in training
mode (`make_trainable`), plan the steps, build optimizer + schedule + engine and restore a saved
state (`prepare_training`), and stop on Ctrl-C between steps only (`StepInterrupts`)."""
from __future__ import annotations

import logging
import random
import signal
import threading
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from trainer.checkpointing import CHECKPOINT_DIR, Position, StepPlan, latest_training_state, resume_training
from trainer.config import ConfigError, RunConfig
from trainer.distributed import build_engine
from trainer.optim import build_optimizer, build_scheduler


def begin_stage(run: RunConfig, resume: bool) -> tuple[Path, Path]:
    """(output dir, final checkpoint dir) after refusing a finished run and an interrupted one started
    again without --resume; seeds torch and python."""
    out = Path(run.output_dir)
    final_dir = out / CHECKPOINT_DIR
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} exists: this run already finished (checkpoints are immutable)")
    if not resume and latest_training_state(out) is not None:
        raise ConfigError(f"{out} holds the state of an interrupted run: pass --resume, or use a new output_dir")
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    return out, final_dir


def make_trainable(model, gradient_checkpointing: bool) -> None:
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a cache is useless in training and HF warns with checkpointing
    model.train()


class Training(NamedTuple):
    plan: StepPlan
    engine: object  # trainer.distributed engine (plain torch or DeepSpeed)
    position: Position  # where to start: step 0, or the resumed state's
    save_state: Callable[[int], Path]  # save_state(step) → the state directory written


def prepare_training(model, config, n_items: int, out: Path, config_dict: dict, data_hash: str, *, resume: bool,
                     deepspeed, log: logging.Logger) -> Training:
    """Plan (an optimizer step = `grad_accumulation` micro-batches of `data.batch_size` items; the last
    step of an epoch may take fewer), AdamW + schedule + engine, and — with `resume` — model, optimizer,
    scheduler, RNG and data position restored from the newest saved state under `out`."""
    plan = StepPlan(n_items, batch_size=config.data.batch_size, accumulation=config.optim.grad_accumulation,
                    epochs=config.epochs, seed=config.run.seed, shuffle=config.data.shuffle,
                    max_steps=config.run.max_steps)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, plan.total_steps)
    engine = build_engine(model, optimizer, scheduler, grad_clip=config.optim.grad_clip,
                          batch_size=config.data.batch_size, accumulation=plan.accumulation,
                          deepspeed_config=deepspeed)
    position = Position(step=0, epoch=0, batch_index=0)
    if resume:
        position, state_dir = resume_training(out, config_dict, data_hash, engine=engine)
        log.info("resuming from %s (step %d of %d)", state_dir, position.step, plan.total_steps)
    save_state = partial(plan.save_state, out, engine=engine, config=config_dict, data_hash=data_hash)
    return Training(plan, engine, position, save_state)


class StepInterrupts:
    """Ctrl-C during a training loop takes effect between steps, so the state saved on the way out
    is exactly that of the steps finished. A PPO step makes several optimizer updates (and moves the
    adaptive β): interrupted between two of them, the weights would be half a step ahead of the step
    counter saved with them, and the resumed run would differ from an uninterrupted one.

    The first SIGINT is held until `at_step_end()`, which raises KeyboardInterrupt there; a second one
    aborts at once (`whole_steps` False: the caller saves nothing; resume from the last saved state).
    Installed only over Python's default SIGINT handler in the main thread (`feedloop train`); a
    process that handles its signals itself (`feedloop loop`) keeps its behaviour. `close()` restores.
    """

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.requested = False
        self.whole_steps = True
        self._installed = (threading.current_thread() is threading.main_thread()
                           and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self._installed:
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            self.whole_steps = False
            raise KeyboardInterrupt
        self.requested = True
        self.log.warning("interrupted: stopping at the end of this step (Ctrl-C again to stop now without "
                         "saving it)")

    def at_step_end(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False
