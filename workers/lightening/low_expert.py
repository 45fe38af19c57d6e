"""The big-then-small schedule (issue #12, item 5): the base's high-noise expert lays out the
video while noise is high, and a smaller low-noise expert refines it.

``--low-expert VARIANT`` puts ``VARIANT/transformer_2`` (the low-noise expert of another
folder: a pruned or shallower variant of the same base, workers/lightening/prune.py) in
place of the derived folder's ``transformer_2``; ``transformer`` stays the base's. The two
experts take turns on the same latents with the same text embeddings, so they must agree on
what crosses between them: latent channels in and out, the text embedding's width, the patch
size, and the text encoder, VAE and boundary they were trained with. Anything else (width,
depth, FFN size, quantization) may differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from workers.lightening.manifest import read_manifest, weights_sha256
from workers.lightening.ops import DeriveContext, DeriveError

SHARED_FIELDS = ("in_channels", "out_channels", "text_dim", "patch_size")
SHARED_COMPONENTS = ("text_encoder", "vae")
INDEX_FIELDS = ("boundary_ratio", "expand_timesteps")


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def expert_params(path: Path) -> int:
    """Parameters of an expert folder, from the safetensors headers' shapes (a quantized
    weight counts its logical elements)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                count = 1
                for d in fh.get_slice(key).get_shape():
                    count *= int(d)
                total += count
    return total


def _summary(path: Path) -> dict:
    config = _config(path)
    return {"params": expert_params(path), "num_layers": config["num_layers"],
            "ffn_dim": config["ffn_dim"],
            "width": config["num_attention_heads"] * config["attention_head_dim"]}


class LowExpert:
    """``--low-expert VARIANT``: the base's high-noise expert with VARIANT's low-noise one."""

    name = "low-expert"

    def __init__(self, variant: str | Path):
        self.variant = Path(variant)
        self.option = f"--low-expert {str(variant)!r}"
        if not (self.variant / "transformer_2" / "config.json").is_file():
            raise DeriveError(f"{self.option}: not a folder with a low-noise expert "
                              f"(no transformer_2/config.json)")

    def settings(self) -> dict:
        return {"variant": str(self.variant.resolve())}

    def check(self, work: Path) -> None:
        """DeriveError unless VARIANT's low-noise expert can take turns with ``work``'s
        high-noise one."""
        if not (work / "transformer" / "config.json").is_file():
            raise DeriveError(f"{self.option}: {work} has no high-noise expert (transformer/)")
        index = json.loads((work / "model_index.json").read_text())
        if index.get("boundary_ratio") is None or "transformer_2" not in index:
            raise DeriveError(f"{self.option}: the base has a single expert and no boundary; "
                              f"a low-noise expert would never run")
        high, low = _config(work / "transformer"), _config(self.variant / "transformer_2")
        for field in SHARED_FIELDS:
            if high.get(field) != low.get(field):
                raise DeriveError(f"{self.option}: its low-noise expert has {field}="
                                  f"{low.get(field)!r} but the high-noise expert has "
                                  f"{high.get(field)!r}; both must agree")
        theirs = json.loads((self.variant / "model_index.json").read_text()) \
            if (self.variant / "model_index.json").is_file() else {}
        for field in INDEX_FIELDS:
            if field in theirs and theirs.get(field) != index.get(field):
                raise DeriveError(f"{self.option}: its {field} is {theirs.get(field)!r}, the "
                                  f"base's {index.get(field)!r}: the expert was trained for "
                                  f"another switch")
        for name in SHARED_COMPONENTS:
            if (self.variant / name).is_dir() and \
                    weights_sha256(self.variant / name) != weights_sha256(work / name):
                raise DeriveError(f"{self.option}: its {name} differs from the base's; its "
                                  f"low-noise expert was trained with another {name}")

    def apply(self, ctx: DeriveContext) -> dict:
        work = Path(ctx.work)
        self.check(work)
        replaced = _summary(work / "transformer_2")
        shutil.rmtree(work / "transformer_2")
        shutil.copytree(self.variant / "transformer_2", work / "transformer_2")
        low, high = _summary(work / "transformer_2"), _summary(work / "transformer")
        chain = read_manifest(self.variant)
        return {"name": self.name, "settings": self.settings(),
                "method": "big-then-small: the base's high-noise expert, the low-noise expert "
                          "of another variant of the same base (no training here)",
                "checked": [*SHARED_FIELDS, *INDEX_FIELDS, *SHARED_COMPONENTS],
                "high": high, "low": low, "low_replaced": replaced,
                "low_params_ratio": round(low["params"] / max(1, replaced["params"]), 4),
                "variant_sha256": weights_sha256(self.variant / "transformer_2"),
                "variant_operations": [op.get("name", op.get("operation"))
                                       for op in (chain or {}).get("operations", [])]}
