"""A route's step cache reaches the actor's renders (issue #12, item 6): the request carries
``cache`` (farm/tasks/segment_runner.py), the actor turns caching on for that render and off
for the next request without one, so one loaded model serves cached and uncached routes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.actor import RenderWorker
from workers.lightening.step_cache import last_render_counts
from workers.toy import BUNDLED_DIR

REQUEST = dict(prompt="a red circle moving right on a black background", negative_prompt="",
               frames=9, height=32, width=32, steps=12, guidance_high=4.0, guidance_low=4.0,
               seed=4)
CACHE = {"kind": "first_block", "threshold": 0.2}


@pytest.fixture(scope="module")
def worker():
    torch.set_num_threads(1)
    return RenderWorker("wan-toy", str(BUNDLED_DIR / "wan-toy"))


def frames_of(worker: RenderWorker, request: dict, request_id: str) -> np.ndarray:
    events = list(worker.render(request, request_id))
    return np.concatenate([e["frames"] for e in events if e["kind"] == "frames"])


def test_a_cached_route_skips_blocks_and_the_next_uncached_request_runs_them_all(worker):
    plain = frames_of(worker, REQUEST, "plain-1")
    cached = frames_of(worker, {**REQUEST, "cache": CACHE}, "cached-1")
    counts = last_render_counts(worker.pipeline)
    assert counts["passes"] == 2 * REQUEST["steps"]  # caption and empty prompt, every step
    assert counts["blocks_run"] < counts["blocks_total"], counts
    assert cached.shape == plain.shape and not np.array_equal(cached, plain)
    again = frames_of(worker, REQUEST, "plain-2")
    assert worker.pipeline._step_cache is None
    assert np.array_equal(again, plain)  # caching left nothing behind


def test_the_same_cache_twice_keeps_its_hooks_and_gives_the_same_frames(worker):
    first = frames_of(worker, {**REQUEST, "cache": CACHE}, "cached-2")
    session = worker.pipeline._step_cache
    second = frames_of(worker, {**REQUEST, "cache": dict(CACHE)}, "cached-3")
    assert worker.pipeline._step_cache is session  # not re-hooked per render
    assert np.array_equal(first, second)  # caches start empty for every render


def test_a_bad_cache_option_is_refused_naming_it(worker):
    with pytest.raises(ValueError, match=r"cache.threshold -1"):
        frames_of(worker, {**REQUEST, "cache": {"kind": "first_block", "threshold": -1}},
                  "bad")
    assert worker.pipeline._step_cache is None
    assert frames_of(worker, REQUEST, "after-bad").shape[0] == REQUEST["frames"]
