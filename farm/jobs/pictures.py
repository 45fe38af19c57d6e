"""A finished job's pictures (issue #13, item 9): the one list of them, where each is stored
and how each is made from the job's video. Read by the picture routes
(farm/api/picture_routes.py), retention (farm/jobs/retention.py: a succeeded job's pictures
are named, so kept) and batch reports (farm/jobs/reports.py).

Every job's pictures live under its own prefix, ``jobs/{id}/{name}``; a job answered from
the result cache (``cached_from``) shares the source's video, not its pictures: its own are
made from that video when first asked for (the source may be deleted before it).
"""

from __future__ import annotations

from pathlib import Path

from workers import video

THUMBNAIL = "thumbnail.jpg"  # made by the stitcher (farm/tasks/stitcher.py) for rendered jobs
CONTACT_SHEET = "contact-sheet.jpg"
PREVIEW = "preview.webp"
# name -> its media type
PICTURES = {THUMBNAIL: "image/jpeg", CONTACT_SHEET: "image/jpeg", PREVIEW: "image/webp"}


def picture_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{name}"


def make(name: str, mp4: Path, out: Path, frames: int, fps: int) -> Path:
    """Make picture ``name`` from the video ``mp4`` (``frames`` long at ``fps``) into ``out``;
    raises workers.video.VideoError when ffmpeg cannot."""
    if name == THUMBNAIL:
        return video.thumbnail(mp4, out)  # the middle frame, 320 pixels wide
    if name == CONTACT_SHEET:
        return video.contact_sheet(mp4, out, frames)  # up to 12 frames, 4 wide
    if name == PREVIEW:
        return video.animated_preview(mp4, out, fps=min(fps, 12))
    raise KeyError(f"no picture named {name!r}; one of {sorted(PICTURES)}")
