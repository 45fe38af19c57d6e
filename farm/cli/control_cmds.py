"""CLI verbs of the job controls (issue #13), over the farm's HTTP API: `farm retry`,
`farm hold`, `farm release`, `farm priority`, `farm batch cancel`, `farm batch retry-failed`."""

from __future__ import annotations

import typer

from farm.cli.client import check, client
from farm.cli.policy_cmds import batch_app


def _job_line(job: dict) -> str:
    where = ""
    if job.get("queue_position") is not None:
        where = f", position {job['queue_position']} on tier {job['route']['tier']}"
    eta = f", eta {job['eta_s']:.0f} s" if job.get("eta_s") is not None else ""
    held = ", held" if job.get("held") else ""
    return f"job {job['id']}: {job['state']}, priority {job['priority']}{held}{where}{eta}"


def retry(job_id: str) -> None:
    """Run a failed, canceled or expired job again (in its batch; its log is kept)."""
    with client() as http:
        typer.echo(_job_line(check(http.post(f"/v1/jobs/{job_id}/retry"))))


def hold(job_id: str) -> None:
    """Keep a queued job from being admitted until `farm release`."""
    with client() as http:
        typer.echo(_job_line(check(http.patch(f"/v1/jobs/{job_id}", json={"hold": True}))))


def release(job_id: str) -> None:
    """Give a held job back to admission."""
    with client() as http:
        typer.echo(_job_line(check(http.patch(f"/v1/jobs/{job_id}", json={"hold": False}))))


def priority(job_id: str, value: int = typer.Argument(..., metavar="N", help="0..100, 100 first")
             ) -> None:
    """Change a queued job's priority (before it is admitted)."""
    with client() as http:
        typer.echo(_job_line(check(http.patch(f"/v1/jobs/{job_id}", json={"priority": value}))))


@batch_app.command("cancel")
def batch_cancel(batch_id: str) -> None:
    """Cancel every job of the batch that has not ended."""
    with client() as http:
        result = check(http.post(f"/v1/batches/{batch_id}/cancel"))
    typer.echo(f"batch {batch_id}: {len(result['job_ids'])} job(s) canceled")


@batch_app.command("retry-failed")
def batch_retry_failed(batch_id: str) -> None:
    """Run the batch's failed and expired jobs again (canceled ones stay canceled)."""
    with client() as http:
        result = check(http.post(f"/v1/batches/{batch_id}/retry-failed"))
    typer.echo(f"batch {batch_id}: {len(result['job_ids'])} job(s) retried")
    for job_id, why in result["skipped"].items():
        typer.echo(f"  not retried {job_id}: {why}", err=True)


COMMANDS = (retry, hold, release, priority)
