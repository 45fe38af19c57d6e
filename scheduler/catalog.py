"""GPU tiers and model variants, declared in YAML (`scheduler/config/*.yaml`), parsed here.

Pure: functions take the YAML text (or a mapping) and return frozen objects; reading the
files is the caller's business (`farm.policy`). Every error names the file, the entry and
the field, and quotes the bad value.
"""

from __future__ import annotations

from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator,
)

from scheduler.latents import latent_shape, vae_strides


class PolicyError(ValueError):
    """A tiers, models or rules file that cannot be used; the message says where and why."""


def parse_size(text: str) -> tuple[int, int]:
    """"1280x720" -> (1280, 720)."""
    try:
        width, height = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. '1280x720'") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return width, height


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
    name: str = ""  # the key it is declared under
    gpu: str  # GPU model, e.g. "A100-80GB"; "cpu" for CPU render slots
    memory_gb: Annotated[float, Field(gt=0)]  # per GPU
    gpus_per_node: Annotated[int, Field(ge=1, le=64)]
    count: Annotated[int, Field(ge=0)]  # nodes
    cost_per_gpu_hour: Annotated[float, Field(ge=0)]
    ray_resource: Annotated[str, Field(min_length=1)]  # custom Ray resource pinning actors here
    accelerator_type: str | None = None  # Ray accelerator_type where the GPU is detected

    @property
    def gpus(self) -> int:
        return self.count * self.gpus_per_node

    @property
    def gpus_per_actor(self) -> int:
        return 0 if self.gpu == "cpu" else 1


class Guidance(_Strict):
    high: Annotated[float, Field(ge=0)]  # CFG scale of the high-noise expert (A14B: 4.0)
    low: Annotated[float, Field(ge=0)]  # of the low-noise expert (A14B: 3.0)


class Latent(_Strict):
    channels: Annotated[int, Field(ge=1)]
    stride: tuple[int, int, int]  # VAE: frames, height, width per latent cell
    patch: tuple[int, int, int]  # transformer patch over latent cells

    @model_validator(mode="after")
    def _square(self) -> "Latent":
        if self.stride[1] != self.stride[2]:
            raise ValueError(f"stride {list(self.stride)}: Wan's VAE has one spatial stride; "
                             f"height and width must be equal")
        return self

    @classmethod
    def from_checkpoint(cls, vae_config: dict, transformer_config: dict) -> "Latent":
        """What a checkpoint's own configs say (vae/ and transformer/ config.json), strides
        read as the pipeline and diffusers read them (scheduler/latents.py)."""
        temporal, spatial = vae_strides(vae_config)
        return cls(channels=vae_config["z_dim"], stride=(temporal, spatial, spatial),
                   patch=tuple(transformer_config["patch_size"]))

    def shape(self, width: int, height: int, frames: int) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of one segment."""
        return latent_shape(self.channels, (self.stride[0], self.stride[1]), frames, height,
                            width)


class ModelVariant(_Strict):
    name: str = ""
    folder: str  # diffusers layout under FARM_MODELS_DIR
    native: str  # "WxH" the model renders at; encoding scales to the requested size
    max_frames: Annotated[int, Field(ge=5)]  # 4k+1 frames per segment
    default_steps: Annotated[int, Field(ge=1)]
    guidance: Guidance
    bundled: bool = False  # weights ship with the project
    params_b: Annotated[float, Field(gt=0)]  # billions of parameters per expert
    experts: Annotated[int, Field(ge=1, le=2)]
    bytes_per_param: Annotated[float, Field(gt=0)]
    dim: Annotated[int, Field(ge=1)]  # transformer width
    ffn_dim: Annotated[int, Field(ge=1)]  # FFN inner width: tensor parallelism splits it too
    layers: Annotated[int, Field(ge=1)]  # transformer blocks
    latent: Latent
    heads: Annotated[int, Field(ge=1)]  # attention heads: tensor parallelism splits them
    degrees: list[int]  # parallel degrees the model supports
    extra_gb: Annotated[float, Field(ge=0)]  # text encoder + VAE kept on every GPU
    activation_gb: dict[str, float]  # "WxH" -> GB for one segment of max_frames, degree 1
    seconds_per_step: dict[str, float]  # tier -> one step with CFG at native size, 1 GPU
    # Lightening (issue #12): the variant this one was derived from (`farm models derive`),
    # the lighter variant to render each track with ({"draft": "wan-toy-draft"}), and a
    # quantization applied when the folder is loaded (int8-weight | int8-dynamic | fp8), so
    # a 57 GB folder is never rewritten.
    derived_from: str | None = None
    tracks: dict[str, str] = {}
    quantize_on_load: Literal["int8-weight", "int8-dynamic", "fp8"] | None = None
    quantized: Literal["int8-weight", "int8-dynamic", "fp8"] | None = None  # saved so
    # Batching like requests (issue #15): at most ``max_batch`` segments per batched
    # forward pass (1: never batched); a lone like job may wait ``batch_wait_ms`` after its
    # creation for companions (0: never held); ``batch_marginal``: the measured cost of one
    # more member as a share of a solo render (scheduler/batching.py batch_seconds).
    max_batch: Annotated[int, Field(ge=1, le=64)] = 1
    batch_wait_ms: Annotated[int, Field(ge=0, le=600_000)] = 0
    batch_marginal: Annotated[float, Field(gt=0, le=1)] = 1.0

    @property
    def is_quantized(self) -> bool:
        """Quantized experts (saved or at load): the offload placement cannot hold them."""
        return self.quantized is not None or self.quantize_on_load is not None

    @field_validator("native")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ModelVariant":
        if (self.max_frames - 1) % 4:
            raise ValueError(f"max_frames must be 4k+1, got {self.max_frames}")
        for size in self.activation_gb:
            parse_size(size)
        if self.native not in self.activation_gb:
            raise ValueError(f"activation_gb has no entry for the native size {self.native!r}")
        bad = [d for d in self.degrees if d < 1 or self.heads % d]
        if bad or not self.degrees:
            raise ValueError(f"degrees {self.degrees} must be non-empty divisors of the "
                             f"{self.heads} attention heads (bad: {bad})")
        return self

    def tokens(self, width: int, height: int, frames: int) -> int:
        """Video tokens of one forward pass at that size (one segment of ``frames``)."""
        _, t, h, w = self.latent.shape(width, height, frames)
        pt, ph, pw = self.latent.patch
        return (t // pt) * (h // ph) * (w // pw)

    # The names the render path has used since issue 2.
    @property
    def native_width(self) -> int:
        return parse_size(self.native)[0]

    @property
    def native_height(self) -> int:
        return parse_size(self.native)[1]

    @property
    def max_frames_per_segment(self) -> int:
        return self.max_frames

    @property
    def guidance_high(self) -> float:
        return self.guidance.high

    @property
    def guidance_low(self) -> float:
        return self.guidance.low


class Catalog(_Strict):
    tiers: dict[str, Tier]
    models: dict[str, ModelVariant]
    runtime_overhead_gb: float = 1.5
    _memo: dict = PrivateAttr(default_factory=dict)  # scheduler.routing's per-route figures

    def model(self, name: str) -> ModelVariant:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(self.models))}") \
                from None

    def tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except KeyError:
            raise KeyError(f"unknown tier {name!r}; known: {', '.join(sorted(self.tiers))}") \
                from None


def _load_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping at the top, got {type(data).__name__}")
    return data


def validation_message(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        got = f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else ""
        lines.append(f"{source}: {where}: {err['msg']}{got}")
    return "\n".join(lines)


def parse_catalog(tiers_text: str, models_text: str, tiers_source: str = "tiers.yaml",
                  models_source: str = "models.yaml",
                  overlays: tuple[tuple[str, str], ...] = ()) -> Catalog:
    """``overlays``: (text, source) of variants files (issue #12), applied in order over
    the models file: an entry with a new name adds a variant; an entry naming a known one
    may only add tracks to it (``{tracks: {draft: NAME}}``)."""
    tiers_doc = _load_yaml(tiers_text, tiers_source)
    models_doc = _load_yaml(models_text, models_source)
    tiers = _entries(Tier, tiers_doc.get("tiers"), f"{tiers_source}: tiers")
    models = _entries(ModelVariant, models_doc.get("models"), f"{models_source}: models")
    fixed = frozenset(models)  # the models file's own: an overlay may only add tracks
    for text, source in overlays:
        _apply_overlay(models, _load_yaml(text, source), source, fixed)
    _check_links(models, overlays[-1][1] if overlays else models_source)
    for model in models.values():
        for tier in model.seconds_per_step:
            if tier not in tiers:
                raise PolicyError(f"{models_source}: models.{model.name}.seconds_per_step: "
                                  f"unknown tier {tier!r}; known: {', '.join(sorted(tiers))}")
    return Catalog(tiers=tiers, models=models,
                   runtime_overhead_gb=float(models_doc.get("runtime_overhead_gb", 1.5)))


def _apply_overlay(models: dict, doc: dict, source: str, fixed: frozenset) -> None:
    """A later overlay's entry replaces an earlier overlay's of the same name."""
    section = doc.get("models") or {}
    if not isinstance(section, dict):
        raise PolicyError(f"{source}: models: expected a mapping, got {section!r}")
    known = {n: spec for n, spec in section.items() if n in fixed}
    new = {n: spec for n, spec in section.items() if n not in fixed}
    if new:
        models.update(_entries(ModelVariant, new, f"{source}: models"))
    for name, spec in known.items():
        if not isinstance(spec, dict) or set(spec) != {"tracks"}:
            raise PolicyError(f"{source}: models.{name}: a variant of the models file may only "
                              f"get tracks here, got {spec!r}")
        tracks = {**models[name].tracks, **spec["tracks"]}
        models[name] = models[name].model_copy(update={"tracks": tracks})


def _check_links(models: dict, source: str) -> None:
    """Every derived_from and track names a variant of the catalog."""
    for name, model in models.items():
        if model.derived_from is not None and model.derived_from not in models:
            raise PolicyError(f"{source}: models.{name}.derived_from: unknown variant "
                              f"{model.derived_from!r}")
        for track, target in model.tracks.items():
            if target not in models:
                raise PolicyError(f"{source}: models.{name}.tracks.{track}: unknown variant "
                                  f"{target!r}; known: {', '.join(sorted(models))}")


def _entries(cls, section, where: str) -> dict:
    """Parse each ``name: {fields}`` entry of a section; errors name the entry and field."""
    if not isinstance(section, dict) or not section:
        raise PolicyError(f"{where}: expected a mapping of named entries, got {section!r}")
    out = {}
    for name, spec in section.items():
        if not isinstance(spec, dict):
            raise PolicyError(f"{where}.{name}: expected a mapping, got {spec!r}")
        try:
            out[name] = cls(name=str(name), **spec)
        except ValidationError as exc:
            raise PolicyError(validation_message(f"{where}.{name}", exc)) from None
    return out
