"""The big-then-small schedule (issue #12, item 5): the base's high-noise expert with the
low-noise expert of another variant; experts that cannot take turns are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from diffusers import WanTransformer3DModel

from workers.lightening.low_expert import LowExpert
from workers.lightening.manifest import weights_sha256
from workers.lightening.ops import DeriveContext, DeriveError
from workers.lightening.prune import keep_blocks
from workers.toy import BUNDLED_DIR
from workers.wan_pipeline import RenderRequest, WanT2V

BASE = BUNDLED_DIR / "wan-toy"


def variant_with_low(tmp_path: Path, name: str, low: WanTransformer3DModel) -> Path:
    """A copy of the base whose low-noise expert is ``low``."""
    folder = tmp_path / name
    shutil.copytree(BASE, folder)
    shutil.rmtree(folder / "transformer_2")
    low.save_pretrained(folder / "transformer_2", safe_serialization=True)
    return folder


def apply(op: LowExpert, tmp_path: Path) -> tuple[Path, dict]:
    work = tmp_path / "derived"
    shutil.copytree(BASE, work)
    return work, op.apply(DeriveContext(base=BASE, work=work, seed=0, resume=False,
                                        scratch=tmp_path / "scratch"))


def toy_expert(**changes) -> WanTransformer3DModel:
    config = json.loads((BASE / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return WanTransformer3DModel(**{**config, "num_layers": 1, **changes})


def test_a_shallower_low_expert_replaces_the_base_one_and_renders(tmp_path):
    base_low = WanTransformer3DModel.from_pretrained(BASE / "transformer_2")
    variant = variant_with_low(tmp_path, "shallow", keep_blocks(base_low, [0, 3]))
    work, entry = apply(LowExpert(variant), tmp_path)
    assert weights_sha256(work / "transformer") == weights_sha256(BASE / "transformer")
    assert weights_sha256(work / "transformer_2") == weights_sha256(variant / "transformer_2")
    pipe = WanT2V.from_folder(work)
    assert pipe.transformer.config.num_layers == 4 and pipe.transformer_2.config.num_layers == 2
    req = RenderRequest("a red circle moving right on a black background", "", 5, 32, 32, 4,
                        4.0, 4.0, 1)
    seen = [which for _, _, which, _ in pipe.denoise_steps(req)]
    assert "high" in seen and "low" in seen  # both experts take turns
    frames = next(pipe.decode_chunks(pipe.denoise(req)))
    assert frames.shape[1:] == (32, 32, 3) and frames.std() > 0
    assert entry["low"]["num_layers"] == 2 and entry["low_replaced"]["num_layers"] == 4
    assert entry["low"]["params"] < entry["low_replaced"]["params"] == entry["high"]["params"]
    assert 0.5 < entry["low_params_ratio"] < 0.6


@pytest.mark.parametrize("field, value", [("in_channels", 4), ("out_channels", 4),
                                          ("text_dim", 32), ("patch_size", (1, 4, 4))])
def test_experts_that_cannot_take_turns_are_refused(tmp_path, field, value):
    variant = variant_with_low(tmp_path, "odd", toy_expert(**{field: value}))
    op = LowExpert(variant)
    with pytest.raises(DeriveError) as caught:
        apply(op, tmp_path)
    message = str(caught.value)
    assert "--low-expert" in message and str(variant) in message and field in message
    # nothing was replaced
    assert weights_sha256(tmp_path / "derived" / "transformer_2") == \
        weights_sha256(BASE / "transformer_2")


def test_a_low_expert_trained_with_another_text_encoder_is_refused(tmp_path):
    variant = variant_with_low(tmp_path, "other-text", toy_expert(num_layers=2))
    encoder = variant / "text_encoder" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(encoder)
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, encoder)
    with pytest.raises(DeriveError, match="text_encoder differs"):
        apply(LowExpert(variant), tmp_path)


def test_a_low_expert_for_another_boundary_is_refused(tmp_path):
    variant = variant_with_low(tmp_path, "other-boundary", toy_expert(num_layers=2))
    index = json.loads((variant / "model_index.json").read_text())
    (variant / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.5}))
    with pytest.raises(DeriveError, match="boundary_ratio is 0.5"):
        apply(LowExpert(variant), tmp_path)


def test_a_folder_without_a_low_expert_is_refused(tmp_path):
    folder = tmp_path / "single"
    shutil.copytree(BASE, folder)
    shutil.rmtree(folder / "transformer_2")
    with pytest.raises(DeriveError, match=f"--low-expert '{folder}': not a folder"):
        LowExpert(folder)


def test_a_single_expert_base_has_no_low_expert_to_replace(tmp_path):
    variant = variant_with_low(tmp_path, "shallow", toy_expert(num_layers=2))
    work = tmp_path / "derived"
    shutil.copytree(BASE, work)
    shutil.rmtree(work / "transformer_2")
    index = json.loads((work / "model_index.json").read_text())
    index.pop("transformer_2")
    (work / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(DeriveError, match="single expert"):
        LowExpert(variant).apply(DeriveContext(base=BASE, work=work, seed=0, resume=False,
                                               scratch=tmp_path / "scratch"))
