"""The `farm` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from farm.cli import cache_cmds, client, models_cmds, policy_cmds, render, services
from farm.cli import control_cmds
from farm.cli import exporter
from farm.cli import simulate_cmds
from farm.settings import get_settings

app = typer.Typer(help="Render farm for Wan2.2-class text-to-video models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database migrations (Alembic).")
toy_app = typer.Typer(help="The farm's small model, trained here on a procedural world.")
app.add_typer(db_app, name="db")
app.add_typer(models_cmds.models_app, name="models")
app.add_typer(toy_app, name="toy")
app.add_typer(services.ray_app, name="ray")
app.add_typer(policy_cmds.rules_app, name="rules")
app.add_typer(policy_cmds.batch_app, name="batch")
app.add_typer(cache_cmds.cache_app, name="cache")
keys_app = typer.Typer(help="Projects' API keys (run where FARM_DATABASE_URL points).")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(project: str = typer.Option(..., help="the project the key acts for"),
                name: str = typer.Option("", help="a note: who or what uses it")) -> None:
    """Create a key and print it: it is shown this once, and stored only as a hash."""
    import re

    from farm.jobs import keys
    from farm.schemas import PROJECT_PATTERN

    if not re.match(PROJECT_PATTERN, project):
        typer.echo(f"error: --project: got {project!r}: lower-case letters, digits, . _ -",
                   err=True)
        raise typer.Exit(2)
    record, key = keys.create_key(get_settings().database_url, project, name)
    typer.echo(f"key {record.id} for project {project}:\n{key}")


@keys_app.command("list")
def keys_list(project: str = typer.Option(None)) -> None:
    """Keys by id, project, name, created and revoked (never the key itself)."""
    from farm.jobs import keys

    for k in keys.list_keys(get_settings().database_url, project):
        revoked = f" revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else ""
        typer.echo(f"{k.id}  {k.project:<20} {k.name:<20} {k.created_at:%Y-%m-%d %H:%M}{revoked}")


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id: every request with it gets a 401 from then on."""
    from farm.jobs import keys

    if not keys.revoke_key(get_settings().database_url, key_id):
        typer.echo(f"error: no live key with id {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"key {key_id} revoked")


@keys_app.command("webhook-secret")
def keys_webhook_secret(project: str = typer.Option(..., help="the project whose webhooks "
                                                               "it signs")) -> None:
    """Make the project a new webhook signing secret and print it (shown this once; it
    replaces the old one). Receivers check Farm-Signature with it (README: Webhooks)."""
    import re

    from farm.jobs import webhooks
    from farm.schemas import PROJECT_PATTERN

    if not re.match(PROJECT_PATTERN, project):
        typer.echo(f"error: --project: got {project!r}: lower-case letters, digits, . _ -",
                   err=True)
        raise typer.Exit(2)
    secret = webhooks.rotate_secret(get_settings().database_url, project)
    typer.echo(f"webhook secret for project {project}:\n{secret}")

for command in (render.render, client.submit, client.status, client.wait, client.logs,
                client.cancel, client.download, client.delete, services.up, services.api, services.worker, services.beat,
                services.flower):
    app.command()(command)
for command in control_cmds.COMMANDS:  # retry, hold, release, priority (issue #13)
    app.command()(command)
app.command()(exporter.exporter)  # Prometheus metrics (issue #13)
app.command()(simulate_cmds.simulate)  # fleet simulator (issue #14)


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


@toy_app.command("train")
def toy_train(out: Path, seed: int = 0, vae_steps: int = typer.Option(None),
              dit_steps: int = typer.Option(None),
              reuse_vae: bool = typer.Option(False, help="start from OUT/vae"),
              vae_only: bool = typer.Option(False, help="train the VAE only")) -> None:
    """Train the toy Wan2.2-architecture model from nothing and write it to OUT."""
    import dataclasses
    import logging

    from workers.toy.train import ToyConfig, train_toy_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = ToyConfig(seed=seed)
    overrides = {"vae_steps": vae_steps, "dit_steps": dit_steps}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    typer.echo(str(train_toy_model(out, cfg, reuse_vae=reuse_vae, vae_only=vae_only)))



@toy_app.command("untrained")
def toy_untrained(out: Path, seed: int = 0) -> None:
    """Write the toy architecture with random weights (the yardstick's chance baseline)."""
    from workers.toy.train import save_untrained

    typer.echo(str(save_untrained(out, seed)))


@app.command("eval")
def evaluate(model: str = typer.Option("wan-toy", help="catalog name"),
             model_dir: Path = typer.Option(None, help="a folder instead of a catalog model"),
             seeds: int = typer.Option(2, help="renders per combination and language"),
             combos: int = typer.Option(12, help="combinations per split (12 held out)"),
             steps: int = typer.Option(None, help="default: the variant's (20 for a folder)"),
             guidance: float = typer.Option(None, help="default: the variant's (4.0 for a "
                                            "folder)")) -> None:
    """Score a toy-world model: colour, shape, motion; seen vs held-out; English vs Chinese.
    A catalog variant renders as jobs render it: its steps, guidance and quantize_on_load."""
    from farm.model_dirs import resolve_model_dir
    from farm.policy import get_policy
    from workers.toy.evaluate import EvalSettings, format_table, run_eval, summarise
    from workers.wan_pipeline import WanT2V

    variant = None if model_dir else get_policy().catalog.model(model)
    folder = model_dir or resolve_model_dir(get_settings(), variant)
    cfg = EvalSettings(seeds_per_combo=seeds, combos_per_split=combos,
                       steps=steps or (variant.default_steps if variant else 20),
                       guidance=guidance or (variant.guidance.high if variant else 4.0))
    quantize = variant.quantize_on_load if variant else None
    scores = summarise(run_eval(WanT2V.from_folder(folder, quantize=quantize), cfg))
    typer.echo(f"model {folder}: {cfg}")
    typer.echo(format_table(scores))


if __name__ == "__main__":
    app()
