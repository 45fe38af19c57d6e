"""A render's progress events, thinned by progress_every_s (workers/progress_pace.py)."""

from __future__ import annotations

import numpy as np
import pytest

from farm.policy import get_policy
from workers.group import ActorGroup
from workers.progress_pace import paced, pace


def progress(step: int, at: float) -> dict:
    return {"kind": "progress", "step": step, "steps": 10, "at": at}


def test_progress_is_thinned_and_the_last_step_is_never_lost():
    events = [progress(s, 0.03 * s) for s in range(1, 11)] + [{"kind": "frames", "n": 1}]
    got = list(paced(iter(events), 0.1))
    steps = [e["step"] for e in got if e["kind"] == "progress"]
    assert steps == [1, 5, 9, 10]  # at 0.03, 0.15, 0.27; 10 held, flushed before the frames
    assert got[-1] == {"kind": "frames", "n": 1}
    assert [e["step"] for e in paced(iter(events[:7]), 0.1)] == [1, 5, 7]  # flushed at the end
    assert list(paced(iter(events), 0)) == events  # 0: every step


@pytest.mark.parametrize("bad", [-1, "soon", float("nan")])
def test_a_bad_pace_names_the_field_and_the_value(bad):
    with pytest.raises(ValueError, match=r"progress_every_s must be a number of seconds "
                                         r">= 0, got " + repr(bad)):
        pace({"progress_every_s": bad})


@pytest.mark.parametrize("last", ["handover", "preempted"])
def test_the_held_step_goes_out_before_a_handover_or_a_preemption(last):
    events = [progress(s, 0.01 * s) for s in range(1, 6)] + [{"kind": last}]
    got = list(paced(iter(events), 1.0))
    assert [e.get("step") for e in got] == [1, 5, None] and got[-1]["kind"] == last


def test_a_paced_render_on_an_actor_gives_the_same_frames(ray_head, tiny_model):
    request = dict(prompt="a red circle moving left", negative_prompt="", frames=5, height=64,
                   width=112, steps=4, guidance_high=4.0, guidance_low=3.0, seed=7)
    group = ActorGroup.get_or_create("wan-tiny", get_policy().catalog.tier("cpu"),
                                     str(tiny_model), detached=True)
    every = list(group.render(request))
    sparse = list(group.render(dict(request, progress_every_s=3600)))
    steps = [e["step"] for e in sparse if e["kind"] == "progress"]
    assert steps == [1, 4]  # the first, then the last one held back until the frames
    assert sum(e["kind"] == "progress" for e in every) == 4
    frames = [np.concatenate([e["frames"] for e in events if e["kind"] == "frames"])
              for events in (every, sparse)]
    assert np.array_equal(*frames)
