"""Rules, judgement with label noise, prompts and mixes: pure code, no server."""
from __future__ import annotations

import json
import math
import random

import pytest

from simulate.judge import Judge
from simulate.prompts import PromptsError, load_prompts, rule_text
from simulate.rules import RuleError, count_word, load_rule, prefers_banana, prefers_longer, prefers_shorter
from simulate.users import Mix, SimulationConfig


def test_built_in_rules():
    assert prefers_banana("", "Banana bread, banana! bananas") == 2.0  # whole words, any case
    assert count_word("sea")("", "the sea, the Sea, seaside") == 2.0
    assert prefers_longer("", "  abc ") == 3.0 > prefers_longer("", "ab")
    assert prefers_shorter("", "ab") > prefers_shorter("", "abc")
    with pytest.raises(RuleError):
        count_word(" ")


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "must look like 'module:function'"),
    ("simulate.nope_module:rule", "cannot import module 'simulate.nope_module'"),
    ("simulate.rules:nope", "has no attribute 'nope'"),
    ("simulate.prompts:DEFAULT_PROMPTS", "is a tuple, not a callable"),
])
def test_bad_rule_specs_are_explained(spec, message):
    with pytest.raises(RuleError, match=message):
        load_rule(spec)


def test_rule_spec_loads_the_callable():
    assert load_rule("simulate.rules:prefers_banana") is prefers_banana
    assert load_rule("simulate.rules:count_word")("x")("", "x x") == 2.0


def test_noise_free_judge_follows_the_rule_and_keeps_ties():
    judge = Judge(prefers_longer, 0.0, random.Random(0), threshold=2)
    assert judge.compare("", "long answer", "short").winner == "a"
    assert judge.compare("", "x", "long").winner == "b"
    tie = judge.compare("", "abc", "xyz")
    assert tie.winner == tie.rule_winner == "tie" and not tie.decided
    ranking = judge.rank("", ["bb", "dddd", "a", "ccc"])
    assert ranking.order == [1, 3, 0, 2] and ranking.agrees and not ranking.flipped
    assert [judge.rate("", t).score for t in ("ab", "abc")] == [-1, 1]  # above the threshold only


def test_comparison_noise_reverses_the_configured_share_and_never_a_tie():
    judge = Judge(prefers_longer, 0.2, random.Random(3))
    n = 20_000
    verdicts = [judge.compare("", "longer", "short") for _ in range(n)]
    flips = sum(v.winner == "b" for v in verdicts)
    assert abs(flips - 0.2 * n) <= 4 * math.sqrt(n * 0.2 * 0.8)
    assert all(v.flipped == (v.winner == "b") for v in verdicts)
    assert {judge.compare("", "same", "size").winner for _ in range(500)} == {"tie"}


def test_rating_and_ranking_noise():
    judge = Judge(prefers_longer, 0.3, random.Random(5))
    n = 10_000
    ratings = [judge.rate("", "long enough") for _ in range(n)]
    assert abs(sum(r.score == -1 for r in ratings) - 0.3 * n) <= 4 * math.sqrt(n * 0.3 * 0.7)
    rankings = [judge.rank("", ["a", "bbb", "cc"]) for _ in range(n)]
    swapped = [r for r in rankings if r.flipped]
    assert abs(len(swapped) - 0.3 * n) <= 4 * math.sqrt(n * 0.3 * 0.7)
    # A noise swap exchanges one adjacent pair of the rule's order [1, 2, 0]: either pair, evenly.
    assert {tuple(r.order) for r in swapped} == {(2, 1, 0), (1, 0, 2)}
    assert all(not r.agrees for r in swapped) and all(r.order == [1, 2, 0] for r in rankings if not r.flipped)


def test_ranking_of_equal_scores_is_random_and_still_agrees():
    judge = Judge(prefers_longer, 0.0, random.Random(1))
    orders = {tuple(judge.rank("", ["xx", "yy", "z"]).order) for _ in range(200)}
    assert orders == {(0, 1, 2), (1, 0, 2)}


def test_the_same_seed_judges_the_same():
    def run(seed):
        judge = Judge(prefers_longer, 0.5, random.Random(seed))
        return [judge.compare("", "aa", "a").winner for _ in range(50)]

    assert run(4) == run(4) != run(5)


def test_chat_prompts_read_as_their_last_user_message(tmp_path):
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "bana"}, {"type": "text", "text": "na?"}]}]
    assert rule_text(messages) == "banana?" and rule_text("plain") == "plain"
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "extra": 1}) + "\n\n" + json.dumps({"prompt": messages}) + "\n")
    assert load_prompts(path) == ["hi", messages]


@pytest.mark.parametrize("content, message", [
    ("not json\n", "prompts.jsonl:1: not JSON"),
    ('{"text": "x"}\n', 'must be an object with a "prompt" key'),
    ('{"prompt": ""}\n', "non-empty string or a list"),
    ('{"prompt": [{"content": "x"}]}\n', "non-empty string or a list"),
    ("\n", "has no prompts"),
])
def test_bad_prompts_files_are_explained(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(PromptsError, match=message):
        load_prompts(path)
    with pytest.raises(PromptsError, match="cannot read prompts file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_mix():
    mix = Mix.parse("compare=0.7, rate=0.3")
    assert (mix.compare, mix.rank, mix.rate) == (0.7, 0.0, 0.3)
    rng = random.Random(0)
    drawn = [mix.choose(rng) for _ in range(10_000)]
    assert set(drawn) == {"comparison", "rating"}
    assert abs(drawn.count("rating") - 3000) <= 4 * math.sqrt(10_000 * 0.21)
    for bad, message in [("compare", "expected compare=X"), ("vote=1", "expected compare=X"),
                         ("rank=x", "'x' is not a number"), ("", "empty mix"), ("compare=-1", ">= 0")]:
        with pytest.raises(ValueError, match=message):
            Mix.parse(bad)


@pytest.mark.parametrize("config, message", [
    ({}, "stopping rule"), ({"events": 1, "noise": 1.5}, "noise"), ({"events": 0}, "events"),
    ({"duration_s": -1}, "duration"), ({"events": 1, "rank_k": 10}, "rank_k"), ({"events": 1, "users": 0}, "users"),
    ({"events": 1, "temperature": 0}, "temperature"), ({"events": 1, "prompts": []}, "no prompts"),
])
def test_bad_simulation_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**config)
