"""Commands that talk to a running farm over its HTTP API (FARM_API_URL)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from farm.settings import get_settings

FINAL = {"succeeded", "failed", "canceled", "expired", "deleted"}


def api_key() -> str:
    """FARM_API_KEY, else the key `farm up` wrote to $FARM_HOME/api_key."""
    settings = get_settings()
    key = settings.api_key.get_secret_value()
    if not key and (settings.home / "api_key").is_file():
        key = (settings.home / "api_key").read_text().strip()
    return key


@contextmanager
def client() -> Iterator[httpx.Client]:
    """The API's client; a farm that cannot be reached is one line of error, no traceback."""
    key = api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = get_settings().api_url
    try:
        with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
            yield http
    except httpx.TransportError as exc:
        typer.echo(f"error: cannot reach the farm's API at {url} ({exc}); is `farm up` or "
                   "`farm api` running, and FARM_API_URL right?", err=True)
        raise typer.Exit(1) from None


def check(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text
        if isinstance(detail, list):
            detail = "; ".join(d.get("message", str(d)) for d in detail)
        typer.echo(f"error {resp.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    return resp.json()


def submit(prompt: str,
           model: str = typer.Option("wan-toy", help='a catalog model, or "auto": the rules '
                                                     'choose by track'),
           track: str = typer.Option("draft", help="draft | final"),
           project: str = "default", frames: int = 17, width: int = 1280,
           height: int = 720, fps: int = 16, steps: int = typer.Option(None),
           seed: int = typer.Option(None), priority: int = typer.Option(50, help="0..100"),
           deadline: float = typer.Option(None, help="seconds: wanted within"),
           negative_prompt: str = "",
           cache: bool = typer.Option(True, help="--no-cache: render even when the result "
                                                 "cache holds this exact request"),
           hold: bool = typer.Option(False, help="submit held: not admitted until "
                                                 "`farm release`"),
           timeout: float = typer.Option(None, help="seconds from admission: then failed "
                                                    "(timeout)"),
           queue_ttl: float = typer.Option(None, help="seconds: never admitted by then, "
                                                      "expired"),
           retain_days: int = typer.Option(None, help="days the video is kept (default: "
                                                      "the farm's)"),
           webhook: str = typer.Option(None, help="URL for signed events"),
           webhook_event: list[str] = typer.Option(
               None, help="start | progress | completed | deadline_missed (repeatable; "
                          "default completed)")
           ) -> None:
    """Submit a render job; prints its id."""
    body = dict(prompt=prompt, model=None if model == "auto" else model, track=track,
                project=project, frames=frames, width=width, height=height, fps=fps,
                steps=steps, seed=seed, priority=priority, deadline_s=deadline,
                negative_prompt=negative_prompt, cache=cache, hold=hold, timeout_s=timeout,
                queue_ttl_s=queue_ttl, retain_days=retain_days, webhook=webhook,
                webhook_events=webhook_event or None)
    with client() as http:
        job = check(http.post("/v1/jobs", json={k: v for k, v in body.items() if v is not None}))
    typer.echo(job["id"])


def status(job_id: str) -> None:
    """Print a job's record as JSON (and its deadline's standing on stderr)."""
    with client() as http:
        job = check(http.get(f"/v1/jobs/{job_id}"))
    typer.echo(json.dumps(job, indent=2))
    if note := deadline_note(job):
        typer.echo(note, err=True)


def _poll_job(http: httpx.Client, job_id: str, deadline: float) -> dict:
    """Follow a job by polling (an API without the stream route), one bar for the job."""
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn()) as bar:
        task = bar.add_task(job_id[:8], total=1.0)
        while True:
            job = check(http.get(f"/v1/jobs/{job_id}"))
            bar.update(task, completed=job["progress"], description=f"{job_id[:8]} {job['state']}")
            if job["state"] in FINAL or time.monotonic() > deadline:
                return job
            time.sleep(0.5)


def wait(job_id: str, timeout: float = typer.Option(3600.0, help="seconds")) -> None:
    """Follow a job with a live progress bar per segment until it ends (the API's event
    stream); exit 1 unless it succeeded."""
    from farm.cli import watch

    deadline = time.monotonic() + timeout
    with client() as http:
        result, job = watch.wait_job(http, job_id, deadline)
        if isinstance(result, httpx.Response):
            check(result)  # 403, 404: says why, exit 1
        if result is watch.NO_STREAM:
            job = _poll_job(http, job_id, deadline)
        note = deadline_note(check(http.get(f"/v1/jobs/{job_id}")))
    if note:
        typer.echo(note, err=True)
    if job["state"] != "succeeded":
        typer.echo(f"job {job_id} {job['state']}: {job.get('error') or ''}", err=True)
        raise typer.Exit(1)
    typer.echo(f"job {job_id} succeeded: {job['output_url']}")


def deadline_note(job: dict) -> str | None:
    """One line on the job's deadline (issue #15): missed, at risk, met or on track."""
    if not job.get("deadline_at"):
        return None
    if job.get("deadline_missed_at"):
        return f"deadline {job['deadline_at']}: MISSED (seen {job['deadline_missed_at']})"
    if job.get("deadline_risk"):
        return f"deadline {job['deadline_at']}: AT RISK (the farm estimates it will miss it)"
    if job["state"] == "succeeded":
        return f"deadline {job['deadline_at']}: met"
    ended = job["state"] in FINAL
    return f"deadline {job['deadline_at']}: {'ended ' + job['state'] if ended else 'on track'}"


def logs(job_id: str) -> None:
    """Print a job's log: where each segment ran, what failed, what was sent again."""
    with client() as http:
        lines = check(http.get(f"/v1/jobs/{job_id}/events"))
    for e in lines:
        where = " ".join(x for x in (f"segment {e['segment_index']}"
                                     if e["segment_index"] is not None else "",
                                     e["worker"] or "") if x)
        typer.echo(f"{e['created_at']}  {e['kind']:<18} {where:<40} {e['message']}".rstrip())


def cancel(job_id: str) -> None:
    """Cancel a job that has not ended."""
    with client() as http:
        job = check(http.post(f"/v1/jobs/{job_id}/cancel"))
    typer.echo(f"job {job_id}: {job['state']}")


def download(job_id: str, output: Path = typer.Option(..., "--output", "-o")) -> None:
    """Save a succeeded job's MP4, checked against its recorded sha256."""
    digest = hashlib.sha256()
    partial = output.with_name(output.name + ".part")
    # S3 storage answers with a 307 to a presigned URL (httpx drops the API key when the
    # redirect leaves the API's host); the sha256 comes from the API's own answer.
    with client() as http, http.stream("GET", f"/v1/jobs/{job_id}/video",
                                       follow_redirects=True) as resp:
        if resp.status_code >= 400:
            resp.read()
            check(resp)
        first = resp.history[0] if resp.history else resp
        expected = first.headers.get("X-Content-SHA256")
        with open(partial, "wb") as fh:
            for block in resp.iter_bytes():
                digest.update(block)
                fh.write(block)
    if expected and digest.hexdigest() != expected:
        partial.unlink()
        typer.echo(f"error: download of {job_id} is corrupt (sha256 {digest.hexdigest()}, "
                   f"expected {expected})", err=True)
        raise typer.Exit(1)
    partial.replace(output)
    typer.echo(str(output))


def delete(job_id: str) -> None:
    """Delete an ended job's files (video, chunks, pictures); its record and log stay."""
    with client() as http:
        job = check(http.delete(f"/v1/jobs/{job_id}"))
    typer.echo(f"job {job_id}: {job['state']}")
