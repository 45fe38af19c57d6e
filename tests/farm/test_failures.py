"""The failure policy over made-up failure events (plain Python, no services)."""

from __future__ import annotations

from types import SimpleNamespace

from farm.jobs.events import SEGMENT_FAILED, SEGMENT_LOST
from farm.tasks.failure_policy import blocklisted, decide, pick_worker, segment_errors


def failure(worker: str, index: int = 0, kind: str = SEGMENT_FAILED, message: str = "boom"):
    return SimpleNamespace(worker=worker, segment_index=index, kind=kind, message=message)


SERVING = {"w1", "w2", "w3"}


def test_a_first_failure_is_retried_on_a_worker_that_has_not_failed_the_segment():
    d = decide([failure("w1")], 0, "w1", "render.cpu", SERVING)
    assert d.final is None and d.target == "w2" and not d.newly_blocklisted


def test_the_segment_fails_for_good_on_the_third_different_worker():
    evs = [failure("w1"), failure("w2", kind=SEGMENT_LOST), failure("w3")]
    d = decide(evs, 0, "w3", "render.cpu", SERVING)
    assert d.final == "segment 0 failed on 3 different workers"
    # Two workers are not enough, whatever the count.
    assert decide(evs[:2] * 2, 0, "w2", "render.cpu", SERVING).final is None


def test_three_failures_of_one_job_blocklist_a_worker_and_retries_avoid_it():
    evs = [failure("w1", 0), failure("w1", 1), failure("w1", 2)]
    assert blocklisted(evs) == {"w1"} and blocklisted(evs[:2]) == set()
    d = decide(evs, 2, "w1", "render.cpu", SERVING)
    assert d.newly_blocklisted and d.final is None and d.target in {"w2", "w3"}
    # The blocklisted worker hands the job's other segments on too.
    assert pick_worker(evs, 3, "w1", "render.cpu", SERVING)[0] == "w2"


def test_a_blocklisted_only_worker_fails_the_segment_with_the_reason():
    evs = [failure("w1")] * 3
    d = decide(evs, 0, "w1", "render.cpu", {"w1"})
    assert d.target is None
    assert d.final == ("segment 0 cannot run: no worker of queue render.cpu is left for this "
                       "job: blocklisted ['w1'] (after 3 failures each), serving ['w1']")
    # Workers unknown (a broker without broadcast): back to the queue, for another to take.
    unknown = decide(evs, 0, "w1", "q", None)
    assert unknown.final is None and unknown.target is None and unknown.newly_blocklisted


def test_when_every_other_worker_failed_the_segment_a_usable_one_still_gets_it():
    evs = [failure("w1"), failure("w2")]
    assert decide(evs, 0, "w2", "q", {"w1", "w2"}).target == "w1"


def test_segment_errors_lists_each_failure_with_its_worker():
    evs = [failure("w1", message="OSError: disk"), failure("w2", 1), failure("w3")]
    assert segment_errors(evs, 0) == "[w1] OSError: disk\n[w3] boom"
