"""Retention (issue #13, item 3): which stored files the database still names, and the sweep
that deletes the rest.

A job's files live under ``jobs/{id}/``. What the database names there (``named_under``):
- while the job is live: everything (a render may be writing);
- succeeded: its video, its pictures (thumbnail, contact sheet, preview; farm/jobs/pictures.py),
  and the chunks its segments still list (settling empties those lists unless
  FARM_KEEP_CHUNKS);
- failed / canceled / expired: its done segments' chunks and last frames (a retry continues
  from them);
- deleted: nothing (its ``cache_entries`` rows go in the transaction that deletes it);
- and whatever another job borrowed from it through the result cache (``cached_from``: a
  cached job's video, a reused segment's chunks) or a ``cache_entries`` row names: those stay
  until that job is deleted too (its deletion sweeps the lender's prefix again) or the
  cache drops the entry (eviction calls ``prune_files`` with the entries' jobs).

Each tick (``sweep``), in bounded batches by index: ended jobs not yet settled get
``expires_at`` (finished + FARM_RETAIN_DAYS, the project's or the job's ``retain_days``;
0 keeps forever) and lose every file not named (chunks of a stitched job, stray attempts,
seams); jobs past ``expires_at`` become ``deleted``; idempotency keys past
FARM_IDEMPOTENCY_DAYS and finished webhook deliveries past FARM_WEBHOOK_KEEP_DAYS go;
scratch folders no task can still own go.
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from farm.db.session import session_scope
from farm.db.tables import (
    FINAL_JOB_STATES, CacheEntry, IdempotencyRecord, Job, JobState, Segment, SegmentState, utcnow,
)
from farm.jobs import events, integrity, webhook_delivery
from farm.jobs.pictures import PICTURES
from farm.settings import Settings
from farm.storage import Storage
from farm.tasks.seams import last_frame_key

log = logging.getLogger(__name__)

DELETED = "deleted"  # the job-log event
ENDED = [s.value for s in FINAL_JOB_STATES if s != JobState.deleted]
SETTLED = [*ENDED, JobState.deleted.value]  # a deleted job is swept once more, then stamped
FOREVER = datetime(9999, 12, 31, tzinfo=timezone.utc)  # expires_at of a job kept forever
SETTLE_GRACE_S = 600  # a job just ended is left this long (the result cache reads its chunks)


def prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def _job_names(job: Job) -> set[str]:
    """What ``job`` itself names (any prefix: a cached job names its source's files)."""
    if job.state == JobState.deleted.value:
        return set()
    segments = job.segments
    if job.state in ENDED and job.state != JobState.succeeded.value:
        segments = [s for s in segments if s.state == SegmentState.done.value]
    # A succeeded job's lists are emptied by ``settle`` when its chunks are to go.
    names = {k for s in segments for k in s.chunk_keys}
    if job.state in ENDED and job.state != JobState.succeeded.value:
        names |= {last_frame_key(job.id, s.index, s.attempts) for s in segments}
    if job.state == JobState.succeeded.value:
        names |= {job.output_key, *(prefix(job.id) + p for p in PICTURES)}
    return names - {None}


def named_under(session: Session, job: Job) -> set[str] | None:
    """Keys under ``jobs/{job.id}/`` the database names; None while the job is live (all).
    Reads through indexes: jobs.cached_from, segments.cached_from, cache_entries.job_id."""
    if job.state not in FINAL_JOB_STATES:
        return None
    names = _job_names(job)
    borrowers = session.scalars(select(Job).where(Job.cached_from == job.id,
                                                  Job.state != JobState.deleted.value))
    names |= {b.output_key for b in borrowers if b.output_key}
    segments = session.scalars(select(Segment).join(Job).where(
        Segment.cached_from == job.id, Job.state != JobState.deleted.value))
    names |= {k for s in segments for k in s.chunk_keys}
    for entry in session.scalars(select(CacheEntry).where(CacheEntry.job_id == job.id)):
        names |= set(entry.keys) | ({entry.seam_key} if entry.seam_key else set())
    return {k for k in names if k.startswith(prefix(job.id))}


def lenders(job: Job) -> set[str]:
    """Jobs whose files ``job`` borrowed through the result cache."""
    return ({job.cached_from} | {s.cached_from for s in job.segments}) - {None, job.id}


def prune_files(settings: Settings, storage: Storage, job_ids: set[str]) -> int:
    """Delete every file under these jobs' prefixes the database no longer names. Safe for
    any job at any time (the cache's eviction calls it with the jobs of the entries it
    dropped): a live job's prefix is left whole, a succeeded job keeps its video, pictures
    and listed chunks, an unknown or deleted job keeps only what another job or an entry
    names. Returns the files removed."""
    removed = 0
    for job_id in job_ids:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            named = named_under(session, job) if job else set()
        if named is None:
            continue
        gone = [k for k in storage.list_keys(prefix(job_id)) if k not in named]
        storage.remove_many(gone)
        removed += len(gone)
    return removed


def retain_days(settings: Settings, job: Job) -> int:
    if job.retain_days is not None:
        return job.retain_days
    return settings.retain_days_by_project.get(job.project, settings.retain_days)


def expiry(settings: Settings, job: Job) -> datetime:
    days = retain_days(settings, job)
    return FOREVER if days == 0 else (job.finished_at or utcnow()) + timedelta(days=days)


def settle(settings: Settings, storage: Storage, now: datetime) -> int:
    """Ended jobs not yet seen: stamp ``expires_at``; a succeeded one's chunks are dropped
    (unless FARM_KEEP_CHUNKS) and every unnamed file under its prefix goes. A job deleted
    since the last tick is swept once more (what a crash mid-removal or a late write left)."""
    grace = now - timedelta(seconds=SETTLE_GRACE_S)
    with session_scope(settings.database_url) as session:
        rows = list(session.scalars(
            select(Job).where(Job.state.in_(SETTLED), Job.expires_at.is_(None),
                              or_(Job.finished_at.is_(None), Job.finished_at <= grace))
            .limit(settings.retention_batch)))
        touched: set[str] = set()
        for job in rows:
            job.expires_at = job.deleted_at or now if job.state == JobState.deleted.value \
                else expiry(settings, job)
            if job.state == JobState.succeeded.value:
                job.verified_at = job.finished_at or now  # its sha256 was taken when stored
                if not settings.keep_chunks:
                    touched |= lenders(job)
                    for seg in job.segments:
                        seg.chunk_keys = []
            touched.add(job.id)
    prune_files(settings, storage, touched)
    return len(rows)


def mark_deleted(session: Session, job_id: str, now: datetime) -> Job | None:
    """Compare-and-set an ended job to ``deleted``; None when it is live or already deleted.
    In the same transaction its ``cache_entries`` go (a deleted job's files answer no one),
    and its segments stop naming their chunks: what is left named under its prefix is only
    what a live job borrowed (``cached_from``)."""
    done = session.execute(update(Job).where(Job.id == job_id, Job.state.in_(ENDED))
                           .values(state=JobState.deleted.value, deleted_at=now,
                                   expires_at=None))  # the next settle sweeps it again
    if done.rowcount != 1:
        return None
    session.execute(delete(CacheEntry).where(CacheEntry.job_id == job_id))
    job = session.get(Job, job_id)
    session.refresh(job)
    for seg in job.segments:
        seg.chunk_keys = []
    return job


def delete_job_files(settings: Settings, job_id: str, why: str) -> bool:
    """Mark the ended job ``deleted`` (row and log kept; ``output_key`` kept as a record of
    what was there) and remove its files, keeping what another job or a cache entry names.
    False when it is live (nothing done); a job already deleted has its prefix swept again
    (a crash mid-removal is finished this way)."""
    storage = Storage(settings.storage_url)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.state not in FINAL_JOB_STATES:
            return False
        touched = lenders(job) | {job_id}
        if mark_deleted(session, job_id, utcnow()) is not None:
            events.add(session, job_id, DELETED, why)
    prune_files(settings, storage, touched)
    return True


def expire(settings: Settings, now: datetime) -> int:
    """Jobs past ``expires_at`` become ``deleted`` (oldest first, a batch per tick). One
    retried and ended again since it was stamped is stamped anew instead."""
    with session_scope(settings.database_url) as session:
        due = list(session.scalars(
            select(Job).where(Job.state.in_(ENDED), Job.expires_at <= now)
            .order_by(Job.expires_at).limit(settings.retention_batch)))
        ids = []
        for job in due:
            again = expiry(settings, job)
            if again > now:
                job.expires_at = again
            else:
                ids.append(job.id)
    for job_id in ids:
        delete_job_files(settings, job_id, "retention: kept its days")
    return len(ids)


def prune_idempotency(settings: Settings, now: datetime) -> int:
    cutoff = now - timedelta(days=settings.idempotency_days)
    with session_scope(settings.database_url) as session:
        old = session.execute(select(IdempotencyRecord.project, IdempotencyRecord.key)
                              .where(IdempotencyRecord.created_at < cutoff)
                              .order_by(IdempotencyRecord.created_at)
                              .limit(settings.retention_batch)).all()
        for project, key in old:
            session.execute(delete(IdempotencyRecord).where(
                IdempotencyRecord.project == project, IdempotencyRecord.key == key))
    return len(old)


def scratch_owner(name: str) -> str | None:
    """The job a scratch folder of FARM_WORK_DIR belongs to: ``{job}-s{index}-*`` (a
    segment's encoding, farm/tasks/segment_runner.py) or ``stitch-{job}-*``."""
    parts = name.split("-")
    if parts[0] == "stitch" and len(parts) >= 3:
        return parts[1]
    if len(parts) >= 3 and parts[1].startswith("s") and parts[1][1:].isdigit():
        return parts[0]
    return None


def sweep_scratch(settings: Settings, now_s: float | None = None) -> list[str]:
    """Scratch folders no task can still own: older than FARM_TASK_TIME_LIMIT_S (Celery's
    hard limit has killed any task by then), or of an ended (or unknown) job and untouched
    for FARM_LEASE_S (a task writing there would have touched it). This machine's only: each
    machine's beat tick cleans its own FARM_WORK_DIR."""
    now_s = time.time() if now_s is None else now_s
    if not settings.work_dir.is_dir():
        return []
    folders = {p: scratch_owner(p.name) for p in settings.work_dir.iterdir() if p.is_dir()}
    owners = {o for o in folders.values() if o}
    with session_scope(settings.database_url) as session:
        live = set(session.scalars(select(Job.id).where(
            Job.id.in_(owners), Job.state.not_in([s.value for s in FINAL_JOB_STATES]))))
    removed = []
    for path, owner in folders.items():
        idle = now_s - path.stat().st_mtime
        if owner and (idle > settings.task_time_limit_s
                      or (owner not in live and idle > settings.lease_s)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def sweep(settings: Settings) -> dict:
    """One beat tick's retention work, each part a bounded batch (FARM_RETENTION_BATCH), and
    the integrity check's FARM_VERIFY_PER_TICK videos. A part that fails (storage or the
    database unreachable) is logged and counted -1; the others, and the rest of the tick
    (batch windows, webhooks), still run."""
    now, storage = utcnow(), Storage(settings.storage_url)
    parts = {"settled": lambda: settle(settings, storage, now),
             "expired_files": lambda: expire(settings, now),
             "idempotency_pruned": lambda: prune_idempotency(settings, now),
             "webhooks_pruned": lambda: webhook_delivery.prune(settings, now),
             "scratch_removed": lambda: len(sweep_scratch(settings)),
             "corrupt_found": lambda: len(integrity.verify_outputs(settings))}
    done = {}
    for name, part in parts.items():
        try:
            done[name] = part()
        except Exception:  # reported, not raised: the tick goes on (issue #13)
            log.exception("retention: %s failed this tick", name)
            done[name] = -1
    return done
