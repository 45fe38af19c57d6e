"""Issue #3's quality floor for the shipped toy model, on a fixed sample (under a minute)."""

from __future__ import annotations

from workers.toy.evaluate import EvalSettings, run_eval, summarise

FLOOR = {"colour": 0.85, "motion": 0.75, "shape": 0.60}  # held-out combinations
SAMPLE = EvalSettings(seeds_per_combo=1, combos_per_split=12)


def test_meets_the_floor_on_held_out_combinations_in_both_languages(toy):
    scores = summarise(run_eval(toy, SAMPLE))
    held = {(s.language, s.attribute): s.accuracy for s in scores if s.split == "held-out"}
    for (language, attribute), accuracy in held.items():
        assert accuracy >= FLOOR[attribute], (language, attribute, accuracy, held)
