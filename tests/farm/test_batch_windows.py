"""Batch windows with a fake clock, against a real database: jobs wait, wake when the window
opens, and when it closes the unsent ones keep their place or are canceled."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from farm.jobs import batches, service as jobs
from farm.db.migrate import upgrade
from farm.db.tables import Job
from farm.db.session import session_scope
from farm.schemas import BatchCreate


@pytest.fixture()
def sqlite_settings(settings, tmp_path):
    url = f"sqlite:///{tmp_path}/farm.db"
    upgrade(url)
    return settings.model_copy(update={"database_url": url})


def closed_window_batch(settings, on_close: str):
    """A batch whose window (an hour, two hours from now) is closed at submission."""
    now = datetime.now(timezone.utc)
    start = now + timedelta(hours=2)
    window = f"{start:%H:%M}-{start + timedelta(hours=1):%H:%M}"
    content = "\n".join(json.dumps({"prompt": f"clip {i}", "priority": p})
                        for i, p in enumerate([10, 90, 50]))
    batch, new = batches.create_batch(settings, BatchCreate(
        content=content, window=window, on_window_close=on_close,
        defaults={"model": "wan-tiny", "frames": 5}))
    return batch, new, start


def states(settings, new):
    return [jobs.get_job(settings.database_url, j.id).state for j in new]


def test_jobs_wait_wake_and_keep_their_place_when_the_window_closes(sqlite_settings):
    batch, new, start = closed_window_batch(sqlite_settings, "wait")
    db = sqlite_settings.database_url
    assert states(sqlite_settings, new) == ["waiting"] * 3
    assert batches.apply_windows(db, start - timedelta(minutes=1)) == (0, 0)
    assert batches.apply_windows(db, start + timedelta(minutes=1)) == (3, 0)
    assert states(sqlite_settings, new) == ["queued"] * 3
    # One was sent to the GPUs (admission marks it) before the window closed: it runs on.
    with session_scope(db) as session:
        session.get(Job, new[1].id).dispatched_at = start + timedelta(minutes=2)
    before = {j.id: (jobs.get_job(db, j.id).priority, jobs.get_job(db, j.id).created_at)
              for j in new}
    assert batches.apply_windows(db, start + timedelta(hours=2)) == (0, 2)
    assert states(sqlite_settings, new) == ["waiting", "queued", "waiting"]
    after = {j.id: (jobs.get_job(db, j.id).priority, jobs.get_job(db, j.id).created_at)
             for j in new}
    assert after == before  # same priority and age: the same place in the next window
    assert batches.apply_windows(db, start + timedelta(days=1, minutes=1)) == (2, 0)


def test_a_batch_can_cancel_what_its_window_did_not_start(sqlite_settings):
    batch, new, start = closed_window_batch(sqlite_settings, "cancel")
    db = sqlite_settings.database_url
    batches.apply_windows(db, start + timedelta(minutes=1))
    assert batches.apply_windows(db, start + timedelta(hours=2)) == (0, 3)
    canceled = [jobs.get_job(db, j.id) for j in new]
    assert {j.state for j in canceled} == {"canceled"}
    assert canceled[0].error == "the batch window closed first"
    _, job_states = batches.get_batch(db, batch.id)
    assert batches.counts(job_states) == {"canceled": 3}
