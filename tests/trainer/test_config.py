"""Recipes: every shipped YAML parses; bad keys, types and values fail with messages naming them."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import STAGE_CONFIGS, ConfigError, SFTConfig, config_reference, load_config
from trainer.optim import lr_multiplier

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_configs_are_shipped():
    assert any(p.name == "sft.yaml" for p in SHIPPED)


def _load_other(path: Path):
    """The shipped YAMLs that are not stage recipes, each by its own loader."""
    if path.name == "gates.yaml":
        from trainer.gates import load_gates_config

        return load_gates_config(path)
    if path.name == "loop.yaml":
        from trainer.loop.config import load_loop_config

        return load_loop_config(path)
    raise AssertionError(f"{path.name}: no 'stage' key and no loader known to this test")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_parses(path):
    stage = yaml.safe_load(path.read_text()).get("stage")
    if stage is None:  # the promotion gates and the loop's recipe live beside the stage recipes
        assert _load_other(path) is not None
        return
    config = load_config(path)
    assert isinstance(config, STAGE_CONFIGS[stage])


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = "stage: sft\nmodel: m\ndata: {train: t.jsonl}\nrun: {output_dir: out}\n"


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) learning_rate"):
        load_config(write(tmp_path, BASE + "learning_rate: 1\n"))
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(write(tmp_path, BASE + "optim: {lrr: 0.1}\n"))


@pytest.mark.parametrize("extra, message", [
    ("optim: {lr: -1}", "optim.lr must be > 0"),
    ("epochs: two", "epochs: expected an integer"),
    ("optim: {schedule: linear}", "optim.schedule must be"),
    ("optim: {warmup_ratio: 1.5}", "optim.warmup_ratio"),
    ("optim: {grad_accumulation: 0}", "optim.grad_accumulation"),
    ("optim: {betas: [0.9]}", "optim.betas"),
    ("run: {output_dir: out, dtype: fp16}", "run.dtype"),
    ("data: {train: t.jsonl, max_length: 1}", "data.max_length"),
    ("data: {train: t.jsonl, too_long: truncate}", "data.too_long must be one of error, skip"),
    ("stage: rm-typo", "stage"),
])
def test_bad_values_fail_clearly(tmp_path, extra, message):
    recipe = {**yaml.safe_load(BASE), **yaml.safe_load(extra)}  # `extra`'s sections replace BASE's
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(write(tmp_path, yaml.safe_dump(recipe)))


def test_missing_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="data.train must name"):
        load_config(write(tmp_path, "stage: sft\nrun: {output_dir: out}\n"))


def test_numbers_written_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads `1e-5` as a string; a recipe author means the number.
    config = load_config(write(tmp_path, BASE + "optim: {lr: 1e-5}\n"), SFTConfig)
    assert config.optim.lr == pytest.approx(1e-5)


def test_schedule_warmup_then_cosine():
    # warm-up 2 of 6 steps: 1/2, 2/2, then cosine from 1 to 0.1 over steps 2..5.
    values = [lr_multiplier(s, 2, 6, "cosine", 0.1) for s in range(6)]
    assert values[:3] == [0.5, 1.0, 1.0]
    assert values[-1] == pytest.approx(0.1)
    assert values == sorted(values[:2]) + sorted(values[2:], reverse=True)
    assert lr_multiplier(5, 0, 6, "constant", 0.1) == 1.0


def test_docs_list_every_field():
    # docs/training.md carries the rendered table: a field added here must be documented there.
    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    assert config_reference(SFTConfig) in docs
