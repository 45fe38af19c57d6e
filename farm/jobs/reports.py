"""A batch's report, stored when its last job ends: HTML (a thumbnail per job, linked, not
inlined: farm/api/picture_routes.py serves it with a contact sheet and a preview) and CSV.

Stored at ``batches/{id}/report.html`` and ``report.csv``. Picture and video links are
relative (``../../jobs/{id}/...``), so they work on local files, on a bucket served as is
and over the API; a job answered from the result cache links its source's pictures.
"""

from __future__ import annotations

import csv
import html
import io
import tempfile
from pathlib import Path

from sqlalchemy import select

from farm.db.tables import Batch, Job
from farm.db.session import session_scope
from farm.jobs.pictures import THUMBNAIL, picture_key
from farm.settings import Settings
from farm.storage import Storage

COLUMNS = ("job_id", "state", "prompt", "seed", "model", "track", "priority", "rule", "tier",
           "degree", "width", "height", "frames", "video", "sha256", "bytes", "run_seconds",
           "error")


def _row(job: Job) -> dict:
    run = ((job.finished_at - job.started_at).total_seconds()
           if job.finished_at and job.started_at else None)
    return {
        "job_id": job.id, "state": job.state, "prompt": job.prompt, "seed": job.seed,
        "model": job.model, "track": job.track, "priority": job.priority,
        "rule": job.route.get("rule"), "tier": job.route.get("tier"),
        "degree": job.route.get("degree"), "width": job.width, "height": job.height,
        "frames": job.frames, "video": job.output_key or "", "sha256": job.output_sha256 or "",
        "bytes": job.output_bytes or "", "run_seconds": f"{run:.1f}" if run is not None else "",
        "error": job.error or "",
    }


def _pictures(storage: Storage, job_id: str, cached_from: str | None) -> str | None:
    """Links to the job's pictures, relative to the report (``batches/ID/report.html`` in
    storage, ``/v1/batches/ID/report.html`` over the API: both resolve ``../../jobs/...``),
    or None when there is no thumbnail (no video). A job answered from the result cache
    (``cached_from``) was never stitched: unless its own were made since, its source's
    pictures stand for it (the same video)."""
    for owner in (job_id, cached_from):
        if owner and storage.exists(picture_key(owner, THUMBNAIL)):
            return f"../../jobs/{owner}"
    return None


def render_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def render_html(batch: Batch, rows: list[dict], thumbs: dict[str, str | None]) -> str:
    e = html.escape
    cells = []
    for r in rows:
        base = thumbs.get(r["job_id"])
        img = (f'<a href="{base}/contact-sheet.jpg"><img src="{base}/thumbnail.jpg" '
               f'width="160" alt="thumbnail"></a> <a href="{base}/preview.webp">preview</a>'
               if base else "no video")
        video = (f'<a href="../../{e(r["video"])}">video</a>' if r["video"] else "")
        cells.append(
            f"<tr><td>{img}</td><td>{e(r['prompt'])}</td><td>{r['seed']}</td>"
            f"<td>{e(r['state'])}</td><td>{e(str(r['model']))} / {e(str(r['tier']))} "
            f"({e(str(r['rule']))})</td><td>{r['run_seconds']}</td><td>{video}</td>"
            f"<td>{e(r['error'])}</td></tr>")
    states = ", ".join(f"{s}: {sum(r['state'] == s for r in rows)}"
                       for s in sorted({r["state"] for r in rows}))
    return (
        "<!doctype html><meta charset='utf-8'>"
        f"<title>batch {e(batch.id)}</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 8px;border-bottom:1px solid #ddd;"
        "text-align:left;vertical-align:top}</style>"
        f"<h1>Batch {e(batch.name or batch.id)}</h1>"
        f"<p>project {e(batch.project)}; window {e(batch.window or 'none')} "
        f"{e(batch.timezone)}; {len(rows)} jobs ({e(states)})</p>"
        "<table><tr><th>thumbnail</th><th>prompt</th><th>seed</th><th>state</th>"
        "<th>model / tier (rule)</th><th>run s</th><th>video</th><th>error</th></tr>"
        + "".join(cells) + "</table>")


def write_report(settings: Settings, batch_id: str) -> dict[str, str]:
    """Build and store the report; returns its storage keys."""
    with session_scope(settings.database_url) as session:
        batch = session.get(Batch, batch_id)
        job_rows = session.scalars(select(Job).where(Job.batch_id == batch_id)
                                   .order_by(Job.created_at, Job.id)).all()
        rows = [_row(j) for j in job_rows]
        sources = {j.id: j.cached_from for j in job_rows}
    storage = Storage(settings.storage_url)
    keys = {"html": f"batches/{batch_id}/report.html", "csv": f"batches/{batch_id}/report.csv"}
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.work_dir, prefix=f"report-{batch_id}-") as tmp:
        tmp = Path(tmp)
        thumbs = {r["job_id"]: _pictures(storage, r["job_id"], sources[r["job_id"]])
                  for r in rows}
        (tmp / "report.html").write_text(render_html(batch, rows, thumbs), encoding="utf-8")
        (tmp / "report.csv").write_text(render_csv(rows), encoding="utf-8")
        storage.put_file(tmp / "report.html", keys["html"])
        storage.put_file(tmp / "report.csv", keys["csv"])
    return keys
