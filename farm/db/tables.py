"""SQLAlchemy 2 models of jobs and segments. The same code runs on PostgreSQL and SQLite.

States (README.md "When things break"): job queued -> waiting -> running -> stitching -> succeeded | failed |
canceled | expired (never admitted within its queue_ttl_s); any ended job -> deleted (its files
removed, its row and log kept); segment pending -> running -> done | failed. Only the job service
(`farm.jobs`) changes them.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
    TypeDecorator, UniqueConstraint, literal_column, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobState(str, enum.Enum):
    queued = "queued"
    waiting = "waiting"
    running = "running"
    stitching = "stitching"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    expired = "expired"  # not admitted within its queue_ttl_s (issue #13)
    deleted = "deleted"  # its files removed by DELETE or retention; row and log kept


class SegmentState(str, enum.Enum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"


FINAL_JOB_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.canceled,
                              JobState.expired, JobState.deleted})


class UTCDateTime(TypeDecorator):
    """Timestamps in UTC on every database: SQLite gives them back without a zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


_NOT_SENT = "dispatched_at IS NULL AND NOT held"  # the admission look-ahead's rows
_IN_FLIGHT = "dispatched_at IS NOT NULL AND state IN ('queued', 'running', 'stitching')"


def _route_tier(context) -> str:
    """A new job's tier, from its route (any insert that names a route sets it)."""
    return ((context.get_current_parameters().get("route") or {}).get("tier") or "")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_expires_at", "state", "expires_at"),
                      Index("ix_jobs_state_verified_at", "state", "verified_at"),
                      # Issue #14 (migration 0010): jobs in flight, for admission's holdings
                      # and the reconciler; the admission look-ahead's index is after the class.
                      Index("ix_jobs_in_flight", "state", "dispatched_at",
                            postgresql_where=text(_IN_FLIGHT), sqlite_where=text(_IN_FLIGHT)))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.queued.value)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)  # output size, pixels
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer)
    fps: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_high: Mapped[float] = mapped_column(Float)
    guidance_low: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=50)  # 0..100, 100 first
    project: Mapped[str] = mapped_column(String(64), index=True, default="default")
    track: Mapped[str] = mapped_column(String(16), default="draft")  # draft | final
    # Segment k+1 continues segment k from its last frame, one after another (issue #11,
    # item 7); False: independent clips rendered at once.
    continuous: Mapped[bool] = mapped_column(Boolean, default=True)
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="SET NULL"), index=True, nullable=True)
    route: Mapped[dict] = mapped_column(JSON)  # scheduler.routing.Route as a dict
    # route["tier"], as a column admission indexes and groups by (issue #14, migration 0010).
    tier: Mapped[str] = mapped_column(String(32), default=_route_tier, server_default="")
    rules_sha256: Mapped[str] = mapped_column(String(64), default="")  # the rules it was routed by
    # Set when the admission step sends the job to its tier's queue (farm.jobs.admit); until
    # then a queued job waits in the database, in priority order.
    dispatched_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_key: Mapped[str | None] = mapped_column(String(512), nullable=True)  # storage key
    output_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The chord's id; also the fencing token of the stitch task: a stitch task whose id is
    # not this one (sent before the reconciler re-sent the job) does nothing.
    celery_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resends: Mapped[int] = mapped_column(Integer, default=0)  # times farm.tasks.reconcile re-sent it
    # Issue #13. The result cache's content key (farm.jobs.result_cache); None: the client
    # opted out. ``cached_from``: the job whose stored video answered this one.
    cache_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    cached_from: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    held: Mapped[bool] = mapped_column(Boolean, default=False)  # admission passes it over
    timeout_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # from admission
    queue_ttl_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # from creation
    retain_days: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: project's
    webhook: Mapped[str | None] = mapped_column(String(2048), nullable=True)  # URL
    webhook_events: Mapped[list] = mapped_column(JSON, default=list)  # start|progress|completed
    # Seconds per stage: queue_wait, load, denoise, decode, encode, stitch (summed over
    # segments); peak memory of the render in bytes (device memory, else the process's RSS).
    stage_times: Mapped[dict] = mapped_column(JSON, default=dict)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)  # metrics
    deleted_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Retention (farm/jobs/retention.py, migration 0008): when an ended job's files go,
    # stamped when the sweep first sees it ended; when its video's sha256 was last checked.
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    verified_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Issue #15, item 3: the time the job must be done by (created_at + deadline_s), None:
    # no deadline; deadline_risk: the farm's estimate says it will miss it; missed_at: when
    # it was first seen missed (its deadline_missed webhook is sent once).
    deadline_at: Mapped[datetime | None] = mapped_column(nullable=True)
    deadline_risk: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    deadline_missed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    segments: Mapped[list["Segment"]] = relationship(
        back_populates="job", order_by="Segment.index", cascade="all, delete-orphan"
    )


# Issues #14, #15: admission's per-tier look-ahead over the jobs not yet sent, in admission
# order: priority band first (negated, ascending), earliest deadline first within a band
# (jobs without one after), then priority, age, id (farm.jobs.admit_queries, migration 0012).
Index("ix_jobs_admission_edf", Job.tier, Job.state,
      -(Job.priority // literal_column("10", Integer)), Job.deadline_at.is_(None),
      Job.deadline_at, Job.priority.desc(), Job.created_at, Job.id,
      postgresql_where=text(_NOT_SENT), sqlite_where=text(_NOT_SENT))

# Issue #15 (migration 0013): the deadline watch's candidates, live jobs with a deadline not
# yet missed (farm.jobs.deadline_watch.live_query), never the finished history.
_DEADLINE_LIVE = ("deadline_at IS NOT NULL AND deadline_missed_at IS NULL AND state IN "
                  "('queued', 'waiting', 'running', 'stitching')")
Index("ix_jobs_deadline_live", Job.deadline_at, postgresql_where=text(_DEADLINE_LIVE),
      sqlite_where=text(_DEADLINE_LIVE))


class Batch(Base):
    """Jobs submitted together, optionally waiting for a daily window (scheduler.windows)."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    project: Mapped[str] = mapped_column(String(64), index=True, default="default")
    window: Mapped[str | None] = mapped_column(String(32), nullable=True)  # "22:00-06:00"
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    on_window_close: Mapped[str] = mapped_column(String(16), default="wait")  # wait | cancel
    state: Mapped[str] = mapped_column(String(16), default="open", index=True)  # open | done
    report_keys: Mapped[dict] = mapped_column(JSON, default=dict)  # {"html": key, "csv": key}
    webhook: Mapped[str | None] = mapped_column(String(2048), nullable=True)  # issue #13
    webhook_events: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Segment(Base):
    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_segments_job_index"),
                      # Issue #14: the reconciler's "which in-flight job has a fresh heartbeat"
                      Index("ix_segments_beating", "heartbeat_at",
                            postgresql_where=text("state = 'running'"),
                            sqlite_where=text("state = 'running'")))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=SegmentState.pending.value)
    frame_start: Mapped[int] = mapped_column(Integer)
    render_frames: Mapped[int] = mapped_column(Integer)
    skip_frames: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The render task's id, and its fencing token: only the task with this id may start,
    # report or finish the segment (farm.tasks.reconcile gives a re-sent segment a new one).
    celery_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Written every few seconds while a task renders it; stale means its worker vanished.
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    chunk_keys: Mapped[list] = mapped_column(JSON, default=list)  # storage keys, in order
    # The segment's content key (farm.jobs.result_cache): its chunks answer a later job's
    # segment with the same key without rendering it.
    cache_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    cached_from: Mapped[str | None] = mapped_column(String(32), nullable=True,
                                                    index=True)  # job id
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Issue #15, item 1: preemption at a step boundary. preempt_requested_at: admission asked
    # the running segment to yield its group; preemptions: times it yielded (at most
    # FARM_MAX_PREEMPTIONS); resume_*: the saved denoising state it resumes from (storage
    # key, its sha256, the steps already done), None: it starts from noise.
    preempt_requested_at: Mapped[datetime | None] = mapped_column(nullable=True)
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    resume_key: Mapped[str | None] = mapped_column(String(512), nullable=True)
    resume_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resume_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Issue #15, item 2: the batched render (its Celery task id) the segment was rendered
    # in with like segments of other jobs; None: rendered on its own. Not preempted.
    render_batch: Mapped[str | None] = mapped_column(String(64), nullable=True)

    job: Mapped[Job] = relationship(back_populates="segments")


class ApiKey(Base):
    """An API key of a project: only its sha256 is stored; the key is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # also the key's prefix
    project: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class IdempotencyRecord(Base):
    """A submission made with an Idempotency-Key: a retry gets the same job back."""

    __tablename__ = "idempotency_keys"

    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    body_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class JobEvent(Base):
    """A job's log: what happened to it and where (segments started, failed, re-sent,
    workers blocklisted). Kept with the job whatever its end; failures by worker are read
    from here to blocklist a worker for a job."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    segment_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kind: Mapped[str] = mapped_column(String(32))  # farm.jobs.events: RESENT, SEGMENT_FAILED, ...
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CacheEntry(Base):
    """A stored result the result cache may answer with (issue #13): a whole video
    (``kind`` video: ``keys`` is [the mp4]) or one segment's chunks (``kind`` segment).
    Retention never deletes a file an entry names; evicting the entry lets it go."""

    __tablename__ = "cache_entries"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # content hash
    kind: Mapped[str] = mapped_column(String(16))  # video | segment
    project: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)  # the job that rendered it
    segment_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    keys: Mapped[list] = mapped_column(JSON, default=list)  # storage keys, in order
    # A segment's last frame (farm/tasks/seams.py), which the next segment of a continuous
    # job starts from; None for a video or a segment that ended its job.
    seam_key: Mapped[str | None] = mapped_column(String(512), nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the video's
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_hit_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ProjectSecret(Base):
    """A project's webhook signing secret (issue #13), shown once when made."""

    __tablename__ = "project_secrets"

    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    webhook_secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """The webhook outbox (issue #13): one row per event to deliver, written in the same
    transaction as the state change it reports, sent and retried with backoff by a beat task."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    batch_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    event: Mapped[str] = mapped_column(String(32))  # start | progress | completed | ...
    url: Mapped[str] = mapped_column(String(2048))
    body: Mapped[str] = mapped_column(Text)  # the JSON sent, byte for byte
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
