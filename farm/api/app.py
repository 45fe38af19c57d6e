"""The FastAPI application (OpenAPI at /docs)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from farm.api import batch_routes, picture_routes, routes
from farm.api import metrics, videos_routes
from farm.api import control_routes
from farm.api import stream_routes
from farm.api import retention_routes
from farm.api import web_routes
from farm.api.limits import BodyLimit
from farm.api.errors import database_unavailable_handler, validation_error_handler
from farm.db.session import DATABASE_OUTAGE
from farm.settings import Settings, get_settings


def _broker_check(settings: Settings) -> Callable:
    from kombu import Connection

    def check_broker() -> None:
        with Connection(settings.broker_url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    return check_broker


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="farm", version="0.1.0",
                  description="Render farm for Wan2.2-class text-to-video models")
    app.state.settings = settings = settings or get_settings()
    app.state.check_broker = _broker_check(settings)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    # Connection-level database errors (OperationalError, InterfaceError) are a 503.
    for error in DATABASE_OUTAGE:
        app.add_exception_handler(error, database_unavailable_handler)
    app.include_router(routes.router)
    app.include_router(batch_routes.router)
    app.include_router(picture_routes.router)
    app.include_router(retention_routes.router)  # DELETE /v1/jobs/{id}
    app.include_router(videos_routes.router)  # OpenAI-style /v1/videos (issue #13)
    app.include_router(metrics.router)  # /metrics for Prometheus (issue #13)
    app.include_router(control_routes.router)
    app.include_router(stream_routes.router)  # progress streams, webhook secret
    app.include_router(web_routes.router)  # the web page at / and GET /v1/farm (issue #14)
    return app
