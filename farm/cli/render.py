"""`farm render`: the whole flow in one process with the embedded defaults.

The same job service, Celery tasks (run eagerly), Ray actor and ffmpeg code as the farm,
with a SQLite database, an in-process Ray and a local folder: no server to start.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from farm.jobs import service as jobs
from farm.db.migrate import upgrade
from farm.schemas import JobCreate
from farm.settings import get_settings
from farm.storage import Storage


def _follow(db_url: str, job_id: str, done: threading.Event) -> None:
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn()) as bar:
        task = bar.add_task("queued", total=1.0)
        while True:
            job = jobs.get_job(db_url, job_id)
            bar.update(task, completed=job.progress, description=job.state)
            if done.wait(0.2):
                job = jobs.get_job(db_url, job_id)
                bar.update(task, completed=job.progress, description=job.state)
                return


def _new_job(settings, request):
    """Routed by the rules in force and saved as sent: this process renders it now, whatever
    else waits in the database."""
    from farm.db.tables import utcnow
    from farm.errors import Unroutable
    from farm.policy import get_policy
    from farm.jobs.submit import route_request

    try:
        route = route_request(request, {})
    except Unroutable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    job = jobs.new_job(request, route, get_policy().rules.sha256)
    job.dispatched_at = utcnow()
    jobs.add_jobs(settings.database_url, [job])
    return job


def render(prompt: str, output: Path = typer.Option(Path("out.mp4"), "--output", "-o"),
           model: str = "wan-toy", track: str = "draft", frames: int = 17, width: int = 1280,
           height: int = 720, fps: int = 16, steps: int = typer.Option(None), seed: int = typer.Option(0),
           negative_prompt: str = "") -> None:
    """Render PROMPT to an MP4 in this process (embedded defaults, no servers)."""
    from pydantic import ValidationError

    from farm.cli.services import prepare_ray_env

    prepare_ray_env()
    from farm.tasks import celery_tasks  # noqa: F401  (registers the tasks that run eagerly here)
    from farm.celery_app import app as celery
    from farm.jobs.dispatch import enqueue_job
    from workers import ray_cluster

    settings = get_settings()
    try:
        request = JobCreate(prompt=prompt, model=model, track=track, frames=frames, width=width,
                            height=height, fps=fps, steps=steps, seed=seed,
                            negative_prompt=negative_prompt)
    except ValidationError as exc:
        for err in exc.errors():
            typer.echo(f"error: {'.'.join(map(str, err['loc']))}: {err['msg']} "
                       f"(got {err.get('input')!r})", err=True)
        raise typer.Exit(2) from None
    settings.ensure_dirs()
    upgrade(settings.database_url)
    celery.conf.task_always_eager = True
    job = _new_job(settings, request)
    typer.echo(f"job {job.id}: {len(job.segments)} segment(s), route {job.route}")
    done = threading.Event()
    follower = threading.Thread(target=_follow, args=(settings.database_url, job.id, done))
    started = time.monotonic()
    follower.start()
    try:
        enqueue_job(job)
    except Exception as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
    finally:
        done.set()
        follower.join()
        ray_cluster.shutdown_local()
    job = jobs.get_job(settings.database_url, job.id)
    if job.state != "succeeded":
        typer.echo(f"job {job.id} {job.state}: {job.error}", err=True)
        raise typer.Exit(1)
    output.parent.mkdir(parents=True, exist_ok=True)
    Storage(settings.storage_url).get_file(job.output_key, output)
    typer.echo(f"wrote {output.resolve()} ({job.model}"
               + (f", {job.track} track of {job.route['track_of']}" if job.route.get("track_of")
                  else "") + f", {job.width}x{job.height}, {job.frames} frames, "
               f"{time.monotonic() - started:.1f}s, sha256 {job.output_sha256[:12]})")
