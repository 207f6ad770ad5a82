"""The store's tables (SQLModel). The schema itself is created by the alembic migrations in
`migrations/versions/`; `tests/feedback/store/test_migrations.py` checks both stay identical.

Conventions:
- every event row has `event_id` UNIQUE (idempotent ingestion), `tenant`, `user_id`, `created_at`
  (the event's time, from the gateway's clock) and `ingested_at` (the store's clock: ingestion lag);
- the column is `user_id`, not `user`: `user` is reserved in Postgres, where `SELECT user FROM
  ratings` silently returns the session's role name;
- enums are short lower-case strings (`"a"`, `"length"`, `"candidate"`) checked by the code that
  writes them, so adding a value needs no migration.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import BigInteger, CheckConstraint, Column, ForeignKey, Index, LargeBinary, MetaData, String, Text
from sqlmodel import Field, SQLModel

from feedback.store.types import JSONDocument, UTCDateTime, utcnow

# Named constraints, so migrations can refer to them by name (SQLite batch mode needs names too).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MODEL_STATUSES = ("candidate", "canary", "serving", "rejected", "retired")
MODEL_ROLES = ("policy", "reward")
PREFERENCE_WINNERS = ("a", "b")  # a comparison's winners that say which answer is better
NO_PREFERENCE_WINNERS = ("tie", "both_bad")  # left out of the reward model's data
RUN_STATUSES = ("running", "succeeded", "canary", "promoted", "rejected", "failed")


class StoreModel(SQLModel):
    """Base of the store's tables: their own metadata, so nothing else declared with SQLModel in
    the process ends up in the store's schema."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created_at() -> Any:
    return Field(sa_column=Column(UTCDateTime(), nullable=False))


def _ingested_at() -> Any:
    return Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


def _completion_ref(nullable: bool = False) -> Any:
    return Field(sa_column=Column(String(128), ForeignKey("completions.completion_id"),
                                  nullable=nullable, index=True))


class Completion(StoreModel, table=True):
    """One served answer (a `CompletionServed` event)."""

    __tablename__ = "completions"
    completion_id: str = Field(sa_column=Column(String(128), primary_key=True))
    event_id: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    schema_version: int
    tenant: str = Field(default="")
    user_id: str = Field(default="")
    # Exactly one of prompt_text / prompt_chat (a list of {role, content}) is set.
    prompt_text: Optional[str] = Field(default=None, sa_column=Column(Text))
    prompt_chat: Optional[list] = Field(default=None, sa_column=Column(JSONDocument))
    prompt_key: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    response: str = Field(sa_column=Column(Text, nullable=False))
    prompt_tokens: int
    completion_tokens: int
    model_version: str = Field(sa_column=Column(String(256), nullable=False, index=True))
    # SamplingParameters fields that were set (absent = the engine's default).
    parameters: dict = Field(default_factory=dict, sa_column=Column(JSONDocument, nullable=False))
    finish_reason: Optional[str] = Field(default=None, max_length=32)  # length | eos_token | stop_sequence
    comparison_id: Optional[str] = Field(default=None, sa_column=Column(String(128), index=True))
    created_at: datetime = _created_at()
    ingested_at: datetime = _ingested_at()


class Rating(StoreModel, table=True):
    __tablename__ = "ratings"
    __table_args__ = (CheckConstraint("score IN (-1, 1)", name="score"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    event_id: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    completion_id: str = _completion_ref()
    score: int
    comment: Optional[str] = Field(default=None, sa_column=Column(Text))
    tenant: str = Field(default="")
    user_id: str = Field(default="")
    created_at: datetime = _created_at()
    ingested_at: datetime = _ingested_at()


class Comparison(StoreModel, table=True):
    __tablename__ = "comparisons"
    __table_args__ = (CheckConstraint("winner IN ('a', 'b', 'tie', 'both_bad')", name="winner"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    event_id: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    # Not unique: several people may judge the same pair (POST /v1/compare hands out one id).
    comparison_id: Optional[str] = Field(default=None, sa_column=Column(String(128), index=True))
    completion_a: str = _completion_ref()
    completion_b: str = _completion_ref()
    winner: str = Field(max_length=16)
    prompt_key: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    tenant: str = Field(default="")
    user_id: str = Field(default="")
    created_at: datetime = _created_at()
    ingested_at: datetime = _ingested_at()


class Ranking(StoreModel, table=True):
    """A ranking's completions are rows of `ranking_entries` (position 0 = best): a child table
    rather than a JSON list so every id is a foreign key and "how often was X ranked first" is an
    indexed query."""

    __tablename__ = "rankings"
    id: Optional[int] = Field(default=None, primary_key=True)
    event_id: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    prompt_key: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    size: int
    tenant: str = Field(default="")
    user_id: str = Field(default="")
    created_at: datetime = _created_at()
    ingested_at: datetime = _ingested_at()


class RankingEntry(StoreModel, table=True):
    __tablename__ = "ranking_entries"
    ranking_id: int = Field(sa_column=Column(ForeignKey("rankings.id"), primary_key=True))
    position: int = Field(primary_key=True)  # 0 = best
    completion_id: str = _completion_ref()


class Demonstration(StoreModel, table=True):
    """A better answer a person wrote: for a served completion (the prompt is that completion's)
    or for a prompt of their own (prompt_text / prompt_chat set here)."""

    __tablename__ = "demonstrations"
    id: Optional[int] = Field(default=None, primary_key=True)
    event_id: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    completion_id: Optional[str] = _completion_ref(nullable=True)
    prompt_text: Optional[str] = Field(default=None, sa_column=Column(Text))
    prompt_chat: Optional[list] = Field(default=None, sa_column=Column(JSONDocument))
    # The completion's prompt_key for a completion target: the held-out split needs it directly.
    prompt_key: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    text: str = Field(sa_column=Column(Text, nullable=False))
    tenant: str = Field(default="")
    user_id: str = Field(default="")
    created_at: datetime = _created_at()
    ingested_at: datetime = _ingested_at()


class DeadLetter(StoreModel, table=True):
    """An event the ingestor could not store, kept with the reason for someone to look at.
    (topic, partition, offset) is unique so a redelivered bad event is kept once."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("uq_dead_letters_position", "topic", "partition", "offset", unique=True),)
    id: Optional[int] = Field(default=None, primary_key=True)
    topic: Optional[str] = Field(default=None, max_length=256)
    partition: Optional[int] = None
    offset: Optional[int] = Field(default=None, sa_column=Column(BigInteger))  # Kafka offsets are 64-bit
    key: Optional[bytes] = Field(default=None, sa_column=Column(LargeBinary))
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # the record's value, as it came
    event_id: Optional[str] = Field(default=None, sa_column=Column(String(128), index=True))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _ingested_at()


class DatasetSnapshot(StoreModel, table=True):
    """One dataset export: what was written where, and the hash that identifies its content."""

    __tablename__ = "dataset_snapshots"
    id: Optional[int] = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16, index=True)  # sft | rm | prompts | ptx
    content_hash: str = Field(max_length=64, index=True)
    counts: dict = Field(default_factory=dict, sa_column=Column(JSONDocument, nullable=False))
    path: str = Field(sa_column=Column(Text, nullable=False))
    heldout_fraction: float
    seed: int
    created_at: datetime = _ingested_at()


class ModelVersion(StoreModel, table=True):
    """The model registry: one row per immutable checkpoint, written after its files."""

    __tablename__ = "model_versions"
    __table_args__ = (CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in MODEL_STATUSES) + ")", name="status"),)
    version: str = Field(sa_column=Column(String(256), primary_key=True))
    # No foreign key: the first version's parent is a base model that was never registered.
    parent_version: Optional[str] = Field(default=None, max_length=256)
    stage: str = Field(max_length=32)  # base | sft | rm | ppo | dpo
    # What it is served as: a policy (generation) or a reward model (/v1/score). Swapped independently.
    role: str = Field(default="policy", max_length=16, index=True)
    checkpoint_path: str = Field(sa_column=Column(Text, nullable=False))
    checksums: dict = Field(default_factory=dict, sa_column=Column(JSONDocument, nullable=False))
    status: str = Field(default="candidate", max_length=16, index=True)
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSONDocument, nullable=False))
    created_at: datetime = _ingested_at()
    updated_at: datetime = _ingested_at()


class Deployment(StoreModel, table=True):
    """What serving should run, per role: the one row a gateway polls (by primary key).

    `revision` grows by one on every change: gateways compare it with the one they applied, and
    writers update with `WHERE revision = <read>` so two concurrent promotions cannot both win."""

    __tablename__ = "deployments"
    role: str = Field(sa_column=Column(String(16), primary_key=True))  # policy | reward
    serving_version: str = Field(max_length=256)
    canary_version: Optional[str] = Field(default=None, max_length=256)
    canary_percent: float = 0.0
    revision: int = 1
    updated_at: datetime = _ingested_at()


class DeploymentEvent(StoreModel, table=True):
    """The audit log of the registry: every promotion, canary, rollback and refusal, and why."""

    __tablename__ = "deployment_events"
    id: Optional[int] = Field(default=None, primary_key=True)
    role: str = Field(max_length=16, index=True)
    action: str = Field(max_length=32)  # deploy | promote | canary | rollback | reject | refused
    version: Optional[str] = Field(default=None, max_length=256)
    previous_version: Optional[str] = Field(default=None, max_length=256)
    canary_percent: Optional[float] = None
    reason: str = Field(default="", sa_column=Column(Text, nullable=False))
    actor: str = Field(default="", max_length=128)  # who asked: "cli", "admin-api", "loop", "gateway"
    created_at: datetime = _ingested_at()


class TrainingRun(StoreModel, table=True):
    """One run of the trainer loop: what triggered it, the stages it runs, its data snapshots, the
    candidates it produced, the gate report, and where it stands. A crashed run is resumed by id."""

    __tablename__ = "training_runs"
    run_id: str = Field(sa_column=Column(String(64), primary_key=True))
    status: str = Field(default="running", max_length=16, index=True)
    stage: Optional[str] = Field(default=None, max_length=32)  # the stage running now (or last run)
    plan: list = Field(default_factory=list, sa_column=Column(JSONDocument, nullable=False))  # stages, in order
    trigger: dict = Field(default_factory=dict, sa_column=Column(JSONDocument, nullable=False))
    # Feedback ingested up to this instant is in the run's snapshots (the next run counts from here).
    data_until: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    snapshots: dict = Field(default_factory=dict, sa_column=Column(JSONDocument, nullable=False))
    base_policy_version: Optional[str] = Field(default=None, max_length=256)
    base_reward_version: Optional[str] = Field(default=None, max_length=256)
    policy_version: Optional[str] = Field(default=None, max_length=256)  # the candidate it produced
    reward_version: Optional[str] = Field(default=None, max_length=256)
    report: dict = Field(default_factory=dict, sa_column=Column(JSONDocument, nullable=False))
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSONDocument, nullable=False))
    error: Optional[str] = Field(default=None, sa_column=Column(Text))
    attempts: int = 1
    created_at: datetime = _ingested_at()
    updated_at: datetime = _ingested_at()
    finished_at: Optional[datetime] = Field(default=None, sa_column=Column(UTCDateTime()))


class Lease(StoreModel, table=True):
    """A named lease held by one process until `expires_at` (e.g. `fleet-rollouts`: the one gateway
    that reloads the workers). Taken over only once expired, with a compare-and-set on `token`,
    which grows by one whenever the holder changes: the fencing token a holder sends along, so a
    worker can refuse a holder that lost the lease without knowing it (serving/leadership.py)."""

    __tablename__ = "leases"
    name: str = Field(sa_column=Column(String(64), primary_key=True))
    holder: str = Field(max_length=256)
    token: int = 1
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    acquired_at: datetime = _ingested_at()
    renewed_at: datetime = _ingested_at()


UPSTREAM_KINDS = ("feedloop", "tgi", "openai", "sglang")


class UpstreamPoolRow(StoreModel, table=True):
    """An upstream pool registered in the store (feedback/store/pools.py): gateways in upstream mode
    add its members beside FEEDLOOP_UPSTREAMS' and drop them (after draining) when it is removed, so
    a blue/green pool comes and goes without restarting a gateway. `model_version` is what its
    servers serve (required for kinds that cannot say it themselves: tgi, openai). No secrets here:
    `api_key_env` names the gateway's environment variable that holds an OpenAI-compatible key."""

    __tablename__ = "upstream_pools"
    name: str = Field(sa_column=Column(String(64), primary_key=True))
    role: str = Field(max_length=16, index=True)
    kind: str = Field(max_length=16)
    url: str = Field(max_length=512)
    discovery: Optional[str] = Field(default=None, max_length=8)  # dns | srv | None: one server at url
    model_version: Optional[str] = Field(default=None, max_length=256)
    model: Optional[str] = Field(default=None, max_length=256)
    api_key_env: Optional[str] = Field(default=None, max_length=128)
    actor: str = Field(default="", max_length=128)
    created_at: datetime = _ingested_at()
