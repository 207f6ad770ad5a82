"""SFT end to end on the tiny model: checkpoint + manifest + metrics, learning, resume, serving loads it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from serving.checkpoint import model_version_of, read_manifest, verify_checkpoint
from serving.models import load_policy
from tests.trainer.sft_fixtures import DEMONSTRATIONS, tiny_sft_config
from trainer.checkpointing import latest_training_state
from trainer.cli import add_train_commands
from trainer.config import ConfigError
from trainer.data import DatasetError
from trainer.metrics import read_metrics
from trainer.sft import run_sft


def test_sft_overfits_writes_checkpoint_and_metrics_and_serving_loads_it(tmp_path, tiny_model_dir):
    # 4 demonstrations in one batch, 30 epochs = 30 steps: the loss must fall (overfitting).
    config = tiny_sft_config(tmp_path, tiny_model_dir, records=DEMONSTRATIONS[:4])
    path = run_sft(config)

    assert path == tmp_path / "run" / "checkpoint"
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= {p.name for p in path.iterdir()}
    manifest = read_manifest(path)
    assert manifest["stage"] == "sft"
    assert manifest["parent_version"] == model_version_of(tiny_model_dir)
    assert manifest["model_version"].startswith("sft-") and model_version_of(path) == manifest["model_version"]
    assert len(manifest["data_hash"]) == 64 and manifest["config"]["optim"]["lr"] == config.optim.lr
    assert "model.safetensors" in manifest["files"] and verify_checkpoint(path) == []
    assert manifest["metrics"]["steps"] == 30

    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= metrics[0].keys()
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    assert manifest["metrics"]["final_loss"] == pytest.approx(metrics[-1]["loss"])

    policy = load_policy(path, device="cpu")
    assert policy.model_version == manifest["model_version"]
    assert policy.eos_token_ids == (policy.tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def _weights(path):
    return load_file(path / "model.safetensors")


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    # 6 records, micro-batches of 2, 2 per step: 2 steps per epoch (the second takes one micro-batch);
    # 3 epochs = 6 steps. Stop after step 3 (mid-epoch, mid-schedule), resume, compare with straight.
    kw = dict(records=DEMONSTRATIONS, epochs=3, data={"batch_size": 2},
              optim={"grad_accumulation": 2, "warmup_steps": 1, "weight_decay": 0.1}, run={"save_every": 2})
    straight = run_sft(tiny_sft_config(tmp_path / "a", tiny_model_dir, **kw))

    config = tiny_sft_config(tmp_path / "b", tiny_model_dir, **kw)
    state = run_sft(config, stop_at_step=3)
    assert state == latest_training_state(tmp_path / "b" / "run") and state.name == "step-00000003"
    assert json.loads((state / "position.json").read_text())["epoch"] == 1
    assert not (tmp_path / "b" / "run" / "checkpoint").exists()
    with pytest.raises(ConfigError, match="pass --resume"):
        run_sft(config)
    resumed = run_sft(config, resume=True)

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [m["step"] for m in read_metrics(tmp_path / "b" / "run") if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert read_manifest(straight)["model_version"] == read_manifest(resumed)["model_version"]


def test_resume_refuses_a_changed_config(tmp_path, tiny_model_dir):
    config = tiny_sft_config(tmp_path, tiny_model_dir, epochs=2)
    run_sft(config, stop_at_step=1)
    changed = tiny_sft_config(tmp_path, tiny_model_dir, epochs=2, optim={"lr": 1e-4})
    with pytest.raises(ConfigError, match=r"config changed.*optim\.lr"):
        run_sft(changed, resume=True)
    with pytest.raises(ConfigError, match="no saved training state"):
        run_sft(tiny_sft_config(tmp_path / "other", tiny_model_dir), resume=True)


def test_bad_data_fails_before_training(tmp_path, tiny_model_dir):
    config = tiny_sft_config(tmp_path, tiny_model_dir, records=['{"prompt": "a", "response": "b"}', "{oops"])
    with pytest.raises(DatasetError, match=r"sft.train.jsonl:2: malformed JSON"):
        run_sft(config)
    long = tiny_sft_config(tmp_path / "long", tiny_model_dir, records=[{"prompt": "a", "response": "b " * 300}])
    with pytest.raises(DatasetError, match="exceed data.max_length"):
        run_sft(long)
    over_context = tiny_sft_config(tmp_path / "ctx", tiny_model_dir, data={"max_length": 4096})
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        run_sft(over_context)
    for run in ("run", "long/run", "ctx/run"):  # nothing started: no metrics, no state
        assert not (tmp_path / run).exists()


def test_bf16_autocast_with_gradient_checkpointing_on_cpu(tmp_path, tiny_model_dir):
    config = tiny_sft_config(tmp_path, tiny_model_dir, run={"dtype": "bf16", "gradient_checkpointing": True,
                                                            "max_steps": 2})
    path = run_sft(config)
    assert read_manifest(path)["metrics"]["steps"] == 2
    assert json.loads((path / "config.json").read_text())["use_cache"] is True
    assert load_file(path / "model.safetensors")["model.norm.weight"].dtype == torch.float32


def test_heldout_loss_is_reported(tmp_path, tiny_model_dir):
    heldout = tmp_path / "sft.heldout.jsonl"
    heldout.write_text(json.dumps(DEMONSTRATIONS[5]) + "\n")
    config = tiny_sft_config(tmp_path, tiny_model_dir, data={"heldout": str(heldout)}, run={"max_steps": 1})
    path = run_sft(config)
    assert read_manifest(path)["metrics"]["heldout_loss"] > 0


def _cli(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="feedloop")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_refuses_deepspeed_and_bad_recipes_clearly(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\nmodel: m\ndata: {train: t.jsonl}\nrun: {output_dir: out}\n")
    assert _cli(["train", "sft", "--config", str(recipe), "--deepspeed", "ds.json"]) == 2
    assert "DeepSpeed config ds.json not found" in capsys.readouterr().err
    recipe.write_text("stage: sft\nmodle: m\n")
    assert _cli(["train", "sft", "--config", str(recipe)]) == 2
    assert "unknown key(s) modle" in capsys.readouterr().err


def test_cli_trains(tmp_path, tiny_model_dir, capsys):
    import yaml

    from trainer.config import config_to_dict

    recipe = tmp_path / "r.yaml"
    config = config_to_dict(tiny_sft_config(tmp_path, tiny_model_dir, run={"max_steps": 1}))
    recipe.write_text(yaml.safe_dump(config))
    assert _cli(["train", "sft", "--config", str(recipe)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "checkpoint")
