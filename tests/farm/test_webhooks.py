"""Webhooks (issue #13, item 5): events written to the outbox with the state change that
causes them, exactly once; signed deliveries to a local HTTP receiver; retries with
backoff; the job's log. And the progress streams' diffing (item 4). Real PostgreSQL (a
database of this module's own: the session's beat must not deliver these rows) and SQLite."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import delete, select

from farm.db.session import session_scope
from farm.db.tables import Batch, Segment, WebhookDelivery, utcnow
from farm.jobs import batches, controls, events, progress_feed as feed, service as jobs
from farm.jobs import webhooks
from farm.jobs import webhook_delivery as delivery
from farm.jobs.submit import route_request
from farm.schemas import JobCreate
from farm.settings import get_settings
from tests.conftest import RUN_ID, free_port


class Receiver:
    """A webhook receiver on 127.0.0.1: records (headers, body) of each POST and answers
    ``status``. ``stop`` and ``start`` again keep its port."""

    def __init__(self, port: int | None = None):
        self.port, self.status, self.got = port or free_port(), 200, []
        self.server = None

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                if receiver.status == 200:
                    receiver.got.append((dict(self.headers), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self) -> list[tuple[str, str | None]]:
        return [(json.loads(b)["event"], json.loads(b).get("job_id")) for _, b in self.got]


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def new_job(db, batch_id=None, **fields):
    request = JobCreate(**({"prompt": "a red circle", "frames": 33, "model": "wan-tiny"}
                           | fields))
    job = jobs.new_job(request, route_request(request, {}), "sha", batch_id)
    jobs.add_jobs(db, [job])
    with session_scope(db) as session:
        assert jobs.claim_for_dispatch(session, job.id)
    return job


def outbox(db, job_id=None, batch_id=None) -> list[WebhookDelivery]:
    with session_scope(db) as session:
        where = (WebhookDelivery.job_id == job_id) if job_id else \
            (WebhookDelivery.batch_id == batch_id)
        return list(session.scalars(select(WebhookDelivery).where(where)
                                    .order_by(WebhookDelivery.id)))


def clear_outbox(db) -> None:
    """Earlier tests' rows (this module's own database) are not these tests' to send."""
    with session_scope(db) as session:
        session.execute(delete(WebhookDelivery))


def test_signature_verifies_and_catches_tampering():
    body = '{"event":"completed"}'
    header = webhooks.signature("whsec_x", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert webhooks.verify("whsec_x", header, body, now=1_700_000_010)
    assert not webhooks.verify("whsec_x", header, body + " ", now=1_700_000_010)
    assert not webhooks.verify("whsec_y", header, body, now=1_700_000_010)
    assert not webhooks.verify("whsec_x", header, body, now=1_700_000_000 + 301)  # replayed
    assert not webhooks.verify("whsec_x", "garbage", body)


def test_backoff_doubles_up_to_its_cap():
    assert [delivery.backoff_s(n, 2.0, 30.0) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_each_transition_writes_its_event_once(any_db):
    job = new_job(any_db, webhook="http://127.0.0.1:9/h",
                  webhook_events=["start", "progress", "completed"])
    first, second = (s.id for s in job.segments)
    assert jobs.start_segment(any_db, first, "w1") and jobs.start_segment(any_db, second, "w2")
    assert jobs.start_segment(any_db, first, "w1")  # a re-run: the job was already running
    for seg, fraction in [(first, 0.05), (first, 0.3), (second, 0.05), (first, 0.31),
                          (second, 0.61), (first, 0.91), (second, 0.89)]:
        jobs.report_segment_progress(any_db, seg, fraction, None)
    assert jobs.cancel_job(any_db, job.id) and not jobs.cancel_job(any_db, job.id)
    rows = outbox(any_db, job.id)
    # job progress = 0.95 x the segments' mean: 0.024, 0.1425, 0.166, 0.171, 0.437, 0.722,
    # 0.855: an event on entering tenths 1, 4, 7 and 8 only
    assert [(r.event, json.loads(r.body)["progress"]) for r in rows] == [
        ("start", 0.0), ("progress", 0.1425), ("progress", 0.437), ("progress", 0.722),
        ("progress", 0.855), ("completed", 0.855)]
    done = json.loads(rows[-1].body)
    assert done["state"] == "canceled" and done["output_url"] is None and \
        done["job_id"] == job.id and done["project"] == "default"
    assert all(r.url == "http://127.0.0.1:9/h" and r.next_attempt_at is not None for r in rows)


def test_only_the_events_asked_for_and_completed_for_every_end(any_db):
    quiet = new_job(any_db)  # no webhook: no rows
    assert jobs.fail_job(any_db, quiet.id, "boom") and outbox(any_db, quiet.id) == []
    job = new_job(any_db, webhook="http://127.0.0.1:9/h")  # default: completed only
    assert jobs.start_segment(any_db, job.segments[0].id, "w")
    assert jobs.fail_job(any_db, job.id, "boom")
    [row] = outbox(any_db, job.id)
    assert row.event == "completed" and json.loads(row.body)["error"] == "boom"
    parked = new_job(any_db, webhook="http://127.0.0.1:9/h")
    with session_scope(any_db) as session:  # not yet sent: a closing window may cancel it
        session.get(type(parked), parked.id).dispatched_at = None
    assert jobs.park_jobs(any_db, [parked.id], cancel=True) == 1
    assert [json.loads(r.body)["state"] for r in outbox(any_db, parked.id)] == ["canceled"]
    request = JobCreate(prompt="a red circle", model="wan-tiny", webhook="http://127.0.0.1:9/h")
    cached = jobs.new_job(request, route_request(request, {}), "sha")
    cached.state, cached.progress = "succeeded", 1.0  # as the result cache answers one
    jobs.add_jobs(any_db, [cached])
    [row] = outbox(any_db, cached.id)
    assert json.loads(row.body)["output_url"] == f"/v1/jobs/{cached.id}/video"


def test_a_batch_webhook_gets_its_jobs_starts_and_its_own_completion(own_pg, settings):
    db = own_pg
    batch = Batch(id=f"b{RUN_ID}", project="default", state="open", report_keys={},
                  webhook="http://127.0.0.1:9/batch", webhook_events=["start", "completed"])
    jobs.add_jobs(db, [], batch)
    job = new_job(db, batch_id=batch.id, frames=5)
    assert jobs.start_segment(db, job.segments[0].id, "w")
    assert jobs.fail_job(db, job.id, "boom")  # the batch asked no per-job completed
    assert [(r.event, r.url) for r in outbox(db, job.id)] == [("start", batch.webhook)]
    finished = batches.finish_batches(settings.model_copy(update={"database_url": db}))
    assert batch.id in finished
    [row] = [r for r in outbox(db, batch_id=batch.id) if r.job_id is None]
    body = json.loads(row.body)
    assert (row.event, row.job_id, body["counts"], body["state"]) == \
        ("completed", None, {"failed": 1}, "done")
    assert set(body["report_urls"]) == {"html", "csv"}
    assert batch.id not in batches.finish_batches(settings.model_copy(
        update={"database_url": db}))  # done once: no second event
    assert len([r for r in outbox(db, batch_id=batch.id) if r.job_id is None]) == 1


def test_delivery_signs_retries_with_backoff_and_logs(any_db, settings, receiver):
    clear_outbox(any_db)
    conf = settings.model_copy(update={"database_url": any_db, "webhook_retry_base_s": 30.0,
                                       "webhook_max_attempts": 3})
    job = new_job(any_db, webhook=receiver.url)
    assert jobs.cancel_job(any_db, job.id)
    receiver.status = 500
    t0 = utcnow()
    assert delivery.deliver_due(conf, t0) == {delivery.WEBHOOK_FAILED: 1}
    [row] = outbox(any_db, job.id)
    assert row.attempts == 1 and row.last_error == "HTTP 500" and row.delivered_at is None
    assert abs((row.next_attempt_at - t0).total_seconds() - 30.0) < 1
    assert delivery.deliver_due(conf, t0 + timedelta(seconds=29)) == {}  # not due yet
    receiver.status = 200
    assert delivery.deliver_due(conf, t0 + timedelta(seconds=31)) == \
        {delivery.WEBHOOK_DELIVERED: 1}
    assert delivery.deliver_due(conf, t0 + timedelta(days=1)) == {}  # never sent again
    [(headers, body)] = receiver.got
    [row] = outbox(any_db, job.id)
    assert row.next_attempt_at is None and row.delivered_at is not None and row.attempts == 2
    assert body == row.body and headers["Farm-Event"] == "completed"
    assert headers["Farm-Delivery"] == str(row.id)
    with session_scope(any_db) as session:
        secret = webhooks.secret_for(session, "default")
    assert webhooks.verify(secret, headers["Farm-Signature"], body)
    log = [(e.kind, e.message) for e in events.list_events(any_db, job.id)]
    assert [k for k, _ in log if k.startswith("webhook")] == ["webhook_failed",
                                                              "webhook_delivered"]
    assert "attempt 1 failed (HTTP 500); next in 30 s" in log[-2][1]


def test_delivery_gives_up_after_max_attempts(any_db, settings):
    clear_outbox(any_db)
    conf = settings.model_copy(update={"database_url": any_db, "webhook_retry_base_s": 1.0,
                                       "webhook_max_attempts": 2})
    job = new_job(any_db, webhook=f"http://127.0.0.1:{free_port()}/nobody-listens")
    assert jobs.cancel_job(any_db, job.id)
    t0 = utcnow()
    assert delivery.deliver_due(conf, t0) == {delivery.WEBHOOK_FAILED: 1}
    assert delivery.deliver_due(conf, t0 + timedelta(seconds=2)) == \
        {delivery.WEBHOOK_GAVE_UP: 1}
    [row] = outbox(any_db, job.id)
    assert row.next_attempt_at is None and row.delivered_at is None
    assert "ConnectError" in row.last_error
    assert delivery.deliver_due(conf, t0 + timedelta(days=1)) == {}


def test_rotating_the_secret_replaces_it(own_pg):
    with session_scope(own_pg) as session:
        made = webhooks.secret_for(session, "rotated")
    with session_scope(own_pg) as session:
        assert webhooks.secret_for(session, "rotated") == made  # made once, then kept
    new = webhooks.rotate_secret(own_pg, "rotated")
    assert new != made and new.startswith("whsec_") and len(new) == 70
    with session_scope(own_pg) as session:
        assert webhooks.secret_for(session, "rotated") == new


def test_progress_feed_sends_only_what_changed(own_pg):
    job = new_job(own_pg, steps=4)
    url = lambda job_id: f"/v1/jobs/{job_id}/video"  # noqa: E731

    def view(queue=(3, 42.4)):
        return feed.job_view(jobs.get_job(own_pg, job.id), queue, url)

    first = view()
    sent = feed.job_events(None, first)
    assert [e for e, _ in sent] == ["state", "progress", "progress", "queue"]
    assert sent[1][1] == {"index": 0, "state": "pending", "step": 0, "steps": 4,
                          "progress": 0.0, "job_progress": 0.0}
    assert sent[3][1] == {"queue_position": 3, "eta_s": 42}
    assert feed.job_events(first, view()) == []  # nothing changed: nothing sent
    seg = job.segments[1].id
    assert jobs.start_segment(own_pg, seg, "w")
    jobs.report_segment_progress(own_pg, seg, 0.5, None)
    later = view(queue=(None, 10.0))
    sent = feed.job_events(first, later)
    assert [e for e, _ in sent] == ["state", "progress", "queue"]
    assert sent[0][1]["state"] == "running" and (sent[1][1]["index"], sent[1][1]["step"]) == (1, 2)
    assert jobs.cancel_job(own_pg, job.id)
    end = feed.job_events(later, view(queue=(None, None)))
    assert [e for e, _ in end] == ["state", "queue", "done"]
    assert end[-1][1] == {"id": job.id, "state": "canceled", "error": None, "output_url": None}


def test_progress_restarts_after_a_retry_and_run_tells_the_runs_apart(own_pg, settings):
    db = own_pg
    job = new_job(db, webhook="http://127.0.0.1:9/h", frames=5,
                  webhook_events=["progress", "completed"])
    seg = job.segments[0].id
    assert jobs.start_segment(db, seg, "w")
    jobs.report_segment_progress(db, seg, 0.5, None)  # tenth 4
    assert jobs.fail_job(db, job.id, "boom")
    with session_scope(db) as session:  # its task has stopped (no more heartbeats)
        session.get(Segment, seg).heartbeat_at = utcnow() - timedelta(hours=1)
    controls.retry_job(settings.model_copy(update={"database_url": db}), job.id)
    with session_scope(db) as session:  # sent again (unless admission already sent it)
        jobs.claim_for_dispatch(session, job.id)
    assert jobs.get_job(db, job.id).dispatched_at is not None
    assert jobs.start_segment(db, seg, "w")
    jobs.report_segment_progress(db, seg, 0.2, None)  # tenth 1 of the second run
    assert jobs.cancel_job(db, job.id)
    sent = [(r.event, json.loads(r.body)["run"], json.loads(r.body)["progress"])
            for r in outbox(db, job.id)]
    assert sent == [("progress", 0, 0.475), ("completed", 0, 0.475),
                    ("progress", 1, 0.19), ("completed", 1, 0.19)]


@pytest.fixture
def public_url(monkeypatch):
    monkeypatch.setenv("FARM_PUBLIC_URL", "https://farm.example.com/")
    get_settings.cache_clear()
    yield "https://farm.example.com"
    monkeypatch.delenv("FARM_PUBLIC_URL")
    get_settings.cache_clear()


def test_output_url_is_absolute_under_the_public_url(own_pg, public_url):
    assert webhooks.output_url("abc", "") == "/v1/jobs/abc/video"
    request = JobCreate(prompt="a red circle", model="wan-tiny", webhook="http://127.0.0.1:9/h")
    cached = jobs.new_job(request, route_request(request, {}), "sha")
    cached.state, cached.progress = "succeeded", 1.0  # as the result cache answers one
    jobs.add_jobs(own_pg, [cached])
    [row] = outbox(own_pg, cached.id)
    assert json.loads(row.body)["output_url"] == f"{public_url}/v1/jobs/{cached.id}/video"


def test_finished_deliveries_older_than_the_keep_days_go(any_db, settings):
    clear_outbox(any_db)
    conf = settings.model_copy(update={"database_url": any_db, "webhook_keep_days": 7,
                                       "retention_batch": 3})
    now = utcnow()
    old, new = now - timedelta(days=8), now - timedelta(days=1)
    rows = {  # name -> (created, delivered, next attempt), in id (= creation) order
        "retrying": (old, None, now),  # still being tried: kept whatever its age
        "gave_up_old": (old, None, None),
        "delivered_old": (old, old + timedelta(hours=1), None),
        "gave_up_old_later": (old, None, None),  # beyond this tick's window of 3 ids
        "gave_up_new": (new, None, None),
        "delivered_new": (new, new, None),
    }
    ids = {}
    with session_scope(any_db) as session:
        for name, (created, delivered, due) in rows.items():
            row = WebhookDelivery(project="p", event="completed", url="http://127.0.0.1:9/h",
                                  body="{}", attempts=1, created_at=created,
                                  delivered_at=delivered, next_attempt_at=due)
            session.add(row)
            session.flush()
            ids[name] = row.id

    def left():
        with session_scope(any_db) as session:
            found = set(session.scalars(select(WebhookDelivery.id)))
        return {name for name, i in ids.items() if i in found}

    assert delivery.prune(conf, now) == 2
    assert left() == {"retrying", "gave_up_new", "delivered_new", "gave_up_old_later"}
    assert delivery.prune(conf, now) == 1  # the window has moved on
    assert left() == {"retrying", "gave_up_new", "delivered_new"}
    assert delivery.prune(conf, now) == 0
