"""Long videos without cuts (issue #11, item 7), on the shipped toy model (17 frames a run).

A 65-frame clip is planned as the farm plans it (scheduler/planner.py: 17, then three runs
of 17 keeping the last 16) and rendered segment by segment with `WanT2V`, each continuation
given the previous segment's last frame as ``first_frame``. The object's centroid is read
per frame with the world's judge rule (workers/toy/score.py): pixels farther from the
border's median colour than max(MIN_DISTANCE, half the 99th percentile distance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scheduler.planner import plan_segments
from workers.toy.score import MIN_DISTANCE, MIN_PIXELS
from workers.wan_pipeline import RenderRequest

CAPTION = "a red circle moving right on a black background"
FRAMES, MAX_FRAMES, SIZE, STEPS, GUIDANCE = 65, 17, 32, 20, 4.0  # wan-toy's catalog entry


def centroids(clip: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, 2) object centroid (x, y) in pixels, the judge's mask."""
    video = clip.astype(np.float32)
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0)
    distance = np.sqrt(((video - background) ** 2).sum(axis=-1))  # (T, H, W)
    mask = distance > max(MIN_DISTANCE, 0.5 * float(np.percentile(distance, 99)))
    out = np.full((len(clip), 2), np.nan)
    for t, frame in enumerate(mask):
        ys, xs = np.nonzero(frame)
        if len(xs) >= MIN_PIXELS:
            out[t] = xs.mean(), ys.mean()
    return out


def render_segments(toy, continued: bool, seed: int = 1) -> tuple[np.ndarray, list[int]]:
    """The job's frames, and the index of each continuation's first kept frame."""
    kept, seams, last = [], [], None
    for plan in plan_segments(FRAMES, MAX_FRAMES, seed):
        req = RenderRequest(CAPTION, "", frames=plan.render_frames, height=SIZE, width=SIZE,
                            steps=STEPS, guidance_high=GUIDANCE, guidance_low=GUIDANCE,
                            seed=plan.seed, first_frame=last if continued else None)
        clip = np.concatenate(list(toy.decode_chunks(toy.denoise(req))))
        last = clip[-1]
        if plan.index:
            seams.append(plan.frame_start)
        kept.append(clip[plan.skip_frames:])
    return np.concatenate(kept), seams


def jumps(video: np.ndarray, seams: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(centroid jump into each seam's first frame, every jump inside a segment), pixels."""
    steps = np.linalg.norm(np.diff(centroids(video), axis=0), axis=1)  # steps[i]: i -> i+1
    at_seams = steps[[s - 1 for s in seams]]
    return at_seams, np.delete(steps, [s - 1 for s in seams])


@pytest.fixture(scope="module")
def continued(toy):
    return render_segments(toy, continued=True)


def test_65_frames_join_without_a_cut(continued):
    video, seams = continued
    assert video.shape == (FRAMES, SIZE, SIZE, 3) and seams == [17, 33, 49]
    assert not np.isnan(centroids(video)).any()  # the object is seen in every frame
    at_seams, inside = jumps(video, seams)
    print(f"seam jumps {np.round(at_seams, 2)} px; largest inside a segment {inside.max():.2f} px")
    assert at_seams.max() <= inside.max()
    assert at_seams.max() < 2.0  # the object moves about a pixel a frame


def test_independent_clips_cut_at_every_seam(toy, continued):
    """The same plan and seeds without the held frame: each segment starts the object over
    at the left, a cut the measurement above would catch."""
    video, seams = render_segments(toy, continued=False)
    at_seams, _ = jumps(video, seams)
    assert at_seams.min() > 8.0
    # Segment 0 does not depend on the conditioning: both renders share it exactly.
    np.testing.assert_array_equal(video[:17], continued[0][:17])


def test_held_frame_is_the_encoded_first_frame(toy, continued):
    last = continued[0][-1]
    req = RenderRequest(CAPTION, "", frames=9, height=SIZE, width=SIZE, steps=4,
                        guidance_high=GUIDANCE, guidance_low=GUIDANCE, seed=3, first_frame=last)
    latents = toy.denoise(req)
    torch.testing.assert_close(latents[:, :, :1], toy.encode_frame(last), rtol=0, atol=1e-6)
    first = next(toy.decode_chunks(latents))[0]
    assert np.abs(first.astype(np.int16) - last).mean() < 12  # the VAE's round trip


def test_request_takes_first_frame_from_a_dict():
    frame = np.zeros((SIZE, SIZE, 3), np.uint8)
    fields = dict(prompt=CAPTION, negative_prompt="", frames=17, height=SIZE, width=SIZE,
                  steps=2, guidance_high=4.0, guidance_low=4.0, seed=0)
    assert RenderRequest(**fields, first_frame=frame).first_frame is frame
    with pytest.raises(ValueError, match=r"first_frame must be a uint8 array of shape "
                                         r"\(32, 32, 3\).*got uint8 array of shape \(16, 32, 3\)"):
        RenderRequest(**fields, first_frame=frame[:16])
    with pytest.raises(ValueError, match="first_frame.*got float64 array"):
        RenderRequest(**fields, first_frame=frame.astype(float))
