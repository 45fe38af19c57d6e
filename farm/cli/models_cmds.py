"""`farm models ...`: the model checkpoints this machine has or can make."""

from __future__ import annotations

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
