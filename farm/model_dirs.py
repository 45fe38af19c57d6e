"""Where a catalog model's folder is on this machine."""

from __future__ import annotations

from pathlib import Path

from farm.errors import ModelUnavailable
from farm.settings import Settings
from scheduler.catalog import ModelVariant


def resolve_model_dir(settings: Settings, variant: ModelVariant) -> Path:
    """FARM_MODELS_DIR/<folder> when it holds a checkpoint, else the copy shipped with the
    project (the toy model), else a ModelUnavailable that says what to do."""
    local = settings.models_dir / variant.folder
    if (local / "model_index.json").is_file():
        return local
    if variant.bundled:
        from workers.toy import BUNDLED_DIR

        shipped = BUNDLED_DIR / variant.folder
        if (shipped / "model_index.json").is_file():
            return shipped
    if variant.name == "wan-tiny":
        hint = f"; run `farm models make-tiny {local}`"
    elif variant.bundled:
        hint = f"; train it with `farm toy train {local}`"
    else:
        hint = "; copy its diffusers folder there"
    raise ModelUnavailable(f"model {variant.name!r} has no checkpoint at {local}{hint}")
