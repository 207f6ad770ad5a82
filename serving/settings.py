"""One typed settings object for the gateway: environment variables (FEEDLOOP_*) and CLI flags."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.paths import default_data_dir


class ServingSettings(BaseSettings):
    """Everything `feedloop serve` reads. Flags override environment variables."""

    model_config = SettingsConfigDict(env_prefix="FEEDLOOP_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir, description="All feedloop writes go under here.")
    model: str | None = Field(None, description="Policy checkpoint directory (HF format). None: the bundled SmolLM2.")
    reward_model: str | None = Field(
        None, description="Reward checkpoint directory (sequence-classification head, 1 label). "
        "None: an untrained one initialised from the policy.")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    grpc_port: int | None = Field(50051, ge=0, le=65535, description="None disables gRPC.")
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    dtype: str = Field("auto", description="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16")
    max_batch_size: int = Field(32, ge=1, description="Requests decoded together in one step.")
    max_queue: int = Field(128, ge=0, description="Waiting requests beyond the running batch; more get 429.")
    max_input_tokens: int = Field(2048, ge=1)
    max_total_tokens: int = Field(4096, ge=2, description="Prompt + generated tokens per request.")
    max_new_tokens_default: int = Field(100, ge=1, description="When a request does not say.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Bigger request bodies get 413.")
    max_score_batch: int = Field(64, ge=1, description="Most (prompt, response) pairs in one /v1/score call.")
    kafka: str | None = Field(None, description="Kafka bootstrap servers (host:port[,host:port]); "
                              "None: the embedded local log under the data directory.")
    database_url: str | None = Field(None, description="sqlite:///… or postgresql://…; "
                                     "None: SQLite at <data_dir>/feedloop.db.")
    served_model_name: str | None = Field(None, description="Name in /v1/models; default: the model directory's name.")
    # Deployments (serving/deployment.py): the registry in the store says which versions to serve.
    poll_interval: float = Field(1.0, gt=0, description="Seconds between reads of the registry's deployments.")
    rollback_min_requests: int = Field(20, ge=1, description="Finished requests a newly deployed version "
                                       "serves before its error rate can roll it back (one window).")
    rollback_error_rate: float = Field(0.05, ge=0, le=1, description="A newly deployed version whose "
                                       "failed share of a window exceeds this is rolled back.")
    admin_token: str | None = Field(None, description="When set, /v1/admin/* require "
                                    "`Authorization: Bearer <token>`; None: the admin routes are open.")
    # Upstreams (serving/upstreams/): generation and scoring on other servers instead of in-process.
    upstreams: str | None = Field(None, description="JSON (or @file.json) naming the policy/reward "
                                  "upstreams (serving/upstreams/config.py); None: the models run in-process.")
    leader_lease_ttl: float = Field(15.0, gt=0, description="Upstream mode with a store: seconds the "
                                    "`fleet-rollouts` lease lasts (one gateway reloads the workers; "
                                    "serving/leadership.py).")
    worker_role: str = Field("policy", description="`feedloop worker`: policy | reward.")


def bus_url(settings: "ServingSettings") -> str:
    """The bus URL the factories take: `kafka://servers` or `local`."""
    if settings.kafka:
        return settings.kafka if settings.kafka.startswith("kafka://") else f"kafka://{settings.kafka}"
    return "local"


def database_url(settings: "ServingSettings") -> str:
    return settings.database_url or f"sqlite:///{settings.data_dir / 'feedloop.db'}"
