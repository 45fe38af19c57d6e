"""Read a clip's colour, shape and motion back from its pixels, the world's ground truth.

The judge knows only the world's palettes: background = the border's median colour; the
object = pixels far from it; colour = the nearest palette colour of their mean; shape = how
much of its bounding box the object fills (square ~1, circle ~pi/4, triangle ~1/2); motion =
how its centroid moves between the first and last frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.toy.world import BACKGROUNDS, COLOURS

OBJECT_DISTANCE = 70.0  # RGB distance from the background that counts as object
MIN_PIXELS = 4  # per frame, for a frame to say anything about the object
FILL_TRIANGLE_BELOW = 0.66
FILL_SQUARE_ABOVE = 0.885
STILL_BELOW = 0.1  # centroid travel, as a fraction of the frame size


@dataclass(frozen=True)
class Judgement:
    colour: str | None
    shape: str | None
    motion: str | None
    background: str


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    refs = np.array([palette[n][0] for n in names], dtype=np.float32)
    return names[int(np.argmin(((refs - rgb) ** 2).sum(axis=1)))]


def judge(clip: np.ndarray) -> Judgement:
    """``clip``: uint8 (T, H, W, 3), any size."""
    video = clip.astype(np.float32)
    frames, height, width, _ = video.shape
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
    bg_rgb = np.median(border.reshape(-1, 3), axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    mask = np.sqrt(((video - bg_rgb) ** 2).sum(axis=-1)) > OBJECT_DISTANCE  # (T, H, W)
    counts = mask.sum(axis=(1, 2))
    good = counts >= MIN_PIXELS * (height * width) / 1024
    if good.sum() < max(2, frames // 3):
        return Judgement(None, None, None, background)
    colour = _nearest(video[mask].mean(axis=0), COLOURS)

    fills, centroids = [], []
    for t in np.flatnonzero(good):
        ys, xs = np.nonzero(mask[t])
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
        centroids.append((xs.mean(), ys.mean()))
    fill = float(np.median(fills))
    shape = ("triangle" if fill < FILL_TRIANGLE_BELOW else
             "square" if fill > FILL_SQUARE_ABOVE else "circle")

    centroids = np.array(centroids)
    k = max(1, len(centroids) // 4)
    dx, dy = centroids[-k:].mean(axis=0) - centroids[:k].mean(axis=0)
    dx, dy = dx / width, dy / height
    if max(abs(dx), abs(dy)) < STILL_BELOW:
        motion = "still"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return Judgement(colour, shape, motion, background)
