"""422 bodies that name the field and quote the bad value."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


async def validation_error_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = []
    for err in exc.errors():
        field = _field(tuple(err.get("loc", ())))
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        item = {"field": field, "message": f"{field}: {message}", "loc": list(err.get("loc", ())),
                "type": err.get("type")}
        if "input" in err and err.get("type") != "missing":
            value = err["input"]
            item["value"] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)[:200]
        detail.append(item)
    return JSONResponse(status_code=422, content={"detail": detail})


async def database_unavailable_handler(_request: Request, exc: Exception) -> JSONResponse:
    """The database is unreachable (restarting, failing over): try again soon, not a 500."""
    log.warning("database unavailable: %s", type(exc).__name__)
    return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                        content={"detail": "the database is unavailable; retry shortly"})
