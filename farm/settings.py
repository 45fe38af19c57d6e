"""Configuration read from the environment (prefix ``FARM_``), with embedded defaults.

The defaults need no server at all: a SQLite database, kombu's SQLAlchemy transport on
SQLite as the Celery broker, a local Ray started in-process, and a local folder for outputs,
all under ``FARM_HOME`` (``./.farm`` unless set).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FARM_", env_file=None, extra="ignore")

    home: Path = Field(default=Path(".farm"), description="folder for the embedded defaults")

    database_url: str = ""  # default: sqlite:///{home}/farm.db
    broker_url: str = ""  # default: sqla+sqlite:///{home}/broker.db
    result_backend: str = ""  # default: db+sqlite:///{home}/results.db
    ray_address: str = "local"  # "local": start Ray in-process; else "host:port" of a head
    storage_url: str = ""  # default: file://{home}/storage
    models_dir: Path | None = None  # default: {home}/models
    work_dir: Path | None = None  # scratch space for encoding; default: {home}/work

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = ""  # what the CLI talks to; default: http://{api_host}:{api_port}
    api_key: SecretStr = SecretStr("")  # what the CLI sends; else the key file in FARM_HOME
    # Jobs per project per minute, each job of a batch counted (0: no limit).
    rate_limit_per_minute: int = 120
    # Jobs of a project waiting or queued (not yet rendering) at once (0: no cap). 10,000 is
    # a few hours of a 100-GPU farm's whole throughput (100,000 jobs a day): room for the
    # largest nightly batch, while a runaway client stops long before it buries the others.
    max_queued_per_project: int = 10_000
    max_body_bytes: int = 10_000_000  # larger request bodies get a 413
    flower_host: str = "127.0.0.1"
    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: SecretStr = SecretStr("")
    # The API's /metrics answers only with this bearer token (issue #13); unset: not served
    # by the API (`farm exporter` serves it on its own loopback port).
    metrics_token: SecretStr = SecretStr("")

    # Ray start-up (see RUNBOOK: loopback only, no usage stats, bounded memory).
    # Across hosts (issue #14; README "Two hosts" lists every setting): on each host
    # FARM_RAY_NODE_IP is that host's own address on the farm's link (Ray's servers and
    # workers announce it), FARM_RAY_ADDRESS the head's "ip:port" (the same on every host),
    # and FARM_RAY_AUTH_TOKEN_FILE the token file the head was started with, copied to
    # every host (it becomes Ray's RAY_AUTH_TOKEN_PATH); FARM_DATABASE_URL, FARM_BROKER_URL,
    # FARM_RESULT_BACKEND and FARM_STORAGE_URL name the first host's servers.
    ray_head_port: int = 6380
    ray_node_ip: str = "127.0.0.1"  # the address this machine's Ray node uses (loopback here)
    ray_auth_token_file: Path | None = None  # unset: Ray's own $HOME/.ray/auth_token
    ray_temp_dir: Path = Path("/tmp/ray-farm")
    ray_object_store_bytes: int = 512 * 1024 * 1024
    ray_tier_slots: int = 2  # actors of the cpu tier a local head can hold
    # CPU cores each rank of a group takes from Ray, and so its torch threads (Ray sets
    # OMP_NUM_THREADS to it): on a CPU-only node, cores / groups (issue #11).
    actor_cpus: int = Field(1, ge=1)

    # Celery: long GPU tasks.
    celery_eager: bool = False  # run tasks in the calling process (the one-process `farm render`)
    task_soft_time_limit_s: int = 3300
    task_time_limit_s: int = 3600
    visibility_timeout_s: int = 7200  # above the hard limit, or Redis hands a task out twice
    # Faults (issue #6): heartbeats, the reconciler's lease and the failure policy.
    heartbeat_s: float = 5.0  # a rendering task writes its segment's heartbeat this often
    lease_s: float = 60.0  # no heartbeat for this long: the task is lost and its job re-sent
    blocklist_after: int = 3  # failures of one job's segments that blocklist a worker for it
    segment_failure_workers: int = 3  # a segment fails for good on this many different workers
    segment_max_attempts: int = 10  # starts of one segment, lost ones included
    retry_countdown_s: float = 2.0  # a failed segment is re-sent after this long
    control_timeout_s: float = 1.0  # how long to wait for workers to say which queues they read
    # While the database is down: a task retries this often (3 s apart), and a finished
    # segment tries this often (1.5 s apart) to record itself.
    db_outage_retries: int = 20

    # Routing policy (scheduler/config/*.yaml unless set): tiers, model catalog, rules.
    tiers_file: Path | None = None
    models_file: Path | None = None
    rules_file: Path | None = None
    # Derived variants registered on this machine by `farm models derive` (issue #12), read
    # over the catalog; default {home}/variants.yaml.
    variants_file: Path | None = None
    tick_seconds: float = 5.0  # Celery beat: batch windows opened/closed, waiting jobs released
    # Celery beat: retention, integrity re-hashes and cache eviction (issue #13).
    housekeeping_seconds: float = Field(30.0, gt=0)
    # The result cache (issue #13): entries not hit for this many days are dropped (0: never),
    # and the least recently hit videos beyond this many bytes (0: no cap), checked every
    # cache_evict_every_s (the total is a sum over the table: not on every tick).
    cache_max_age_days: float = Field(30.0, ge=0)
    cache_max_bytes: int = Field(200 * 1024**3, ge=0)
    cache_evict_every_s: float = Field(600.0, gt=0)

    # Issue #15: a segment yields its group to a more urgent job at most max_preemptions
    # times (then it runs to its end); deadline_risk is re-estimated every tick from the
    # measured step times of the last step_time_window segments of each variant.
    max_preemptions: int = Field(2, ge=0)
    step_time_window: int = Field(50, ge=1)

    # S3 storage (FARM_STORAGE_URL s3://bucket/prefix, issue #13): the server, its keys, and
    # the part size of multipart uploads (S3's minimum is 5 MiB): files of at least two parts
    # go up in parts; downloads answer with a URL signed for presign_expiry_s.
    s3_endpoint_url: str = ""  # empty: AWS's own endpoints
    s3_key: str = ""
    s3_secret: SecretStr = SecretStr("")
    s3_region: str = "us-east-1"
    s3_part_bytes: int = Field(32 * 1024**2, ge=5 * 1024**2)
    presign_expiry_s: int = Field(3600, ge=1, le=7 * 86400)
    # Retention (farm/jobs/retention.py): days an ended job's files are kept (0: forever),
    # per project over that ({"proj": days} as JSON), chunks kept after the stitch,
    # days idempotency keys are kept, jobs settled or expired per tick, and videos re-hashed
    # per tick by the integrity check.
    retain_days: int = Field(30, ge=0)
    retain_days_by_project: dict[str, int] = Field(default_factory=dict)
    keep_chunks: bool = False
    idempotency_days: int = Field(7, ge=1)
    retention_batch: int = Field(200, ge=1)
    # Integrity (farm/jobs/integrity.py): to re-hash each video once a day, per tick >=
    # jobs a day x the tick's seconds / 86400: at 100,000 jobs a day that is >= 6 on a 5 s
    # tick and >= 35 on the 30 s housekeeping tick that runs retention; 40 covers that
    # (jobs sharing one file, cached ones, are re-hashed once for all).
    verify_per_tick: int = Field(40, ge=0)
    # Webhooks (farm/jobs/webhook_delivery.py, issue #13): a failed delivery is tried again
    # after base * 2**(attempt-1) seconds, at most cap apart, max_attempts in all; seconds
    # a receiver may take to answer.
    webhook_retry_base_s: float = Field(2.0, gt=0)
    webhook_retry_cap_s: float = Field(600.0, gt=0)
    webhook_max_attempts: int = Field(20, ge=1)
    webhook_timeout_s: float = Field(5.0, gt=0)
    # Days delivered or given-up deliveries are kept in the outbox before retention drops
    # them (issue #13).
    webhook_keep_days: int = Field(7, ge=1)
    # The API's public base URL (e.g. https://farm.example.com): webhook bodies then carry
    # an absolute output_url; empty: the path alone (/v1/jobs/{id}/video).
    public_url: str = ""

    encode_chunk_frames: int = 16  # frames per H.264 chunk
    x264_preset: str = "veryfast"
    x264_crf: int = 18

    @field_validator("tiers_file", "models_file", "rules_file", "variants_file", "models_dir",
                     "work_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if value == "" else value  # compose passes unset variables as ""

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        home = self.home.resolve()
        self.home = home
        self.database_url = self.database_url or f"sqlite:///{home}/farm.db"
        self.broker_url = self.broker_url or f"sqla+sqlite:///{home}/broker.db"
        self.result_backend = self.result_backend or f"db+sqlite:///{home}/results.db"
        self.storage_url = self.storage_url or f"file://{home}/storage"
        self.models_dir = (self.models_dir or home / "models").resolve()
        self.work_dir = (self.work_dir or home / "work").resolve()
        self.variants_file = (self.variants_file or home / "variants.yaml").resolve()
        self.api_url = self.api_url or f"http://{self.api_host}:{self.api_port}"
        if self.lease_s < 3 * self.heartbeat_s:
            raise ValueError(f"lease_s ({self.lease_s}) must be at least 3 x heartbeat_s "
                             f"({self.heartbeat_s}), or a slow heartbeat looks like a lost task")
        if self.task_time_limit_s >= self.visibility_timeout_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed "
                f"task_time_limit_s ({self.task_time_limit_s}), or a long task runs twice"
            )
        return self

    def ensure_dirs(self) -> None:
        for path in (self.home, self.models_dir, self.work_dir):
            path.mkdir(parents=True, exist_ok=True)


def is_redis_url(url: str | None) -> bool:
    return bool(url) and url.startswith(("redis://", "rediss://"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
