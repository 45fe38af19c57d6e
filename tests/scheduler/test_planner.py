import pytest

from scheduler.batch_lines import parse_batch
from scheduler.planner import SEED_SPACE, is_4k_plus_1, plan_segments, segment_seed


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


def test_segment_zero_renders_from_the_job_seed():
    assert plan_segments(17, 17, seed=1234)[0].seed == 1234
    assert plan_segments(65, 17, seed=1234)[0].seed == 1234


def test_a_seeds_batch_shares_no_noise_between_its_segments():
    """Issue #11: with seed + k, job s's segment 1 was job s+1's segment 0."""
    lines = parse_batch('{"prompt": "a red circle moving right", "seeds": 200, "seed": 40}',
                        "jsonl")
    seeds = [line.fields["seed"] for line in lines]
    assert seeds == list(range(40, 240))
    plans = {s: plan_segments(65, 17, seed=s) for s in seeds}
    assert plans[40][1].seed != plans[41][0].seed
    every = [p.seed for ps in plans.values() for p in ps]
    assert len(every) == 4 * 200 and len(set(every)) == len(every)
    assert all(0 <= seed < SEED_SPACE for seed in every)


def test_segment_seeds_are_a_pure_function_of_job_seed_and_index():
    assert [p.seed for p in plan_segments(65, 17, 9)] == [p.seed for p in plan_segments(65, 17, 9)]
    assert segment_seed(9, 2) != segment_seed(10, 1) != segment_seed(9, 1)
