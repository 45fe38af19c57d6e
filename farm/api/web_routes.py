"""The web page (issue #14, item 3) and the farm's per-tier numbers it shows.

`GET /` answers farm/web/index.html, `GET /web/{api,pages,app}.js` and `/web/style.css`
its scripts and style: plain files, no build step, no key needed (they hold no data).
Every number the page shows comes from the `/v1` routes with the key the user signed in
with, sent as a header by fetch() (never in a URL). The page's Content-Security-Policy
allows scripts, styles and connections to this origin only; pictures and videos also
from blob: (the page fetches them with the key and shows object URLs) and, on S3
storage, from the S3 endpoint (presigned video URLs: a signature, never the key).

`GET /v1/farm`: per tier, its GPUs, the actor groups busy and idle, and the jobs waiting,
admitted and running, counted over every project (no job ids, prompts or projects), with
the Prometheus collector's queries (farm/api/metrics.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from farm.api.metrics import group_gauges, job_gauges
from farm.api.routes import Project
from farm.db.session import session_scope
from farm.db.tables import utcnow
from farm.policy import get_policy
from farm.settings import Settings

router = APIRouter()
WEB = Path(__file__).resolve().parent.parent / "web"
JS = "text/javascript; charset=utf-8"
ASSETS = {"api.js": JS, "pages.js": JS, "app.js": JS, "style.css": "text/css; charset=utf-8"}


def content_security_policy(settings: Settings) -> str:
    """'self' only, plus blob: for media the page fetched itself and, on S3 storage, the S3
    endpoint's origin for presigned video URLs."""
    media = "'self' blob:"
    if settings.storage_url.startswith("s3://") and settings.s3_endpoint_url:
        parts = urlsplit(settings.s3_endpoint_url)
        media += f" {parts.scheme}://{parts.netloc}"
    elif settings.storage_url.startswith("s3://"):
        media += " https://*.amazonaws.com"
    return (f"default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            f"img-src {media}; media-src {media}; object-src 'none'; base-uri 'none'; "
            f"form-action 'self'; frame-ancestors 'none'")


@router.get("/", include_in_schema=False)
def index(request: Request) -> FileResponse:
    headers = {"Content-Security-Policy": content_security_policy(request.app.state.settings),
               "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache"}
    return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8",
                        headers=headers)


@router.get("/web/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"name: no file {name!r} in the web page")
    return FileResponse(WEB / name, media_type=ASSETS[name],
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})


class TierLoad(BaseModel):
    tier: str
    gpu: str | None  # the GPU model ("cpu" for CPU render slots); None: no such tier now
    gpus: int  # nodes x GPUs per node
    groups_busy: int  # actor groups leased now
    groups_idle: int
    jobs_waiting: int  # waiting for admission to the tier (queued, or in a batch window)
    jobs_admitted: int  # sent to the tier's queue, not yet started
    jobs_running: int  # rendering or stitching


class FarmPublic(BaseModel):
    tiers: list[TierLoad]


def _sum_by_tier(families, value_label: str | None = None) -> dict[tuple[str, str], int]:
    """(tier, kind) -> count, from gauge families labelled by tier (and track, summed)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for family in families:
        for sample in family.samples:
            kind = sample.labels[value_label] if value_label else family.name
            counts[(sample.labels["tier"], kind)] += int(sample.value)
    return counts


def farm_load(db_url: str) -> list[TierLoad]:
    with session_scope(db_url) as session:
        jobs = _sum_by_tier(job_gauges(session))
        groups = _sum_by_tier(group_gauges(session, utcnow()), "state")
    catalog = get_policy().catalog.tiers
    names = list(catalog) + sorted({t for t, _ in jobs | groups} - set(catalog))
    return [TierLoad(tier=name, gpu=catalog[name].gpu if name in catalog else None,
                     gpus=catalog[name].gpus if name in catalog else 0,
                     groups_busy=groups[(name, "busy")], groups_idle=groups[(name, "idle")],
                     jobs_waiting=jobs[(name, "farm_jobs_waiting")],
                     jobs_admitted=jobs[(name, "farm_jobs_admitted")],
                     jobs_running=jobs[(name, "farm_jobs_running")])
            for name in names]


@router.get("/v1/farm", response_model=FarmPublic)
def farm(request: Request, project: Project) -> FarmPublic:
    """Each tier's GPUs, actor groups busy and idle, and jobs waiting, admitted and running
    (every project's, counted; for the web page's farm view)."""
    return FarmPublic(tiers=farm_load(request.app.state.settings.database_url))
