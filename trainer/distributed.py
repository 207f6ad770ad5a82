"""The seam between a stage's training loop and what applies its gradients: plain torch or DeepSpeed ZeRO.

A stage builds its model, its AdamW (`build_optimizer`) and its LambdaLR (`build_scheduler`) as always,
then wraps them with `build_engine(...)`. The loop then only calls

    engine.backward(loss, last=<is this the window's last micro-batch>)   # per micro-batch
    grad_norm, lr = engine.step()                                        # per optimizer step

and keeps calling the HF model directly for forwards, evaluation and `save_pretrained` (`engine.module`
is that same model). The stage's own accumulation is kept: its losses are already each micro-batch's
share of the step's mean, and a window may be shorter at the end of an epoch, so DeepSpeed neither
rescales the loss (`scale_wrt_gas=False`) nor counts micro-steps itself (the boundary is set by `last`).

- `TorchEngine` (default): clip_grad_norm_, optimizer.step, scheduler.step, zero_grad — the stages'
  original code, bit for bit.
- `DeepSpeedEngine` (`--deepspeed CONFIG`): `deepspeed.initialize(model, optimizer=<the AdamW>,
  lr_scheduler=<the LambdaLR>, config=<the file, with the batch sizes, accumulation and clipping filled
  from the recipe>)`. ZeRO stages 0–2 only: they keep the full parameters on every rank, so the model
  the stage forwards, evaluates and saves is complete (stage 3 would shard it). Weights stay fp32; the
  recipe's `run.dtype: bf16` gives bf16 autocast compute exactly as without DeepSpeed, so DeepSpeed's own
  `bf16`/`fp16` blocks (low-precision weights) are refused. Without a launcher (`deepspeed` / `torchrun`
  set RANK etc.), a one-process group is made here: gloo on CPU, nccl on GPU. One process only for now:
  WORLD_SIZE > 1 is refused until the stages shard micro-batches by rank and write from rank 0.

Resumable state: the plain engine's is model + optimizer + scheduler in `state.pt` (unchanged); the
DeepSpeed engine's is DeepSpeed's own checkpoint (`save_checkpoint`: module, ZeRO-partitioned optimizer
state, scheduler) in `<state>/deepspeed/`. A state saved by one kind cannot be resumed by the other.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
from pathlib import Path

import torch

from trainer.config import ConfigError

log = logging.getLogger(__name__)

DEEPSPEED_STATE = "deepspeed"  # sub-directory of a training-state directory holding DeepSpeed's checkpoint
_TAG = "state"


class TorchEngine:
    """Plain torch: what every stage did before the seam."""

    is_deepspeed = False

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, grad_clip: float | None):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_norm = grad_clip if grad_clip is not None else float("inf")
        self.params = [p for p in model.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def step(self) -> tuple[float, float]:
        """Clip, update, advance the schedule, clear the gradients; returns (grad norm before clipping, lr used)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm).item()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def state_payload(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def save_extra(self, directory: Path) -> None:
        """Nothing beyond `state_payload` (kept in state.pt)."""

    def load(self, directory: Path, payload: dict) -> None:
        if "model" not in payload:
            raise ConfigError(f"{directory} was saved by a DeepSpeed run: resume it with the same --deepspeed")
        self.module.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])


class DeepSpeedEngine(TorchEngine):
    """DeepSpeed ZeRO (stages 0–2) over the stage's own AdamW and LambdaLR."""

    is_deepspeed = True

    def __init__(self, model, optimizer, scheduler, ds_config: dict):
        import deepspeed

        _init_process_group(deepspeed)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        self.module, self.optimizer, self.scheduler = self.engine.module, optimizer, scheduler
        self.config = ds_config

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # The boundary must be known before the backward: ZeRO reduces gradients in its hooks.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # the stage's loss already is its share of the step

    def step(self) -> tuple[float, float]:
        lr = self.scheduler.get_last_lr()[0]
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # ZeRO's optimizer step (clipping per the config), then the scheduler, then zero_grad
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm.item() if isinstance(norm, torch.Tensor) else norm) if norm is not None else math.nan
        return grad_norm, lr

    def state_payload(self) -> dict:
        return {}  # DeepSpeed's checkpoint holds the module, optimizer and scheduler

    def save_extra(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(Path(directory) / DEEPSPEED_STATE), tag=_TAG, save_latest=False)

    def load(self, directory: Path, payload: dict) -> None:
        path = Path(directory) / DEEPSPEED_STATE
        if not path.is_dir():
            raise ConfigError(f"{directory} was saved without DeepSpeed: resume it without --deepspeed")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise ConfigError(f"{path}: DeepSpeed could not load its checkpoint")


class EngineGroup:
    """Models trained side by side, each by its own engine, saved and resumed as one training state.

    PPO trains the policy and the value model: separate weights, separate losses (the policy's loss has
    no path to the value model and the reverse), gradient norms clipped per model. One engine each is
    what DeepSpeed needs for that (one `deepspeed.initialize` per model, as DeepSpeed-Chat does for its
    actor and critic: a single engine would clip the two models' gradients by one global norm).
    `extra` holds small values saved with them (PPO's KL coefficient β).
    """

    def __init__(self, engines: dict[str, TorchEngine]):
        self.engines = engines
        self.extra: dict = {}

    def __getitem__(self, name: str) -> TorchEngine:
        return self.engines[name]

    @property
    def is_deepspeed(self) -> bool:
        return any(e.is_deepspeed for e in self.engines.values())

    def state_payload(self) -> dict:
        return {"engines": {name: e.state_payload() for name, e in self.engines.items()}, "extra": dict(self.extra)}

    def save_extra(self, directory: Path) -> None:
        for name, e in self.engines.items():  # a DeepSpeed checkpoint per model: <state>/<name>/deepspeed/
            e.save_extra(Path(directory) / name)

    def load(self, directory: Path, payload: dict) -> None:
        if "engines" not in payload:
            raise ConfigError(f"{directory} was saved by an older trainer (one optimizer for all models); "
                              "start a new run in a new output_dir")
        for name, e in self.engines.items():
            e.load(Path(directory) / name, payload["engines"][name])
        self.extra = dict(payload["extra"])


def load_deepspeed_config(path: str | Path) -> dict:
    """Read a DeepSpeed config file (JSON; YAML also accepted)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed: DeepSpeed config {path} not found")
    text = path.read_text()
    try:
        config = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except ValueError as e:
        raise ConfigError(f"--deepspeed: {path} is not valid JSON/YAML: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed: {path} must hold a mapping")
    return config


def _yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def fill_deepspeed_config(config: dict, *, batch_size: int, accumulation: int, grad_clip: float | None,
                          world_size: int, source: str = "the DeepSpeed config") -> dict:
    """The config with batch sizes, accumulation and clipping from the recipe; conflicting values refused.

    The recipe stays the one place these are set: a value in the DeepSpeed file must be "auto" or agree.
    """
    config = json.loads(json.dumps(config))  # a copy
    wanted = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": accumulation,
              "train_batch_size": batch_size * accumulation * world_size,
              "gradient_clipping": float(grad_clip) if grad_clip is not None else 0.0}
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{source}: {key} is {given} but the recipe gives {value} "
                              "(set it to \"auto\" or drop it: the recipe's data/optim sections decide)")
        config[key] = value
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"{source}: drop the {key!r} block: the stage builds its own "
                              "(AdamW and warm-up + cosine from the recipe's optim section)")
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled") not in (None, False, "auto"):
            raise ConfigError(f"{source}: {key}.enabled keeps {key} weights; weights stay fp32 here: "
                              "use the recipe's run.dtype: bf16 (autocast) for bf16 compute")
        config.pop(key, None)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{source}: ZeRO stage {stage} is not supported (0, 1 or 2: the stages need the "
                          "full parameters on every rank to evaluate and save)")
    config.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW, the stage's own
    config.setdefault("steps_per_print", 10 ** 9)  # the stage logs its own metrics
    return config


def build_engine(model, optimizer, scheduler, *, grad_clip: float | None, batch_size: int, accumulation: int,
                 deepspeed_config: str | Path | None = None) -> TorchEngine:
    """Plain torch by default; DeepSpeed when `deepspeed_config` names a config file."""
    if deepspeed_config is None:
        return TorchEngine(model, optimizer, scheduler, grad_clip)
    config = load_deepspeed_config(deepspeed_config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != 1:
        # Every rank would read the same micro-batches and write the checkpoint: refuse, never train wrong.
        raise ConfigError(f"--deepspeed with WORLD_SIZE={world_size}: multi-process runs are not supported yet "
                          "(the stages do not shard micro-batches by rank); run one process")
    config = fill_deepspeed_config(config, batch_size=batch_size, accumulation=accumulation, grad_clip=grad_clip,
                                   world_size=world_size, source=str(deepspeed_config))
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("--deepspeed needs the deepspeed package: pip install 'feedloop[deepspeed]'") from None
    return DeepSpeedEngine(model, optimizer, scheduler, config)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(deepspeed) -> None:
    """Join the launcher's process group, or make a one-process one (gloo on CPU, nccl on GPU)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:  # no launcher: a single process
        os.environ.update({"MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port())),
                           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
