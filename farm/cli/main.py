"""The `farm` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from farm.cli import client, render, services
from farm.settings import get_settings

app = typer.Typer(help="Render farm for Wan2.2-class text-to-video models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database migrations (Alembic).")
models_app = typer.Typer(help="Model checkpoints.")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(services.ray_app, name="ray")

for command in (render.render, client.submit, client.status, client.wait, client.cancel,
                client.download, services.up, services.api, services.worker, services.flower):
    app.command()(command)


@app.callback()
def _before_any_command() -> None:
    # Ray reads its environment when first imported: set it before any command imports Ray.
    from workers.ray_cluster import quiet_ray_env

    quiet_ray_env(get_settings().ray_node_ip)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate FARM_DATABASE_URL to REVISION (default: the newest)."""
    from farm.db.migrate import upgrade

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url, revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Migrate FARM_DATABASE_URL back to REVISION ("base" removes every table)."""
    from farm.db.migrate import downgrade

    downgrade(get_settings().database_url, revision)
    typer.echo(f"database at {revision}")


@models_app.command("make-tiny")
def make_tiny(path: Path, seed: int = 0) -> None:
    """Write a tiny random-weight Wan2.2 T2V checkpoint (diffusers layout) to PATH."""
    from workers.tiny_model import make_tiny_checkpoint

    typer.echo(str(make_tiny_checkpoint(path, seed)))


if __name__ == "__main__":
    app()
