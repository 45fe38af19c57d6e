"""Who is calling: every route but /healthz needs a project's API key (HTTP errors here only).

`Authorization: Bearer <key>` or `X-API-Key: <key>`. No key or a bad or revoked one: 401.
A job or batch of another project: 403 (farm.api.routes). Submission limits are in
farm/api/limits.py.
"""

from __future__ import annotations

from fastapi import HTTPException, Request

from farm.jobs import keys


def current_project(request: Request) -> str:
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else \
        request.headers.get("x-api-key", "")
    if not key:
        raise HTTPException(401, "an API key is required (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})
    project = keys.project_of(request.app.state.settings.database_url, key)
    if project is None:
        raise HTTPException(401, "the API key is not valid (unknown or revoked)",
                            headers={"WWW-Authenticate": "Bearer"})
    return project
