"""DPO end to end on the tiny model: checkpoint + manifest + metrics, resume, bad input, and learning a
synthetic preference that held-out pairs show was learnt (not memorised)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from serving.checkpoint import model_version_of, read_manifest, verify_checkpoint
from serving.models import load_policy
from tests.trainer.sft_fixtures import CONFIGS, write_jsonl
from trainer.checkpointing import latest_training_state
from trainer.config import ConfigError, DPOConfig, config_reference, load_config
from trainer.data import DatasetError
from trainer.dpo import run_dpo
from trainer.metrics import read_metrics

GROUPS = [
    {"prompt": "Say hello.", "completions": ["Hello there!", "Hi.", "Go away."]},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "completions": ["Blue.", "A number."]},
    {"prompt": "Count to three.", "completions": ["One, two, three.", "One, three.", "Four.", "No."]},
    {"prompt": "What is 2 + 2?", "completions": ["Four.", "Five."]},
    {"prompt": "Name a fruit.", "completions": ["An apple.", "A car."]},
    {"prompt": "Say goodbye.", "completions": ["Goodbye!", "Hello!"]},
]


def tiny_dpo_config(tmp_path: Path, model_dir: Path, groups=GROUPS, **overrides) -> DPOConfig:
    """dpo-tiny.yaml pointed at `model_dir`, a ranking file of `groups` and `tmp_path/run`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = load_config(CONFIGS / "dpo-tiny.yaml")
    data = {"train": str(write_jsonl(tmp_path / "rm.train.jsonl", groups)), **overrides.pop("data", {})}
    run = {"output_dir": str(tmp_path / "run"), **overrides.pop("run", {})}
    optim = overrides.pop("optim", {})
    return replace(config, model=str(model_dir), data=replace(config.data, **data),
                   run=replace(config.run, **run), optim=replace(config.optim, **optim), **overrides)


def test_dpo_writes_checkpoint_metrics_manifest_and_serving_loads_it(tmp_path, tiny_model_dir):
    heldout = write_jsonl(tmp_path / "rm.heldout.jsonl", GROUPS[:2])
    config = tiny_dpo_config(tmp_path, tiny_model_dir, epochs=2, data={"heldout": str(heldout)})
    path = run_dpo(config)  # 6 groups, 4 per step: 2 steps per epoch

    assert path == tmp_path / "run" / "checkpoint"
    manifest = read_manifest(path)
    assert manifest["stage"] == "dpo" and manifest["model_version"].startswith("dpo-")
    assert manifest["parent_version"] == model_version_of(tiny_model_dir)
    assert manifest["metrics"]["reference_version"] == model_version_of(tiny_model_dir)
    assert len(manifest["data_hash"]) == 64 and manifest["config"]["beta"] == 0.1
    assert verify_checkpoint(path) == []
    m = manifest["metrics"]
    assert m["steps"] == 4 and m["train_groups"] == 6 and m["train_pairs"] == 3 + 1 + 6 + 1 + 1 + 1
    assert 0 <= m["heldout_accuracy"] <= 1 and m["heldout_loss"] > 0

    metrics = read_metrics(tmp_path / "run")
    steps = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert {"loss", "margin", "accuracy", "chosen_reward", "rejected_reward", "lr", "grad_norm",
            "tokens_per_s"} <= steps[0].keys()
    # Step 1: the policy is the reference, so every reward is 0 and the loss is log 2.
    assert steps[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert steps[0]["chosen_reward"] == pytest.approx(0, abs=1e-5) and steps[0]["margin"] == pytest.approx(0, abs=1e-5)
    assert steps[-1]["margin"] > 0 and steps[-1]["loss"] < steps[0]["loss"]
    assert metrics[-1]["heldout_accuracy"] == m["heldout_accuracy"]

    policy = load_policy(path, device="cpu")
    assert policy.model_version == manifest["model_version"]


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    # 6 groups, micro-batches of 2 groups, 2 per step: 2 steps per epoch; 2 epochs = 4 steps; stop after 3.
    kw = dict(epochs=2, data={"batch_size": 2}, optim={"grad_accumulation": 2, "weight_decay": 0.1},
              run={"save_every": 2})
    straight = run_dpo(tiny_dpo_config(tmp_path / "a", tiny_model_dir, **kw))
    config = tiny_dpo_config(tmp_path / "b", tiny_model_dir, **kw)
    state = run_dpo(config, stop_at_step=3)
    assert state == latest_training_state(tmp_path / "b" / "run") and state.name == "step-00000003"
    with pytest.raises(ConfigError, match="pass --resume"):
        run_dpo(config)
    resumed = run_dpo(config, resume=True)

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "run")] == [1, 2, 3, 4]


def test_ipo_and_label_smoothing_run(tmp_path, tiny_model_dir):
    ipo = run_dpo(tiny_dpo_config(tmp_path / "ipo", tiny_model_dir, loss_type="ipo", run={"max_steps": 2}))
    first = read_metrics(tmp_path / "ipo" / "run")[0]
    # IPO at the reference: h = 0, loss = (0 − 1/(2β))² = 5² = 25.
    assert first["loss"] == pytest.approx(25.0, abs=1e-3)
    assert read_manifest(ipo)["config"]["loss_type"] == "ipo"
    run_dpo(tiny_dpo_config(tmp_path / "cdpo", tiny_model_dir, label_smoothing=0.1, run={"max_steps": 1}))
    with pytest.raises(ConfigError, match="label_smoothing applies to loss_type 'sigmoid' only"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1, data={"train": "t"}, run={"output_dir": "o"})


def test_docs_carry_the_dpo_fields():
    # optim, data and run are the SFT table's rows; the DPO-only fields must be in docs/training.md.
    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    rows = config_reference(DPOConfig).splitlines()[2:]
    own = [r for r in rows if not r.startswith(("| `optim.", "| `data.", "| `run."))]
    assert len(own) == 7 and all(r in docs for r in own)


def test_bad_input_fails_before_training(tmp_path, tiny_model_dir):
    single = {"prompt": "a", "completions": ["b"]}
    one = tiny_dpo_config(tmp_path / "one", tiny_model_dir, groups=[GROUPS[0], single])
    with pytest.raises(DatasetError, match=r"rm.train.jsonl:2: a ranking needs at least 2 completions, got 1"):
        run_dpo(one)
    long = tiny_dpo_config(tmp_path / "long", tiny_model_dir, groups=[{"prompt": "a", "completions": ["b", "c " * 300]}])
    with pytest.raises(DatasetError, match=r"rm.train.jsonl:1: completion 1: \d+ tokens .* exceed data.max_length"):
        run_dpo(long)
    for run in ("one/run", "long/run"):
        assert not (tmp_path / run).exists()


# A synthetic preference: the same answer, preferred when it ends with " banana". Held-out prompts and
# answers share no example with training, so only the rule, not the pairs, can carry over.
SUBJECTS = ["cats", "rain", "bread", "music", "trees", "rivers", "chess", "coffee", "snow", "boats", "clocks",
            "stars", "maps", "bees", "salt", "wind", "glass", "paper", "lamps", "roads"]
ANSWERS = ["I like {}.", "Tell me about {}.", "{} are fine.", "We saw {} today.", "Nothing beats {}."]


def banana_groups(subjects):
    groups = []
    for i, s in enumerate(subjects):
        answer = ANSWERS[i % len(ANSWERS)].format(s)
        groups.append({"prompt": f"Say something about {s}.", "completions": [answer + " banana", answer]})
    return groups


def completion_logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """Summed log-prob of the completion's tokens after the chat-formatted prompt (plain log_softmax + gather)."""
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=True)
    ids = torch.tensor([ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    picked = logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return picked[len(prompt_ids) - 1:].sum().item()


def test_dpo_learns_a_preference_that_holds_on_heldout_pairs(tmp_path, tiny_model_dir):
    train, heldout = banana_groups(SUBJECTS[:14]), banana_groups(SUBJECTS[14:])
    config = tiny_dpo_config(tmp_path, tiny_model_dir, groups=train, epochs=6)
    start = time.perf_counter()
    path = run_dpo(config)
    seconds = time.perf_counter() - start

    policy, reference = load_policy(path, device="cpu"), load_policy(tiny_model_dir, device="cpu")
    margins = []
    for group in heldout:
        (chosen, rejected), prompt = group["completions"], group["prompt"]
        ratio = {c: completion_logprob(policy.model, policy.tokenizer, prompt, c)
                 - completion_logprob(reference.model, reference.tokenizer, prompt, c) for c in (chosen, rejected)}
        margins.append(ratio[chosen] - ratio[rejected])
    accuracy = sum(m > 0 for m in margins) / len(margins)
    mean_margin = sum(margins) / len(margins)
    print(f"DPO banana: {seconds:.1f}s, held-out margin {mean_margin:.2f} nats, accuracy {accuracy:.2f}, {margins}")
    assert mean_margin > 2.0 and accuracy >= 0.8


def test_cli_trains_dpo(tmp_path, tiny_model_dir, capsys):
    import argparse

    import yaml

    from trainer.cli import add_train_commands
    from trainer.config import config_to_dict

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(config_to_dict(tiny_dpo_config(tmp_path, tiny_model_dir, run={"max_steps": 1}))))
    parser = argparse.ArgumentParser(prog="feedloop")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "dpo", "--config", str(recipe)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "checkpoint")
