"""422 bodies that name the field and quote the bad value."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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
