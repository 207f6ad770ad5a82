"""Several model versions in one engine: hot swap under load, canary split, forced versions, the
checks on adding and routing versions, failure isolation between versions, and swapping the reward
model. Two tiny checkpoints with different weights (seeds 0 and 1) stand for the serving policy and a
newly promoted one; a GPT-2 whose position table is too short for its requests is a broken one."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import logging
import math
import threading
import weakref

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from feedback import topics
from protos.feedloop.v1 import events_pb2
from serving.engine.local import LocalEngineClient, LocalRewardClient
from serving.engine.types import Routing, SamplingParams
from serving.engine.engine import LaneFailed
from serving.errors import GenerationError, UnknownModelVersion, ValidationError
from serving.metrics import ServingMetrics
from serving.models import load_policy, load_reward
from serving.services.generation import GenerationService
from serving.services.recorder import EventRecorder, RecorderMetrics
from tests.deployment.gateway import make_short_context_checkpoint
from tests.fakes import MemoryPublisher
from tests.tiny import make_tiny_checkpoint

PROMPTS = [f"Request {i}: tell me about the number {i}." + " Go on." * (i % 4) for i in range(8)]
LONGEST = 24  # max_new_tokens of any request here


@pytest.fixture(scope="module")
def new_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama-new", seed=1)


@pytest.fixture(scope="module")
def expected(tiny_model_dir, new_model_dir):
    """{version: {prompt: greedy tokens of HF generate (LONGEST new tokens, or up to eos)}}, each
    from a separate copy of the model that keeps HF's own attention."""
    table = {}
    for path in (tiny_model_dir, new_model_dir):
        ref = load_policy(path, device="cpu")
        table[ref.model_version] = {}
        for prompt in PROMPTS:
            ids = torch.tensor([ref.tokenizer.encode(prompt, add_special_tokens=False)])
            out = ref.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=LONGEST,
                                     do_sample=False)
            table[ref.model_version][prompt] = out[0, ids.shape[1]:].tolist()
    old, new = table.values()
    assert sum(old[p][:4] != new[p][:4] for p in PROMPTS) >= 6  # the versions answer differently
    return table


def _client(policy, **limits) -> LocalEngineClient:
    return LocalEngineClient(policy, max_input_tokens=512, max_total_tokens=1024, **limits)


def _service(client) -> tuple[GenerationService, MemoryPublisher, EventRecorder]:
    registry = CollectorRegistry()
    publisher = MemoryPublisher()
    recorder = EventRecorder(publisher, RecorderMetrics(registry))
    return GenerationService(client, ServingMetrics(registry), recorder), publisher, recorder


def _recorded_versions(publisher, recorder) -> dict[str, str]:
    """completion_id → model_version of the CompletionServed events published."""
    assert recorder.close()
    events = [events_pb2.CompletionServed.FromString(v) for _, v, _ in publisher.on(topics.COMPLETIONS)]
    return {e.completion_id: e.model_version for e in events}


async def _until(condition, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


async def test_hot_swap_under_load_fails_nothing_and_never_mixes_versions(tiny_model_dir, new_model_dir, expected,
                                                                         caplog):
    """10 client loops keep the engine full (batch of 8, so some wait) while a new version is added
    and routed: no request fails, each request's tokens are exactly its version's greedy tokens,
    requests queued before the switch run on the old weights and later ones on the new, and the old
    lane is unloaded (its model freed) once drained."""
    caplog.set_level(logging.INFO, logger="serving.engine.engine")
    old = load_policy(tiny_model_dir, device="cpu")
    old_version, old_model = old.model_version, weakref.ref(old.model)
    new = load_policy(new_model_dir, device="cpu")
    client = _client(old, max_batch_size=8, max_queue=64)
    del old  # from here on only the engine holds the old weights
    service, publisher, recorder = _service(client)
    results, failures = [], []
    state = {"swapped": False, "stop": False}

    async def loop(i: int) -> None:
        k = 0
        while not state["stop"]:
            prompt, n = PROMPTS[(i + k) % len(PROMPTS)], 6 + (3 * i + 5 * k) % (LONGEST - 5)
            after_swap = state["swapped"]  # nothing awaits between this and the request being queued
            try:
                c = await service.complete(prompt, SamplingParams(max_new_tokens=n))
            except Exception as exc:  # any failure is the test's failure
                failures.append(repr(exc))
                return
            results.append(dict(loop=i, prompt=prompt, n=n, submitted_after_swap=after_swap,
                                finished_after_swap=state["swapped"], completion=c))
            k += 1

    def done_per_loop(after: bool) -> list[int]:
        return [sum(r["loop"] == i and r["submitted_after_swap"] == after for r in results) for i in range(10)]

    await client.start()
    try:
        loops = [asyncio.ensure_future(loop(i)) for i in range(10)]
        await _until(lambda: min(done_per_loop(False)) >= 2 or failures)
        assert client.add_version(new) == new.model_version
        assert client.add_version(new) == new.model_version  # already loaded: nothing changes
        assert client.versions()[new.model_version] == {"running": 0, "waiting": 0, "share": 0.0}
        in_flight = client.versions()[old_version]
        client.set_routing(Routing(serving=new.model_version))
        state["swapped"] = True
        assert client.model_version == new.model_version
        assert in_flight["running"] + in_flight["waiting"] > 0  # the swap happened under load
        await _until(lambda: min(done_per_loop(True)) >= 2 or failures)
        state["stop"] = True
        await asyncio.gather(*loops)
        assert failures == []
        await _until(lambda: old_version not in client.versions())
    finally:
        await client.stop()

    before = [r for r in results if not r["submitted_after_swap"]]
    after = [r for r in results if r["submitted_after_swap"]]
    assert {r["completion"].model_version for r in before} == {old_version}
    assert {r["completion"].model_version for r in after} == {new.model_version}
    assert any(r["finished_after_swap"] for r in before)  # some old requests finished after the switch
    for r in results:  # tokens all from the weights the request reports
        c = r["completion"]
        assert [t.id for t in c.tokens] == expected[c.model_version][r["prompt"]][: r["n"]], r
    recorded = _recorded_versions(publisher, recorder)
    assert all(recorded[r["completion"].completion_id] == r["completion"].model_version for r in results)
    assert service.metrics.requests.labels(old_version, "ok")._value.get() == len(before)
    assert service.metrics.requests.labels(new.model_version, "ok")._value.get() == len(after)
    assert list(client.versions()) == [new.model_version]
    assert any(f"model version {old_version} unloaded" in m for m in caplog.messages)
    gc.collect()
    assert old_model() is None  # the old weights were released


async def test_canary_takes_its_share_and_forced_versions_run_where_asked(tiny_policy, new_model_dir, expected):
    new = load_policy(new_model_dir, device="cpu")
    client = _client(tiny_policy, max_batch_size=16, max_queue=256)
    old_version = tiny_policy.model_version
    service, publisher, recorder = _service(client)
    await client.start()
    try:
        client.add_version(new)
        client.set_routing(Routing(serving=old_version, canary=new.model_version, canary_percent=25))
        assert client.versions() == {old_version: {"running": 0, "waiting": 0, "share": 75.0},
                                     new.model_version: {"running": 0, "waiting": 0, "share": 25.0}}
        assert client.info().model_version == old_version
        assert client.info().extra["routing"] == {"serving": old_version, "canary": new.model_version,
                                                  "canary_percent": 25}
        params = SamplingParams(max_new_tokens=2)
        answers = await asyncio.gather(*[service.complete(PROMPTS[i % 8], params) for i in range(200)])
        on_canary = sum(a.model_version == new.model_version for a in answers)
        assert abs(on_canary - 50) <= 4 * math.sqrt(200 * 0.25 * 0.75)  # binomial(200, 0.25) ± 4σ
        for i, a in enumerate(answers):
            assert [t.id for t in a.tokens] == expected[a.model_version][PROMPTS[i % 8]][:2]

        # a named version runs there whatever the routing says
        forced = await asyncio.gather(*[service.complete(PROMPTS[i], params, model_version=new.model_version)
                                        for i in range(8)])
        assert {a.model_version for a in forced} == {new.model_version}
        stream = await service.stream(PROMPTS[0], params, model_version=old_version)
        assert stream.model_version == old_version
        assert [o.model_version async for o in stream] == [old_version, old_version]

        # an unknown one is refused before anything is queued
        with pytest.raises(UnknownModelVersion, match="'nope' is not loaded here; loaded: "):
            await service.complete(PROMPTS[0], params, model_version="nope")
        assert isinstance(UnknownModelVersion("x"), ValidationError)  # → 422 / INVALID_ARGUMENT
        assert client.stats()["queue_size"] == 0

        # ending the canary unloads it once drained; the serving version stays
        client.set_routing(Routing(serving=old_version))
        await _until(lambda: list(client.versions()) == [old_version])
    finally:
        await client.stop()
    recorded = _recorded_versions(publisher, recorder)
    assert all(recorded[a.completion_id] == a.model_version for a in answers + forced)


async def test_a_broken_version_fails_only_its_own_requests(tiny_model_dir, tmp_path, expected, caplog):
    """A 50 % canary on a version that really fails (a GPT-2 with 12 position rows: prompts longer
    than that fail in their prefill, the 12-token one in its first decode step), under concurrent
    load that keeps both lanes in the same steps: every request routed to the serving version
    succeeds with exactly its tokens, every one routed to the broken version fails with a
    GenerationError naming that version, and each failure is counted under the version it ran on."""
    caplog.set_level(logging.INFO, logger="serving.engine.engine")
    old = load_policy(tiny_model_dir, device="cpu")
    broken = load_policy(make_short_context_checkpoint(tmp_path / "short-context"), device="cpu")
    lengths = {p: len(old.tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS}
    assert min(lengths.values()) == 12 and max(lengths.values()) > 12  # decode and prefill failures
    client = _client(old, max_batch_size=16, max_queue=256)
    service, publisher, recorder = _service(client)
    await client.start()
    try:
        client.add_version(broken)
        client.set_routing(Routing(old.model_version, canary=broken.model_version, canary_percent=50))
        jobs = [(PROMPTS[i % 8], 12 + i % 13) for i in range(64)]
        answers = await asyncio.gather(*[service.complete(p, SamplingParams(max_new_tokens=n)) for p, n in jobs],
                                       return_exceptions=True)
        ok = [(job, a) for job, a in zip(jobs, answers) if not isinstance(a, BaseException)]
        failed = [a for a in answers if isinstance(a, BaseException)]
        assert len(ok) >= 10 and len(failed) >= 10, (len(ok), failed[:3])  # binomial(64, 0.5)
        for (prompt, n), a in ok:
            assert a.model_version == old.model_version
            assert [t.id for t in a.tokens] == expected[old.model_version][prompt][:n]
        for exc in failed:
            assert isinstance(exc, LaneFailed) and isinstance(exc, GenerationError), repr(exc)
            assert exc.model_version == broken.model_version and "IndexError" in str(exc)
        # both kinds of failure happened, while the serving version had requests in the same steps
        assert any(f"{broken.model_version} failed its prefill" in m for m in caplog.messages)
        assert any(f"{broken.model_version} failed its decode" in m for m in caplog.messages)

        outcomes = service.metrics.request_outcomes
        assert outcomes(old.model_version) == {"ok": len(ok)}
        assert outcomes(broken.model_version) == {"error": len(failed)}  # not "rejected", not the serving one's

        # the engine goes on: the broken lane is withdrawn and dropped, the serving one answers
        client.set_routing(Routing(old.model_version))
        after = await service.complete(PROMPTS[0], SamplingParams(max_new_tokens=8))
        assert [t.id for t in after.tokens] == expected[old.model_version][PROMPTS[0]][:8]
        await _until(lambda: list(client.versions()) == [old.model_version])
        assert client.stats()["batch_size"] == 0 and client.stats()["queue_size"] == 0
    finally:
        await client.stop()
    recorded = _recorded_versions(publisher, recorder)
    assert set(recorded.values()) == {old.model_version}  # failed answers are not recorded
    assert len(recorded) == len(ok) + 1


async def test_a_version_broken_mid_swap_fails_none_of_the_old_versions_requests(tiny_model_dir, tmp_path,
                                                                                 expected):
    """The old version's requests in flight when a broken version is promoted all finish on the old
    weights, although the new version's requests fail (in prefill and in decode) during their run."""
    old = load_policy(tiny_model_dir, device="cpu")
    broken = load_policy(make_short_context_checkpoint(tmp_path / "short-context"), device="cpu")
    client = _client(old, max_batch_size=16, max_queue=256)
    service, _, _ = _service(client)
    await client.start()
    try:
        client.add_version(broken)
        long = SamplingParams(max_new_tokens=400)  # still decoding when the new version's requests fail
        before = [asyncio.ensure_future(service.complete(PROMPTS[i % 8], long)) for i in range(8)]
        await _until(lambda: client.versions()[old.model_version]["running"] == 8)
        client.set_routing(Routing(broken.model_version))  # promoted while the old requests decode
        short = SamplingParams(max_new_tokens=16)
        later = await asyncio.gather(*[service.complete("Hello there", short) for _ in range(4)],
                                     *[service.complete(PROMPTS[1], short) for _ in range(4)],
                                     return_exceptions=True)
        assert all(isinstance(e, LaneFailed) and e.model_version == broken.model_version for e in later), later
        assert client.versions()[old.model_version]["running"] == 8  # the failures came mid-way
        done = await asyncio.gather(*before)
    finally:
        await client.stop()
    for i, c in enumerate(done):
        assert c.model_version == old.model_version
        assert [t.id for t in c.tokens][:LONGEST] == expected[old.model_version][PROMPTS[i % 8]]
    assert service.metrics.request_outcomes(old.model_version) == {"ok": 8}
    assert service.metrics.request_outcomes(broken.model_version) == {"error": 8}


async def test_incompatible_versions_and_unknown_routes_are_refused(tiny_policy, new_model_dir):
    client = _client(tiny_policy)
    new = load_policy(new_model_dir, device="cpu")
    other_eos = dataclasses.replace(new, eos_token_ids=(7,))
    with pytest.raises(ValueError, match=r"eos token ids are \[7\].*must use the serving version's tokenizer"):
        client.add_version(other_eos)
    bigger = AutoTokenizer.from_pretrained(new_model_dir)
    bigger.add_tokens(["<feedloop-extra>"])
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens, the serving one \d+"):
        client.add_version(dataclasses.replace(new, tokenizer=bigger))
    assert list(client.versions()) == [tiny_policy.model_version]  # nothing was added

    with pytest.raises(KeyError, match="'not-loaded'.* not loaded"):
        client.set_routing(Routing(serving="not-loaded"))
    with pytest.raises(KeyError, match="not loaded"):
        client.set_routing(Routing(serving=tiny_policy.model_version, canary="not-loaded", canary_percent=5))
    assert client.routing == Routing(serving=tiny_policy.model_version)

    with pytest.raises(ValidationError, match="between 0 and 100"):
        Routing("a", "b", 101)
    with pytest.raises(ValidationError, match="between 0 and 100"):
        Routing("a", "b", float("nan"))
    with pytest.raises(ValidationError, match="needs a `canary`"):
        Routing("a", None, 10)
    with pytest.raises(ValidationError, match="must differ"):
        Routing("a", "a", 10)
    assert Routing("a", "b", 0).pick(0.0) == "a" and Routing("a", "b", 100).pick(0.999) == "b"


async def test_reward_swap_new_calls_score_with_the_new_model_and_queued_ones_keep_theirs(tiny_policy,
                                                                                          new_model_dir):
    first = load_reward(None, tiny_policy, device="cpu")
    second = load_reward(None, load_policy(new_model_dir, device="cpu"), device="cpu")
    pairs = [("What is 2+2?", "4"), ("Name a colour.", "Blue, like the sky.")]
    worker = concurrent.futures.ThreadPoolExecutor(1)  # stands for the engine thread's job queue
    try:
        expected = {}
        for reward in (first, second):
            alone = LocalRewardClient(reward, run_job=worker.submit)
            expected[reward.model_version] = (await alone.score(pairs)).scores
        assert expected[first.model_version] != pytest.approx(expected[second.model_version], abs=1e-3)

        client = LocalRewardClient(first, run_job=worker.submit)
        gate = threading.Event()
        worker.submit(gate.wait)  # the worker is busy: the next call waits in the queue
        queued = asyncio.ensure_future(client.score(pairs))
        await asyncio.sleep(0)  # the call is submitted (with the model it captured)
        assert client.swap(second) == first.model_version
        gate.set()
        before = await queued
        after = await client.score(pairs)
    finally:
        worker.shutdown()
    assert (before.model_version, before.scores) == (first.model_version, expected[first.model_version])
    assert (after.model_version, after.scores) == (second.model_version, expected[second.model_version])
    assert client.model_version == second.model_version
