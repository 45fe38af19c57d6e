"""The preemption trigger against a real PostgreSQL database (issue #15, item 1): an urgent
job blocked on a full tier asks the right running segment to yield, through the admission
pass, once; and nobody else is asked."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, text, update

from farm.db.leases import GroupLease
from farm.db.session import session_scope
from farm.db.tables import Job, Segment, utcnow
from farm.jobs import admit, batches, events, service as jobs
from farm.jobs.events import PREEMPT_REQUESTED
from farm.jobs.preempt import preempt_for_waiting
from farm.jobs.submit import route_request
from farm.schemas import JobCreate

TIER = "cpu-b"  # the test policy's one-slot tier (tests/conftest.py)


def lease(db_url, job_id, segment_index, replica):
    """A live lease of a group of the tier's pool by the segment (farm.tasks.group_leases)."""
    with session_scope(db_url) as session:
        session.add(GroupLease(pool=f"wan-tiny:{TIER}:test", replica=replica, holder="h" * 32,
                               job_id=job_id, segment_index=segment_index, leased_at=utcnow(),
                               expires_at=utcnow() + timedelta(minutes=5)))


def add(db_url, priority, preempt_at=None, margin=20, running=False, age_s=0,
        project="tier-b", **segment):
    """A job of tier cpu-b (project tier-b; cpu for others); ``running``: sent, its one
    segment rendering since ``age_s`` ago on a group it holds the lease of."""
    request = JobCreate(prompt="a red circle", model="wan-tiny", frames=5, priority=priority,
                        project=project)
    job = jobs.new_job(request, route_request(request, {}), "sha")
    job.route = {**job.route, "preempt_at": preempt_at, "preempt_margin": margin}
    jobs.add_jobs(db_url, [job])
    if running:
        with session_scope(db_url) as session:
            session.execute(update(Job).where(Job.id == job.id).values(
                state="running", dispatched_at=utcnow()))
            session.execute(update(Segment).where(Segment.job_id == job.id).values(
                state="running", started_at=utcnow() - timedelta(seconds=age_s), **segment))
        lease(db_url, job.id, 0, replica=len(leases(db_url)))
    return job


def leases(db_url) -> list:
    with session_scope(db_url) as session:
        return session.execute(text("SELECT job_id, segment_index FROM group_leases")).all()


def requested(db_url, job) -> bool:
    with session_scope(db_url) as session:
        return session.scalar(text("SELECT preempt_requested_at IS NOT NULL FROM segments "
                                   "WHERE job_id = :j"), {"j": job.id})


def test_a_blocked_urgent_job_asks_the_running_low_one_to_yield_once(own, db):
    low = add(db, 10, running=True)
    urgent = add(db, 95, preempt_at=90)
    sent = []
    assert admit.release(own, sent.append, tiers=[TIER]) == []  # no room: nothing sent
    assert requested(db, low)
    log = [(e.kind, e.message) for e in events.list_events(db, low.id)]
    assert log == [(PREEMPT_REQUESTED, f"preemption requested for job {urgent.id} (priority 95)")]
    # The next pass: the segment is already yielding: its GPUs count, nobody more is asked.
    assert preempt_for_waiting(own, TIER) == []
    assert len(events.list_events(db, low.id)) == 1


def test_an_urgent_submission_asks_at_once_not_at_the_next_tick(own, db):
    """A submission runs no pass when its job cannot go now, except an urgent one: its
    pass, blocked, asks the running segment to yield."""
    low = add(db, 10, running=True)
    plain = add(db, 99)  # no preempt_at: no pass, nobody asked
    assert admit.release_submitted(own, plain, lambda job: None) == []
    assert not requested(db, low)
    with session_scope(db) as session:  # out of the way: the urgent job is first in line
        session.execute(update(Job).where(Job.id == plain.id).values(held=True))
    urgent = add(db, 95, preempt_at=90)
    assert admit.release_submitted(own, urgent, lambda job: None) == []
    assert requested(db, low)


def test_of_equal_priorities_the_most_recently_started_yields(own, db):
    """Tier cpu, two slots, both rendering priority 10 of another project (the quota is
    per project): the one started last yields (it loses the least), the older keeps its
    group."""
    old = add(db, 10, running=True, age_s=60, project="overnight")
    new = add(db, 10, running=True, age_s=5, project="overnight")
    mid = add(db, 40, running=False, project="default")  # waits behind, never asked
    add(db, 95, preempt_at=90, project="default")
    assert admit.release(own, lambda job: None, tiers=["cpu"]) == []
    assert (requested(db, old), requested(db, new)) == (False, True)
    assert events.list_events(db, mid.id) == []


@pytest.mark.parametrize("case", ["no preempt_at", "below preempt_at", "within the margin",
                                  "preempted enough", "in a batch"])
def test_nobody_is_asked_when_the_rules_say_no(own, db, case):
    segment = {"preempted enough": {"preemptions": 2},
               "in a batch": {"render_batch": "b" * 32}}.get(case, {})
    low = add(db, 80 if case == "within the margin" else 10, running=True, **segment)
    urgent = {"no preempt_at": dict(priority=99),
              "below preempt_at": dict(priority=89, preempt_at=90)}.get(
        case, dict(priority=95, preempt_at=90))
    add(db, **urgent)
    assert admit.release(own, lambda job: None, tiers=[TIER]) == []
    assert not requested(db, low)
    assert events.list_events(db, low.id) == []


def test_only_a_segment_holding_a_group_is_asked_to_yield(own, db):
    """One job, three segments `running`: the newest has not leased a group yet (it waits
    for one after start_segment). Asking it would free nothing and count as asked, so the
    urgent job would wait (issue #15 review): one of the two holding a lease yields."""
    low = add(db, 10, running=True, age_s=60)  # segment 0, leased
    with session_scope(db) as session:
        first = session.scalars(select(Segment).where(Segment.job_id == low.id)).one()
        for index, age_s in ((1, 30), (2, 1)):  # segment 2: started last, no lease
            session.add(Segment(job_id=low.id, index=index, state="running", frame_start=0,
                                render_frames=first.render_frames, skip_frames=0, seed=index,
                                started_at=utcnow() - timedelta(seconds=age_s)))
    lease(db, low.id, 1, replica=1)
    add(db, 95, preempt_at=90)
    assert admit.release(own, lambda job: None, tiers=[TIER]) == []
    with session_scope(db) as session:
        asked = session.scalars(select(Segment.index).where(
            Segment.job_id == low.id, Segment.preempt_requested_at.is_not(None))).all()
    assert asked == [1]  # the most recently started of those on a group


def window_closed_now() -> str:
    """A one-minute window twelve hours from now: closed now."""
    hour = (utcnow().hour + 12) % 24
    return f"{hour:02d}:00-{hour:02d}:01"


@pytest.mark.parametrize("started", [True, False])
def test_a_started_window_job_back_in_line_is_neither_parked_nor_passed_over(own, db,
                                                                                started):
    """An overnight job preempted after its window closed is `queued` and un-sent, as a
    job never sent: started, it finishes (issue #15 review): the tick does not park it
    (nor cancel it) and admission sends it; one that never started is parked."""
    job = add(db, 10)
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job.id).values(
            route={**job.route, "window": window_closed_now(), "timezone": "UTC"},
            started_at=utcnow() - timedelta(minutes=5) if started else None))
    assert batches.apply_windows(db, utcnow()) == (0, 0 if started else 1)
    sent = []
    admit.release(own, lambda j: sent.append(j.id), tiers=[TIER])
    assert sent == ([job.id] if started else [])
    with session_scope(db) as session:
        assert session.get(Job, job.id).state == ("queued" if started else "waiting")


def test_a_tier_with_room_preempts_nothing(own, db):
    urgent = add(db, 95, preempt_at=90)
    assert preempt_for_waiting(own, TIER, urgent.id) == []
    sent = []
    assert admit.release(own, lambda job: sent.append(job.id), tiers=[TIER]) == [urgent.id]


def test_a_job_held_by_its_own_projects_quota_preempts_nobody(own, db):
    """Preemption frees room on a tier, never quota: the urgent job's own project holds
    both its cpu GPUs, so its line is not blocked and nobody is asked."""
    mine = [add(db, 10, running=True, project="default") for _ in range(2)]
    add(db, 95, preempt_at=90, project="default")
    assert admit.release(own, lambda job: None, tiers=["cpu"]) == []
    assert not any(requested(db, job) for job in mine)


# ---- `farm rules explain --running / --live`: who would be preempted -------------------------

def explain(tmp_path, *options, priority=95):
    import json

    from typer.testing import CliRunner

    from farm.cli.main import app
    from farm.policy import CONFIG_DIR

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"track": "final", "frames": 81, "priority": priority}))
    return CliRunner().invoke(app, ["rules", "explain", str(job), "--rules",
                                    str(CONFIG_DIR / "rules.yaml"), *options])


def test_explain_what_if_names_the_victim_and_why_the_others_stay(tmp_path):
    """The shipped finals rule (preempt_at 90, margin 20) on a full a100 tier (16 GPUs)."""
    result = explain(tmp_path, "--running", "overnight:10:2", "--running", "final-b:80:6",
                     "--running", "old:20:4:2", "--running", "batched:5:4:0:batch")
    assert result.exit_code == 0, result.output
    out = result.output
    assert ("preemption on a100 (what-if): preempt_at 90, preempt_margin 20, "
            "FARM_MAX_PREEMPTIONS 2; the job (priority 95) needs 2 GPU(s), 0 free") in out
    assert "  would yield: overnight (priority 10, 2 GPU(s), yielded 0 time(s))" in out
    assert "  stays: final-b (priority 80): priority 80 is not 20 below 95 (preempt_margin)" in out
    assert "  stays: old (priority 20): has yielded 2 time(s), the most allowed" in out
    assert "  stays: batched: renders in a batch (batch members are never preempted)" in out


def test_explain_what_if_a_job_below_preempt_at_and_a_bad_option(tmp_path):
    result = explain(tmp_path, "--running", "overnight:10:16", priority=80)
    assert result.exit_code == 0, result.output
    assert "  nobody: priority 80 is below preempt_at 90" in result.output
    assert "would yield" not in result.output
    bad = explain(tmp_path, "--running", "overnight:ten:2")
    assert bad.exit_code == 2
    assert "--running: got 'overnight:ten:2'; expected JOB:PRIORITY:GPUS" in bad.output


def test_explain_live_reads_the_farms_running_segments(tmp_path, own, db, monkeypatch):
    """--live on a farm whose one cpu-b slot renders a priority-10 and a batch member's
    job: a tier-b toy job at 95, its rule given preempt_at 90, would take the first."""
    import json
    import os

    import yaml
    from typer.testing import CliRunner

    from farm.cli.main import app
    from farm.settings import get_settings

    low = add(db, 10, running=True)
    batched = add(db, 5, running=True, render_batch="b" * 32)
    rules = yaml.safe_load(open(os.environ["FARM_RULES_FILE"]).read())
    tier_b = next(r for r in rules["rules"] if r["name"] == "tier-b-project")
    tier_b["route"]["preempt_at"] = 90
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    (tmp_path / "job.json").write_text(json.dumps({"model": "wan-tiny", "frames": 5,
                                                   "priority": 95, "project": "tier-b"}))
    monkeypatch.setenv("FARM_DATABASE_URL", db)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["rules", "explain", str(tmp_path / "job.json"),
                                          "--rules", str(tmp_path / "rules.yaml"), "--live"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "preemption on cpu-b (live farm): preempt_at 90" in result.output
    assert "needs 1 GPU(s), 0 free" in result.output
    assert f"  would yield: {low.id} (priority 10, 1 GPU(s), yielded 0 time(s))" in result.output
    assert f"  stays: {batched.id}: renders in a batch" in result.output
