"""`farm exporter`: the farm's Prometheus metrics on a port of their own (issue #13)."""

from __future__ import annotations

import typer

from farm.settings import get_settings


def exporter(port: int = typer.Option(9464, help="the port to serve /metrics on"),
             host: str = typer.Option("127.0.0.1", help="the address to bind")) -> None:
    """Serve the farm's metrics (farm/api/metrics.py) for Prometheus at
    http://HOST:PORT/metrics: jobs waiting, admitted and running per tier and track, queue
    wait and render time, GPU-seconds, cache lookups, actor groups, re-sends, webhooks."""
    from farm.api.metrics import serve_exporter

    typer.echo(f"farm exporter: http://{host}:{port}/metrics")
    serve_exporter(get_settings().database_url, port, host)
