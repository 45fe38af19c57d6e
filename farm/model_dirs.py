"""Where a catalog model's folder is on this machine, and how to make it when it is missing.

"A way to make one" (issue #11): the farm makes the tiny variants itself (`farm models
make-tiny`); the toy model and its derived variants ship with the project; a derived variant
is made again by `farm models derive` (issue #12); the official Wan2.2 checkpoints are
downloaded by a person (the farm never downloads) and put under FARM_MODELS_DIR. Anything
else nothing makes: a rule routing to it while its folder is missing is flagged by
`farm rules check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from farm.errors import ModelUnavailable
from farm.settings import Settings
from scheduler.catalog import ModelVariant

# Variants the farm writes itself (random weights), and the real layout each copies.
TINY_LIKE = {"wan-tiny": "t2v-a14b"}
# Folders a person downloads: the official diffusers checkpoints (Wan-AI on Hugging Face).
DOWNLOADS = {
    "Wan2.2-T2V-A14B-Diffusers": "https://huggingface.co/Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "Wan2.2-TI2V-5B-Diffusers": "https://huggingface.co/Wan-AI/Wan2.2-TI2V-5B-Diffusers",
}


@dataclass(frozen=True)
class Availability:
    variant: str
    path: Path  # where the folder is, or where it belongs
    present: bool
    how: str | None  # how to make it when missing; None: nothing makes it


def _bundled_dir(variant: ModelVariant) -> Path | None:
    if not variant.bundled:
        return None
    from workers.toy import BUNDLED_DIR

    shipped = BUNDLED_DIR / variant.folder
    return shipped if (shipped / "model_index.json").is_file() else None


def how_to_make(variant: ModelVariant, local: Path) -> str | None:
    """What a person runs or does to get ``variant``'s folder at ``local``; None if nothing."""
    if variant.name in TINY_LIKE:
        return f"run `farm models make-tiny {local} --like {TINY_LIKE[variant.name]}`"
    if variant.bundled and variant.derived_from is not None:
        return (f"it ships with the project; or derive it from {variant.derived_from} with "
                f"`farm models derive` (the operations its derive.json lists)")
    if variant.bundled:
        return f"it ships with the project; or train it with `farm toy train {local}`"
    if variant.quantize_on_load is not None and variant.folder in DOWNLOADS:
        return (f"download {DOWNLOADS[variant.folder]} and put the folder at {local} (its "
                f"base's weights, quantized {variant.quantize_on_load} at load time)")
    if variant.derived_from is not None:
        return (f"derive it again from {variant.derived_from} with `farm models derive "
                f"{variant.derived_from} {local} ...` (the operations its derive.json lists)")
    if variant.folder in DOWNLOADS:
        return f"download {DOWNLOADS[variant.folder]} and put the folder at {local}"
    return None


def availability(settings: Settings, variant: ModelVariant) -> Availability:
    local = settings.models_dir / variant.folder
    if (local / "model_index.json").is_file():
        return Availability(variant.name, local, True, None)
    shipped = _bundled_dir(variant)
    if shipped is not None:
        return Availability(variant.name, shipped, True, None)
    return Availability(variant.name, local, False, how_to_make(variant, local))


def resolve_model_dir(settings: Settings, variant: ModelVariant) -> Path:
    """FARM_MODELS_DIR/<folder> when it holds a checkpoint, else the copy shipped with the
    project (the toy model), else a ModelUnavailable that says what to do."""
    found = availability(settings, variant)
    if found.present:
        return found.path
    hint = found.how or ("nothing in the farm makes it: put its diffusers folder there")
    raise ModelUnavailable(f"model {variant.name!r} has no checkpoint at {found.path}; {hint}")
