"""The one slow test: the real bundled SmolLM2, dequantised from its GGUF, served by the engine."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from serving.checkpoint import verify_checkpoint
from serving.engine.local import LocalEngineClient
from serving.engine.types import SamplingParams
from serving.models import ensure_bundled_model, load_policy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    path = ensure_bundled_model(data_dir)
    return data_dir, path


def test_dequantised_once_cached_and_intact(bundled):
    data_dir, path = bundled
    assert (path / "model.safetensors").exists() and (path / "manifest.json").exists()
    assert verify_checkpoint(path) == []
    mtime = (path / "model.safetensors").stat().st_mtime
    start = time.perf_counter()
    assert ensure_bundled_model(data_dir) == path
    assert time.perf_counter() - start < 1.0  # reused, not dequantised again
    assert (path / "model.safetensors").stat().st_mtime == mtime


async def test_real_model_answers_and_matches_hf_generate_in_a_batch(bundled):
    _, path = bundled
    policy = load_policy(path, device="cpu")
    reference = load_policy(path, device="cpu")  # HF's own attention (the engine switches its copy's)
    assert policy.model_version.startswith("smollm2-135m-instruct-")
    client = LocalEngineClient(policy, max_batch_size=8)
    await client.start()
    try:
        questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
                     "Say hello in Spanish."]
        prompts = [client.render_chat([{"role": "user", "content": q}]) for q in questions]

        async def run(p):
            outs = [o async for o in client.generate(p, SamplingParams(max_new_tokens=16), "t")]
            return [o.token.id for o in outs], outs[-1]

        together = await asyncio.gather(*[run(p) for p in prompts])
        assert "Paris" in together[0][1].generated_text
        for prompt, (ids, _) in zip(prompts, together):
            enc = torch.tensor([reference.tokenizer.encode(prompt, add_special_tokens=False)])
            assert reference.model.config._attn_implementation == "sdpa"
            ref = reference.model.generate(enc, attention_mask=torch.ones_like(enc), max_new_tokens=16, do_sample=False)
            assert ids == ref[0, enc.shape[1]:].tolist()
    finally:
        await client.stop()
