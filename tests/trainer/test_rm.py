"""Reward model end to end on the tiny model: checkpoint + manifest + metrics, serving loads and scores it
as the trainer does, centring, resume, bad input, and learning a synthetic preference."""
from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from serving.checkpoint import model_version_of, read_manifest, verify_checkpoint
from serving.engine.local import LocalRewardClient
from serving.engine.reward import reward_scores
from serving.models import load_reward
from tests.trainer.rm_fixtures import RANKINGS, marker_groups, tiny_rm_config
from tests.trainer.sft_fixtures import DEMONSTRATIONS, write_jsonl
from trainer.checkpointing import latest_training_state
from trainer.config import ConfigError
from trainer.data import DatasetError
from trainer.maths import pad_groups, pairwise_accuracy
from trainer.metrics import read_metrics
from trainer.reward import run_rm


def serve_scores(reward, pairs) -> torch.Tensor:
    """Scores as `/v1/score` computes them (serving's reward client)."""
    client = LocalRewardClient(reward)
    try:
        return torch.tensor(asyncio.run(client.score(pairs)).scores)
    finally:
        asyncio.run(client.stop())


def served_accuracy(reward, groups) -> float:
    scores = serve_scores(reward, [(g["prompt"], c) for g in groups for c in g["completions"]])
    return pairwise_accuracy(*pad_groups(scores, [len(g["completions"]) for g in groups])).item()


def test_rm_writes_checkpoint_and_metrics_and_serving_scores_as_the_trainer(tmp_path, tiny_model_dir, tiny_policy):
    heldout = write_jsonl(tmp_path / "rm.heldout.jsonl", RANKINGS[:3])
    # 6 groups, micro-batches of 2 groups, 2 epochs = 6 steps.
    config = tiny_rm_config(tmp_path, tiny_model_dir, epochs=2, data={"heldout": str(heldout)})
    path = run_rm(config)

    assert path == tmp_path / "run" / "checkpoint"
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= {p.name for p in path.iterdir()}
    manifest = read_manifest(path)
    assert manifest["stage"] == "rm" and manifest["model_version"].startswith("rm-")
    assert manifest["parent_version"] == model_version_of(tiny_model_dir)
    assert len(manifest["data_hash"]) == 64 and manifest["config"]["stage"] == "rm"
    assert verify_checkpoint(path) == []
    m = manifest["metrics"]
    assert m["steps"] == 6 and m["train_groups"] == 6 and 0 <= m["heldout_accuracy"] <= 1 and m["heldout_loss"] > 0
    assert json.loads((path / "config.json").read_text())["feedloop_reward_bias"] == pytest.approx(m["reward_bias"])

    metrics = read_metrics(tmp_path / "run")
    assert [x["step"] for x in metrics if "loss" in x] == list(range(1, 7))
    assert {"step", "epoch", "loss", "accuracy", "lr", "grad_norm", "tokens_per_s"} <= metrics[0].keys()
    assert metrics[-1]["heldout_accuracy"] == m["heldout_accuracy"]

    reward = load_reward(path, tiny_policy, device="cpu")
    assert reward.trained and reward.model_version == manifest["model_version"]
    # /v1/score's scores give the trainer's held-out accuracy; the best completions (the default
    # demonstrations) score 0 on average.
    assert served_accuracy(reward, RANKINGS[:3]) == pytest.approx(m["heldout_accuracy"])
    best = serve_scores(reward, [(g["prompt"], g["completions"][0]) for g in RANKINGS])
    assert abs(best.mean().item()) < 1e-4


def test_centring_on_an_sft_file(tmp_path, tiny_model_dir, tiny_policy):
    sft = write_jsonl(tmp_path / "sft.train.jsonl", DEMONSTRATIONS)
    config = tiny_rm_config(tmp_path, tiny_model_dir, data={"demonstrations": str(sft)}, run={"max_steps": 2})
    path = run_rm(config)
    metrics = read_manifest(path)["metrics"]
    assert metrics["demonstrations"] == len(DEMONSTRATIONS) and metrics["reward_bias"] != 0
    reward = load_reward(path, tiny_policy, device="cpu")
    scores = serve_scores(reward, [(d["prompt"], d["response"]) for d in DEMONSTRATIONS])
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() > 1e-3


def test_reward_scores_add_the_config_bias(tiny_reward):
    model = tiny_reward.model
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        plain = reward_scores(model, ids, mask)
        model.config.feedloop_reward_bias = 1.5
        try:
            shifted = reward_scores(model, ids, mask)
        finally:
            del model.config.feedloop_reward_bias
    assert torch.allclose(shifted, plain + 1.5)


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    # 6 groups, micro-batches of 2, 2 per step: 2 steps per epoch (the second takes one micro-batch);
    # 2 epochs = 4 steps. Stop after step 3 (mid-epoch), resume, compare with straight.
    kw = dict(epochs=2, optim={"grad_accumulation": 2, "weight_decay": 0.1}, run={"save_every": 2})
    straight = run_rm(tiny_rm_config(tmp_path / "a", tiny_model_dir, **kw))

    config = tiny_rm_config(tmp_path / "b", tiny_model_dir, **kw)
    state = run_rm(config, stop_at_step=3)
    assert state == latest_training_state(tmp_path / "b" / "run") and state.name == "step-00000003"
    with pytest.raises(ConfigError, match="pass --resume"):
        run_rm(config)
    resumed = run_rm(config, resume=True)

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and "score.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert read_manifest(straight)["model_version"] == read_manifest(resumed)["model_version"]
    assert [m["step"] for m in read_metrics(tmp_path / "b" / "run") if "loss" in m] == [1, 2, 3, 4]


def test_bad_input_fails_before_training(tmp_path, tiny_model_dir):
    one = tiny_rm_config(tmp_path / "one", tiny_model_dir,
                         records=[RANKINGS[0], {"prompt": "a", "completions": ["only one"]}])
    with pytest.raises(DatasetError, match=r"rm.train.jsonl:2: a ranking needs at least 2 completions"):
        run_rm(one)
    long = tiny_rm_config(tmp_path / "long", tiny_model_dir, records=[{"prompt": "a", "completions": ["b " * 300, "c"]}])
    with pytest.raises(DatasetError, match=r"rm.train.jsonl:1: .* exceed data.max_length 128"):
        run_rm(long)

    # A policy whose tokenizer differs: another chat template, then another vocabulary.
    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    settings = json.loads((policy / "tokenizer_config.json").read_text())
    (policy / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": "{{ messages }}"}))
    (policy / "chat_template.jinja").unlink(missing_ok=True)
    mismatch = tiny_rm_config(tmp_path / "tok", tiny_model_dir, policy=str(policy))
    with pytest.raises(ConfigError, match="does not match the policy's .*chat templates differ"):
        run_rm(mismatch)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<|extra|>"])
    shutil.rmtree(policy)
    shutil.copytree(tiny_model_dir, policy)
    tok.save_pretrained(policy)
    with pytest.raises(ConfigError, match="does not match the policy's .*vocabularies differ"):
        run_rm(mismatch)
    for run in ("one", "long", "tok"):  # nothing started: no metrics, no state
        assert not (tmp_path / run / "run").exists()


def test_rm_learns_a_synthetic_preference(tmp_path, tiny_model_dir, tiny_policy):
    # Answers ranked by the marker word they hold (banana > cherry > none > rotten), K = 2..4: 64
    # training rankings, 40 epochs of 8 steps; 32 held-out rankings of other answers.
    # 25 epochs reached 1.0 on one machine and 0.64 on another (AMD EPYC: other float kernels, the same
    # seed): the tiny model is mid-way through learning the marker there. 40 epochs reach 1.0 on both.
    heldout_groups = marker_groups(32, seed=1)
    heldout = write_jsonl(tmp_path / "rm.heldout.jsonl", heldout_groups)
    config = tiny_rm_config(tmp_path, tiny_model_dir, records=marker_groups(64, seed=0), epochs=40,
                            optim={"warmup_steps": 5}, data={"heldout": str(heldout), "batch_size": 8},
                            run={"save_every": 0})
    start = time.perf_counter()
    path = run_rm(config)
    elapsed = time.perf_counter() - start
    accuracy = read_manifest(path)["metrics"]["heldout_accuracy"]
    assert accuracy >= 0.9, f"held-out pairwise accuracy {accuracy:.3f} after {elapsed:.1f}s"
    assert served_accuracy(load_reward(path, tiny_policy, device="cpu"), heldout_groups) == pytest.approx(accuracy)


def test_cli_trains_rm(tmp_path, tiny_model_dir, capsys):
    import argparse

    import yaml

    from trainer.cli import add_train_commands
    from trainer.config import config_to_dict

    recipe = tmp_path / "rm.yaml"
    recipe.write_text(yaml.safe_dump(config_to_dict(tiny_rm_config(tmp_path, tiny_model_dir, run={"max_steps": 1}))))
    parser = argparse.ArgumentParser(prog="feedloop")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "rm", "--config", str(recipe)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "checkpoint")
