"""The measurements behind the promotion gates, on tiny models: each against a hand computation or the
number the trainer reports, and the win rate on a preference built by hand (no training, no chance)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.checkpoint import read_manifest
from serving.models import load_policy
from tests.trainer.rm_fixtures import RANKINGS, tiny_rm_config
from tests.trainer.sft_fixtures import write_jsonl
from tests.trainer.test_ppo import MARKER, make_direction_reward_model, make_marker_reward_model
from trainer.evaluation import (judge_scores, kl_to_reference, ptx_loss, rm_heldout_accuracy, sample_answers,
                                win_rate)

MAX_NEW_TOKENS = 4
MAX_LENGTH = 128
PROMPTS = [{"prompt": f"Tell me about {w}."} for w in ("the sea", "a cat", "bread")]
PTX = [{"text": "The cat sat on the mat and looked at the bird."}, {"text": "Rain fell all night."},
       {"text": "She baked bread every morning before dawn, as her mother had."}]
# Hand-worked under the marker judge (more marker tokens, same length: a higher score; no marker: exactly
# the bias, so equal): group 1 ranks its 3 pairs right, group 2 is ranked backwards (0 of 1), group 3
# is a tie (a tie counts as wrong): 3 of 5 pairs, accuracy 0.6.
MARKER_RANKINGS = [
    {"prompt": "Name some fruit.", "completions": ["ok banana banana", "ok banana red", "ok red blue"]},
    {"prompt": "Name a colour.", "completions": ["ok red", "ok banana"]},
    {"prompt": "Name an animal.", "completions": ["ok cat", "ok dog"]},
]
ANSWERS = dict(max_new_tokens=MAX_NEW_TOKENS, max_length=MAX_LENGTH, device="cpu")


def marker_id(model_dir: Path) -> int:
    from transformers import AutoTokenizer

    (token,) = AutoTokenizer.from_pretrained(model_dir).encode(MARKER, add_special_tokens=False)
    return token


def make_marker_biased_policy(policy_dir: Path, out_dir: Path, marker: int) -> Path:
    """The tiny policy edited by hand to write the marker token almost always.

    Residual dimension 1 is set to 10 in every token embedding and nothing writes into it (its rows of
    every attention o_proj and MLP down_proj are zeroed), so after the final norm it is a positive
    constant-ish at every position. The head is tied to the embeddings: giving the marker's embedding
    200 in that dimension adds ~200 × h[1] to the marker's logit wherever the model is (measured:
    p(marker) > 0.9999 after a chat prompt), and every other token's logit moves by the same 10 × h[1].
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[1].zero_()
            layer.mlp.down_proj.weight[1].zero_()
        model.model.embed_tokens.weight[:, 1] = 10.0
        model.model.embed_tokens.weight[marker, 1] = 200.0
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out_dir)
    return out_dir


def build_models(tiny_model_dir: Path, root: Path) -> dict[str, Path]:
    """tiny policy, the marker-biased policy, the marker judge and the direction judge (continuous scores)."""
    marker = marker_id(tiny_model_dir)
    return {"tiny": tiny_model_dir,
            "biased": make_marker_biased_policy(tiny_model_dir, root / "biased", marker),
            "marker_rm": make_marker_reward_model(tiny_model_dir, root / "marker-rm", marker),
            "direction_rm": make_direction_reward_model(tiny_model_dir, root / "direction-rm")}


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    return build_models(tiny_model_dir, tmp_path_factory.mktemp("evaluation"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.heldout.jsonl", PROMPTS)


def test_a_policy_against_itself_with_the_same_seeds_ties_every_answer(models, prompts_file):
    # The direction judge gives the six answers six different scores (checked below), so all ties can
    # only come from identical answers: both sides drew with the same per-answer seeds.
    result = win_rate(models["tiny"], models["tiny"], models["direction_rm"], prompts_file, samples_per_prompt=2,
                      seed=3, **ANSWERS)
    assert (result.wins, result.losses, result.ties, result.n) == (0, 0, 6, 6)
    assert result.rate == 0.5 and result.candidate_score == result.baseline_score

    from serving.models import load_reward

    policy, judge = load_policy(models["tiny"], device="cpu"), load_reward(models["direction_rm"], None, device="cpu")
    scores = judge_scores(judge, sample_answers(policy, prompts_file, samples_per_prompt=2, seed=3,
                                                max_new_tokens=MAX_NEW_TOKENS, max_length=MAX_LENGTH), MAX_LENGTH, 8)
    assert len(set(scores.tolist())) == 6  # six different answers score six different numbers


def test_a_policy_biased_towards_the_marker_wins_under_the_marker_judge(models, prompts_file):
    result = win_rate(models["biased"], models["tiny"], models["marker_rm"], prompts_file, **ANSWERS)
    assert result.n == 3 and result.wins + result.losses + result.ties == 3
    assert result.rate > 0.8 and result.wins == 3, result
    assert result.candidate_score > result.baseline_score
    # Swapped sides see the same answers (same seeds): wins and losses swap exactly.
    swapped = win_rate(models["tiny"], models["biased"], models["marker_rm"], prompts_file, **ANSWERS)
    assert (swapped.wins, swapped.losses, swapped.ties) == (result.losses, result.wins, result.ties)
    assert swapped.rate == pytest.approx(1 - result.rate)


def test_kl_to_reference_is_zero_for_the_same_weights_and_matches_a_hand_computation(models, prompts_file):
    same = kl_to_reference(models["tiny"], models["tiny"], prompts_file, seed=5, **ANSWERS)
    assert same == pytest.approx(0, abs=1e-5)

    kl = kl_to_reference(models["biased"], models["tiny"], prompts_file, seed=5, **ANSWERS)
    # By hand: the same answers (same seed), then log_softmax of each model's logits (a different code
    # path from the trainer's gather − logsumexp), summed over the answer tokens, averaged over answers.
    policy, reference = load_policy(models["biased"], device="cpu"), load_policy(models["tiny"], device="cpu")
    answers = sample_answers(policy, prompts_file, seed=5, max_new_tokens=MAX_NEW_TOKENS, max_length=MAX_LENGTH)
    expected = []
    for a in answers:
        ids = torch.tensor([a.prompt.ids + a.response_ids])
        n = len(a.prompt.ids)
        with torch.no_grad():
            lp, lq = (torch.log_softmax(m.model(ids).logits[0, n - 1:-1].double(), -1) for m in (policy, reference))
        targets = ids[0, n:]
        expected.append((lp[range(len(targets)), targets] - lq[range(len(targets)), targets]).sum().item())
    assert kl == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert kl > 10  # the biased policy is far from the reference: the marker is improbable under it


def test_ptx_loss_equals_hf_next_token_loss_with_padding_masked(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ptx = write_jsonl(tmp_path / "ptx.jsonl", PTX)
    loss = ptx_loss(tiny_model_dir, ptx, MAX_LENGTH, batch_size=2, device="cpu")  # batches of 2 then 1

    # By hand: all three texts in one right-padded batch, labels = input ids with padding at -100; HF
    # shifts them and averages over every predicted token of the batch.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = [tokenizer.encode(r["text"], add_special_tokens=False) for r in PTX]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.item()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_rm_heldout_accuracy_on_hand_built_rankings(models, tmp_path):
    heldout = write_jsonl(tmp_path / "rm.heldout.jsonl", MARKER_RANKINGS)
    result = rm_heldout_accuracy(models["marker_rm"], heldout, MAX_LENGTH, device="cpu")
    assert (result.accuracy, result.pairs, result.groups) == (pytest.approx(0.6), 5, 3)


def test_rm_heldout_accuracy_equals_what_run_rm_reports(tmp_path, tiny_model_dir):
    from trainer.reward import run_rm

    heldout = write_jsonl(tmp_path / "rm.heldout.jsonl", RANKINGS[:3])  # K = 3, 2, 4: 3 + 1 + 6 pairs
    config = tiny_rm_config(tmp_path, tiny_model_dir, data={"heldout": str(heldout)},
                            run={"max_steps": 3, "save_every": 0})
    path = run_rm(config)
    reported = read_manifest(path)["metrics"]["heldout_accuracy"]
    result = rm_heldout_accuracy(path, heldout, config.data.max_length, batch_size=config.data.batch_size,
                                 device="cpu")
    assert result.accuracy == reported and (result.pairs, result.groups) == (10, 3)
