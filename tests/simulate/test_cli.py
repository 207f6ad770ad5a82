"""`feedloop simulate` end to end through the real `feedloop` entry point, against a real gateway."""
from __future__ import annotations

import json

import pytest

from serving.cli import main


def test_simulate_prints_the_json_report(recording_gateway, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a fruit."}) + "\n"
                       + json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Say banana."}]}) + "\n")
    rc = main(["simulate", "--url", recording_gateway.url, "--rule", "simulate.rules:prefers_longer",
               "--noise", "0", "--users", "2", "--comparisons", "6", "--prompts", str(prompts),
               "--mix", "compare=1,rank=1,rate=1", "--rank-k", "2", "--max-new-tokens", "2", "--seed", "3",
               "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert sum(report["accepted"].values()) == sum(report["sent"].values()) == 6
    assert report["errors"] == {} and report["agreement_rate"] in (1.0, None)
    assert set(report["versions"]) == {recording_gateway.model_version}
    assert "simulate:" in captured.err  # progress lines go to stderr, the report alone to stdout

    assert sum(report["noise_flips"].values()) == 0

    # What it reports is what reached the bus (this module's gateway has a log of its own).
    _, feedback = recording_gateway.read_log()
    kinds = [e.WhichOneof("event") for e in feedback.values()]
    assert {k: kinds.count(k) for k in set(kinds)} == {k: n for k, n in report["accepted"].items() if n}
    completions, _ = recording_gateway.published(list(feedback))
    prompts = {c.WhichOneof("prompt") for c in completions.values()}
    assert prompts == {"chat"}  # users chat: the file's string prompt went as a user message too
    conversations = [[(m.role, m.content) for m in c.chat.messages] for c in completions.values()]
    expected = ([("system", "Be brief."), ("user", "Say banana.")], [("user", "Name a fruit.")])
    assert conversations and all(c in expected for c in conversations)


def test_unreachable_gateway_exits_1_with_the_errors(capsys):
    rc = main(["simulate", "--url", "http://127.0.0.1:9", "--comparisons", "2", "--users", "1", "--quiet", "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    report = json.loads(captured.out)
    assert report["errors"] == {"connect": 2} and "ConnectError" in report["error_messages"][0]


@pytest.mark.parametrize("argv, message", [
    (["--rule", "no_such_module_x:rule"], "cannot import module 'no_such_module_x'"),
    (["--rule", "simulate.rules:KINDS_NOPE"], "has no attribute 'KINDS_NOPE'"),
    (["--rule", "simulate.prompts:DEFAULT_PROMPTS"], "not a callable"),
    (["--noise", "2"], "noise must be between 0 and 1"),
    (["--mix", "compare=1,vote=2"], "bad mix entry 'vote=2'"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "cannot read prompts file"),
    (["--rank-k", "12"], "rank_k must be between 2 and 9"),
    (["--url", "127.0.0.1:8080"], "must look like http://HOST:PORT"),
])
def test_bad_arguments_are_explained_without_a_traceback(argv, message, capsys):
    rc = main(["simulate", "--url", "http://127.0.0.1:9", "--comparisons", "1", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert err.startswith("feedloop simulate: ")


def test_a_stopping_rule_is_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate"])
    assert exit_.value.code == 2 and "--comparisons" in capsys.readouterr().err
