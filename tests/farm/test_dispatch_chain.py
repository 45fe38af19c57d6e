"""farm/jobs/dispatch.py: which segments a (re-)sent job's chord carries, and in what form."""

from __future__ import annotations

from farm.db.tables import Job, Segment
from farm.jobs.dispatch import is_continuous, segments_to_send


def _job(states: list[str], continuous: bool = True) -> Job:
    job = Job(id="j", continuous=continuous)
    # Out of order on purpose: the chain follows the segment index.
    job.segments = [Segment(id=10 + i, index=i, state=s)
                    for i, s in reversed(list(enumerate(states)))]
    return job


def test_a_fresh_continuous_job_chains_every_segment_in_order():
    job = _job(["pending"] * 4)
    assert is_continuous(job)
    assert [s.index for s in segments_to_send(job)] == [0, 1, 2, 3]


def test_a_resent_chain_starts_at_the_first_segment_not_done():
    job = _job(["done", "done", "running", "pending"])
    assert [s.index for s in segments_to_send(job)] == [2, 3]


def test_all_done_sends_the_last_so_the_stitch_still_runs():
    assert [s.index for s in segments_to_send(_job(["done"] * 3))] == [2]


def test_independent_clips_fan_out_whole():
    job = _job(["done", "pending", "pending"], continuous=False)
    assert not is_continuous(job)
    assert [s.index for s in segments_to_send(job)] == [0, 1, 2]
    assert not is_continuous(_job(["pending"]))  # one segment: nothing to chain
