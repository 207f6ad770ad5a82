"""Promotion gates: the decision worked by hand at every threshold boundary, the config and report
formats, and evaluate_gates end to end on tiny models with a preference built by hand."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from serving.checkpoint import model_version_of
from tests.trainer.sft_fixtures import CONFIGS, write_jsonl
from tests.trainer.test_evaluation import MARKER_RANKINGS, PROMPTS, PTX, build_models
from trainer.config import ConfigError, config_reference
from trainer.gates import (GATES, GateReport, GatesConfig, Measurement, decide, evaluate_gates, load_gates_config)

# Every gate enabled, thresholds with round numbers for hand-worked boundaries.
CONFIG = GatesConfig(rm_accuracy_margin=0.1, min_win_rate=0.55, kl_budget=20.0, ptx_margin=0.1)


def at_threshold() -> dict[str, Measurement]:
    """Each gate's value exactly at its bound: 0.6 ≥ 0.7 − 0.1 (0.5999… in floats), 0.55 ≥ 0.55, 20 ≤ 20,
    2.1 ≤ 2.0 + 0.1 (2.1000000000000001 in floats)."""
    return {"rm_accuracy": Measurement(0.6, 0.7), "win_rate": Measurement(0.55), "kl": Measurement(20.0),
            "ptx": Measurement(2.1, 2.0)}


def test_every_gate_passes_exactly_at_its_threshold():
    report = decide(at_threshold(), CONFIG)
    assert report.passed and report.reasons == []
    assert [g.name for g in report.gates] == list(GATES)
    assert all(g.status == "passed" and g.passed is True for g in report.gates)
    rm, win, kl, ptx = report.gates
    assert (rm.value, rm.baseline, rm.threshold) == (0.6, 0.7, pytest.approx(0.6))
    assert (win.threshold, kl.threshold, ptx.threshold, ptx.baseline) == (0.55, 20.0, pytest.approx(2.1), 2.0)


@pytest.mark.parametrize("gate, value", [("rm_accuracy", 0.59), ("win_rate", 0.549), ("kl", 20.01), ("ptx", 2.11)])
def test_each_gate_fails_just_past_its_threshold_and_alone_rejects(gate, value):
    measurements = at_threshold()
    measurements[gate] = replace(measurements[gate], value=value)
    report = decide(measurements, CONFIG)
    assert not report.passed
    assert [g.name for g in report.gates if g.status == "failed"] == [gate]
    assert report.gate(gate).passed is False
    assert len(report.reasons) == 1 and report.reasons[0].startswith(f"{gate}: ")
    assert all(g.passed for g in report.gates if g.name != gate)


def test_two_failures_give_two_reasons_in_gate_order():
    report = decide({**at_threshold(), "kl": Measurement(35.0), "rm_accuracy": Measurement(0.4, 0.7)}, CONFIG)
    assert not report.passed
    assert [r.split(":")[0] for r in report.reasons] == ["rm_accuracy", "kl"]
    assert "35.0000" in report.reasons[1] and "budget 20" in report.reasons[1]


def test_first_run_compares_the_rm_with_chance():
    # No current RM: the baseline is chance, 0.5, so with margin 0.1 the bound is 0.4.
    chance = {"baseline": "chance"}
    rm = decide({**at_threshold(), "rm_accuracy": Measurement(0.41, 0.5, info=chance)}, CONFIG).gate("rm_accuracy")
    assert (rm.status, rm.baseline, rm.threshold) == ("passed", 0.5, pytest.approx(0.4)) and "chance" in rm.detail
    rm = decide({**at_threshold(), "rm_accuracy": Measurement(0.39, 0.5, info=chance)}, CONFIG).gate("rm_accuracy")
    assert rm.status == "failed"


def test_a_disabled_gate_is_neither_measured_nor_passed_and_does_not_block():
    config = replace(CONFIG, kl_budget=None)
    report = decide({**at_threshold(), "kl": Measurement(1e9)}, config)  # a value would fail; it is ignored
    kl = report.gate("kl")
    assert (kl.status, kl.passed, kl.value) == ("disabled", None, None) and "kl_budget: null" in kl.detail
    assert report.passed


def test_a_skipped_gate_is_never_a_pass_and_blocks_only_when_strict():
    measurements = {**at_threshold(), "ptx": Measurement(skipped="no ptx text file given")}
    report = decide(measurements, CONFIG)
    ptx = report.gate("ptx")
    assert (ptx.status, ptx.passed, ptx.detail) == ("skipped", None, "no ptx text file given")
    assert report.passed and report.reasons == []

    strict = decide(measurements, replace(CONFIG, strict=True))
    assert not strict.passed and strict.reasons == ["ptx: skipped (no ptx text file given) and gates are strict"]
    missing = decide({k: v for k, v in at_threshold().items() if k != "win_rate"}, CONFIG)  # never measured
    assert missing.gate("win_rate").status == "skipped" and missing.passed


def test_nothing_evaluated_is_not_a_pass():
    skipped = {g: Measurement(skipped="no data") for g in GATES}
    report = decide(skipped, CONFIG)
    assert not report.passed and report.reasons[0].startswith("no enabled gate could be evaluated")
    # …but an operator who disables every gate gets what they asked for.
    off = GatesConfig(rm_accuracy_margin=None, min_win_rate=None, kl_budget=None, ptx_margin=None)
    assert decide(skipped, off).passed


def test_a_measurement_error_fails_its_gate_with_the_message():
    report = decide({**at_threshold(), "win_rate": Measurement(error="DatasetError: p.jsonl:3: prompt too long")},
                    CONFIG)
    win = report.gate("win_rate")
    assert (win.status, win.passed) == ("error", False)
    assert not report.passed and report.reasons == ["win_rate: could not be measured: DatasetError: p.jsonl:3: "
                                                    "prompt too long"]


def test_nan_fails_and_the_report_round_trips_through_json():
    report = decide({**at_threshold(), "kl": Measurement(float("nan"))}, CONFIG)
    assert report.gate("kl").status == "failed" and not report.passed
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # strict JSON: NaN became null
    assert data["gates"][GATES.index("kl")]["value"] is None

    passed = decide({**at_threshold(), "win_rate": Measurement(0.75, info={"wins": 3, "n": 4})}, CONFIG)
    passed.models, passed.seconds = {"candidate": "ppo-abc", "reference": None}, 1.5
    restored = GateReport.from_dict(json.loads(json.dumps(passed.to_dict(), allow_nan=False)))
    assert restored == passed and restored.gate("win_rate").info == {"wins": 3, "n": 4}
    assert restored.config["min_win_rate"] == 0.55


def test_the_yaml_parses_to_the_documented_defaults_and_bad_values_are_refused(tmp_path):
    assert load_gates_config(CONFIGS / "gates.yaml") == GatesConfig()
    (tmp_path / "bad.yaml").write_text("min_win_rate: 1.5\n")
    with pytest.raises(ConfigError, match="min_win_rate must be in"):
        load_gates_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("kl_budjet: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_gates_config(tmp_path / "typo.yaml")
    (tmp_path / "off.yaml").write_text("kl_budget: null\nstrict: true\n")
    assert load_gates_config(tmp_path / "off.yaml") == replace(GatesConfig(), kl_budget=None, strict=True)


def test_docs_carry_the_gates_fields():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    assert config_reference(GatesConfig) in docs


# -- end to end on tiny models ----------------------------------------------------------------------

SMALL = GatesConfig(rm_accuracy_margin=0.05, min_win_rate=0.8, kl_budget=5.0, ptx_margin=0.1, heldout_prompts=2,
                    max_new_tokens=4, max_length=128, batch_size=4, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    return {**build_models(tiny_model_dir, root), "rm_heldout": write_jsonl(root / "rm.heldout.jsonl", MARKER_RANKINGS),
            "prompts": write_jsonl(root / "prompts.heldout.jsonl", PROMPTS),
            "ptx": write_jsonl(root / "ptx.train.jsonl", PTX), "empty": write_jsonl(root / "empty.jsonl", [])}


def test_evaluate_gates_on_a_marker_candidate(setup):
    # Candidate: the marker-biased policy; serving = reference = the tiny policy; the RM was refreshed
    # (the marker RM) on the first run (no current RM). It wins and its RM beats chance, but it is far
    # from the reference (KL way over 5 nats) and worse on the ptx text: rejected for those two.
    report = evaluate_gates(setup["biased"], setup["tiny"], setup["tiny"], setup["marker_rm"], None,
                            rm_heldout=setup["rm_heldout"], prompts=setup["prompts"], ptx=setup["ptx"], config=SMALL)
    rm, win, kl, ptx = (report.gate(g) for g in GATES)
    assert rm.status == "passed" and rm.value == pytest.approx(0.6) and rm.baseline == 0.5  # hand-worked, chance
    assert rm.info["pairs"] == 5 and rm.info["baseline"] == "chance"
    assert win.status == "passed" and win.value > 0.8 and win.info["n"] == 2  # heldout_prompts: 2 of 3
    assert win.info["judge"] == model_version_of(setup["marker_rm"])
    assert kl.status == "failed" and kl.value > SMALL.kl_budget
    assert ptx.status == "failed" and ptx.value > ptx.baseline + SMALL.ptx_margin
    assert not report.passed and [r.split(":")[0] for r in report.reasons] == ["kl", "ptx"]
    assert report.models["candidate"] == model_version_of(setup["biased"]) and report.models["current_rm"] is None
    assert GateReport.from_dict(json.loads(json.dumps(report.to_dict(), allow_nan=False))) == report


def test_the_serving_rm_judges_when_the_rm_was_not_refreshed(setup):
    # No candidate RM: the RM gate is skipped (nothing to compare), the win rate is judged by the
    # current RM. Against itself, the candidate ties everything: 0.5 < 0.8, rejected.
    config = replace(SMALL, kl_budget=None, ptx_margin=None)
    report = evaluate_gates(setup["tiny"], setup["tiny"], None, None, setup["marker_rm"],
                            rm_heldout=setup["rm_heldout"], prompts=setup["prompts"], config=config)
    assert report.gate("rm_accuracy").status == "skipped" and "not refreshed" in report.gate("rm_accuracy").detail
    win = report.gate("win_rate")
    assert win.info["judge"] == model_version_of(setup["marker_rm"]) and win.info["ties"] == win.info["n"] == 2
    assert (win.status, win.value) == ("failed", 0.5) and not report.passed


def test_missing_data_skips_and_a_missing_file_is_an_error(setup, tmp_path):
    report = evaluate_gates(setup["biased"], setup["tiny"], None, setup["marker_rm"], setup["marker_rm"],
                            rm_heldout=setup["empty"], prompts=None, ptx=tmp_path / "nowhere.jsonl", config=SMALL)
    statuses = {g.name: (g.status, g.detail) for g in report.gates}
    assert statuses["rm_accuracy"] == ("skipped", f"no records in {setup['empty']}")
    assert statuses["win_rate"] == ("skipped", "no held-out prompts file given")
    assert statuses["kl"] == ("skipped", "no SFT reference given")
    assert statuses["ptx"][0] == "error" and "no such dataset file" in statuses["ptx"][1]
    assert not report.passed and report.reasons == [f"ptx: {statuses['ptx'][1]}"]
