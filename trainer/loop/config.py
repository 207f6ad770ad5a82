"""The loop's recipe (`feedloop loop --config trainer/configs/loop.yaml`): when to retrain, which stage
recipes to run, how to promote. Stage recipes are the ordinary `feedloop train` YAML files; the loop
fills in their model and data paths for each run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError, _require, config_from_dict, param

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class LoopConfig:
    """Scheduled retraining: thresholds, stage recipes, gates and promotion."""

    poll_seconds: float = param(10.0, "how often the loop looks at the store for new feedback")
    min_preferences: int = param(50, "new comparisons with a winner (ties and both_bad do not count) + rankings "
                                      "+ thumbs that trigger an RM refresh and a policy update")
    min_demonstrations: int = param(20, "new demonstrations that trigger an SFT run")
    max_interval_seconds: float | None = param(None, "also run when this long has passed since the last run "
                                                     "and any new feedback arrived; null: thresholds only")
    policy_stage: str = param("ppo", "'ppo' (RM + PPO-ptx, InstructGPT) or 'dpo' (on the same comparisons)")
    sft_recipe: str = param("sft.yaml", "SFT recipe (relative paths: under trainer/configs/)")
    rm_recipe: str = param("rm.yaml", "reward-model recipe")
    ppo_recipe: str = param("ppo.yaml", "PPO-ptx recipe")
    dpo_recipe: str = param("dpo.yaml", "DPO recipe")
    gates: str = param("gates.yaml", "promotion gates (trainer/gates.py)")
    heldout_fraction: float = param(0.1, "share of prompts held out of training (gates evaluate on them)")
    seed: int = param(0, "seed of the held-out split")
    promotion: str = param("auto", "after the gates pass: 'auto' (promote), 'canary' (canary_percent of traffic), "
                                   "or 'manual' (leave the candidate for `feedloop models promote`)")
    canary_percent: float = param(10.0, "traffic share of a canary, in (0, 100]")
    device: str | None = param(None, "override every recipe's run.device (null: as the recipes say)")
    dtype: str | None = param(None, "override every recipe's run.dtype")

    def __post_init__(self):
        _require(self.poll_seconds > 0, f"poll_seconds must be > 0, got {self.poll_seconds}")
        _require(self.min_preferences >= 1, f"min_preferences must be >= 1, got {self.min_preferences}")
        _require(self.min_demonstrations >= 1, f"min_demonstrations must be >= 1, got {self.min_demonstrations}")
        _require(self.max_interval_seconds is None or self.max_interval_seconds > 0,
                 f"max_interval_seconds must be > 0 or null, got {self.max_interval_seconds}")
        _require(self.policy_stage in ("ppo", "dpo"), f"policy_stage must be 'ppo' or 'dpo', got {self.policy_stage!r}")
        _require(0 <= self.heldout_fraction < 1, f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        _require(self.promotion in ("auto", "canary", "manual"),
                 f"promotion must be 'auto', 'canary' or 'manual', got {self.promotion!r}")
        _require(0 < self.canary_percent <= 100, f"canary_percent must be in (0, 100], got {self.canary_percent}")

    def recipe(self, stage: str) -> Path:
        return resolve(getattr(self, f"{stage}_recipe"))


def resolve(path: str, base: Path = CONFIGS_DIR) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else base / p


def load_loop_config(path: str | Path | None) -> LoopConfig:
    """The loop recipe at `path` (relative recipe paths inside it resolve next to it, then under
    trainer/configs/); None: trainer/configs/loop.yaml."""
    import yaml

    path = Path(path) if path else CONFIGS_DIR / "loop.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from e
    try:
        config = config_from_dict(data or {}, LoopConfig)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for field in ("sft_recipe", "rm_recipe", "ppo_recipe", "dpo_recipe", "gates"):
        value = getattr(config, field)
        if not Path(value).is_absolute() and (path.parent / value).exists():
            setattr(config, field, str((path.parent / value).resolve()))
    return config
