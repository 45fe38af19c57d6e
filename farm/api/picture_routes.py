"""Pictures of a finished job (issue #13, item 9): its thumbnail, a contact sheet and an
animated preview, for galleries and batch reports that should not fetch whole videos.

The thumbnail is made when the job is stitched (farm/tasks/stitcher.py); the contact sheet
and the preview are made from the stored video the first time someone asks (most jobs are
never looked at this way) and stored beside it, so later requests only read them. A job
answered from the result cache has no stitch: all three of its pictures are made this way
from the video it shares, under its own prefix (farm/jobs/pictures.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, Response

from farm.api.routes import Project, _get_or_404, _settings
from farm.db.tables import Job, JobState
from farm.jobs.pictures import PICTURES, make, picture_key
from farm.storage import Storage
from workers import video

log = logging.getLogger(__name__)
router = APIRouter()


def _picture(request: Request, project: str, job_id: str, name: str) -> Response:
    settings = _settings(request)
    job = _get_or_404(settings.database_url, job_id, project)
    if job.state != JobState.succeeded.value or not job.output_key:
        raise HTTPException(409, f"job {job_id} has no video to picture: it is {job.state}")
    storage = Storage(settings.storage_url)
    key = picture_key(job_id, name)
    media_type = PICTURES[name]
    if not storage.exists(key):
        _make(storage, job, name, key)
    headers = {"Cache-Control": "private, max-age=86400"}  # a finished job's never change
    local = storage.local_path(key)
    if local is not None:
        return FileResponse(local, media_type=media_type, headers=headers)
    with storage.open(key) as fh:
        return Response(fh.read(), media_type=media_type, headers=headers)


def _make(storage: Storage, job: Job, name: str, key: str) -> None:
    """Make ``name`` from the job's stored video and store it under the job's own prefix
    (two requests at once both make it; the store is atomic, so either copy is whole). A
    job answered from the cache shares its source's video, so its pictures are made from
    that file and kept by retention as this job's (farm/jobs/retention.py)."""
    with tempfile.TemporaryDirectory(prefix="farm-picture-") as tmp:
        mp4 = storage.local_path(job.output_key) or storage.get_file(
            job.output_key, Path(tmp) / "video.mp4")
        try:
            made = make(name, Path(mp4), Path(tmp) / name, job.frames, job.fps)
        except video.VideoError as exc:
            log.error("job %s: could not make %s: %s", job.id, name, exc)
            raise HTTPException(500, f"job {job.id}: could not make {name} from its "
                                     "video") from None
        storage.put_file(made, key)


@router.get("/v1/jobs/{job_id}/thumbnail.jpg")
def thumbnail(job_id: str, request: Request, project: Project):
    """The middle frame, 320 pixels wide (JPEG)."""
    return _picture(request, project, job_id, "thumbnail.jpg")


@router.get("/v1/jobs/{job_id}/contact-sheet.jpg")
def contact_sheet(job_id: str, request: Request, project: Project):
    """Up to 12 frames spread over the video in a 4-wide grid (JPEG)."""
    return _picture(request, project, job_id, "contact-sheet.jpg")


@router.get("/v1/jobs/{job_id}/preview.webp")
def preview(job_id: str, request: Request, project: Project):
    """The whole video as a looping animated WebP, 320 pixels wide, at most 12 fps."""
    return _picture(request, project, job_id, "preview.webp")
