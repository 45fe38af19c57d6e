"""Model variants the farm knows, and the GPU tiers it runs them on.

Pure data. Folders are relative to the farm's models directory (``FARM_MODELS_DIR``).
Issue #4 moves tiers and the catalog to YAML with memory arithmetic; the fields here are the
ones the render path needs today.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelVariant:
    name: str
    folder: str  # diffusers layout: model_index.json, transformer/, transformer_2/, vae/, ...
    native_width: int  # the size the model renders at; encoding scales to the requested size
    native_height: int
    max_frames_per_segment: int  # 4k+1; longer jobs are split into several segments
    default_steps: int
    guidance_high: float  # CFG scale of the high-noise expert (Wan2.2: 4.0)
    guidance_low: float  # CFG scale of the low-noise expert (Wan2.2: 3.0)
    bundled: bool = False  # weights ship with the project (used when FARM_MODELS_DIR lacks them)


@dataclass(frozen=True)
class Tier:
    name: str
    ray_resource: str  # custom Ray resource that pins actors to this tier, e.g. "tier:a10"
    accelerator_type: str | None  # Ray accelerator_type where the GPU model is known
    gpus_per_actor: float


MODELS: dict[str, ModelVariant] = {
    # Random-weight checkpoint written by `farm models make-tiny`: real layout, tiny shapes.
    "wan-tiny": ModelVariant(
        name="wan-tiny", folder="wan-tiny", native_width=112, native_height=64,
        max_frames_per_segment=17, default_steps=8, guidance_high=4.0, guidance_low=3.0,
    ),
    # The farm's own small model, trained on the procedural world (`farm toy train`).
    "wan-toy": ModelVariant(
        name="wan-toy", folder="wan-toy", native_width=32, native_height=32,
        max_frames_per_segment=17, default_steps=20, guidance_high=4.0, guidance_low=4.0,
        bundled=True,
    ),
    # The real two-expert model, from a local copy of Wan-AI/Wan2.2-T2V-A14B-Diffusers.
    "wan2.2-t2v-a14b": ModelVariant(
        name="wan2.2-t2v-a14b", folder="Wan2.2-T2V-A14B-Diffusers", native_width=1280,
        native_height=720, max_frames_per_segment=81, default_steps=40,
        guidance_high=4.0, guidance_low=3.0,
    ),
}

TIERS: dict[str, Tier] = {
    "cpu": Tier(name="cpu", ray_resource="tier:cpu", accelerator_type=None, gpus_per_actor=0),
    "a10": Tier(name="a10", ray_resource="tier:a10", accelerator_type="A10G", gpus_per_actor=1),
    "a100": Tier(name="a100", ray_resource="tier:a100", accelerator_type="A100", gpus_per_actor=1),
}


def get_model(name: str) -> ModelVariant:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
