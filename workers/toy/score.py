"""Read a clip's colour, shape and motion back from its pixels, the world's ground truth.

The judge knows only the world's palettes: background = the border's median colour; the
object = pixels nearer the object's colour than the background's (the midpoint, so a blurred
edge is cut where a sharp one would be); colour = the nearest palette colour of their mean;
shape = a triangle if the object tapers (its top third much narrower than its bottom third),
else a square if it fills the corners of its bounding box, else a circle; motion = how its
centroid moves between the first and last frames. Thresholds sit midway between the world's
own shapes (taper: triangles <= 0.31, circles >= 0.67; corners: circles <= 0.25, squares 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.toy.world import BACKGROUNDS, COLOURS

MIN_DISTANCE = 40.0  # RGB distance from the background below which nothing is an object
MIN_PIXELS = 4  # per frame (at 32x32), for a frame to say anything about the object
TAPER_TRIANGLE_BELOW = 0.5  # width of the top third / width of the bottom third
CORNERS_SQUARE_ABOVE = 0.6  # mask share of the four corner cells (a quarter each way)
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
    distance = np.sqrt(((video - bg_rgb) ** 2).sum(axis=-1))  # (T, H, W)
    mask = distance > max(MIN_DISTANCE, 0.5 * float(np.percentile(distance, 99)))
    counts = mask.sum(axis=(1, 2))
    good = counts >= MIN_PIXELS * (height * width) / 1024
    if good.sum() < max(2, frames // 3):
        return Judgement(None, None, None, background)
    colour = _nearest(video[mask].mean(axis=0), COLOURS)

    tapers, corners, centroids = [], [], []
    for t in np.flatnonzero(good):
        ys, xs = np.nonzero(mask[t])
        box = mask[t, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        tapers.append(_taper(box))
        corners.append(_corner_share(box))
        centroids.append((xs.mean(), ys.mean()))
    shape = ("triangle" if np.median(tapers) < TAPER_TRIANGLE_BELOW else
             "square" if np.median(corners) > CORNERS_SQUARE_ABOVE else "circle")

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


def _taper(box: np.ndarray) -> float:
    """Mean width of the top third of rows over that of the bottom third."""
    third = max(1, box.shape[0] // 3)
    return float(box[:third].sum(axis=1).mean() / max(box[-third:].sum(axis=1).mean(), 1e-6))


def _corner_share(box: np.ndarray) -> float:
    """How much of the four corner cells (a quarter of the box each way) the object fills."""
    ch, cw = max(1, box.shape[0] // 4), max(1, box.shape[1] // 4)
    cells = (box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:])
    return float(np.mean([c.mean() for c in cells]))
