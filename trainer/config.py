"""Training configs: typed dataclasses, one per concern, loaded from YAML recipes (trainer/configs/).

Each field's doc is written once, in its `doc=` metadata: `config_reference` renders the tables in
docs/training.md from it. Values are checked in `__post_init__`, so a bad recipe fails when it is
loaded, before any model or data is touched. YAML keys a dataclass does not have are refused (a
typo such as `lr_rate` would otherwise be silently ignored and train with the default).

A recipe names its stage (`stage: sft`); `STAGE_CONFIGS` maps each stage to its dataclass, and
the other stages add their entries there.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TOO_LONG_POLICIES = ("error", "skip")  # what a stage does with a record over data.max_length


class ConfigError(ValueError):
    """A recipe that cannot be used: unknown keys, wrong types or values out of range."""


def param(default, doc: str, **kwargs):
    """A dataclass field with its documentation (the one place the field is described)."""
    if isinstance(default, (list, dict, tuple)) or dataclasses.is_dataclass(default):
        value = default
        return field(default_factory=lambda: value() if isinstance(value, type) else value,
                     metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (InstructGPT's SFT recipe)."""

    lr: float = param(1e-5, "peak learning rate, reached at the end of warm-up")
    weight_decay: float = param(0.0, "AdamW decoupled weight decay (not applied to biases and norm weights)")
    betas: tuple[float, float] = param((0.9, 0.95), "AdamW β1, β2")
    eps: float = param(1e-8, "AdamW ε")
    warmup_steps: int = param(0, "optimizer steps of linear warm-up from 0 (ignored when warmup_ratio is set)")
    warmup_ratio: float | None = param(None, "warm-up as a share of all optimizer steps, in [0, 1)")
    schedule: str = param("cosine", "'cosine' (decay to min_lr_ratio · lr after warm-up) or 'constant'")
    min_lr_ratio: float = param(0.1, "final learning rate of the cosine schedule, as a share of lr")
    grad_clip: float | None = param(1.0, "clip the global gradient L2 norm to this; null: no clipping")
    grad_accumulation: int = param(1, "micro-batches per optimizer step (effective batch = batch_size × this)")

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
                 f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _require(self.schedule in ("cosine", "constant"),
                 f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")
        _require(self.grad_accumulation >= 1, f"optim.grad_accumulation must be >= 1, got {self.grad_accumulation}")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up length in optimizer steps for a run of `total_steps`."""
        if self.warmup_ratio is not None:
            return int(self.warmup_ratio * total_steps)
        return self.warmup_steps


@dataclass
class DataConfig:
    """Dataset files (the JSONL that `feedloop data export` writes; see docs/datasets.md)."""

    train: str = param("", "training file, e.g. DIR/sft.train.jsonl")
    heldout: str | None = param(None, "held-out file evaluated at the end (loss reported in the manifest); null: none")
    max_length: int = param(1024, "longest sequence in tokens (prompt + response); longer records: see too_long, "
                                  "never silently truncated; at most the model's context")
    batch_size: int = param(8, "sequences per micro-batch")
    shuffle: bool = param(True, "shuffle the training records each epoch (seeded by run.seed and the epoch)")
    too_long: str = param("error", "a record over max_length: 'error' (names file:line) or 'skip' (dropped, "
                                   "counted in the manifest's skipped_too_long_* metrics; the loop always skips: "
                                   "the public API accepts longer prompts than a recipe trains on)")

    def __post_init__(self):
        _require(bool(self.train), "data.train must name the training file")
        _require(self.too_long in TOO_LONG_POLICIES,
                 f"data.too_long must be one of {', '.join(TOO_LONG_POLICIES)}, got {self.too_long!r}")
        _require(self.max_length >= 2, f"data.max_length must be >= 2, got {self.max_length}")
        _require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")

    def files(self) -> list[Path]:
        """The dataset files, train first (the order of the data snapshot hash)."""
        return [Path(self.train)] + ([Path(self.heldout)] if self.heldout else [])


@dataclass
class RunConfig:
    """Where and how a run executes."""

    output_dir: str = param("", "run directory: checkpoint/, state/ and metrics.jsonl go here")
    seed: int = param(0, "seeds torch and python RNGs and the data order")
    log_every: int = param(1, "write a metrics line every N optimizer steps")
    save_every: int = param(50, "save the resumable training state every N optimizer steps (0: only when stopped)")
    max_steps: int | None = param(None, "stop after at most this many optimizer steps (the schedule is planned for them); "
                                        "null: run all epochs")
    device: str = param("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', …")
    dtype: str = param("auto", "compute dtype: 'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16' (autocast; "
                               "weights and optimizer state stay fp32)")
    gradient_checkpointing: bool = param(False, "recompute activations in the backward pass (less memory, ~30% "
                                                "more compute; on CPU with bf16 it was faster)")

    def __post_init__(self):
        _require(bool(self.output_dir), "run.output_dir must be set")
        _require(self.log_every >= 1, f"run.log_every must be >= 1, got {self.log_every}")
        _require(self.save_every >= 0, f"run.save_every must be >= 0, got {self.save_every}")
        _require(self.max_steps is None or self.max_steps >= 1, f"run.max_steps must be >= 1 or null, got {self.max_steps}")
        _require(self.dtype in ("auto", "fp32", "bf16"),
                 f"run.dtype must be 'auto', 'fp32' or 'bf16', got {self.dtype!r} (fp16 would need loss scaling)")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"run.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations: next-token loss on response tokens only."""

    stage: str = param("sft", "the stage this recipe is for (picks the dataclass)")
    model: str = param("bundled", "base checkpoint directory (HF format), or 'bundled' for SmolLM2-135M-Instruct")
    epochs: int = param(2, "passes over the training file")
    optim: OptimConfig = param(OptimConfig, "optimizer and schedule")
    data: DataConfig = param(DataConfig, "dataset files and batching")
    run: RunConfig = param(RunConfig, "output, seed, device, precision")

    def __post_init__(self):
        _require(self.stage == "sft", f"stage must be 'sft' for SFTConfig, got {self.stage!r}")
        _require(bool(self.model), "model must name the base checkpoint (or 'bundled')")
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")


# Stage name (a recipe's `stage:` key) → its config dataclass. Other stages register here.
STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig}


def _convert(value, annotation, where: str):
    """Check/convert one YAML value to the field's annotation (dataclasses, Optional, tuples, numbers)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(annotation, value, where + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads `1e-5` (no dot) as a string: accept it when it is a number.
            try:
                return float(value) if isinstance(value, str) else _fail(where, "a number", value)
            except ValueError:
                _fail(where, "a number", value)
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, "an integer", value)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(where, "true or false", value)
        return value
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(where, "a string", value)
        return str(value)
    return value


def _fail(where: str, expected: str, value):
    raise ConfigError(f"{where}: expected {expected}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {cls.__name__} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict, cls: type):
    """Build `cls` from a (YAML) mapping; nested mappings build the nested dataclasses."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
    return _build(cls, data)


def load_config(path: str | Path, cls: type | None = None):
    """Load a YAML recipe into `cls`, or into the dataclass its `stage:` key names (STAGE_CONFIGS)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    if cls is None:
        stage = data.get("stage")
        if stage not in STAGE_CONFIGS:
            raise ConfigError(f"{path}: `stage:` must be one of {', '.join(sorted(STAGE_CONFIGS))}, got {stage!r}")
        cls = STAGE_CONFIGS[stage]
    try:
        return config_from_dict(data, cls)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(config) -> dict:
    """Plain dict of a config (tuples as lists): what the manifest and the training state record."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def config_reference(cls: type, prefix: str = "") -> str:
    """Markdown table of a config's fields (key, default, doc), nested dataclasses flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.append(config_reference(hints[f.name], prefix + f.name + ".").split("\n", 2)[2])
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = list(default) if isinstance(default, tuple) else default
        rows.append(f"| `{prefix}{f.name}` | `{json.dumps(default)}` | {f.metadata.get('doc', '')} |")
    return "| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows)


@dataclass
class DPOConfig:
    """Direct preference optimisation on the reward model's ranking groups (no reward model, no rollouts)."""

    stage: str = param("dpo", "the stage this recipe is for (picks the dataclass)")
    model: str = param("bundled", "checkpoint the policy starts from (the SFT checkpoint, HF format), or 'bundled'")
    reference: str | None = param(None, "frozen reference checkpoint; null: a separate copy of `model` (the usual "
                                        "choice: the implicit reward is measured against where training started)")
    beta: float = param(0.1, "β: strength of the implicit KL constraint (rewards are β · log π/π_ref)")
    loss_type: str = param("sigmoid", "'sigmoid' (DPO) or 'ipo' (squared loss towards h = 1/(2β))")
    label_smoothing: float = param(0.0, "probability that a preference label is flipped, in [0, 0.5) "
                                        "(conservative DPO; sigmoid loss only)")
    epochs: int = param(1, "passes over the training file")
    optim: OptimConfig = param(OptimConfig, "optimizer and schedule")
    data: DataConfig = param(DataConfig, "rm-format files ({prompt, completions best→worst}); "
                                         "data.batch_size counts ranking groups (prompts) per micro-batch")
    run: RunConfig = param(RunConfig, "output, seed, device, precision")

    def __post_init__(self):
        _require(self.stage == "dpo", f"stage must be 'dpo' for DPOConfig, got {self.stage!r}")
        _require(bool(self.model), "model must name the initial checkpoint (or 'bundled')")
        _require(self.reference is None or bool(self.reference), "reference must name a checkpoint or be null")
        _require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _require(self.loss_type in ("sigmoid", "ipo"), f"loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")
        _require(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(self.label_smoothing == 0 or self.loss_type == "sigmoid",
                 "label_smoothing applies to loss_type 'sigmoid' only")
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")


STAGE_CONFIGS["dpo"] = DPOConfig


@dataclass
class RMDataConfig(DataConfig):
    """Ranking files for the reward model (`feedloop data export --kind rm`), plus the demonstrations
    that define reward 0."""

    train: str = param("", "training file of rankings, e.g. DIR/rm.train.jsonl")
    heldout: str | None = param(None, "held-out rankings: pairwise accuracy and loss reported in the manifest; "
                                      "null: none")
    max_length: int = param(1024, "longest (prompt, completion) in tokens as the reward model reads it; longer: "
                                  "see too_long, never truncated; at most the model's context")
    batch_size: int = param(8, "prompts (ranking groups) per micro-batch; all K completions of a group go in "
                               "the same forward")
    demonstrations: str | None = param(None, "SFT file (DIR/sft.train.jsonl) whose responses score 0 on average "
                                             "after training; null: the best completion of each training group")

    def files(self) -> list[Path]:
        """train, held-out, then the demonstrations (the order of the data hash)."""
        return super().files() + ([Path(self.demonstrations)] if self.demonstrations else [])


@dataclass
class RMConfig:
    """Reward model: a scalar head on the SFT model, trained with the K-way ranking loss."""

    stage: str = param("rm", "the stage this recipe is for (picks the dataclass)")
    model: str = param("bundled", "checkpoint to start from (the SFT result, HF format), or 'bundled'; its "
                                  "LM head is replaced by a one-output head")
    policy: str | None = param(None, "the policy checkpoint the reward model will score (or 'bundled'): its "
                                     "tokenizer (vocabulary and chat template) must equal the model's; null: "
                                     "no check")
    epochs: int = param(1, "passes over the rankings (one: reward models overfit quickly)")
    optim: OptimConfig = param(OptimConfig, "optimizer and schedule")
    data: RMDataConfig = param(RMDataConfig, "dataset files and batching")
    run: RunConfig = param(RunConfig, "output, seed, device, precision")

    def __post_init__(self):
        _require(self.stage == "rm", f"stage must be 'rm' for RMConfig, got {self.stage!r}")
        _require(bool(self.model), "model must name the initial checkpoint (or 'bundled')")
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")


STAGE_CONFIGS["rm"] = RMConfig


@dataclass
class PPODataConfig(DataConfig):
    """Prompt files for PPO rollouts (`feedloop data export --kind prompts`), plus the ptx text."""

    train: str = param("", "training prompts, e.g. DIR/prompts.train.jsonl ({prompt})")
    heldout: str | None = param(None, "held-out prompts: fresh rollouts of the final policy are scored and "
                                      "their mean RM score and KL reported in the manifest; null: none")
    max_length: int = param(1024, "longest prompt (chat template applied) + max_new_tokens, in tokens; a longer "
                                  "prompt: see too_long, never truncated; at most the model's context")
    batch_size: int = param(8, "rollout batch: prompts rolled out (one completion each) per PPO step")
    mini_batch_size: int = param(4, "rollouts per optimizer step inside the PPO epochs")
    ptx: str | None = param(None, "pretraining-mix text (DIR/ptx.train.jsonl, {text}) for the ptx term; "
                                  "null: no ptx term (ptx_coef must then be 0)")
    ptx_batch_size: int = param(4, "ptx texts per optimizer step")

    def __post_init__(self):
        super().__post_init__()
        _require(self.mini_batch_size >= 1, f"data.mini_batch_size must be >= 1, got {self.mini_batch_size}")
        _require(self.mini_batch_size <= self.batch_size,
                 f"data.mini_batch_size {self.mini_batch_size} exceeds data.batch_size {self.batch_size}")
        _require(self.ptx_batch_size >= 1, f"data.ptx_batch_size must be >= 1, got {self.ptx_batch_size}")

    def files(self) -> list[Path]:
        """prompts, held-out prompts, then the ptx text (the order of the data hash)."""
        return super().files() + ([Path(self.ptx)] if self.ptx else [])


@dataclass
class PPOConfig:
    """PPO-ptx (InstructGPT step 3): the SFT policy maximises the frozen RM's score minus β · KL to the SFT
    model, plus γ_ptx times the next-token loss on pretraining text."""

    stage: str = param("ppo", "the stage this recipe is for (picks the dataclass)")
    policy: str = param("bundled", "the SFT checkpoint the policy starts from (HF format), or 'bundled'")
    reward_model: str = param("", "the RM checkpoint (stage rm): frozen scorer, and the value model's start")
    reference: str | None = param(None, "frozen reference checkpoint for the KL penalty; null: a separate copy "
                                        "of `policy`")
    epochs: int = param(1, "passes over the prompts (a PPO step takes data.batch_size of them)")
    init_kl_coef: float = param(0.02, "β: KL penalty coefficient (the adaptive controller's start)")
    kl_target: float | None = param(None, "adaptive KL: target KL per sequence (nats, summed over tokens); "
                                          "null: β stays fixed")
    kl_horizon: int = param(10000, "adaptive KL: rollouts over which a persistent error moves β by ~e^0.2")
    kl_estimator: str = param("k1", "per-token KL estimator: 'k1' (log p − log p_ref) or 'k3'")
    clip_range: float = param(0.2, "ε: PPO policy ratio clip")
    value_clip: float = param(0.2, "value clip range around the rollout's values (reward units)")
    value_loss_coef: float = param(1.0, "weight of the value loss (the value model has its own weights)")
    gamma: float = param(1.0, "γ: discount")
    lam: float = param(0.95, "λ: GAE parameter")
    ppo_epochs: int = param(4, "passes over each rollout batch")
    max_new_tokens: int = param(64, "longest rollout completion in tokens")
    temperature: float = param(1.0, "rollout sampling temperature (log-probs are of the same tempered policy)")
    ptx_coef: float = param(0.0, "γ_ptx: weight of the pretraining-mix loss; 0 gives plain PPO")
    score_clip: float | None = param(None, "clip RM scores to ±this before the KL penalty; null: no clip")
    whiten_rewards: bool = param(False, "rescale per-token rewards to unit variance (mean kept)")
    whiten_advantages: bool = param(True, "whiten advantages over each rollout batch")
    optim: OptimConfig = param(OptimConfig, "optimizer and schedule (policy and value model, one AdamW; the "
                                            "schedule counts optimizer steps = PPO steps × ppo_epochs × mini-batches)")
    data: PPODataConfig = param(PPODataConfig, "prompt and ptx files, batch sizes")
    run: RunConfig = param(RunConfig, "output, seed, device, precision")

    def __post_init__(self):
        _require(self.stage == "ppo", f"stage must be 'ppo' for PPOConfig, got {self.stage!r}")
        _require(bool(self.policy), "policy must name the SFT checkpoint (or 'bundled')")
        _require(bool(self.reward_model), "reward_model must name the RM checkpoint")
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _require(self.init_kl_coef >= 0, f"init_kl_coef must be >= 0, got {self.init_kl_coef}")
        _require(self.kl_target is None or self.kl_target > 0, f"kl_target must be > 0 or null, got {self.kl_target}")
        _require(self.kl_horizon >= 1, f"kl_horizon must be >= 1, got {self.kl_horizon}")
        _require(self.kl_estimator in ("k1", "k3"), f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        _require(self.clip_range > 0, f"clip_range must be > 0, got {self.clip_range}")
        _require(self.value_clip > 0, f"value_clip must be > 0, got {self.value_clip}")
        _require(self.value_loss_coef >= 0, f"value_loss_coef must be >= 0, got {self.value_loss_coef}")
        _require(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}")
        _require(self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        _require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.temperature > 0, f"temperature must be > 0 (rollouts sample), got {self.temperature}")
        _require(self.ptx_coef >= 0, f"ptx_coef must be >= 0, got {self.ptx_coef}")
        _require(self.ptx_coef == 0 or self.data.ptx is not None, "ptx_coef > 0 needs data.ptx (the ptx text file)")
        _require(self.score_clip is None or self.score_clip > 0, f"score_clip must be > 0 or null, got {self.score_clip}")
        _require(self.max_new_tokens < self.data.max_length,
                 f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in data.max_length "
                 f"{self.data.max_length}")


STAGE_CONFIGS["ppo"] = PPOConfig
