"""Issue #15, item 3: the admission order with deadlines, the render estimate from measured
step times and the risk of missing a deadline, on made-up step times."""

from datetime import datetime, timedelta, timezone

import pytest

from scheduler.deadlines import PRIORITY_BAND, admission_key, band

UTC = timezone.utc
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def order(jobs: list[tuple]) -> list[str]:
    """jobs: (id, priority, deadline_at or None, created_at) -> ids in admission order."""
    return [j[0] for j in sorted(jobs, key=lambda j: admission_key(j[1], j[2], j[3], j[0]))]


@pytest.mark.parametrize("priority,expected", [
    (0, 0), (9, 0), (10, 1), (50, 5), (89, 8), (90, 9), (99, 9), (100, 10)])
def test_band_groups_priorities_by_ten_with_100_alone(priority, expected):
    assert PRIORITY_BAND == 10
    assert band(priority) == expected


@pytest.mark.parametrize("bad", [-1, 101, 50.0, "90", None, True])
def test_band_rejects_what_is_not_a_priority(bad):
    with pytest.raises(ValueError, match="priority"):
        band(bad)


def test_a_higher_band_goes_first_whatever_the_deadlines():
    jobs = [("batch", 80, at(10), at(0)), ("final", 90, None, at(5)),
            ("top", 100, None, at(9))]
    assert order(jobs) == ["top", "final", "batch"]


def test_earliest_deadline_first_within_a_band_even_over_priority_and_age():
    jobs = [("old-late", 99, at(7200), at(0)), ("new-soon", 90, at(600), at(60)),
            ("middle", 95, at(3600), at(30))]
    assert order(jobs) == ["new-soon", "middle", "old-late"]


def test_jobs_without_a_deadline_follow_those_with_one_in_their_band():
    jobs = [("free-99", 99, None, at(0)), ("due-90", 90, at(99999), at(50)),
            ("free-92", 92, None, at(1))]
    assert order(jobs) == ["due-90", "free-99", "free-92"]


def test_without_deadlines_the_order_is_priority_then_age_then_id():
    jobs = [("b", 50, None, at(0)), ("a", 50, None, at(0)), ("c", 55, None, at(1)),
            ("d", 50, None, at(-1))]
    assert order(jobs) == ["c", "d", "a", "b"]


def test_equal_deadlines_fall_back_to_priority_then_age():
    jobs = [("x", 90, at(100), at(5)), ("y", 95, at(100), at(9)), ("z", 90, at(100), at(1))]
    assert order(jobs) == ["y", "z", "x"]


# ---- the estimate from measured step times --------------------------------------------

from scheduler.deadlines import (  # noqa: E402
    Left, StepSample, StepTimes, catalog_step_s, missed, outlook, render_seconds, sample_of,
    step_seconds, volume_share,
)


@pytest.mark.parametrize("frames,share", [(17, 1.0), (13, 4 / 5), (9, 3 / 5), (5, 2 / 5),
                                          (1, 1 / 5)])
def test_volume_share_counts_latent_frames_of_the_causal_vae(frames, share):
    assert volume_share(frames, 17) == pytest.approx(share)


@pytest.mark.parametrize("frames", [0, 18])
def test_volume_share_rejects_a_segment_longer_than_the_model_renders(frames):
    with pytest.raises(ValueError, match=f"render_frames {frames}"):
        volume_share(frames, 17)


def test_a_sample_counts_its_segments_in_full_segment_steps():
    """A 17-frame model: a job of segments 17 + 9 frames at 10 steps ran 10 * (1 + 3/5) =
    16 full steps; 32 s of denoising is 2 s a full step."""
    s = sample_of("toy", "cpu", 1, denoise_s=32.0, steps=10, segment_frames=[17, 9],
                  max_frames=17)
    assert (s.full_steps, s.denoise_s / s.full_steps) == pytest.approx((16.0, 2.0))
    assert sample_of("toy", "cpu", 1, 0.0, 10, [17], 17) is None
    assert sample_of("toy", "cpu", 1, 5.0, 10, [], 17) is None  # all from the cache


def test_step_times_keep_the_newest_window_per_key_and_weigh_by_steps():
    newest_first = [StepSample("toy", "cpu", 1, 30.0, 10.0),  # 3 s a step
                    StepSample("toy", "cpu", 1, 10.0, 10.0),  # 1 s
                    StepSample("toy", "cpu", 2, 8.0, 16.0),  # another degree: 0.5 s
                    StepSample("toy", "cpu", 1, 999.0, 1.0)]  # outside a window of 2
    times = StepTimes(newest_first, window=2)
    assert times.measured("toy", "cpu", 1) == pytest.approx(2.0)
    assert times.measured("toy", "cpu", 2) == pytest.approx(0.5)
    assert times.measured("toy", "a100", 1) is None
    assert times.counts[("toy", "cpu", 1)] == 2
    with pytest.raises(ValueError, match="step_time_window"):
        StepTimes([], 0)


def test_measured_step_time_wins_over_the_catalog_which_is_the_fallback():
    times = StepTimes([StepSample("toy", "cpu", 1, 4.0, 10.0)], window=50)
    catalog = catalog_step_s({"cpu": 0.1}, "cpu", 1, 0.85)
    assert step_seconds(times, "toy", "cpu", 1, catalog) == pytest.approx((0.4, "measured"))
    assert step_seconds(times, "toy", "cpu", 2, catalog) == (0.1, "catalog")
    assert step_seconds(None, "toy", "cpu", 1, None) is None
    # The catalog's step on 2 GPUs: 10 s / (2 x 0.85).
    assert catalog_step_s({"a100": 10.0}, "a100", 2, 0.85) == pytest.approx(10 / 1.7)
    assert catalog_step_s({"a100": 10.0}, "h100", 1, 0.85) is None


def test_render_seconds_one_after_another_or_in_rounds_of_groups():
    """2 s a full step, 17-frame model: segments 17 (10 steps left), 9 (10), 9 (4 left after
    a preemption at step 6): 20 + 12 + 4.8 s."""
    left = [Left(17, 10), Left(9, 10), Left(9, 4)]
    assert render_seconds(2.0, left, 17) == pytest.approx(36.8)
    # Independent clips on 2 groups: rounds (20, 12) then (4.8): 20 + 4.8.
    assert render_seconds(2.0, left, 17, groups=2, continuous=False) == pytest.approx(24.8)
    assert render_seconds(2.0, [], 17) == 0.0


def test_a_job_with_enough_time_is_not_at_risk_and_one_behind_a_long_queue_is():
    """Tier of 4 GPUs, 400 GPU-seconds ahead: 100 s wait, 50 s render: finishes at 150 s."""
    view = outlook(at(0), deadline_at=at(200), render_s=50.0, gpu_s_ahead=400.0, tier_gpus=4)
    assert (view.wait_s, view.render_s, view.finish_at, view.at_risk) == (100.0, 50.0, at(150),
                                                                          False)
    assert outlook(at(0), at(149), 50.0, 400.0, 4).at_risk
    assert outlook(at(0), at(149), 50.0, 400.0, 4, running=True).finish_at == at(50)
    assert outlook(at(0), at(160), 50.0, 400.0, 4, slack_s=20.0).at_risk


def test_the_same_job_turns_at_risk_when_the_measured_steps_are_slower_than_the_catalog():
    """The catalog says 0.1 s a step; the farm measured 0.5 s: 20 steps of a full segment
    take 10 s, not 2 s, and a 5 s deadline is at risk only on the measured figure."""
    slow = StepTimes([StepSample("toy", "cpu", 1, 50.0, 100.0)], window=50)
    for times, risky in ((None, False), (slow, True)):
        per_step, _ = step_seconds(times, "toy", "cpu", 1, 0.1)
        render = render_seconds(per_step, [Left(17, 20)], 17)
        assert outlook(at(0), at(5), render, 0.0, 2).at_risk is risky


def test_outlook_rejects_bad_inputs_naming_them():
    with pytest.raises(ValueError, match="tier_gpus"):
        outlook(at(0), at(10), 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="render_s -1"):
        outlook(at(0), at(10), -1.0, 0.0, 1)


def test_missed_when_the_deadline_passes_while_the_job_is_live():
    assert not missed(None, at(100), None)
    assert missed(at(10), at(11), None)  # live past it
    assert not missed(at(10), at(9), None)
    assert missed(at(10), at(20), at(12))  # ended (delivered, failed, canceled) after it
    assert not missed(at(10), at(20), at(9))  # ended before it: whatever the end, no miss
