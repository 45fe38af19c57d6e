import pytest

from scheduler.planner import is_4k_plus_1, plan_segments


@pytest.mark.parametrize("frames,max_frames", [(1, 17), (17, 17), (33, 17), (81, 17),
                                               (85, 81), (161, 81), (1281, 81)])
def test_segments_cover_the_frames_exactly(frames, max_frames):
    plans = plan_segments(frames, max_frames, seed=10)
    assert sum(p.kept_frames for p in plans) == frames
    assert all(is_4k_plus_1(p.render_frames) and p.render_frames <= max_frames for p in plans)
    starts = [p.frame_start for p in plans]
    assert starts == [sum(p.kept_frames for p in plans[:i]) for i in range(len(plans))]
    assert [p.skip_frames for p in plans] == [0] + [1] * (len(plans) - 1)
    assert len({p.seed for p in plans}) == len(plans)


def test_33_frames_on_17_frame_model_is_two_segments():
    plans = plan_segments(33, 17, seed=0)
    assert [(p.render_frames, p.kept_frames) for p in plans] == [(17, 17), (17, 16)]


@pytest.mark.parametrize("frames", [0, 2, 10, 80])
def test_rejects_frames_not_4k_plus_1(frames):
    with pytest.raises(ValueError, match=f"got {frames}"):
        plan_segments(frames, 17, seed=0)
