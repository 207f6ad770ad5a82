"""The gateway's services when FEEDLOOP_UPSTREAMS is set: generation and scoring go to upstream pools;
no torch model is loaded here, only a tokenizer (chat templates, token counts)."""
from __future__ import annotations

import logging

from serving.services import Services
from serving.settings import ServingSettings
from serving.upstreams.config import UpstreamsConfig, parse_upstreams
from serving.upstreams.pool import UpstreamPool
from serving.upstreams.reward import NoReward, RewardUpstreamPool

log = logging.getLogger(__name__)


def load_tokenizer(config: UpstreamsConfig, settings: ServingSettings):
    """`tokenizer` from the config, else `--model`'s, else the bundled SmolLM2's (the default policy)."""
    source = config.tokenizer or settings.model
    if source:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source), source
    from serving.models import load_bundled_tokenizer

    return load_bundled_tokenizer(), "bundled smollm2"


def build_upstream_services(settings: ServingSettings, publisher=None, completion_lookup=None,
                            config: UpstreamsConfig | None = None) -> Services:
    config = config or parse_upstreams(settings.upstreams or "")
    tokenizer, source = load_tokenizer(config, settings)
    routing = config.routing.to_routing() if config.routing is not None else None
    engine = UpstreamPool.from_specs(config.policy, tokenizer, config.options, routing=routing,
                                     max_input_tokens=settings.max_input_tokens,
                                     max_total_tokens=settings.max_total_tokens,
                                     model_id=settings.served_model_name or "feedloop-upstreams")
    reward = RewardUpstreamPool(config.reward, config.options) if config.reward else NoReward()
    services = Services.build(settings, engine, reward, publisher=publisher, completion_lookup=completion_lookup)
    engine.register_metrics(services.metrics.registry)
    if isinstance(reward, RewardUpstreamPool):
        reward.register_metrics(services.metrics.registry)
    log.info("gateway in front of upstreams", extra={
        "fl_policy": [s.url for s in config.policy], "fl_reward": [s.url for s in config.reward],
        "fl_tokenizer": str(source)})
    return services
