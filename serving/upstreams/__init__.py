"""Upstream inference servers behind the gateway's EngineClient / RewardClient interfaces.

`FEEDLOOP_UPSTREAMS` (serving/upstreams/config.py) names them; `build_services` then builds an
`UpstreamPool` (policy) and a `RewardUpstreamPool` (reward) instead of loading models here.
"""
from serving.upstreams.base import CircuitBreaker, Upstream
from serving.upstreams.config import UpstreamsConfig, UpstreamSpec, parse_upstreams
from serving.upstreams.pool import UpstreamPool
from serving.upstreams.reward import RewardUpstreamPool

__all__ = ["CircuitBreaker", "RewardUpstreamPool", "Upstream", "UpstreamPool", "UpstreamSpec", "UpstreamsConfig",
           "parse_upstreams"]
