"""Stage times summed under a row lock, and the metrics collector's numbers, on a real
PostgreSQL database of this module's own (issue #13, items 7 and 8)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from farm.api.metrics import registry_for
from farm.db.leases import GroupLease
from farm.db.session import session_scope
from farm.db.tables import Job, JobEvent, Segment, WebhookDelivery, utcnow
from farm.jobs import events, service as jobs, stage_times
from farm.jobs.webhook_delivery import WEBHOOK_FAILED
from farm.jobs.submit import route_request
from farm.schemas import JobCreate
from farm.tasks.stage_clock import StageClock


def saved_job(db, **fields) -> Job:
    request = JobCreate(**({"prompt": "a red circle", "frames": 5, "model": "wan-tiny",
                            "width": 64, "height": 64} | fields))
    job = jobs.new_job(request, route_request(request, {}), "sha")
    jobs.add_jobs(db, [job])
    return job


def set_job(db, job_id: str, **values) -> None:
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def scrape(registry) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_segments_finishing_at_once_all_add_their_stage_times(own_pg):
    job = saved_job(own_pg)
    started = job.created_at + timedelta(seconds=2.5)
    set_job(own_pg, job.id, started_at=started)
    peaks = list(range(1, 9))
    barrier = threading.Barrier(len(peaks))

    def finish(peak: int) -> None:
        barrier.wait()
        stage_times.add_stages(own_pg, job.id, {"load": 0.5, "denoise": 1.25}, peak * 1000)

    threads = [threading.Thread(target=finish, args=(p,)) for p in peaks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stage_times.add_stages(own_pg, job.id, {"stitch": 0.1})
    got = jobs.get_job(own_pg, job.id)
    assert got.stage_times == {"load": 4.0, "denoise": 10.0, "queue_wait": 2.5, "stitch": 0.1}
    assert got.peak_memory_bytes == 8000
    header = stage_times.server_timing(got.stage_times)
    assert header == "queue_wait;dur=2500.0, load;dur=4000.0, denoise;dur=10000.0, stitch;dur=100.0"
    assert stage_times.add_stages(own_pg, "0" * 32, {"load": 1.0}) is None


def test_the_stage_clock_reads_the_actors_events():
    clock = StageClock()
    # A split render: two groups, each with its own start; then two decoded chunks.
    for began, loaded, ats in ((100.0, 103.0, (104.0, 105.0)), (200.0, 200.5, (201.0, 202.5))):
        for step, at in enumerate(ats, 1):
            clock.track({"kind": "progress", "step": step, "steps": 4, "began": began,
                         "loaded": loaded, "at": at, "peak_memory_bytes": 10 * step})
    clock.track({"kind": "frames", "frames": [], "decode_s": 0.25, "peak_memory_bytes": 50})
    clock.track({"kind": "frames", "frames": [], "decode_s": 0.5, "peak_memory_bytes": 30})
    assert clock.seconds() == {"load": 3.5, "denoise": 4.0, "decode": 0.75, "encode": 0.0}
    assert clock.peak_memory_bytes == 50


def test_the_collector_counts_live_jobs_and_observes_finished_ones(own_pg):
    registry = registry_for(own_pg, settle_s=0.0)
    before = scrape(registry)
    waiting, admitted, running = (saved_job(own_pg, track=t) for t in ("draft", "final", "draft"))
    tier = waiting.route["tier"]
    set_job(own_pg, admitted.id, dispatched_at=utcnow())
    now = utcnow()
    set_job(own_pg, running.id, state="running", dispatched_at=now, started_at=now)
    with session_scope(own_pg) as session:
        session.add(GroupLease(pool=f"wan-tiny:{tier}:single:resident", replica=0,
                               holder="h", job_id=running.id, leased_at=now,
                               expires_at=now + timedelta(seconds=60)))
        session.add(GroupLease(pool=f"wan-tiny:{tier}:single:resident", replica=1))
        events.add(session, running.id, events.RESENT, "lost")
        events.add(session, running.id, WEBHOOK_FAILED, "HTTP 500")
        for delivered, retry, attempts in ((now, None, 1), (None, now, 1), (None, now, 0)):
            session.add(WebhookDelivery(project="default", job_id=running.id, event="start",
                                        url="http://127.0.0.1:9/", body="{}", attempts=attempts,
                                        delivered_at=delivered, next_attempt_at=retry))
    live = scrape(registry)
    for kind, track, job in (("waiting", "draft", waiting), ("admitted", "final", admitted),
                             ("running", "draft", running)):
        key = (f"farm_jobs_{kind}", (("tier", tier), ("track", track)))
        assert live[key] == before.get(key, 0) + 1, kind
    assert live[("farm_actor_groups", (("state", "busy"), ("tier", tier)))] == 1
    assert live[("farm_actor_groups", (("state", "idle"), ("tier", tier)))] == 1
    assert live[("farm_reconciler_resends_total", ())] == 1
    assert live[("farm_webhook_deliveries_total", (("result", "delivered"),))] == 1
    assert live[("farm_webhook_deliveries_total", (("result", "failed_attempt"),))] == 1
    assert live[("farm_webhook_deliveries_pending", (("retrying", "true"),))] == 1
    assert live[("farm_webhook_deliveries_pending", (("retrying", "false"),))] == 1

    # The running job ends: 3 s of queue, 40 s of render, one 30 s segment on degree 1.
    start = utcnow() - timedelta(seconds=43)  # it finished now, after the last scrape
    set_job(own_pg, running.id, state="succeeded", created_at=start,
            started_at=start + timedelta(seconds=3), finished_at=start + timedelta(seconds=43))
    with session_scope(own_pg) as session:
        session.execute(update(Segment).where(Segment.job_id == running.id).values(
            state="done", started_at=start + timedelta(seconds=5),
            finished_at=start + timedelta(seconds=35)))
    after = scrape(registry)
    draft = (("track", "draft"),)
    assert after[("farm_job_render_seconds_count", draft)] == 1
    assert after[("farm_job_render_seconds_sum", draft)] == pytest.approx(40.0)
    assert after[("farm_job_render_seconds_bucket", (("le", "60.0"),) + draft)] == 1
    assert after[("farm_job_render_seconds_bucket", (("le", "30.0"),) + draft)] == 0
    assert after[("farm_job_queue_wait_seconds_sum", draft)] == pytest.approx(3.0)
    degree = running.route["degree"]
    assert after[("farm_gpu_seconds_total", (("project", "default"), ("tier", tier)))] == \
        pytest.approx(30.0 * degree)
    assert after[("farm_jobs_running", (("tier", tier), ("track", "draft")))] == \
        live[("farm_jobs_running", (("tier", tier), ("track", "draft")))] - 1
    assert after[("farm_cache_lookups_total", (("result", "miss"),))] == \
        (1 if running.cache_key else 0)
    # Observed once: the next scrape counts nothing new.
    assert scrape(registry)[("farm_job_render_seconds_count", draft)] == 1
    with session_scope(own_pg) as session:
        assert session.query(JobEvent).filter_by(job_id=running.id).count() == 2
    assert scrape(registry)[("farm_reconciler_resends_total", ())] == 1  # counted once
