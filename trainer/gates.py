"""Promotion gates: the checks a candidate policy passes before the loop promotes it (issue 5, item 2).

    report = evaluate_gates(candidate, serving, reference, candidate_rm, current_rm,
                            rm_heldout=..., prompts=..., ptx=...,
                            config=load_gates_config("trainer/configs/gates.yaml"))
    if report.passed: promote …          else: mark rejected, with report.reasons
    store it: report.to_dict() (JSON-safe); GateReport.from_dict(d) reads it back.

Gates (each one's threshold is in `GatesConfig`; null disables it):

| gate | value | passes when |
|---|---|---|
| `rm_accuracy` | candidate RM's held-out pairwise accuracy | ≥ current RM's − `rm_accuracy_margin` |
| `win_rate` | candidate vs serving policy on held-out prompts, judged by the new RM | ≥ `min_win_rate` |
| `kl` | KL(candidate ‖ SFT reference), nats per answer | ≤ `kl_budget` |
| `ptx` | candidate's ptx loss, nats per token | ≤ serving policy's + `ptx_margin` |

Each gate ends in one status: `passed`, `failed`, `error` (measuring raised: a missing file, a
corrupt checkpoint, a prompt too long; counts as failed, the message is the reason), `skipped` (the
data cannot evaluate it: no file, an empty file, no RM refreshed, no judge, no reference; never a
pass, and with `strict` it blocks), or `disabled` (threshold null in the config). The candidate passes
when no gate failed or errored, no gate was skipped under `strict`, and at least one enabled gate was
evaluated: a run whose every enabled gate was skipped has shown nothing and is not promoted.

Reward models:
- the RM gate needs a candidate RM (`candidate_rm`, set when this run refreshed the RM); without one
  it is skipped (the serving RM stays, nothing to compare).
- first run (no trained RM serving, `current_rm` None): the candidate RM is compared with chance,
  baseline 0.5 (what an untrained head scores on average), so it must rank at least 0.5 − margin of
  held-out pairs right.
- the win-rate judge is the new RM: `candidate_rm` when the RM was refreshed, else `current_rm`
  (then the serving RM is the newest there is); with neither, the gate is skipped.

`decide(measurements, config)` is the pure decision over measured numbers (`Measurement` per gate);
`measure_gates` produces them (trainer/evaluation.py) and `evaluate_gates` is both.
Comparisons allow 1e-9 of float slack so a value exactly at its threshold passes (in binary floating
point 0.7 − 0.1 is 0.5999…, which an accuracy of 0.6 would otherwise miss).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from serving.checkpoint import model_version_of
from trainer.config import TOO_LONG_POLICIES, ConfigError, config_to_dict, load_config, param
from trainer.evaluation import kl_to_reference, ptx_loss, rm_heldout_accuracy, win_rate

log = logging.getLogger(__name__)

PathLike = str | Path
GATES = ("rm_accuracy", "win_rate", "kl", "ptx")  # report order
THRESHOLD_FIELD = {"rm_accuracy": "rm_accuracy_margin", "win_rate": "min_win_rate", "kl": "kl_budget",
                   "ptx": "ptx_margin"}
CHANCE_ACCURACY = 0.5  # the RM baseline when no trained RM serves yet
SLACK = 1e-9


@dataclass
class GatesConfig:
    """Thresholds of the promotion gates and how the held-out measurements are taken."""

    rm_accuracy_margin: float | None = param(0.02, "rm_accuracy gate: the candidate RM's held-out pairwise accuracy "
                                                   "must be ≥ the current RM's minus this; null: gate disabled")
    min_win_rate: float | None = param(0.55, "win_rate gate: (wins + ties/2) / answers of the candidate against "
                                             "the serving policy, judged by the new RM, must be ≥ this; null: "
                                             "gate disabled")
    kl_budget: float | None = param(20.0, "kl gate: KL(candidate ‖ SFT reference), k1 summed over each sampled "
                                          "answer's tokens and averaged (nats per sequence), must be ≤ this; null: "
                                          "gate disabled")
    ptx_margin: float | None = param(0.1, "ptx gate: the candidate's ptx loss (nats per token) must be ≤ the "
                                          "serving policy's plus this; null: gate disabled")
    heldout_prompts: int | None = param(64, "held-out prompts answered for win_rate and kl (the first N of the "
                                            "prompts file, which export orders by hash); null: all")
    samples_per_prompt: int = param(1, "answers per prompt and policy (each with its own seed)")
    max_new_tokens: int = param(64, "longest answer in tokens")
    temperature: float = param(1.0, "sampling temperature of the answers (KL is of the tempered policy, as in PPO)")
    seed: int = param(0, "sampling seed: answer i draws with rollout_seed(seed, 0, i), the same for both policies")
    max_length: int = param(1024, "longest prompt + answer, ranking pair or ptx text, in tokens; longer: see "
                                  "too_long, never truncated")
    too_long: str = param("error", "a held-out record over max_length: 'error' (that gate's status is error) or "
                                   "'skip' (left out of the measurement; the loop always skips)")
    batch_size: int = param(16, "sequences per forward (and answers generated at once)")
    strict: bool = param(False, "a gate skipped for lack of data blocks promotion; false: it is reported as "
                                "skipped and does not block (unless no enabled gate could be evaluated at all)")
    device: str = param("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', …")
    dtype: str = param("auto", "weights dtype, as serving loads them: 'auto' (bf16 on GPU, fp32 on CPU), 'fp32' "
                               "or 'bf16'")

    def __post_init__(self):
        for name in ("rm_accuracy_margin", "ptx_margin"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"{name} must be >= 0 or null, got {value}")
        _require(self.min_win_rate is None or 0 <= self.min_win_rate <= 1,
                 f"min_win_rate must be in [0, 1] or null, got {self.min_win_rate}")
        _require(self.kl_budget is None or self.kl_budget >= 0, f"kl_budget must be >= 0 or null, got {self.kl_budget}")
        _require(self.heldout_prompts is None or self.heldout_prompts >= 1,
                 f"heldout_prompts must be >= 1 or null, got {self.heldout_prompts}")
        _require(self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        _require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.temperature > 0, f"temperature must be > 0 (answers are sampled), got {self.temperature}")
        _require(self.max_length > self.max_new_tokens,
                 f"max_length {self.max_length} leaves no room for a prompt before max_new_tokens "
                 f"{self.max_new_tokens}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.too_long in TOO_LONG_POLICIES,
                 f"too_long must be one of {', '.join(TOO_LONG_POLICIES)}, got {self.too_long!r}")
        _require(self.dtype in ("auto", "fp32", "bf16"), f"dtype must be 'auto', 'fp32' or 'bf16', got {self.dtype!r}")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def threshold(self, gate: str) -> float | None:
        return getattr(self, THRESHOLD_FIELD[gate])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def load_gates_config(path: PathLike) -> GatesConfig:
    """A GatesConfig from YAML (trainer/configs/gates.yaml); unknown keys and bad values are ConfigErrors."""
    return load_config(path, GatesConfig)


@dataclass
class Measurement:
    """What one gate measured, before any threshold: the input of `decide`."""

    value: float | None = None  # the candidate's number; None when not measured
    baseline: float | None = None  # what it is compared with (current RM's accuracy, serving policy's ptx loss)
    skipped: str | None = None  # why the data cannot evaluate this gate
    error: str | None = None  # why measuring failed
    info: dict = field(default_factory=dict)  # JSON-safe extras for the report (pairs, wins, versions, seconds)


@dataclass
class GateResult:
    name: str  # one of GATES
    status: str  # 'passed', 'failed', 'error', 'skipped' or 'disabled'
    value: float | None  # the candidate's measured number
    threshold: float | None  # the bound it was held to (already including the baseline and margin)
    baseline: float | None  # the number the threshold was derived from, if any
    passed: bool | None  # None when skipped or disabled: not evaluated is neither a pass nor a fail
    detail: str  # one sentence a person reads in the run report
    info: dict = field(default_factory=dict)


@dataclass
class GateReport:
    gates: list[GateResult]  # one per gate, in GATES order
    passed: bool  # promote?
    reasons: list[str]  # why not (empty when passed)
    config: dict = field(default_factory=dict)  # the GatesConfig used
    models: dict = field(default_factory=dict)  # versions of the checkpoints measured (and the judge)
    seconds: float | None = None  # wall time of the measurements

    def gate(self, name: str) -> GateResult:
        return next(g for g in self.gates if g.name == name)

    def to_dict(self) -> dict:
        """JSON-serialisable (non-finite numbers become null): the run report the store keeps."""
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping) -> GateReport:
        fields = {k: v for k, v in data.items() if k != "gates"}
        return cls(gates=[GateResult(**g) for g in data["gates"]], **fields)

    def summary(self) -> str:
        """One line for logs: the decision and every gate's status and value."""
        parts = [f"{g.name} {g.status}" + (f" {g.value:.4g}" if g.value is not None else "") for g in self.gates]
        return ("passed" if self.passed else "rejected") + ": " + ", ".join(parts)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- the decision (pure) ------------------------------------------------------------------------------

def _bound(gate: str, m: Measurement, limit: float) -> tuple[float, bool, str]:
    """(threshold, passed, detail) of a measured gate whose config value is `limit`."""
    v, b = m.value, m.baseline
    if gate == "rm_accuracy":
        t = b - limit
        vs = "chance" if m.info.get("baseline") == "chance" else "the current RM's"
        return t, v >= t - SLACK, (f"candidate RM held-out pairwise accuracy {v:.4f} vs {vs} {b:.4f} − margin "
                                   f"{limit:g} = {t:.4f}")
    if gate == "win_rate":
        return limit, v >= limit - SLACK, f"win rate {v:.4f} against the serving policy, threshold {limit:g}"
    if gate == "kl":
        return limit, v <= limit + SLACK, f"KL to the SFT reference {v:.4f} nats per answer, budget {limit:g}"
    if gate == "ptx":
        t = b + limit
        return t, v <= t + SLACK, (f"ptx loss {v:.4f} nats/token vs the serving policy's {b:.4f} + margin {limit:g} "
                                   f"= {t:.4f}")
    raise ValueError(f"unknown gate {gate!r}")


def decide_gate(gate: str, m: Measurement | None, config: GatesConfig) -> GateResult:
    """One gate's result from its measurement (None: not measured) and the config."""
    limit = config.threshold(gate)
    if limit is None:
        return GateResult(gate, "disabled", None, None, None, None,
                          f"disabled in the config ({THRESHOLD_FIELD[gate]}: null)")
    if m is None:
        return GateResult(gate, "skipped", None, None, None, None, "not measured")
    if m.error is not None:
        return GateResult(gate, "error", m.value, None, m.baseline, False, f"could not be measured: {m.error}", m.info)
    if m.skipped is not None:
        return GateResult(gate, "skipped", None, None, m.baseline, None, m.skipped, m.info)
    threshold, passed, detail = _bound(gate, m, limit)  # NaN compares false: a NaN value fails
    return GateResult(gate, "passed" if passed else "failed", m.value, threshold, m.baseline, passed, detail, m.info)


def decide(measurements: Mapping[str, Measurement], config: GatesConfig) -> GateReport:
    """The promotion decision over measured numbers: one GateResult per gate, the overall verdict, reasons."""
    results = [decide_gate(gate, measurements.get(gate), config) for gate in GATES]
    reasons = [f"{r.name}: {r.detail}" for r in results if r.status in ("failed", "error")]
    if config.strict:
        reasons += [f"{r.name}: skipped ({r.detail}) and gates are strict" for r in results if r.status == "skipped"]
    enabled = [r for r in results if r.status != "disabled"]
    if enabled and all(r.status == "skipped" for r in enabled):
        reasons.append("no enabled gate could be evaluated: "
                       + "; ".join(f"{r.name}: {r.detail}" for r in enabled))
    return GateReport(results, not reasons, reasons, config_to_dict(config))


# -- the measurements ---------------------------------------------------------------------------------

def _no_data(path: PathLike | None, what: str) -> str | None:
    """Why the file cannot evaluate a gate (None given, or no records), else None. A named file that
    does not exist is left to the measurement, where it is an error: the caller meant to give one."""
    if path is None:
        return f"no {what} file given"
    path = Path(path)
    if path.is_file() and not any(line.strip() for line in path.open(encoding="utf-8")):
        return f"no records in {path}"
    return None


def _measure(gate: str, fn: Callable[[], Measurement]) -> Measurement:
    """Run one gate's measurement; bad input or a bad checkpoint becomes the gate's error, with its message."""
    log.info("gate %s: measuring", gate)
    start = time.perf_counter()
    try:
        m = fn()
    except (ValueError, OSError) as e:  # DatasetError / ConfigError are ValueErrors; checksum mismatch too
        log.warning("gate %s: could not be measured: %s", gate, e, exc_info=True)
        m = Measurement(error=f"{type(e).__name__}: {e}")
    m.info.setdefault("seconds", round(time.perf_counter() - start, 3))
    log.info("gate %s: %s", gate, m.skipped or m.error or f"value {m.value} (baseline {m.baseline})")
    return m


def measure_gates(candidate: PathLike, serving: PathLike, reference: PathLike | None,
                  candidate_rm: PathLike | None, current_rm: PathLike | None, *, rm_heldout: PathLike | None = None,
                  prompts: PathLike | None = None, ptx: PathLike | None = None,
                  config: GatesConfig | None = None) -> dict[str, Measurement]:
    """Measure every enabled gate (disabled ones cost nothing); see `evaluate_gates` for the arguments."""
    config = config or GatesConfig()
    run = dict(device=config.device, dtype=config.dtype, too_long=config.too_long)
    answers = dict(limit=config.heldout_prompts, samples_per_prompt=config.samples_per_prompt,
                   max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed,
                   max_length=config.max_length, batch_size=config.batch_size, **run)
    judge = candidate_rm if candidate_rm is not None else current_rm

    def rm_accuracy() -> Measurement:
        if candidate_rm is None:
            return Measurement(skipped="the reward model was not refreshed in this run (no candidate RM)")
        if (why := _no_data(rm_heldout, "held-out rankings (rm)")) is not None:
            return Measurement(skipped=why)
        new = rm_heldout_accuracy(candidate_rm, rm_heldout, config.max_length, batch_size=config.batch_size, **run)
        info = {"pairs": new.pairs, "groups": new.groups}
        if current_rm is None:
            return Measurement(new.accuracy, CHANCE_ACCURACY, info={**info, "baseline": "chance"})
        old = rm_heldout_accuracy(current_rm, rm_heldout, config.max_length, batch_size=config.batch_size, **run)
        return Measurement(new.accuracy, old.accuracy, info={**info, "baseline": "current_rm"})

    def win() -> Measurement:
        if judge is None:
            return Measurement(skipped="no trained reward model to judge with (no candidate RM, none serving)")
        if (why := _no_data(prompts, "held-out prompts")) is not None:
            return Measurement(skipped=why)
        result = win_rate(candidate, serving, judge, prompts, **answers)
        return Measurement(result.rate, info={**dataclasses.asdict(result), "judge": model_version_of(Path(judge))})

    def kl() -> Measurement:
        if reference is None:
            return Measurement(skipped="no SFT reference given")
        if (why := _no_data(prompts, "held-out prompts")) is not None:
            return Measurement(skipped=why)
        return Measurement(kl_to_reference(candidate, reference, prompts, **answers))

    def ptx_gate() -> Measurement:
        if (why := _no_data(ptx, "ptx text")) is not None:
            return Measurement(skipped=why)
        new = ptx_loss(candidate, ptx, config.max_length, config.batch_size, **run)
        return Measurement(new, ptx_loss(serving, ptx, config.max_length, config.batch_size, **run))

    steps = {"rm_accuracy": rm_accuracy, "win_rate": win, "kl": kl, "ptx": ptx_gate}
    return {gate: _measure(gate, steps[gate]) for gate in GATES if config.threshold(gate) is not None}


def evaluate_gates(candidate: PathLike, serving: PathLike, reference: PathLike | None,
                   candidate_rm: PathLike | None, current_rm: PathLike | None, *, rm_heldout: PathLike | None = None,
                   prompts: PathLike | None = None, ptx: PathLike | None = None,
                   config: GatesConfig | None = None) -> GateReport:
    """Measure and decide whether `candidate` may replace `serving`.

    Args:
        candidate: the candidate policy checkpoint (this run's PPO/DPO/SFT result).
        serving: the policy checkpoint serving now (the win-rate opponent and the ptx baseline).
        reference: the SFT reference checkpoint of the KL budget; None skips the kl gate.
        candidate_rm: this run's refreshed reward checkpoint, or None when the RM was not refreshed.
        current_rm: the trained reward checkpoint serving now, or None (first run: no trained RM yet).
        rm_heldout: held-out rankings (rm.heldout.jsonl); prompts: held-out prompts
            (prompts.heldout.jsonl); ptx: ptx text (ptx.train.jsonl or a held-out one). None or a file
            without records skips the gates that need it.
        config: thresholds and sampling; GatesConfig() defaults when None.

    Returns:
        GateReport (`.passed`, `.reasons`, `.to_dict()` for the store). Logs each gate's progress.
    """
    config = config or GatesConfig()
    start = time.perf_counter()
    log.info("evaluating promotion gates for %s against %s", candidate, serving)
    report = decide(measure_gates(candidate, serving, reference, candidate_rm, current_rm, rm_heldout=rm_heldout,
                                  prompts=prompts, ptx=ptx, config=config), config)
    checkpoints = {"candidate": candidate, "serving": serving, "reference": reference, "candidate_rm": candidate_rm,
                   "current_rm": current_rm}
    report.models = {k: _version(p) for k, p in checkpoints.items()}
    report.seconds = round(time.perf_counter() - start, 3)
    log.info("promotion gates: %s", report.summary())
    return report


def _version(path: PathLike | None) -> str | None:
    if path is None:
        return None
    try:
        return model_version_of(Path(path))
    except OSError:  # a missing checkpoint is already an error of the gates that needed it
        return None
