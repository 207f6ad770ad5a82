"""Stage checkpoints (what serving loads) and resumable training state (what a stopped run needs).

Two different things on purpose:
- `output_dir/checkpoint/`: the stage's result, an immutable HF directory (safetensors + tokenizer)
  with a manifest {stage, parent_version, data_hash, config, metrics, model_version, files}, written
  atomically by serving.checkpoint.write_checkpoint.
- `output_dir/state/step-NNNNNNNN/`: everything needed to continue mid-run so that the result equals
  an uninterrupted run: model and optimizer and scheduler state, the RNG states, the data position
  (epoch, next micro-batch) and the step. Written to a temporary name and renamed, so a run killed
  while saving leaves the previous state intact; older states are removed after a new one lands.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from serving.checkpoint import write_checkpoint
from trainer.config import ConfigError
from trainer.data import micro_batches

STATE_DIR = "state"
CHECKPOINT_DIR = "checkpoint"


def dataset_hash(files: list[Path]) -> str:
    """sha256 of the files' bytes in order (train then held-out): equals the export's `content_hash`."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def write_stage_checkpoint(final_dir: Path, model, tokenizer, *, stage: str, parent_version: str | None,
                           data_hash: str, config: dict, metrics: dict) -> Path:
    """Save `model` + `tokenizer` in HF format with the stage manifest; returns `final_dir`.

    model_version is `<stage>-<first 12 hex of the weights' sha256>`: the same weights get the same
    version, and the registry refuses a version reused for other files.
    """
    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    def manifest(files: dict[str, str]) -> dict:
        weights = "".join(files[k] for k in sorted(files) if k.endswith(".safetensors"))
        version = f"{stage}-{hashlib.sha256(weights.encode()).hexdigest()[:12]}"
        return {"stage": stage, "parent_version": parent_version, "data_hash": data_hash, "config": config,
                "metrics": metrics, "model_version": version}

    return write_checkpoint(Path(final_dir), save, manifest)


@dataclass
class Position:
    """Where a run stands: `step` optimizer steps done; the next micro-batch is `batch_index` of `epoch`."""

    step: int
    epoch: int
    batch_index: int


def capture_rng() -> dict:
    """RNG states of python and torch (CPU and every CUDA device). numpy is not used by the trainer."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(output_dir: Path, position: Position, *, model=None, optimizer=None, scheduler=None,
                        config: dict, data_hash: str, keep: int = 1, engine=None) -> Path:
    """Write `output_dir/state/step-N/` atomically and keep only the newest `keep` states.

    engine: a `trainer.distributed` engine, instead of model/optimizer/scheduler (a DeepSpeed engine
    adds its own checkpoint in a sub-directory).
    """
    root = Path(output_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{position.step:08d}"
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # torch.save keeps tied weights tied (safetensors would refuse the shared tensor).
        payload = (engine.state_payload() if engine is not None else
                   {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()})
        torch.save({**payload, "rng": capture_rng()}, tmp / "state.pt")
        if engine is not None:
            engine.save_extra(tmp)
        (tmp / "position.json").write_text(json.dumps(
            {**asdict(position), "data_hash": data_hash, "config": config}, indent=2, sort_keys=True))
        if final.exists():  # the same step saved twice (stopped right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_training_state(output_dir: Path) -> Path | None:
    """The newest complete state directory (temporary ones are ignored), or None."""
    states = sorted(p for p in (Path(output_dir) / STATE_DIR).glob("step-*") if (p / "position.json").exists())
    return states[-1] if states else None


def read_position(state_dir: Path) -> tuple[Position, dict]:
    """(Position, the rest of position.json: data_hash and config)."""
    info = json.loads((Path(state_dir) / "position.json").read_text())
    position = Position(info.pop("step"), info.pop("epoch"), info.pop("batch_index"))
    return position, info


def load_training_state(state_dir: Path, *, model=None, optimizer=None, scheduler=None, engine=None) -> Position:
    """Restore model, optimizer, scheduler (or `engine`) and RNG from `state_dir`; returns where to continue."""
    payload = torch.load(Path(state_dir) / "state.pt", map_location="cpu", weights_only=False)
    if engine is not None:
        engine.load(Path(state_dir), payload)
    else:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
    restore_rng(payload["rng"])
    return read_position(state_dir)[0]


# Config keys that may change between an interrupted run and its resumption (they do not change
# what is computed).
RESUMABLE_CHANGES = {"run.log_every", "run.save_every", "run.device"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(saved: dict, config: dict, saved_hash: str, data_hash: str) -> None:
    if saved_hash != data_hash:
        raise ConfigError("the dataset files changed since the interrupted run (data hash differs); "
                          "start a new run in a new output_dir")
    old, new = _flat(saved), _flat(config)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(f"cannot resume: the config changed since the interrupted run ({', '.join(changed)})")


def resume_training(out: Path, config: dict, data_hash: str, **load) -> tuple[Position, Path]:
    """Restore the newest saved state under `out` for `--resume` (what `load` names: `engine=`, or
    `model=`/`optimizer=`/`scheduler=`), after checking that the data and config are unchanged.
    Returns the position to continue from and the state directory."""
    state_dir = latest_training_state(out)
    if state_dir is None:
        raise ConfigError(f"--resume: no saved training state under {out}/state")
    _, saved = read_position(state_dir)
    check_resumable(saved["config"], config, saved["data_hash"], data_hash)
    return load_training_state(state_dir, **load), state_dir


class StepPlan:
    """How a stage's optimizer steps walk its training records, epoch after epoch.

    An optimizer step takes `accumulation` micro-batches of `batch_size` records; the last step of an
    epoch may take fewer. The record order of an epoch is a function of (seed, epoch) only, so any step's
    micro-batches are known without replaying the ones before it (what resuming needs).
    """

    def __init__(self, records: int, *, batch_size: int, accumulation: int, epochs: int, seed: int,
                 shuffle: bool, max_steps: int | None = None):
        self.records, self.batch_size, self.accumulation = records, batch_size, accumulation
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = math.ceil(math.ceil(records / batch_size) / accumulation)
        self.total_steps = epochs * self.steps_per_epoch
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        self._epoch_batches: dict[int, list[list[int]]] = {}  # the current epoch's micro-batches only

    def position_after(self, step: int) -> Position:
        """Where the run stands once `step` optimizer steps are done."""
        epoch, window = divmod(step, self.steps_per_epoch)
        return Position(step=step, epoch=epoch, batch_index=window * self.accumulation)

    def window(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, the micro-batches as record-index lists) of optimizer step `step` (0-based)."""
        epoch, window = divmod(step, self.steps_per_epoch)
        if epoch not in self._epoch_batches:
            self._epoch_batches = {epoch: micro_batches(self.records, self.batch_size, self.seed, epoch,
                                                        self.shuffle)}
        return epoch, self._epoch_batches[epoch][window * self.accumulation:(window + 1) * self.accumulation]

    def save_state(self, output_dir: Path, step: int, *, engine, config: dict, data_hash: str) -> Path:
        """`save_training_state` after `step` optimizer steps (bind all but `step` with functools.partial)."""
        return save_training_state(output_dir, self.position_after(step), engine=engine, config=config,
                                   data_hash=data_hash)
