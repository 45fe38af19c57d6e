"""trace.jsonl: one job a line, as the farm's API takes it, plus when it arrives.

    {"at": "09:30", "prompt": "a fox", "track": "draft", "project": "ads", "priority": 60}
    {"at": 75600, "prompt": "shot 12", "track": "final", "batch": "night-1",
     "window": "22:00-06:00", "timezone": "UTC", "seed": 7}

``at``: seconds from the fleet's ``start`` (midnight by default), or "HH:MM" / "HH:MM:SS"
(that many hours and minutes after it: the clock time when ``start`` is a midnight).
The request fields are checked by the API's own model (farm.schemas.JobCreate), so a trace
the simulator takes is one the farm takes; ``batch`` names a batch (the job is routed as a
batch job), ``window``/``timezone`` are the batch's window (they win over the rule's).
Errors name the line, the field and the bad value.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from scheduler.windows import Window, WindowError

_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
OWN_FIELDS = ("at", "batch", "window", "timezone")  # the rest is a JobCreate


class TraceError(ValueError):
    """A trace line that cannot be simulated: names the line, the field and the value."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    at_s: float  # seconds from the fleet's start
    prompt: str
    track: str = "draft"
    model: str | None = None
    project: str = "default"
    priority: int = 50
    frames: int = 17
    width: int = 1280
    height: int = 720
    fps: int = 16
    steps: int | None = None
    seed: int | None = None  # None: a fresh seed, as the farm draws one (never a cache hit)
    negative_prompt: str = ""
    deadline_s: float | None = None
    continuous: bool = True
    cache: bool = True
    batch: str | None = None  # the batch's name
    window: str | None = None  # the batch's window, "HH:MM-HH:MM"
    timezone: str = "UTC"


def parse_at(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TraceError(f"{where}: field 'at': got {value!r}: seconds or 'HH:MM'")
    if not isinstance(value, str):
        if value < 0:
            raise TraceError(f"{where}: field 'at': got {value!r}: must be >= 0")
        return float(value)
    match = _CLOCK.fullmatch(value.strip())
    if not match or int(match[1]) > 23 or int(match[2]) > 59 or int(match[3] or 0) > 59:
        raise TraceError(f"{where}: field 'at': got {value!r}: seconds or 'HH:MM[:SS]'")
    return int(match[1]) * 3600 + int(match[2]) * 60 + int(match[3] or 0)


def parse_line(data, where: str) -> TraceJob:
    from farm.schemas import JobCreate

    if not isinstance(data, dict):
        raise TraceError(f"{where}: expected a JSON object, got {data!r}")
    if "at" not in data:
        raise TraceError(f"{where}: field 'at': missing (seconds or 'HH:MM')")
    own = {k: data[k] for k in OWN_FIELDS if k in data}
    try:
        request = JobCreate(**{k: v for k, v in data.items() if k not in OWN_FIELDS})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise TraceError(f"{where}: field {field!r}: got {err.get('input')!r}: "
                         f"{err['msg']}") from None
    window, tz = own.get("window"), own.get("timezone", "UTC")
    if window is not None or "timezone" in own:
        try:
            Window.parse(window or "00:00-23:59", tz)
        except WindowError as exc:
            raise TraceError(f"{where}: field 'window'/'timezone': {exc}") from None
    batch = own.get("batch")
    if batch is not None and (not isinstance(batch, str) or not batch):
        raise TraceError(f"{where}: field 'batch': got {batch!r}: a batch name")
    return TraceJob(at_s=parse_at(own["at"], where), prompt=request.prompt,
                    track=request.track, model=request.model, project=request.project,
                    priority=request.priority, frames=request.frames, width=request.width,
                    height=request.height, fps=request.fps, steps=request.steps,
                    seed=request.seed, negative_prompt=request.negative_prompt,
                    deadline_s=request.deadline_s, continuous=request.continuous,
                    cache=request.cache, batch=batch, window=window, timezone=tz)


def parse_trace(lines, source: str = "trace.jsonl") -> list[TraceJob]:
    """Jobs in arrival order (a stable sort on ``at``: equal times keep the file's order)."""
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not JSON: {exc.msg}") from None
        jobs.append(parse_line(data, where))
    return sorted(jobs, key=lambda j: j.at_s)


def load_trace(path: Path) -> list[TraceJob]:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"--workload: no file at {str(path)!r}")
    with open(path) as fh:
        return parse_trace(fh, str(path))


def as_line(job: TraceJob) -> dict:
    """The JSONL object of a job (defaults left out)."""
    defaults = TraceJob(0.0, "")
    out = {"at": job.at_s, "prompt": job.prompt}
    out.update({k: v for k, v in asdict(job).items()
                if k not in ("at_s", "prompt") and v != getattr(defaults, k)})
    return out


def write_trace(path: Path, jobs: list[TraceJob]) -> None:
    with open(path, "w") as fh:
        for job in jobs:
            fh.write(json.dumps(as_line(job)) + "\n")


def _arrival_s(rng: random.Random, hours: float) -> float:
    """Busier in the working day (09:00-19:00 draws 3x the rest of the day's rate)."""
    while True:
        at = rng.uniform(0, hours * 3600)
        if 9 <= (at / 3600) % 24 < 19 or rng.random() < 1 / 3:
            return round(at, 1)


def make_trace(n: int, seed: int = 0, hours: float = 24.0, projects: int = 8) -> list[TraceJob]:
    """A studio's day, seeded: drafts (88%, 20-30 steps), finals (10%, some with a deadline,
    some urgent), finals of overnight batches (2%, submitted in the evening, window
    22:00-06:00); 5% repeat an earlier request exactly (the result cache's share)."""
    rng = random.Random(seed)
    jobs: list[TraceJob] = []
    for i in range(n):
        if jobs and rng.random() < 0.05:  # a repeat (of a job outside the batches)
            earlier = rng.choice(jobs)
            if earlier.batch is None:
                jobs.append(_replace_at(earlier, _arrival_s(rng, hours)))
                continue
        project = f"p{rng.randrange(projects)}"
        kind = rng.random()
        common = dict(prompt=f"shot {i} of {project}", project=project, seed=rng.randrange(2**31))
        if kind < 0.88:
            jobs.append(TraceJob(at_s=_arrival_s(rng, hours), track="draft",
                                 steps=rng.choice((20, 25, 30)),
                                 priority=rng.choice((50, 50, 50, 70)), **common))
        elif kind < 0.98:
            deadline = rng.choice((None, None, 3600.0, 7200.0))
            jobs.append(TraceJob(at_s=_arrival_s(rng, hours), track="final", frames=81,
                                 priority=rng.choice((50, 60, 90)), deadline_s=deadline,
                                 **common))
        else:
            at = round(rng.uniform(18 * 3600, 21.9 * 3600), 1) % (hours * 3600)
            jobs.append(TraceJob(at_s=at, track="final", frames=81, priority=40,
                                 batch=f"night-{project}", window="22:00-06:00", **common))
    return sorted(jobs, key=lambda j: j.at_s)


def _replace_at(job: TraceJob, at_s: float) -> TraceJob:
    from dataclasses import replace

    return replace(job, at_s=at_s)
