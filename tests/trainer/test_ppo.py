"""PPO end to end on tiny models: checkpoint + metrics + serving loads it, resume equals an uninterrupted
run, learning a synthetic preference with a bounded KL, and the ptx term keeping the ptx loss down."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from serving.checkpoint import model_version_of, read_manifest, verify_checkpoint
from serving.engine.engine import LocalEngine
from serving.models import load_policy, load_reward
from tests.trainer.sft_fixtures import CONFIGS, write_jsonl
from trainer.checkpointing import latest_training_state
from trainer.config import ConfigError, PPOConfig, load_config
from trainer.metrics import read_metrics
from trainer.ppo import run_ppo
from trainer.rollouts import load_prompts

STEP_KEYS = {"step", "score", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "ptx_loss", "kl_coef",
             "tokens_per_s"}
TOPICS = ["the sea", "a cat", "bread", "the moon", "music", "rain", "a garden", "trains", "snow", "coffee",
          "a river", "books", "the wind", "cheese", "a forest", "stars"]
PTX = [{"text": "The cat sat on the mat and looked at the bird."}, {"text": "Rain fell on the quiet town all night."},
       {"text": "She baked bread every morning before dawn."}, {"text": "The river runs to the sea past the old mill."}]


def prompts(words: list[str]) -> list[dict]:
    return [{"prompt": f"Tell me about {w}."} for w in words]


def make_direction_reward_model(policy_dir: Path, out_dir: Path, scale: float = 4.0, bias: float = 3.0) -> Path:
    """A reward model whose score reads a fixed 'marker direction' u of the token embeddings, built by
    hand from the policy's own weights (no training, so nothing about it is left to chance):

    - layer 0's attention gets q = 0, so every position attends uniformly to its whole prefix; its
      value reads ⟨RMSNorm(embedding), u⟩ into one channel and o_proj writes that channel into
      residual dimension 0 (zeroed in every embedding, so nothing else lives there);
    - every other attention output and every MLP is zeroed, so the last token's hidden state is its
      own embedding plus, in dimension 0, the MEAN of ⟨token, u⟩ over the whole sequence;
    - the head reads dimension 0 (× scale), so the score grows with how far the response's tokens
      lie along u. A bias (config.feedloop_reward_bias, as the RM stage sets it) moves the level.

    The policy shares the embeddings (tied LM head), so raising the score means moving its final
    hidden states towards u: a preference PPO can find from random samples (a single marker token of
    a 49k vocabulary would almost never be sampled by the random tiny policy).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    u = torch.randn(rm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in rm.model.layers:
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
        attention = rm.model.layers[0].self_attn
        attention.q_proj.weight.zero_()
        attention.v_proj.weight.zero_()
        attention.v_proj.weight[0] = u / u.norm()
        attention.o_proj.weight[0, 0] = 1.0
        rm.model.embed_tokens.weight[:, 0] = 0.0
        rm.score.weight.zero_()
        rm.score.weight[0, 0] = scale
    rm.config.feedloop_reward_bias = bias
    rm.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    return make_direction_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm") / "direction-rm")


def tiny_ppo_config(tmp_path: Path, policy_dir: Path, reward_dir: Path, records=None, **overrides) -> PPOConfig:
    """ppo-tiny.yaml pointed at the tiny policy and RM, a prompts file, the ptx file and `tmp_path/run`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = load_config(CONFIGS / "ppo-tiny.yaml")
    train = write_jsonl(tmp_path / "prompts.train.jsonl", records or prompts(TOPICS[:8]))
    ptx = write_jsonl(tmp_path / "ptx.train.jsonl", PTX)
    data = {"train": str(train), "ptx": str(ptx), **overrides.pop("data", {})}
    run = {"output_dir": str(tmp_path / "run"), **overrides.pop("run", {})}
    optim = overrides.pop("optim", {})
    return replace(config, policy=str(policy_dir), reward_model=str(reward_dir), data=replace(config.data, **data),
                   run=replace(config.run, **run), optim=replace(config.optim, **optim), **overrides)


def fresh_rollouts(policy_dir: Path, reference_dir: Path, reward_dir: Path, words: list[str],
                   tmp_path: Path) -> dict[str, float]:
    """Mean RM score and mean KL to the reference (k1, nats per sequence) of fresh engine rollouts of a
    checkpoint loaded as serving loads it, on prompts made of `words`, with seeds of their own."""
    from trainer.ppo import evaluate_rollouts

    policy = load_policy(policy_dir, device="cpu")
    reference = load_policy(reference_dir, device="cpu")
    reward = load_reward(reward_dir, policy, device="cpu")
    config = load_config(CONFIGS / "ppo-tiny.yaml")
    config = replace(config, run=replace(config.run, seed=123))
    tmp_path.mkdir(parents=True, exist_ok=True)
    held = load_prompts(write_jsonl(tmp_path / "heldout.jsonl", prompts(words)), policy.tokenizer,
                        config.data.max_length - config.max_new_tokens)
    engine = LocalEngine(policy.model, policy.tokenizer, policy.eos_token_ids, max_batch_size=len(held))
    return evaluate_rollouts(engine, policy.model, reference.model, reward.model, policy.tokenizer, held, config,
                             policy.tokenizer.pad_token_id, torch.device("cpu"), None, step=-1)


def test_ppo_writes_checkpoint_and_metrics_and_serving_loads_it(tmp_path, tiny_model_dir, reward_dir):
    heldout = write_jsonl(tmp_path / "prompts.heldout.jsonl", prompts(TOPICS[8:10]))
    # 8 prompts, rollout batches of 4: 2 PPO steps, each 2 epochs × 2 mini-batches; the ptx term on.
    config = tiny_ppo_config(tmp_path, tiny_model_dir, reward_dir, ptx_coef=0.5, data={"heldout": str(heldout)})
    path = run_ppo(config)

    assert path == tmp_path / "run" / "checkpoint"
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= {p.name for p in path.iterdir()}
    manifest = read_manifest(path)
    assert manifest["stage"] == "ppo" and manifest["model_version"].startswith("ppo-")
    assert manifest["parent_version"] == model_version_of(tiny_model_dir)
    assert len(manifest["data_hash"]) == 64 and manifest["config"]["stage"] == "ppo"
    assert verify_checkpoint(path) == []
    m = manifest["metrics"]
    assert m["steps"] == 2 and m["reward_model_version"] == model_version_of(reward_dir)
    assert {"heldout_score", "heldout_kl", "ptx_nll", "final_score"} <= m.keys()

    metrics = [x for x in read_metrics(tmp_path / "run") if "score" in x]
    assert [x["step"] for x in metrics] == [1, 2]
    assert all(STEP_KEYS <= x.keys() for x in metrics)
    first = metrics[0]
    # step 1: the policy is the reference (KL 0), β is the initial one; the first mini-batch's ratio is 1.
    assert first["kl"] == pytest.approx(0.0, abs=1e-4) and first["kl_coef"] == 0.02
    assert 0 <= first["clip_fraction"] <= 1 and first["entropy"] > 0 and first["ptx_loss"] > 0
    assert first["value_loss"] > 0 and first["tokens_per_s"] > 0

    policy = load_policy(path, device="cpu")  # serving loads it, and the weights are the trained ones
    assert policy.model_version == manifest["model_version"]
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(path / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, reward_dir):
    # 12 prompts, batches of 4: 3 PPO steps; adaptive KL (β moves) and ptx on. Stop after step 2, resume.
    kw = dict(records=prompts(TOPICS[:12]), ptx_coef=0.5, kl_target=1.0, kl_horizon=10, run={"save_every": 0})
    straight = run_ppo(tiny_ppo_config(tmp_path / "a", tiny_model_dir, reward_dir, **kw))

    config = tiny_ppo_config(tmp_path / "b", tiny_model_dir, reward_dir, **kw)
    state = run_ppo(config, stop_at_step=2)
    assert state == latest_training_state(tmp_path / "b" / "run") and state.name == "step-00000002"
    with pytest.raises(ConfigError, match="pass --resume"):
        run_ppo(config)
    resumed = run_ppo(config, resume=True)

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ma, mb = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [m["step"] for m in mb] == [1, 2, 3]
    assert [m["kl_coef"] for m in ma] == [m["kl_coef"] for m in mb] and ma[2]["kl_coef"] != 0.02
    assert [m["score"] for m in ma] == [m["score"] for m in mb]


def test_ctrl_c_mid_step_stops_after_the_step_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                                     reward_dir, monkeypatch):
    """A real SIGINT lands after a PPO step's updates but before the loop counted the step: the step is
    finished, saved as step 2, and the resumed run equals an uninterrupted one (before StepInterrupts
    the state was saved as step 1 with step 2's weights). A second Ctrl-C stops at once, saving nothing."""
    import os
    import signal

    import trainer.ppo as ppo_module

    kw = dict(records=prompts(TOPICS[:12]), ptx_coef=0.5, kl_target=1.0, kl_horizon=10, run={"save_every": 0})
    straight = run_ppo(tiny_ppo_config(tmp_path / "a", tiny_model_dir, reward_dir, **kw))
    real_step = ppo_module.ppo_step

    def interrupted_step(step, *args, signals=1, **kwargs):
        out = real_step(step, *args, **kwargs)  # the policy and value model are updated: step + 1's weights
        if step == 1:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(ppo_module, "ppo_step", interrupted_step)
    config = tiny_ppo_config(tmp_path / "b", tiny_model_dir, reward_dir, **kw)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(config)
    assert latest_training_state(tmp_path / "b" / "run").name == "step-00000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
    monkeypatch.setattr(ppo_module, "ppo_step", real_step)
    resumed = run_ppo(config, resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [m["step"] for m in read_metrics(tmp_path / "b" / "run")] == [1, 2, 3]

    monkeypatch.setattr(ppo_module, "ppo_step", lambda *a, **k: interrupted_step(*a, signals=2, **k))
    with pytest.raises(KeyboardInterrupt):
        run_ppo(tiny_ppo_config(tmp_path / "c", tiny_model_dir, reward_dir, **kw))
    assert latest_training_state(tmp_path / "c" / "run") is None  # stopped now: nothing saved


def test_ptx_term_keeps_the_ptx_loss_lower(tmp_path, tiny_model_dir, reward_dir):
    # Same prompts, seed and run length (2 PPO steps); only γ_ptx differs. Both runs measure the ptx loss.
    plain = run_ppo(tiny_ppo_config(tmp_path / "plain", tiny_model_dir, reward_dir, ptx_coef=0.0))
    mixed = run_ppo(tiny_ppo_config(tmp_path / "ptx", tiny_model_dir, reward_dir, ptx_coef=1.0))
    plain_nll, mixed_nll = (read_manifest(p)["metrics"]["ptx_nll"] for p in (plain, mixed))
    assert mixed_nll < plain_nll - 0.1, (plain_nll, mixed_nll)


def test_bad_input_fails_before_training(tmp_path, tiny_model_dir, reward_dir):
    from trainer.data import DatasetError

    long = tiny_ppo_config(tmp_path / "long", tiny_model_dir, reward_dir, records=[{"prompt": "word " * 200}])
    with pytest.raises(DatasetError, match=r"prompts.train.jsonl:1: prompt of \d+ tokens exceeds"):
        run_ppo(long)
    with pytest.raises(ConfigError, match="ptx_coef > 0 needs data.ptx"):
        replace(load_config(CONFIGS / "ppo-tiny.yaml"), ptx_coef=1.0)
    assert not (tmp_path / "long" / "run").exists()


def test_docs_carry_the_ppo_fields():
    from trainer.config import config_reference

    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    assert config_reference(PPOConfig) in docs


MARKER = " banana"
WORDS = [" red", " blue", " green", " cat", " dog", " sun", " moon", MARKER]


def make_marker_reward_model(policy_dir: Path, out_dir: Path, marker_id: int, scale: float = 30.0,
                             bias: float = -1.0) -> Path:
    """A reward model that scores the share of `marker_id` tokens in the sequence, built by hand from the
    policy's weights (no training, so nothing about it is left to chance):

    - residual dimension 0 is zeroed in every embedding but the marker's (set to 4), so it only says
      "this token is the marker";
    - layer 0's attention gets q = 0, so every position attends uniformly to its whole prefix; its
      value reads dimension 0 and o_proj writes it back to dimension 0; every other attention output
      and every MLP is zeroed. The last token's hidden state is then its own embedding plus, in
      dimension 0, (markers in the sequence / its length) × a constant;
    - the head reads dimension 0 (× scale) after the final norm, so more markers score higher; a bias
      (config.feedloop_reward_bias, as the RM stage sets it, and added by `reward_scores`) moves the level.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        for layer in rm.model.layers:
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
        attention = rm.model.layers[0].self_attn
        attention.q_proj.weight.zero_()
        attention.v_proj.weight.zero_()
        attention.v_proj.weight[0, 0] = 1.0
        attention.o_proj.weight[0, 0] = 1.0
        rm.model.embed_tokens.weight[:, 0] = 0.0
        rm.model.embed_tokens.weight[marker_id, 0] = 4.0
        rm.score.weight.zero_()
        rm.score.weight[0, 0] = scale
    rm.config.feedloop_reward_bias = bias
    rm.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out_dir)
    return out_dir


def test_ppo_learns_a_synthetic_preference_and_the_kl_leash_holds_it_near_the_reference(tmp_path, tiny_model_dir):
    import random

    from transformers import AutoTokenizer

    from tests.trainer.sft_fixtures import tiny_sft_config
    from trainer.sft import run_sft

    # The InstructGPT pipeline in miniature. SFT: answers are "ok" + 6 words drawn uniformly from WORDS,
    # so the SFT policy writes the marker word about once per answer. RM: scores the share of marker
    # tokens (constructed, above). PPO from the SFT policy, reference = SFT, 12 steps of 8 rollouts,
    # twice from the same seed: with the recipe's β = 0.02 and with a leash 250× tighter (β = 5).
    # RL on 8 rollouts a step is noisy and the same seed takes another path on another CPU, so the KL
    # the loose run reaches varies (seeds 0, 1, 2: 6.1, 9.5, 9.4 nats on an AMD EPYC; 12.5, 9.1, 4.6 on
    # an Intel Xeon, where its score went 1.7 → 38.3, 25.8, 17.8): an absolute KL bound failed on one
    # CPU or the other. The tight run from the same seed is the comparison that holds: its KL was 0.13,
    # 0.22, 0.30 of the loose run's (1.6, 2.0, 1.4 nats, Xeon, seeds 0, 1, 2).
    rng = random.Random(0)
    demos = [{"prompt": f"Tell me about {rng.choice(TOPICS)}.", "response": "ok" + "".join(rng.choice(WORDS) for _ in range(6))}
             for _ in range(48)]
    sft = run_sft(tiny_sft_config(tmp_path / "sft", tiny_model_dir, records=demos, epochs=10, run={"save_every": 0}))
    (marker_id,) = AutoTokenizer.from_pretrained(sft).encode(MARKER, add_special_tokens=False)
    reward_dir = make_marker_reward_model(sft, tmp_path / "marker-rm", marker_id)

    def ppo(name: str, beta: float) -> Path:
        config = tiny_ppo_config(tmp_path / name, sft, reward_dir, records=prompts((TOPICS * 2)[:24]), epochs=4,
                                 init_kl_coef=beta, optim={"lr": 5e-4}, data={"batch_size": 8, "mini_batch_size": 4},
                                 run={"save_every": 0})
        return run_ppo(config)

    # Fresh rollouts by the engine on held-out prompts, with seeds of their own, before and after.
    words = TOPICS[8:]
    before = fresh_rollouts(sft, sft, reward_dir, words, tmp_path / "before")
    loose = fresh_rollouts(ppo("loose", 0.02), sft, reward_dir, words, tmp_path / "loose-after")
    tight = fresh_rollouts(ppo("tight", 5.0), sft, reward_dir, words, tmp_path / "tight-after")
    assert before["kl"] == pytest.approx(0.0, abs=1e-4)
    assert loose["score"] > before["score"] + 8, (before, loose)  # it learns the preference
    # the leash: the same run with a tight β stays far closer to the reference (it pays for a marker
    # with ≈ β · ln 8 nats of penalty, so it takes fewer)
    assert 0 < tight["kl"] < 0.5 * loose["kl"], (loose, tight)
