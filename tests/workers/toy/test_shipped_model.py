"""The toy model shipped with the project: loads like Wan2.2 and renders deterministically;
the same architecture untrained scores at chance on the yardstick."""

from __future__ import annotations

import numpy as np

from farm.model_dirs import resolve_model_dir
from farm.policy import get_policy
from workers.toy import BUNDLED_DIR
from workers.toy.evaluate import CHANCE, EvalSettings, run_eval, summarise, wilson
from workers.toy.train import save_untrained
from workers.wan_pipeline import RenderRequest, WanT2V

SHIPPED = BUNDLED_DIR / "wan-toy"


def test_catalog_finds_the_shipped_weights(settings):
    assert resolve_model_dir(settings, get_policy().catalog.model("wan-toy")) == SHIPPED


def test_loads_through_the_wan22_code_path(toy):
    assert type(toy.transformer).__name__ == type(toy.transformer_2).__name__ == \
        "WanTransformer3DModel"
    assert type(toy.vae).__name__ == "AutoencoderKLWan"
    assert type(toy.text_encoder).__name__ == "UMT5EncoderModel"
    assert toy.boundary_ratio == 0.875


def test_weights_fit_in_20_mb():
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024, size


def render(toy: WanT2V, prompt: str, seed: int) -> np.ndarray:
    req = RenderRequest(prompt, "", frames=17, height=32, width=32, steps=20,
                        guidance_high=4.0, guidance_low=4.0, seed=seed)
    return np.concatenate(list(toy.decode_chunks(toy.denoise(req))))


def test_fixed_caption_and_seed_render_the_same_clip(toy):
    a = render(toy, "a red circle moving left on a gray background", 3)
    b = render(toy, "a red circle moving left on a gray background", 3)
    c = render(toy, "a red circle moving left on a gray background", 4)
    assert a.shape == (17, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_untrained_model_of_the_same_shape_scores_at_chance(tmp_path):
    untrained = WanT2V.from_folder(save_untrained(tmp_path / "untrained"))
    scores = summarise(run_eval(untrained, EvalSettings(seeds_per_combo=1, combos_per_split=6,
                                                        steps=4)))
    for attribute in CHANCE:
        hits = sum(s.correct for s in scores if s.attribute == attribute)
        total = sum(s.total for s in scores if s.attribute == attribute)
        # Not better than chance: the 95% interval reaches down to chance or below.
        assert wilson(hits, total)[0] <= CHANCE[attribute], (attribute, hits, total)
