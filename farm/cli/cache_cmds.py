"""`farm cache stats|purge`: the result cache (issue #13), run where FARM_DATABASE_URL points."""

from __future__ import annotations

import json

import typer

from farm.settings import get_settings

cache_app = typer.Typer(help="The result cache: repeats answered without a GPU.")


@cache_app.command("stats")
def cache_stats(project: str = typer.Option(None, help="one project (default: all)"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Entries, bytes of video they name, and hits, per kind (video, segment)."""
    from farm.jobs import cache_upkeep

    table = cache_upkeep.stats(get_settings().database_url, project)
    if as_json:
        typer.echo(json.dumps(table, indent=2))
        return
    if not table:
        typer.echo("the result cache is empty")
    for kind, row in sorted(table.items()):
        typer.echo(f"{kind:<8} {row['entries']:>8} entries {row['bytes'] / 1e6:>10.1f} MB "
                   f"{row['hits']:>8} hits")


@cache_app.command("purge")
def cache_purge(project: str = typer.Option(None, help="one project (default: all)"),
                older_than_days: float = typer.Option(
                    None, min=0, help="only entries not hit for this many days"),
                yes: bool = typer.Option(False, "--yes", help="purge everything without asking")
                ) -> None:
    """Drop entries: later repeats render again. Videos stay with their jobs; files no job
    and no other entry names are deleted."""
    from farm.jobs import cache_upkeep

    if project is None and older_than_days is None and not yes:
        typer.echo("error: this drops every entry of every project; add --yes, or narrow it "
                   "with --project or --older-than-days", err=True)
        raise typer.Exit(2)
    dropped = cache_upkeep.purge(get_settings(), project, older_than_days)
    typer.echo(f"purged {dropped} entries")
