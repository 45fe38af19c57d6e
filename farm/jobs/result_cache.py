"""The result cache (issue #13, item 1): a repeated request is answered from a stored video,
with no Celery task and no GPU; a long job whose first segments match an earlier job's
renders only the rest.

Keys are content hashes (``request_key``): the variant and the sha256 of its folder's files
(weights, configs and a derived variant's ``derive.json``), the normalised prompts, seed,
size, frames, fps, steps, guidance, what changes the sampler (the route's step caching,
quantization at load) and the encoder's settings. A segment's key is the job's minus the
total length plus the segment's plan, and for a continuous job the key of the segment it
continues (a chain: a hit on segment k means segments 0..k are the same frames).

Entries are per project: a project never learns from timing or ``cached_from`` what another
rendered. A video entry names the source job's mp4 (checked against its sha256 when stored,
and on a schedule by the integrity sweep); a hit is served only while that job is still
``succeeded`` and the file is in storage. Segment entries are kept for jobs of more than
one segment (a one-segment job is answered by its video entry). Eviction and purging
(farm.jobs.cache_upkeep) drop entries; a file is deleted only once no job and no entry
names it (farm.jobs.retention).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select, update

from farm.db.tables import CacheEntry, Job, JobEvent, JobState, SegmentState, utcnow
from farm.db.session import session_scope
from farm.errors import ModelUnavailable
from farm.jobs import events, integrity
from farm.model_dirs import resolve_model_dir
from farm.policy import get_policy
from farm.settings import Settings
from farm.storage import Storage
from farm.tasks.seams import last_frame_key

log = logging.getLogger(__name__)

# Bump when what a key covers changes: every older entry stops matching. 2: the last chunk
# of a segment takes a remainder of under 4 frames (farm/tasks/segment_runner.TAIL_FRAMES).
# 3: CPU decodes use oneDNN's conv3d (workers/cpu_kernels.py): frames may move by one level
# (GPU entries did not change, but one version covers every device).
KEY_VERSION = 3
_fingerprints: dict[tuple, str] = {}  # (folder, files' (name, size, mtime_ns)) -> sha256
_recent: dict[Path, tuple[float, str]] = {}  # folder -> (monotonic time listed, sha256)
RELIST_S = 5.0


def normalise(text: str) -> str:
    """NFC, runs of whitespace as one space, no leading or trailing space: the same words
    typed twice give the same key."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file of a model folder (path and content sha256), memoised in this
    process on each file's size and mtime: the A14B's 57 GB are read once per process. The
    folder is listed again at most every RELIST_S (a submission must not walk it each time)."""
    seen = _recent.get(folder)
    if seen is not None and time.monotonic() - seen[0] < RELIST_S:
        return seen[1]
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    stamp = (str(folder), tuple((str(p.relative_to(folder)), p.stat().st_size,
                                 p.stat().st_mtime_ns) for p in files))
    if stamp not in _fingerprints:
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as fh:
                content = hashlib.file_digest(fh, "sha256").hexdigest()
            digest.update(f"{path.relative_to(folder)}\0{content}\n".encode())
        _fingerprints[stamp] = digest.hexdigest()
    _recent[folder] = (time.monotonic(), _fingerprints[stamp])
    return _fingerprints[stamp]


def variant_fingerprint(settings: Settings, variant_name: str) -> str:
    """The variant's folder fingerprint; where this machine has no copy (the API runs away
    from the model store), the catalog entry's own fields stand in, so the key still changes
    when the entry does."""
    variant = get_policy().catalog.model(variant_name)
    try:
        return folder_fingerprint(resolve_model_dir(settings, variant))
    except ModelUnavailable:
        return "catalog:" + _digest(variant.model_dump(mode="json"))


def _render_fields(settings: Settings, job: Job) -> dict:
    """What decides a job's frames and bytes, whatever its length."""
    variant = get_policy().catalog.model(job.model)
    return {
        "v": KEY_VERSION, "project": job.project, "variant": job.model,
        "weights": variant_fingerprint(settings, job.model),
        "quantize_on_load": variant.quantize_on_load, "native": variant.native,
        "step_cache": job.route.get("cache"),
        "prompt": normalise(job.prompt), "negative_prompt": normalise(job.negative_prompt),
        "seed": job.seed, "width": job.width, "height": job.height, "fps": job.fps,
        "steps": job.steps, "guidance": [job.guidance_high, job.guidance_low],
        "continuous": job.continuous,
        "encode": {"preset": settings.x264_preset, "crf": settings.x264_crf,
                   "chunk_frames": settings.encode_chunk_frames},
    }


def job_keys(settings: Settings, job: Job) -> tuple[str, list[str]]:
    """(the job's key, each segment's key in order)."""
    fields = _render_fields(settings, job)
    segment_keys, previous = [], None
    for seg in job.segments:
        segment_keys.append(_digest({**fields, "segment": [seg.index, seg.frame_start,
                                                           seg.render_frames, seg.skip_frames,
                                                           seg.seed],
                                     "after": previous if job.continuous else None}))
        previous = segment_keys[-1]
    return _digest({**fields, "frames": job.frames}), segment_keys


@dataclass
class Answer:
    """What the cache answered for one unsaved job: written with the job, in its
    transaction (farm.jobs.service.add_jobs): the hit counts and the job's log lines.
    ``copied``: last frames copied under the job's prefix before it is saved; ``undo``
    removes them when the save fails, so no file is left that no row names."""

    whole: bool = False  # the job is succeeded from a stored video
    hit_keys: list[str] = field(default_factory=list)
    log: list[JobEvent] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)

    def undo(self, settings: Settings) -> None:
        if self.copied:
            Storage(settings.storage_url).remove_many(self.copied)

    @property
    def updates(self) -> tuple:
        if not self.hit_keys:
            return ()
        return (update(CacheEntry).where(CacheEntry.key.in_(self.hit_keys))
                .values(hits=CacheEntry.hits + 1, last_hit_at=utcnow()),)


def answer_from_cache(settings: Settings, job: Job) -> Answer:
    """Set the unsaved ``job``'s keys and answer it from the cache where it can: the whole
    video (the job is ``succeeded`` at once), or a prefix of its segments (those are
    ``done`` with the earlier job's chunks; the rest renders). One read of the database."""
    job.cache_key, segment_keys = job_keys(settings, job)
    for seg, key in zip(job.segments, segment_keys):
        seg.cache_key = key
    wanted = [job.cache_key] + (segment_keys if len(segment_keys) > 1 else [])
    storage = Storage(settings.storage_url)
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(CacheEntry, Job).outerjoin(Job, Job.id == CacheEntry.job_id)
                               .where(CacheEntry.key.in_(wanted))).all()
    found = {entry.key: (entry, source) for entry, source in rows}
    if job.cache_key in found and _video_servable(*found[job.cache_key], storage):
        return _answer_whole(job, *found[job.cache_key])
    return _answer_prefix(job, {k: entry for k, (entry, source) in found.items()
                                if _source_stands(source)}, storage)


def _video_servable(entry: CacheEntry, source: Job | None, storage: Storage) -> bool:
    """The source job still stands by the video: succeeded (not deleted), the same file and
    sha256, not marked corrupt by the integrity check, and the file is there."""
    return (_source_stands(source) and source.output_key == entry.keys[0]
            and source.output_sha256 == entry.sha256 and storage.exists(entry.keys[0]))


def _source_stands(source: Job | None) -> bool:
    return (source is not None and source.state == JobState.succeeded.value
            and integrity.servable(source))


def _answer_whole(job: Job, entry: CacheEntry, source: Job) -> Answer:
    now = utcnow()
    job.state, job.progress, job.cached_from = JobState.succeeded.value, 1.0, source.id
    job.output_key, job.output_sha256 = source.output_key, source.output_sha256
    job.output_bytes, job.started_at, job.finished_at = source.output_bytes, now, now
    job.dispatched_at = now  # never admitted: it holds no GPU
    for seg in job.segments:
        seg.state, seg.progress, seg.cached_from = SegmentState.done.value, 1.0, source.id
    return Answer(whole=True, hit_keys=[entry.key], log=[JobEvent(
        job_id=job.id, kind=events.CACHE_HIT, created_at=now,
        message=f"answered from job {source.id}'s video; no GPU used")])


def _answer_prefix(job: Job, found: dict[str, CacheEntry], storage: Storage) -> Answer:
    """Segments from the first on, while each has an entry whose files are there (and,
    unless it ends the job, the last frame the next one continues from), become done with
    its chunks."""
    answer = Answer()
    for seg in job.segments if len(job.segments) > 1 else ():
        entry = found.get(seg.cache_key)
        last = seg.index == len(job.segments) - 1
        if entry is None or (job.continuous and not last and entry.seam_key is None) \
                or not all(storage.exists(k) for k in entry.keys):
            break
        if job.continuous and not last:  # where the next segment looks (attempt 0)
            answer.copied.append(last_frame_key(job.id, seg.index, 0))
            _copy(storage, entry.seam_key, answer.copied[-1])
        seg.state, seg.progress, seg.cached_from = SegmentState.done.value, 1.0, entry.job_id
        seg.chunk_keys = list(entry.keys)
        answer.hit_keys.append(entry.key)
        answer.log.append(JobEvent(job_id=job.id, kind=events.CACHE_HIT, segment_index=seg.index,
                                   created_at=utcnow(),
                                   message=f"chunks of job {entry.job_id}'s segment reused"))
    return answer


def _copy(storage: Storage, source: str, target: str) -> None:
    with tempfile.TemporaryDirectory(prefix="farm-cache-") as work:
        storage.put_file(storage.get_file(source, Path(work) / "file"), target)


def remember(settings: Settings, job_id: str) -> int:
    """After a job succeeded: its video, and the segments of a longer job, become entries
    (an existing entry for the same key stays: it is as good). Returns entries written."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.cache_key is None or job.cached_from is not None \
                or job.state != JobState.succeeded.value:
            return 0
        now, new = utcnow(), []
        new.append(CacheEntry(key=job.cache_key, kind="video", project=job.project,
                              job_id=job.id, keys=[job.output_key], sha256=job.output_sha256,
                              bytes=job.output_bytes or 0, hits=0, created_at=now,
                              last_hit_at=now))
        last = len(job.segments) - 1
        for seg in job.segments if last > 0 else ():
            if seg.cache_key is None or seg.cached_from is not None:
                continue
            seam = (last_frame_key(job.id, seg.index, seg.attempts)
                    if job.continuous and seg.index < last else None)
            new.append(CacheEntry(key=seg.cache_key, kind="segment", project=job.project,
                                  job_id=job.id, segment_index=seg.index,
                                  keys=list(seg.chunk_keys), seam_key=seam, bytes=0, hits=0,
                                  created_at=now, last_hit_at=now))
        taken = {entry.key for entry, source in session.execute(
            select(CacheEntry, Job).outerjoin(Job, Job.id == CacheEntry.job_id)
            .where(CacheEntry.key.in_([e.key for e in new]))) if _source_stands(source)}
        fresh = [e for e in new if e.key not in taken]
        # An entry whose source was deleted or found corrupt gives way to this one.
        session.execute(delete(CacheEntry).where(CacheEntry.key.in_([e.key for e in fresh])))
        session.add_all(fresh)
    return len(fresh)
