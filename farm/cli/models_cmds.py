"""`farm models ...`: the model checkpoints this machine has or can make."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

models_app = typer.Typer(help="Model checkpoints.")


@models_app.command("make-tiny")
def make_tiny(path: Path, seed: int = 0,
              like: str = typer.Option("t2v-a14b", help="the real layout to copy: t2v-a14b "
                                       "(two experts, Wan2.1 VAE) or ti2v-5b (one expert, "
                                       "Wan2.2 VAE, per-token timesteps)")) -> None:
    """Write a tiny random-weight Wan2.2 checkpoint (diffusers layout) to PATH."""
    from workers.tiny_model import LIKE, make_tiny_checkpoint

    if like not in LIKE:
        raise typer.BadParameter(f"must be one of {', '.join(LIKE)}; got {like!r}",
                                 param_hint="--like")
    typer.echo(str(make_tiny_checkpoint(path, seed, like)))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@models_app.command("list")
def list_models() -> None:
    """Each catalog variant: present (where, size on disk) or missing (and how to make it)."""
    from farm.model_dirs import availability
    from farm.policy import get_policy
    from farm.settings import get_settings

    settings = get_settings()
    rows = []
    for name, variant in sorted(get_policy().catalog.models.items()):
        found = availability(settings, variant)  # the same answer as `farm rules check`
        if found.present:
            rows.append((name, "present", human(folder_bytes(found.path)), str(found.path)))
        else:
            rows.append((name, "missing", "-", found.how or f"nothing makes it: put its "
                         f"diffusers folder at {found.path}"))
    width = max(len(r[0]) for r in rows)
    typer.echo(f"{'VARIANT':<{width}}  {'STATE':<7}  {'SIZE':>9}  WHERE / HOW")
    for name, state, size, where in rows:
        typer.echo(f"{name:<{width}}  {state:<7}  {size:>9}  {where}")


@models_app.command("derive")
def derive_variant(
        base: str = typer.Argument(..., help="the base: a catalog variant (e.g. wan-toy)"),
        out: Path = typer.Argument(..., help="the new variant's folder (diffusers layout)"),
        name: str = typer.Option(None, help="catalog name; default: OUT's folder name"),
        for_track: str = typer.Option(None, "--for-track",
                                      help="the base (the root of a chain of derived variants) renders this track (draft) with it"),
        quantize: str = typer.Option(None, help="int8-weight | int8-dynamic | fp8"),
        on_load: bool = typer.Option(False, "--on-load", help="quantize when loading: the "
                                     "variant keeps the base's folder (a 57 GB A14B is never "
                                     "rewritten); only with --quantize and nothing else"),
        prune_ffn: float = typer.Option(None, help="fraction of FFN channels removed"),
        prune_heads: float = typer.Option(None, help="fraction of attention heads removed"),
        drop_blocks: str = typer.Option(None, help="transformer blocks removed: K, or per "
                                        "expert high=K,low=K"),
        recovery_steps: int = typer.Option(None, help="training steps of the recovery after "
                                           "the last pruning stage (--prune-ffn: 300, "
                                           "--drop-blocks: 600)"),
        student_layers: str = typer.Option(None, help="blocks of a shallower student: K, or "
                                           "per expert high=K,low=K"),
        distill_steps: int = typer.Option(None, help="steps of a few-step student"),
        low_expert: Path = typer.Option(None, help="folder whose low-noise expert replaces "
                                        "the base's (big-then-small)"),
        light_decoder: float = typer.Option(None, help="a VAE decoder of this fraction of "
                                            "the base's width, distilled from it"),
        seed: int = 0, resume: bool = typer.Option(False, help="continue stopped training"),
        prompts: Path = typer.Option(None, exists=True, dir_okay=False, readable=True,
                                     help="training captions, one per line; default: "
                                     "the toy world's (seen combinations only)"),
        threads: int = typer.Option(1, help="torch threads for training"),
        register_it: bool = typer.Option(True, "--register/--no-register",
                                         help="add it to FARM_VARIANTS_FILE")) -> None:
    """Write a lighter variant of BASE to OUT with a derive.json manifest, and register it
    in the catalog so rules (and `--track`) can route to it (issue #12)."""
    from farm.model_dirs import resolve_model_dir
    from farm.policy import get_policy, load_policy
    from farm.settings import get_settings
    from farm.variants import entry_for, register
    from scheduler.catalog import PolicyError
    from scheduler.routing import base_of
    from workers.lightening.derive import derive, expert_shape
    from workers.lightening.manifest import write_manifest
    from workers.lightening.ops import DeriveError

    # Training runs for minutes: its progress notes (workers/lightening/ops.py) go to stderr.
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("workers.lightening").setLevel(logging.INFO)
    settings = get_settings()
    catalog = get_policy().catalog
    if base not in catalog.models:
        raise typer.BadParameter(f"unknown variant {base!r}; known: "
                                 f"{', '.join(sorted(catalog.models))}", param_hint="BASE")
    variant = catalog.models[base]
    base_dir = resolve_model_dir(settings, variant)
    name = name or out.name
    check_name_and_track(catalog, base, name, for_track, register_it)
    try:
        if on_load:
            others = operations(None, prune_ffn, prune_heads, drop_blocks, student_layers,
                                distill_steps, low_expert, light_decoder)
            if quantize is None or others or recovery_steps is not None:
                raise DeriveError("--on-load quantizes at load time: give --quantize and no "
                                  "other operation (nor --recovery-steps)")
            check_not_quantized(variant, base_dir)
            from workers.lightening.quantize import Quantize
            op = Quantize(quantize, check_device=False)  # the workers' GPUs check fp8
            out.mkdir(parents=True, exist_ok=True)
            manifest = write_manifest(out, base_dir, seed, [
                {"operation": "quantize", "settings": op.settings(), "on_load": True}])
            folder, shape = base_dir, expert_shape(base_dir)
        else:
            ops = operations(quantize, prune_ffn, prune_heads, drop_blocks, student_layers,
                             distill_steps, low_expert, light_decoder, recovery_steps)
            lines = prompts.read_text().splitlines() if prompts else []
            derived = derive(base_dir, out, ops, seed, resume, [p for p in lines if p.strip()],
                             threads)
            folder, shape, manifest = derived.folder, derived.shape, derived.manifest
    except DeriveError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    entry = entry_for(variant, folder, shape, manifest, quantize if on_load else None)
    if register_it:
        # A chain's track goes on its root, the variant rules match (scheduler/routing.py).
        try:  # the overlay must load: fail here, not in the next job
            register(settings.variants_file, name, entry, base_of(base, catalog), for_track,
                     validate=lambda path: load_policy(settings.tiers_file,
                                                       settings.models_file,
                                                       settings.rules_file, path))
        except PolicyError as exc:
            typer.echo(f"error: {folder} was written but not registered: {exc}", err=True)
            raise typer.Exit(2) from None
        get_policy.cache_clear()
        typer.echo(f"registered {name} in {settings.variants_file}")
    typer.echo(f"{name}: {folder} ({shape['layers']} layers, ffn {shape['ffn_dim']}, "
               f"{shape['bytes_per_param']} bytes/param)")


TRACKS = ("draft", "final")  # farm/schemas.py JobCreate.track


def check_name_and_track(catalog, base: str, name: str, for_track: str | None,
                         register_it: bool) -> None:
    """Before any training: the name must not be a base variant of models.yaml (the overlay
    may only add tracks to those) and the track must be one jobs have."""
    if for_track is not None and for_track not in TRACKS:
        raise typer.BadParameter(f"{for_track!r}: jobs have the tracks {', '.join(TRACKS)}",
                                 param_hint="--for-track")
    if register_it and (name == base or (name in catalog.models
                                         and catalog.models[name].derived_from is None)):
        raise typer.BadParameter(f"{name!r} names a variant of the catalog that was not "
                                 f"derived; choose another name (or OUT folder name)",
                                 param_hint="--name")


def check_not_quantized(variant, base_dir: Path) -> None:
    """--on-load on a base whose experts are already quantized could never load."""
    import json

    from workers.lightening.ops import DeriveError

    saved = any("quantization_config" in json.loads(config.read_text())
                for config in (base_dir / "transformer" / "config.json",
                               base_dir / "transformer_2" / "config.json") if config.is_file())
    if variant.is_quantized or saved:
        raise DeriveError(f"--on-load: {variant.name} is already quantized "
                          f"({variant.quantized or variant.quantize_on_load or 'its folder'})")


def operations(quantize, prune_ffn, prune_heads, drop_blocks, student_layers, distill_steps,
               low_expert, light_decoder=None, recovery_steps=None) -> list:
    """The Operation objects the options ask for (workers/lightening/*.py); ``recovery_steps``
    replaces the pruning operations' last recovery length."""
    from workers.lightening.ops import DeriveError

    final = {} if recovery_steps is None else {"final_steps": recovery_steps}
    if final and recovery_steps < 1:
        raise DeriveError(f"--recovery-steps {recovery_steps!r}: must be at least 1")
    if final and prune_ffn is None and drop_blocks is None:
        raise DeriveError("--recovery-steps sets the recovery after --prune-ffn or "
                          "--drop-blocks; neither is given")
    ops = []
    if quantize is not None:
        from workers.lightening.quantize import Quantize
        ops.append(Quantize(quantize))
    if prune_ffn is not None:
        from workers.lightening.prune import PruneFfn
        ops.append(PruneFfn(prune_ffn, **final))
    if prune_heads is not None:
        from workers.lightening.prune import PruneHeads
        ops.append(PruneHeads(prune_heads))
    if drop_blocks is not None:
        from workers.lightening.prune import DropBlocks
        ops.append(DropBlocks(drop_blocks, **final))
    if student_layers is not None:
        from workers.lightening.prune import StudentLayers
        ops.append(StudentLayers(student_layers))
    if distill_steps is not None:
        from workers.lightening.distill import DistillSteps
        ops.append(DistillSteps(distill_steps))
    if low_expert is not None:
        from workers.lightening.low_expert import LowExpert
        ops.append(LowExpert(low_expert))
    if light_decoder is not None:
        from workers.lightening.light_decoder import LightDecoder
        ops.append(LightDecoder(light_decoder))
    return ops
