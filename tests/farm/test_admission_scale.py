"""Admission and the reconciler at fleet scale (issue #14, item 5), on a real PostgreSQL
database of this module's own: what they read goes through indexes, a bounded look-ahead
still admits the highest priorities first, a submission during a running pass is admitted
by the pass pending after it, and the broker is read only when a job lacks a heartbeat."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql

from farm.db.migrate import upgrade
from farm.db.session import get_engine, session_scope
from farm.db.tables import Job, utcnow
from farm.jobs import admit, admit_queries, deadline_watch, service as jobs
from farm.jobs.admit_locks import pending_key, tier_key
from farm.jobs.submit import route_request
from farm.schemas import JobCreate
from farm.tasks import reconcile
from tests.conftest import RUN_ID, drop_database, make_database

FULL_MODEL = "wan2.2-t2v-a14b"  # routed to the a100 tier: 2 nodes of 8, 2 GPUs a job, quota 8


def add(db_url: str, priority: int = 50, model: str = "wan-tiny", project: str = "default"):
    request = JobCreate(prompt="a red circle", model=model, frames=5, width=64, height=64,
                        steps=2, priority=priority, project=project)
    job = jobs.new_job(request, route_request(request, {}), "sha")
    jobs.add_jobs(db_url, [job])
    return job


def plan(conn, query) -> str:
    sql = query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    return "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {sql}")))


def test_a_pass_and_a_tick_read_through_indexes_never_the_history(db):
    """20,000 jobs: 2,000 waiting, a few in flight, the rest finished. Every query of an
    admission pass and of a reconciler tick goes through an index (no Seq Scan)."""
    seed = add(db, model=FULL_MODEL)
    columns = [c.name for c in Job.__table__.columns]
    values = [{"id": "substr(md5(jobs.id || g::text), 1, 32)",
               "state": "CASE WHEN g % 10 = 0 THEN 'queued' WHEN g % 500 = 1 THEN 'running' "
                        "ELSE 'succeeded' END",
               "dispatched_at": "CASE WHEN g % 10 = 0 THEN NULL ELSE now() - interval '1 h' END",
               "priority": "g % 101",
               # issue #15: one job in 7 has a deadline; the finished ones a finish time
               "deadline_at": "CASE WHEN g % 7 = 0 THEN now() + interval '1 h' END",
               "finished_at": "CASE WHEN g % 10 <> 0 AND g % 500 <> 1 "
                              "THEN now() - make_interval(secs => g) END",
               }.get(c, f"jobs.{c}") for c in columns]
    with get_engine(db).begin() as conn:
        conn.execute(text(f"INSERT INTO jobs ({', '.join(columns)}) SELECT {', '.join(values)} "
                          f"FROM jobs, generate_series(1, 20000) g WHERE jobs.id = :id"),
                     {"id": seed.id})
        conn.execute(text(
            "INSERT INTO segments (job_id, \"index\", state, frame_start, render_frames,"
            " skip_frames, seed, progress, attempts, chunk_keys, heartbeat_at)"
            " SELECT id, 0, CASE state WHEN 'queued' THEN 'pending' WHEN 'running' THEN"
            " 'running' ELSE 'done' END, 0, 5, 0, 1, 0, 1, '[]', CASE state WHEN 'running'"
            " THEN dispatched_at END FROM jobs WHERE id <> :id"), {"id": seed.id})
        # A fleet's groups, one row per group of each pool (variant x tier x plan x
        # placement: thousands), those of the running segments leased. (With a few hundred
        # rows PostgreSQL rightly reads the whole 8-page table instead of the index.)
        conn.execute(text(
            "INSERT INTO group_leases (pool, replica, holder, job_id, segment_index, leased_at,"
            " expires_at) SELECT 'a14b:a100:p', row_number() OVER (), md5(id), id, 0, now(),"
            " now() + interval '5 min' FROM jobs WHERE state = 'running'"))
        conn.execute(text("INSERT INTO group_leases (pool, replica) SELECT 'idle', g"
                          " FROM generate_series(1, 5000) g"))
        for table in ("jobs", "segments", "group_leases"):
            conn.execute(text(f"ANALYZE {table}"))
        since = utcnow() - timedelta(seconds=60)
        page = conn.execute(admit_queries.look_ahead_query("a100", 100)).all()
        plans = {"look-ahead": plan(conn, admit_queries.look_ahead_query("a100", 100)),
                 "look-ahead page 2": plan(conn, admit_queries.look_ahead_query(
                     "a100", 100, after=page[-1])),
                 "deadlines live": plan(conn, deadline_watch.live_query()),
                 "deadlines ended": plan(conn, deadline_watch.ended_query(utcnow())),
                 "deadlines line": plan(conn, deadline_watch.line_query("a100")),
                 "deadlines on GPUs": plan(conn, deadline_watch.flying_query("a100")),
                 "holdings": plan(conn, admit_queries.holding_query("a100")),
                 "preempt": plan(conn, admit_queries.running_query("a100")),
                 "orphans": plan(conn, admit_queries.orphan_query(["cpu", "a100"], 100)),
                 "reconciler": plan(conn, reconcile.candidates_query(since))}
    for name, text_ in plans.items():
        assert "Seq Scan" not in text_ and "Index" in text_, f"{name}:\n{text_}"
    assert "ix_jobs_admission_edf" in plans["look-ahead"]
    assert "ix_jobs_admission_edf" in plans["look-ahead page 2"]
    # The watch reads up to 500 of the line: when fewer wait, PostgreSQL may read the unsent
    # jobs by dispatched_at and sort them; either way only jobs never sent, not the history.
    assert ("ix_jobs_admission_edf" in plans["deadlines line"]
            or "Index Cond: (dispatched_at IS NULL)" in plans["deadlines line"])
    assert "ix_jobs_deadline_live" in plans["deadlines live"]
    assert "ix_group_leases_job_id" in plans["preempt"]
    assert "ix_jobs_in_flight" in plans["holdings"] and "ix_jobs_in_flight" in plans["reconciler"]
    assert "ix_segments_beating" in plans["reconciler"]


def test_past_the_look_ahead_the_highest_priorities_still_go_first(db, monkeypatch):
    """25 old low-priority jobs, 2 new high ones, a look-ahead of 10: the cpu tier's two
    slots go to the two high ones."""
    monkeypatch.setattr(admit, "LOOK_AHEAD", 10)
    [add(db, priority=10) for _ in range(25)]
    high = [add(db, priority=90).id for _ in range(2)]
    with admit.locked_session(db) as session:
        chosen, impossible = admit._choose(session)
    assert sorted(chosen) == sorted(high) and impossible == {}
    with admit.locked_session(db) as session:  # the tier is full now
        assert admit._choose(session) == ([], {})


def test_a_project_at_its_quota_does_not_hide_the_jobs_past_its_page(own, monkeypatch):
    """A project floods the a100 tier: 4 of its jobs fill its quota (8 GPUs) and 26 more
    wait. A submission's pass reads one page (10 here); the full pass reads on while the
    tier has room and finds the other project's job behind the flood."""
    monkeypatch.setattr(admit, "LOOK_AHEAD", 10)
    db, sent = own.database_url, []
    record = lambda job: sent.append(job.id)  # noqa: E731
    flood = [add(db, 90, FULL_MODEL, "flood") for _ in range(30)]
    other = add(db, 10, FULL_MODEL, "other")
    assert admit.release_submitted(own, flood[-1], record) == [j.id for j in flood[:4]]
    # The flood's project is at its quota and `other` is past the page: no pass at all.
    assert admit.release_submitted(own, add(db, 90, FULL_MODEL, "flood"), record) == []
    assert admit.release(own, record, tiers=["a100"]) == [other.id]
    assert sent == [j.id for j in flood[:4]] + [other.id]
    assert jobs.get_job(db, flood[4].id).dispatched_at is None


def advisory_held(conn, key: int) -> bool:
    """Whether some session holds the advisory lock ``key`` (a bigint key: classid is its
    high 32 bits, objid its low ones)."""
    high, low = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    return conn.execute(text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
        "classid::text::bigint = :high AND objid::text::bigint = :low"),
        {"high": high, "low": low}).scalar() > 0


def test_a_submission_during_a_running_pass_is_sent_by_the_pending_one(own):
    """A pass of the cpu tier runs (its lock held here). The first submission meanwhile
    waits as the pending one; the next returns at once; when the running pass ends the
    pending one passes and sends both jobs (it read the queue after both were saved)."""
    db, sent, out = own.database_url, [], {}
    record = lambda job: sent.append(job.id)  # noqa: E731
    first, second = add(db, priority=60), add(db, priority=50)
    with get_engine(db).connect() as running:
        running.execute(text("SELECT pg_advisory_lock(:k)"), {"k": tier_key("cpu")})
        waiter = threading.Thread(
            target=lambda: out.update(first=admit.release_submitted(own, first, record)))
        waiter.start()
        deadline = time.monotonic() + 20
        while not advisory_held(running, pending_key("cpu")):
            assert time.monotonic() < deadline, "the first submission never became pending"
            time.sleep(0.05)
        began = time.monotonic()
        assert admit.release_submitted(own, second, record) == []
        assert time.monotonic() - began < 5  # it did not queue behind the running pass
        assert sent == [] and waiter.is_alive()
        running.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": tier_key("cpu")})
        running.commit()
        waiter.join(30)
    assert out["first"] == [first.id, second.id] == sent
    with get_engine(db).connect() as conn:
        assert not advisory_held(conn, pending_key("cpu"))


def test_the_broker_is_read_only_when_a_job_lacks_a_heartbeat(own, caplog):
    """A broker nobody listens on (a closed loopback port): a tick with no candidate never
    touches it; a tick with one (a job sent past the lease, never started) reads it."""
    dead = own.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "lease_s": 30.0})
    job = add(own.database_url)
    with session_scope(own.database_url) as session:
        assert jobs.claim_for_dispatch(session, job.id)
    caplog.set_level(logging.WARNING, logger="farm.tasks.reconcile")
    assert reconcile.reconcile(dead, lambda j: None) == []  # within the lease
    assert "broker" not in caplog.text
    later = utcnow() + timedelta(seconds=31)
    assert reconcile.reconcile(dead, lambda j: None, later) == []
    assert "reconciler skipped: the broker's queues cannot be read" in caplog.text


def test_upgrading_fills_the_tier_column_from_the_route():
    name = f"farm_tier_backfill_{RUN_ID}"
    url = make_database(name)
    try:
        upgrade(url, "0009")
        request = JobCreate(prompt="p", model=FULL_MODEL, frames=5, width=64, height=64)
        route = route_request(request, {}).as_dict()
        with get_engine(url).begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, state, prompt, negative_prompt, model, width, height,"
                " frames, fps, steps, guidance_high, guidance_low, seed, priority, route,"
                " progress, created_at, updated_at) VALUES ('j1', 'queued', 'p', '', :m, 64, 64,"
                " 5, 16, 2, 4, 3, 1, 50, CAST(:route AS json), 0, now(), now())"),
                {"m": FULL_MODEL, "route": json.dumps(route)})
        upgrade(url)
        with session_scope(url) as session:
            assert session.scalar(select(Job.tier).where(Job.id == "j1")) == "a100"
    finally:
        drop_database(name)
