"""The procedural world and its judge: right on the world's clips, at chance on noise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from workers.tiny_model import build_tokenizer
from workers.toy.evaluate import CHANCE, wilson
from workers.toy.score import judge
from workers.toy.world import (
    ALL_COMBOS, BACKGROUNDS, COLOURS, HELD_OUT, LANGUAGES, MOTIONS, SEEN, SHAPES, Scene,
    caption, random_scene, render_clip, vocabulary,
)


def test_judge_reads_every_world_clip_right():
    rng = np.random.default_rng(7)
    wrong = []
    for combo, bg in itertools.product(ALL_COMBOS, BACKGROUNDS):
        scene = Scene(*combo, bg)
        j = judge(render_clip(scene, rng))
        if (j.colour, j.shape, j.motion, j.background) != (*combo, bg):
            wrong.append((scene, j))
    assert wrong == []


def test_judge_is_at_chance_on_noise():
    rng = np.random.default_rng(8)
    n = 400
    hits = {a: 0 for a in CHANCE}
    for _ in range(n):
        scene = random_scene(rng, ALL_COMBOS)
        j = judge(rng.integers(0, 256, (17, 32, 32, 3), dtype=np.uint8))
        for a in hits:
            hits[a] += getattr(j, a) == getattr(scene, a)
    for attribute, k in hits.items():
        lo, hi = wilson(k, n)
        assert lo <= CHANCE[attribute] <= hi, (attribute, k / n)


def test_held_out_combinations_leave_every_value_seen():
    assert HELD_OUT <= set(ALL_COMBOS) and not HELD_OUT & set(SEEN)
    for i, values in enumerate((COLOURS, SHAPES, MOTIONS)):
        assert {c[i] for c in SEEN} == set(values)
    assert len(COLOURS) >= 5 and not set(COLOURS) & set(BACKGROUNDS)


def test_captions_in_both_languages_tokenize_without_unknowns():
    tokenizer = build_tokenizer(vocabulary(), 32)
    scene = Scene("red", "circle", "left", "navy")
    assert caption(scene, "en") == "a red circle moving left on a navy background"
    assert caption(scene, "zh") == "深蓝色背景上一个红色圆形向左移动"
    for combo, bg, language in itertools.product(ALL_COMBOS, BACKGROUNDS, LANGUAGES):
        ids = tokenizer(caption(Scene(*combo, bg), language)).input_ids
        assert tokenizer.unk_token_id not in ids and len(ids) <= 32
    with pytest.raises(ValueError, match="'fr'"):
        caption(scene, "fr")


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
