"""The quality yardstick: render captions of the procedural world and score them.

For seen and held-out (colour, shape, motion) combinations, in English and in Chinese, the
model renders each caption with a few seeds; the world's own judge reads colour, shape and
motion back from the pixels. Accuracy per attribute comes with a 95% Wilson interval, so a
lightened variant can be compared with the model it came from, and a random-weight model of
the same shape scores at chance (1/6 colour, 1/3 shape, 1/5 motion).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from workers.toy.score import Judgement, judge
from workers.toy.world import (
    BACKGROUNDS, COLOURS, HELD_OUT, LANGUAGES, MOTIONS, SEEN, SHAPES, Scene, caption,
)
from workers.wan_pipeline import RenderRequest, WanT2V

ATTRIBUTES = ("colour", "shape", "motion")
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "motion": 1 / len(MOTIONS)}


@dataclass(frozen=True)
class EvalSettings:
    seeds_per_combo: int = 2
    combos_per_split: int = 12  # all 12 held-out combinations; as many seen ones, fixed
    steps: int = 20
    guidance: float = 4.0
    frames: int = 17
    size: int = 32


@dataclass(frozen=True)
class Sample:
    split: str  # "seen" | "held-out"
    language: str
    scene: Scene
    judged: Judgement

    def correct(self, attribute: str) -> bool:
        return getattr(self.judged, attribute) == getattr(self.scene, attribute)


def eval_scenes(cfg: EvalSettings) -> Iterator[tuple[str, Scene, int]]:
    """(split, scene, seed), the same on every run."""
    rng = np.random.default_rng(1234)
    seen = [SEEN[i] for i in rng.choice(len(SEEN), size=cfg.combos_per_split, replace=False)]
    held = sorted(HELD_OUT)[: cfg.combos_per_split]
    backgrounds = list(BACKGROUNDS)
    for split, combos in (("seen", seen), ("held-out", held)):
        for c, combo in enumerate(combos):
            for k in range(cfg.seeds_per_combo):
                bg = backgrounds[(c + k) % len(backgrounds)]
                yield split, Scene(*combo, bg), 1000 + 17 * c + k


def run_eval(pipe: WanT2V, cfg: EvalSettings = EvalSettings()) -> list[Sample]:
    samples = []
    for split, scene, seed in eval_scenes(cfg):
        for language in LANGUAGES:
            req = RenderRequest(prompt=caption(scene, language), negative_prompt="",
                                frames=cfg.frames, height=cfg.size, width=cfg.size,
                                steps=cfg.steps, guidance_high=cfg.guidance,
                                guidance_low=cfg.guidance, seed=seed)
            clip = np.concatenate(list(pipe.decode_chunks(pipe.denoise(req))))
            samples.append(Sample(split, language, scene, judge(clip)))
    return samples


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Score:
    split: str
    language: str
    attribute: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.total)


def summarise(samples: list[Sample]) -> list[Score]:
    scores = []
    for split in ("seen", "held-out"):
        for language in LANGUAGES:
            group = [s for s in samples if s.split == split and s.language == language]
            for attribute in ATTRIBUTES:
                scores.append(Score(split, language, attribute,
                                    sum(s.correct(attribute) for s in group), len(group)))
    return scores


def format_table(scores: list[Score]) -> str:
    lines = ["| split | language | attribute | accuracy | 95% CI | n | chance |",
             "|---|---|---|---|---|---|---|"]
    for s in scores:
        lo, hi = s.interval
        lines.append(f"| {s.split} | {s.language} | {s.attribute} | {s.accuracy:.1%} | "
                     f"{lo:.1%} - {hi:.1%} | {s.total} | {CHANCE[s.attribute]:.1%} |")
    return "\n".join(lines)
