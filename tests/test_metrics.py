"""Prometheus metrics of generation, by model version, from the real engine."""
from __future__ import annotations

import asyncio

from serving.engine.types import SamplingParams


async def test_generation_metrics_by_model_version(tiny_services):
    s = tiny_services
    version = s.engine.model_version
    reg = s.metrics.registry

    def value(name, **labels):
        return reg.get_sample_value(name, {"model_version": version, **labels}) or 0.0

    before = {n: value(n) for n in ("feedloop_time_to_first_token_seconds_count",
                                    "feedloop_generated_tokens_sum", "feedloop_prompt_tokens_sum",
                                    "feedloop_request_duration_seconds_count",
                                    "feedloop_time_per_output_token_seconds_count")}
    ok_before = value("feedloop_requests_total", outcome="ok")
    done = await asyncio.gather(*[s.generation.complete(f"count to {i}", SamplingParams(max_new_tokens=6 + i,
                                                                                          ignore_eos=True))
                                  for i in range(3)])
    assert value("feedloop_time_to_first_token_seconds_count") - before["feedloop_time_to_first_token_seconds_count"] == 3
    assert value("feedloop_request_duration_seconds_count") - before["feedloop_request_duration_seconds_count"] == 3
    assert value("feedloop_time_per_output_token_seconds_count") - before["feedloop_time_per_output_token_seconds_count"] == 3
    assert value("feedloop_generated_tokens_sum") - before["feedloop_generated_tokens_sum"] == 6 + 7 + 8
    assert value("feedloop_prompt_tokens_sum") - before["feedloop_prompt_tokens_sum"] == sum(
        s.engine.count_tokens(f"count to {i}") for i in range(3))
    assert value("feedloop_requests_total", outcome="ok") - ok_before == 3
    assert all(c.model_version == version for c in done)
    text = s.metrics.render().decode()
    assert "feedloop_queue_size 0.0" in text and "feedloop_batch_size" in text
