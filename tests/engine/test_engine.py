"""The in-process engine against HF `generate` and its own contracts (seed, stop, cancel, queue)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from serving.engine.local import LocalEngineClient
from serving.engine.types import SamplingParams
from serving.errors import Overloaded, PromptTooLong

PROMPTS = [f"Question {i}: what comes after {i}?" + " Think about it." * (i % 5) for i in range(16)]


async def _tokens(client, prompt, params):
    outs = [o async for o in client.generate(prompt, params, "t")]
    return [o.token.id for o in outs], outs


def _hf_greedy(policy, prompt, max_new_tokens):
    assert policy.model.config._attn_implementation == "sdpa"  # HF's own attention, untouched
    ids = torch.tensor([policy.tokenizer.encode(prompt, add_special_tokens=False)])
    out = policy.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False)
    return out[0, ids.shape[1]:].tolist()


async def test_continuous_batching_parity_with_hf_generate(tiny_services, reference_policy):
    """16 concurrent greedy requests of different lengths: each gives exactly the tokens it gives
    alone, and the tokens HF generate gives."""
    engine = tiny_services.engine
    lengths = [8 + 3 * i for i in range(16)]
    alone = [(await _tokens(engine, p, SamplingParams(max_new_tokens=n)))[0] for p, n in zip(PROMPTS, lengths)]
    together = await asyncio.gather(*[_tokens(engine, p, SamplingParams(max_new_tokens=n))
                                      for p, n in zip(PROMPTS, lengths)])
    hf = [_hf_greedy(reference_policy, p, n) for p, n in zip(PROMPTS, lengths)]
    assert [t for t, _ in together] == alone
    assert alone == hf
    assert len({len(a) for a in alone}) > 4  # the requests really left the batch at different steps


async def test_staggered_arrivals_join_running_batch(tiny_services, reference_policy):
    """Requests arriving while others decode join between steps and still match HF."""
    engine = tiny_services.engine

    async def late(i):
        await asyncio.sleep(0.01 * i)
        return (await _tokens(engine, PROMPTS[i], SamplingParams(max_new_tokens=20)))[0]

    got = await asyncio.gather(*[late(i) for i in range(8)])
    assert got == [_hf_greedy(reference_policy, PROMPTS[i], 20) for i in range(8)]


async def test_logprobs_equal_log_softmax_of_a_full_forward(tiny_services, reference_policy):
    ids, outs = await _tokens(tiny_services.engine, PROMPTS[3], SamplingParams(max_new_tokens=12))
    prompt = reference_policy.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    full = torch.tensor([prompt + ids])
    with torch.no_grad():
        logits = reference_policy.model(full).logits[0, len(prompt) - 1:-1]
    ref = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([o.token.logprob for o in outs]), ref, atol=1e-4)


async def test_seed_reproducible_alone_and_in_a_batch(tiny_services):
    engine = tiny_services.engine
    params = SamplingParams(max_new_tokens=24, do_sample=True, temperature=1.2, top_k=50, top_p=0.95, seed=42)
    first, outs = await _tokens(engine, PROMPTS[0], params)
    crowd = [_tokens(engine, p, SamplingParams(max_new_tokens=24, do_sample=True)) for p in PROMPTS[1:8]]
    again, *_ = await asyncio.gather(_tokens(engine, PROMPTS[0], params), *crowd)
    assert again[0] == first
    assert outs[-1].seed == 42
    other, _ = await _tokens(engine, PROMPTS[0], SamplingParams(max_new_tokens=24, do_sample=True,
                                                                temperature=1.2, seed=7))
    assert other != first


async def test_unseeded_sampling_reports_the_seed_that_reproduces_it(tiny_services):
    engine = tiny_services.engine
    ids, outs = await _tokens(engine, PROMPTS[1], SamplingParams(max_new_tokens=16, do_sample=True))
    seed = outs[-1].seed
    assert seed is not None
    again, _ = await _tokens(engine, PROMPTS[1], SamplingParams(max_new_tokens=16, do_sample=True, seed=seed))
    assert again == ids


async def test_stop_sequence_ends_generation_and_is_included(tiny_services):
    engine = tiny_services.engine
    _, outs = await _tokens(engine, PROMPTS[2], SamplingParams(max_new_tokens=40, ignore_eos=True))
    full = outs[-1].generated_text
    assert len(full) > 20
    stop = full[10:14]
    cut = full.index(stop) + len(stop)
    _, outs = await _tokens(engine, PROMPTS[2], SamplingParams(max_new_tokens=40, ignore_eos=True, stop=(stop,)))
    last = outs[-1]
    assert last.finish_reason == "stop_sequence"
    assert last.generated_text == full[:cut]
    assert "".join(o.text for o in outs) == last.generated_text


async def test_streamed_deltas_add_up_to_generated_text(tiny_services):
    _, outs = await _tokens(tiny_services.engine, PROMPTS[5], SamplingParams(max_new_tokens=30))
    assert "".join(o.text for o in outs) == outs[-1].generated_text
    assert outs[-1].finish_reason in ("length", "eos_token")
    assert all(o.finish_reason is None for o in outs[:-1])


async def test_prompt_over_the_input_limit_is_refused(tiny_services):
    with pytest.raises(PromptTooLong, match="less than 512 tokens"):
        await _tokens(tiny_services.engine, "word " * 600, SamplingParams(max_new_tokens=4))
    with pytest.raises(PromptTooLong, match="max_new_tokens"):
        await _tokens(tiny_services.engine, "hello", SamplingParams(max_new_tokens=1024))


async def _until(condition, timeout=2.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


async def test_cancellation_frees_the_slot_and_full_queue_answers_overloaded(tiny_policy):
    client = LocalEngineClient(tiny_policy, max_batch_size=2, max_queue=0)
    await client.start()
    try:
        long = SamplingParams(max_new_tokens=1000, ignore_eos=True)
        streams = [client.generate(PROMPTS[i], long, f"r{i}") for i in range(2)]
        for s in streams:
            await s.__anext__()
        await _until(lambda: client.stats()["batch_size"] == 2)  # both are running now
        with pytest.raises(Overloaded):
            await client.generate(PROMPTS[3], long, "r3").__anext__()
        await streams[0].aclose()  # the client went away
        await _until(lambda: client.stats()["batch_size"] == 1)
        ids, outs = await _tokens(client, PROMPTS[4], SamplingParams(max_new_tokens=5, ignore_eos=True))
        assert len(ids) == 5 and outs[-1].finish_reason == "length"
        await streams[1].aclose()
    finally:
        await client.stop()


async def test_reward_scores_do_not_depend_on_batch_padding(tiny_services):
    pairs = [("What is 2+2?", "4"), ("Name a colour.", "Blue, like the sky on a clear day."),
             ([{"role": "user", "content": "hi"}], "hello there")]
    together = await tiny_services.reward.score(pairs)
    alone = [(await tiny_services.reward.score([p])).scores[0] for p in pairs]
    assert together.scores == pytest.approx(alone, abs=1e-4)
    assert len(set(round(s, 4) for s in alone)) == 3
    assert tiny_services.reward.trained is False
    assert together.model_version.endswith("-rm-untrained")


@pytest.mark.parametrize("knobs", [dict(temperature=1.3, top_k=20, top_p=0.9), dict(temperature=0.8, top_k=0, top_p=1.0),
                                   dict(temperature=1.0, top_k=5, top_p=1.0, repetition_penalty=1.3)])
async def test_seeded_sampling_equals_hf_generate_with_the_same_seed(tiny_services, reference_policy, knobs):
    """Same processors in the same order as HF (repetition penalty, temperature, top-k, top-p) and
    one multinomial draw per token from a generator seeded like torch.manual_seed."""
    params = SamplingParams(max_new_tokens=16, do_sample=True, seed=3,
                            top_k=knobs["top_k"] or None, top_p=knobs["top_p"], temperature=knobs["temperature"],
                            repetition_penalty=knobs.get("repetition_penalty"))
    ids, _ = await _tokens(tiny_services.engine, PROMPTS[6], params)
    enc = torch.tensor([reference_policy.tokenizer.encode(PROMPTS[6], add_special_tokens=False)])
    torch.manual_seed(3)
    ref = reference_policy.model.generate(enc, attention_mask=torch.ones_like(enc), do_sample=True, max_new_tokens=16,
                                          **knobs)
    assert ids == ref[0, enc.shape[1]:].tolist()
