"""Upkeep of the result cache (issue #13, item 1): stats, purge, and the beat's eviction.

Dropping an entry deletes no file by itself; the jobs whose entries went have their folders
pruned at once (farm.jobs.retention.prune_files), which removes only what no job and no
other entry still names.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import delete, func, select

from farm.db.session import session_scope
from farm.db.tables import CacheEntry, utcnow
from farm.settings import Settings
from farm.storage import Storage

log = logging.getLogger(__name__)

EVICT_BATCH = 1000  # entries dropped per run at most
_size_checked_at = float("-inf")  # when this process last summed the entries' bytes


def stats(db_url: str, project: str | None = None) -> dict:
    """Entries, bytes named and hits, per kind (all projects unless ``project``)."""
    query = select(CacheEntry.kind, func.count(), func.coalesce(func.sum(CacheEntry.bytes), 0),
                   func.coalesce(func.sum(CacheEntry.hits), 0)).group_by(CacheEntry.kind)
    if project:
        query = query.where(CacheEntry.project == project)
    with session_scope(db_url) as session:
        rows = session.execute(query).all()
    return {kind: {"entries": n, "bytes": int(size), "hits": int(hits)}
            for kind, n, size, hits in rows}


def _drop(db_url: str, condition) -> list[str]:
    """Delete the entries matching ``condition``; returns their jobs' ids."""
    with session_scope(db_url) as session:
        return list(session.scalars(delete(CacheEntry).where(condition)
                                    .returning(CacheEntry.job_id)))


def release_files(settings: Settings, job_ids: set[str]) -> int:
    """Prune the folders of jobs whose entries were dropped; returns files removed."""
    from farm.jobs import retention

    if not job_ids:
        return 0
    return retention.prune_files(settings, Storage(settings.storage_url), job_ids)


def purge(settings: Settings, project: str | None = None,
          older_than_days: float | None = None) -> int:
    """Drop entries (all, a project's, or those not hit for a while) and the files only
    they named. Returns how many entries."""
    condition = CacheEntry.key.is_not(None)
    if project:
        condition = condition & (CacheEntry.project == project)
    if older_than_days is not None:
        cutoff = utcnow() - timedelta(days=older_than_days)
        condition = condition & (CacheEntry.last_hit_at < cutoff)
    jobs = _drop(settings.database_url, condition)
    release_files(settings, set(jobs))
    return len(jobs)


def evict(settings: Settings) -> int:
    """Entries not hit for FARM_CACHE_MAX_AGE_DAYS, then the least recently hit videos until
    those named total FARM_CACHE_MAX_BYTES (summed every FARM_CACHE_EVICT_EVERY_S: the sum
    reads the whole table). At most EVICT_BATCH of each per run, through the last_hit_at
    index. Returns entries dropped."""
    db, jobs = settings.database_url, []
    if settings.cache_max_age_days > 0:
        cutoff = utcnow() - timedelta(days=settings.cache_max_age_days)
        with session_scope(db) as session:
            old = session.scalars(select(CacheEntry.key).where(CacheEntry.last_hit_at < cutoff)
                                  .order_by(CacheEntry.last_hit_at).limit(EVICT_BATCH)).all()
        jobs += _drop(db, CacheEntry.key.in_(old)) if old else []
    global _size_checked_at
    if settings.cache_max_bytes > 0 and \
            time.monotonic() - _size_checked_at >= settings.cache_evict_every_s:
        _size_checked_at = time.monotonic()
        doomed = _over_size(db, settings.cache_max_bytes)
        jobs += _drop(db, CacheEntry.key.in_(doomed)) if doomed else []
    if jobs:
        log.info("result cache: evicted %d entries", len(jobs))
        release_files(settings, set(jobs))
    return len(jobs)


def _over_size(db: str, max_bytes: int) -> list[str]:
    """The least recently hit entries whose bytes bring the total under ``max_bytes``."""
    with session_scope(db) as session:
        over = int(session.scalar(select(func.coalesce(func.sum(CacheEntry.bytes), 0)))) \
            - max_bytes
        if over <= 0:
            return []
        oldest = session.execute(select(CacheEntry.key, CacheEntry.bytes)
                                 .where(CacheEntry.bytes > 0).order_by(CacheEntry.last_hit_at)
                                 .limit(EVICT_BATCH)).all()
    doomed = []
    for key, size in oldest:
        if over <= 0:
            break
        doomed.append(key)
        over -= size
    return doomed
