"""`farm models ...`: the model checkpoints this machine has or can make."""

from __future__ import annotations

from pathlib import Path

import typer

models_app = typer.Typer(help="Model checkpoints.")


@models_app.command("make-tiny")
def make_tiny(path: Path, seed: int = 0) -> None:
    """Write a tiny random-weight Wan2.2 T2V checkpoint (diffusers layout) to PATH."""
    from workers.tiny_model import make_tiny_checkpoint

    typer.echo(str(make_tiny_checkpoint(path, seed)))
