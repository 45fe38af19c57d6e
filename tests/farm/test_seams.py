"""farm/tasks/seams.py: a continued segment's first frame through real (local) storage."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from farm.storage import Storage
from farm.tasks.seams import SeamMissing, first_frame, last_frame_key, save_last_frame


@pytest.fixture
def storage(tmp_path):
    return Storage(f"file://{tmp_path}/store")


def _seg(index, attempts=1):
    return SimpleNamespace(index=index, attempts=attempts)


def _job(continuous=True, attempts=(1, 1, 1, 1)):
    """A job whose segment i finished on attempt ``attempts[i]``."""
    return SimpleNamespace(id="job1", continuous=continuous,
                           segments=[_seg(i, a) for i, a in enumerate(attempts)])


def frame(value: int) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)


def test_segment_k_plus_1_starts_from_segment_k_last_frame(storage):
    key = save_last_frame(storage, _job(), _seg(0), frame(1))
    assert key == last_frame_key("job1", 0, 1) == "jobs/job1/seams/s0000_a01_last.npy"
    np.testing.assert_array_equal(first_frame(storage, _job(), _seg(1)), frame(1))
    # No '.part-' leftovers: the write was atomic.
    assert [p.name for p in storage.local_path(key).parent.iterdir()] == \
        ["s0000_a01_last.npy"]


def test_the_next_segment_reads_the_frame_of_the_attempt_that_finished(storage):
    # Attempt 1 of segment 2 was replaced but ran on; attempt 2 finished the segment.
    save_last_frame(storage, _job(), _seg(2, attempts=2), frame(2))
    save_last_frame(storage, _job(), _seg(2, attempts=1), frame(1))  # the late one
    finished_on_2 = _job(attempts=(1, 1, 2, 1))
    np.testing.assert_array_equal(first_frame(storage, finished_on_2, _seg(3)), frame(2))


def test_no_first_frame_for_segment_zero_or_independent_clips(storage):
    save_last_frame(storage, _job(), _seg(0), frame(1))
    assert first_frame(storage, _job(), _seg(0)) is None
    assert first_frame(storage, _job(continuous=False), _seg(1)) is None


def test_missing_previous_frame_is_a_clear_error(storage):
    with pytest.raises(SeamMissing, match=r"job job1 segment 2: the last frame of segment 1 "
                                          r"is missing from storage \('jobs/job1/seams/"
                                          r"s0001_a01_last.npy'\)"):
        first_frame(storage, _job(), _seg(2))
    assert not SeamMissing.retryable


def test_save_refuses_what_is_not_a_frame(storage):
    with pytest.raises(ValueError, match=r"frame must be a uint8 array of shape \(H, W, 3\), "
                                         r"got float32 array of shape \(32, 48, 3\)"):
        save_last_frame(storage, _job(), _seg(0), frame(1).astype(np.float32))
    with pytest.raises(ValueError, match="got list"):
        save_last_frame(storage, _job(), _seg(0), [1, 2, 3])
