"""Batches of like jobs in a real admission pass (issue #15, item 2), on PostgreSQL: a
batch takes one group so more like jobs go, is sent as one render, never passes a job of
higher priority than all its members, holds one group while it renders, and a lone like job
waits for companions only within its window and when nobody higher waits."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from sqlalchemy import update

from farm.db.session import session_scope
from farm.db.tables import Job, Segment, utcnow
from farm.jobs import admit, service as jobs
from farm.jobs.submit import route_request
from farm.policy import Policy, get_policy
from farm.schemas import JobCreate
from scheduler.rules import Quotas


def batching(monkeypatch, max_batch=4, wait_ms=0):
    """The test policy with wan-tiny batching up to ``max_batch`` (shipped: 1)."""
    policy = get_policy()
    tiny = policy.catalog.models["wan-tiny"].model_copy(
        update={"max_batch": max_batch, "batch_wait_ms": wait_ms})
    catalog = policy.catalog.model_copy(
        update={"models": {**policy.catalog.models, "wan-tiny": tiny}})
    monkeypatch.setattr(admit, "get_policy", lambda: Policy(catalog, policy.rules))


def add(db_url, priority=50, steps=2, frames=5, age_s=0, deadline_s=None, project="default"):
    request = JobCreate(prompt="a red circle", model="wan-tiny", frames=frames, steps=steps,
                        priority=priority, project=project)
    job = jobs.new_job(request, route_request(request, {}), "sha")
    job.created_at = utcnow() - timedelta(seconds=age_s)
    if deadline_s is not None:
        job.deadline_at = job.created_at + timedelta(seconds=deadline_s)
    jobs.add_jobs(db_url, [job])
    return job


class Sent:
    """Admission's two send paths, recorded: one job, or one batch of jobs."""

    def __init__(self):
        self.units = []

    def job(self, job):
        self.units.append(job.id)

    def batch(self, members, db_url=None):
        self.units.append(tuple(j.id for j in members))
        return "batch-task"


def release(own, sent):
    return admit.release(own, sent.job, tiers=["cpu"], enqueue_batch=sent.batch)


def test_like_jobs_go_as_one_batch_on_one_group(own, db, monkeypatch):
    batching(monkeypatch, max_batch=4)
    like = [add(db, age_s=10 - i).id for i in range(5)]
    sent = Sent()
    # cpu: 2 slots. Five like jobs spread over both: batches of three and two.
    assert release(own, sent) == like
    assert sent.units == [tuple(like[:3]), tuple(like[3:])]


def test_like_jobs_take_idle_groups_alone_before_they_batch(own, db, monkeypatch):
    batching(monkeypatch, max_batch=4)
    like = [add(db, age_s=10 - i).id for i in range(2)]
    sent = Sent()
    assert release(own, sent) == like and sent.units == like  # one idle group each


def test_a_full_tier_batches_up_to_max_batch(own, db, monkeypatch):
    batching(monkeypatch, max_batch=4)
    occupy_one_group(db)
    like = [add(db, age_s=10 - i).id for i in range(6)]
    sent = Sent()
    # One group free for six like jobs: one batch of max_batch; the rest wait for room.
    assert release(own, sent) == like[:4] and sent.units == [tuple(like[:4])]


def test_without_batching_two_go(own, db):
    like = [add(db, age_s=10 - i).id for i in range(5)]
    sent = Sent()
    assert release(own, sent) == like[:2] and sent.units == like[:2]


def test_unlike_and_multi_segment_jobs_render_alone(own, db, monkeypatch):
    batching(monkeypatch, max_batch=4)
    a, other_steps, long_ = add(db, age_s=3), add(db, steps=3, age_s=2), add(db, frames=33, age_s=1)
    sent = Sent()
    release(own, sent)
    assert sent.units == [a.id, other_steps.id]  # no batch: long_ waits for room
    assert jobs.get_job(db, long_.id).dispatched_at is None


def test_a_batch_never_passes_a_job_of_higher_priority_than_all_its_members(own, db, monkeypatch):
    """EDF within the band 50-59: a 50 with a deadline first, a 55 without (different
    steps) next, then a like 50 without: pulling it into the first one's batch would pass
    the 55. It stays behind; the 55 goes first."""
    batching(monkeypatch, max_batch=4)
    first = add(db, 50, deadline_s=600, age_s=3)
    higher = add(db, 55, steps=3, age_s=2)
    like = add(db, 50, age_s=1)
    sent = Sent()
    release(own, sent)
    assert sent.units == [first.id, higher.id]
    assert jobs.get_job(db, like.id).dispatched_at is None


def test_a_batch_on_the_gpus_holds_one_group(own, db, monkeypatch):
    """Four jobs rendering in one batched render (their segments name it) hold one of the
    two slots: the next like job finds the other."""
    batching(monkeypatch, max_batch=1)  # the next one goes alone: only holdings are tested
    rendering = [add(db, age_s=10) for _ in range(4)]
    with session_scope(db) as session:
        ids = [j.id for j in rendering]
        session.execute(update(Job).where(Job.id.in_(ids)).values(state="running",
                                                                    dispatched_at=utcnow()))
        session.execute(update(Segment).where(Segment.job_id.in_(ids)).values(
            state="running", render_batch="b" * 32))
    nxt, last = add(db, age_s=1), add(db)
    sent = Sent()
    assert release(own, sent) == [nxt.id]
    assert jobs.get_job(db, last.id).dispatched_at is None


def occupy_one_group(db_url):
    """A job of another project rendering on one of the cpu tier's two groups."""
    busy = add(db_url, age_s=60, steps=9, project="busy")
    with session_scope(db_url) as session:
        session.execute(update(Job).where(Job.id == busy.id).values(state="running",
                                                                     dispatched_at=utcnow()))
        session.execute(update(Segment).where(Segment.job_id == busy.id).values(state="running"))


def test_a_lone_like_job_is_not_held_while_groups_are_idle(own, db, monkeypatch):
    batching(monkeypatch, max_batch=4, wait_ms=60_000)
    lone = add(db)
    sent = Sent()
    assert release(own, sent) == [lone.id]  # two idle groups: a companion finds its own


def test_a_lone_like_job_waits_for_a_companion_within_its_window(own, db, monkeypatch):
    batching(monkeypatch, max_batch=4, wait_ms=60_000)
    occupy_one_group(db)
    lone = add(db)
    sent = Sent()
    assert release(own, sent) == [] and sent.units == []  # held, its group reserved
    companion = add(db)
    assert release(own, sent) == [lone.id, companion.id]
    assert sent.units == [(lone.id, companion.id)]


def test_a_lone_job_is_not_held_past_its_window(own, db, monkeypatch):
    batching(monkeypatch, max_batch=4, wait_ms=60_000)
    occupy_one_group(db)
    old = add(db, age_s=61)
    sent = Sent()
    assert release(own, sent) == [old.id] and sent.units == [old.id]


def test_a_lone_job_is_not_held_while_a_higher_one_waits(own, db, monkeypatch):
    """One group free; a 55 of project `busy` waits in the same line but is passed over (its
    project holds its quota of one GPU on cpu): a lone 50 is never held while a job of
    higher priority waits for its tier, so it goes now."""
    batching(monkeypatch, max_batch=4, wait_ms=60_000)
    policy = admit.get_policy()
    quotas = Quotas(projects={"busy": {"cpu": 1}})
    monkeypatch.setattr(admit, "get_policy", lambda: Policy(
        policy.catalog, dataclasses.replace(policy.rules, quotas=quotas)))
    occupy_one_group(db)
    lone = add(db, 50, age_s=1)
    higher = add(db, 55, frames=33, project="busy")
    sent = Sent()
    assert release(own, sent) == [lone.id] and sent.units == [lone.id]
    assert jobs.get_job(db, higher.id).dispatched_at is None
