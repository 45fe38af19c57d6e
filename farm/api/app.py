"""The FastAPI application (OpenAPI at /docs)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from farm.api.errors import validation_error_handler
from farm.api.routes import router
from farm.settings import Settings, get_settings


def _celery_hooks(settings: Settings) -> tuple[Callable, Callable]:
    # By task name: the API process never imports torch, Ray or the model code.
    from kombu import Connection

    from farm.dispatch import enqueue_job

    def check_broker() -> None:
        with Connection(settings.broker_url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    return enqueue_job, check_broker


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="farm", version="0.1.0",
                  description="Render farm for Wan2.2-class text-to-video models")
    app.state.settings = settings = settings or get_settings()
    app.state.enqueue, app.state.check_broker = _celery_hooks(settings)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(router)
    return app
