"""A procedural video world: one shape of one colour moving on a plain background.

Each clip comes with its ground truth (colour, shape, motion, background) and captions in
English and Chinese built from templates. Some (colour, shape, motion) combinations are held
out of training, so that evaluation can ask whether the model composes what it learned.
Pure numpy; clips are uint8 (T, H, W, 3).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# name -> (RGB, Chinese)
COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 190, 60), "绿色"),
    "blue": ((40, 70, 220), "蓝色"),
    "yellow": ((235, 215, 40), "黄色"),
    "purple": ((150, 50, 200), "紫色"),
    "white": ((245, 245, 245), "白色"),
}
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "black": ((15, 15, 15), "黑色"),
    "gray": ((120, 120, 120), "灰色"),
    "navy": ((20, 30, 90), "深蓝色"),
    "brown": ((110, 70, 40), "棕色"),
}
SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
# name -> (dx, dy) per frame in units of the speed, Chinese
MOTIONS: dict[str, tuple[tuple[int, int], str]] = {
    "left": ((-1, 0), "向左移动"),
    "right": ((1, 0), "向右移动"),
    "up": ((0, -1), "向上移动"),
    "down": ((0, 1), "向下移动"),
    "still": ((0, 0), "静止不动"),
}
LANGUAGES = ("en", "zh")

# Held out of training: every colour, shape and motion still appears in other combinations.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset({
    ("red", "triangle", "up"), ("green", "circle", "left"), ("blue", "square", "down"),
    ("yellow", "triangle", "right"), ("purple", "square", "still"), ("white", "circle", "up"),
    ("red", "square", "right"), ("green", "triangle", "still"), ("blue", "circle", "right"),
    ("yellow", "circle", "down"), ("purple", "triangle", "left"), ("white", "square", "left"),
})
ALL_COMBOS = tuple(itertools.product(COLOURS, SHAPES, MOTIONS))
SEEN = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str
    background: str

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)


def caption(scene: Scene, language: str) -> str:
    if language == "en":
        return (f"a {scene.colour} {scene.shape} moving {scene.motion} on a {scene.background} "
                f"background" if scene.motion != "still" else
                f"a {scene.colour} {scene.shape} staying still on a {scene.background} background")
    if language == "zh":
        return (f"{BACKGROUNDS[scene.background][1]}背景上一个{COLOURS[scene.colour][1]}"
                f"{SHAPES[scene.shape]}{MOTIONS[scene.motion][1]}")
    raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")


def vocabulary() -> list[str]:
    """Every word of the English captions and every character of the Chinese ones."""
    words: set[str] = set()
    for colour, shape, motion, bg in itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS):
        scene = Scene(colour, shape, motion, bg)
        words.update(caption(scene, "en").split())
        words.update(caption(scene, "zh"))
    return sorted(words)


def _shape_mask(shape: str, size: int, cx: float, cy: float, height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    half = size / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # pointing up: width grows linearly from apex to base
        top, bottom = cy - half, cy + half
        frac = (ys - top) / max(bottom - top, 1e-6)
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= frac * half)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(scene: Scene, rng: np.random.Generator, frames: int = 17, height: int = 32,
                width: int = 32) -> np.ndarray:
    """uint8 (frames, height, width, 3). Size, speed and start point are drawn from ``rng``."""
    size = rng.uniform(0.30, 0.38) * min(height, width)
    speed = rng.uniform(0.8, 1.0) * min(height, width) / 32  # pixels per frame
    (dx, dy), _ = MOTIONS[scene.motion]
    travel_x, travel_y = dx * speed * (frames - 1), dy * speed * (frames - 1)
    margin = size / 2 + 1
    cx0 = rng.uniform(margin - min(travel_x, 0), width - margin - max(travel_x, 0))
    cy0 = rng.uniform(margin - min(travel_y, 0), height - margin - max(travel_y, 0))
    clip = np.empty((frames, height, width, 3), dtype=np.uint8)
    clip[:] = BACKGROUNDS[scene.background][0]
    colour = np.array(COLOURS[scene.colour][0], dtype=np.uint8)
    for t in range(frames):
        mask = _shape_mask(scene.shape, size, cx0 + dx * speed * t, cy0 + dy * speed * t,
                           height, width)
        clip[t][mask] = colour
    return clip


def random_scene(rng: np.random.Generator, combos=SEEN) -> Scene:
    colour, shape, motion = combos[rng.integers(len(combos))]
    return Scene(colour, shape, motion, list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
