"""The FastAPI application: :func:`create_app` puts the routers, the middleware and the error
handlers together over one read-only view of the store."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from coordinator.api.answers import Answers
from coordinator.api.controls import CoordinatorControls
from coordinator.api.deps import token_digest
from coordinator.api.metrics import metrics_registry
from coordinator.api.routes import admin, boards, dashboard, metrics, model, runs
from coordinator.api.routes.dashboard import DASHBOARD_DIR
from coordinator.api.store_view import StoreView
from coordinator.config import CoordinatorConfig
from coordinator.store import CoordinatorStore, StoreError

logger = logging.getLogger(__name__)

#: Host names the app answers to (DNS-rebinding protection for a loopback service).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(
    config: CoordinatorConfig,
    store: CoordinatorStore | str | Path,
    controls: CoordinatorControls | None = None,
    *,
    token: str | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    clock: Any = time.time,
) -> FastAPI:
    """Build the coordinator's HTTP API and dashboard.

    Parameters
    ----------
    config : CoordinatorConfig
        The coordinator's settings (run id, planned rounds, boards, aggregator, key directory).
    store : CoordinatorStore or path
        The run's database (or its path). The app reads it through its own read-only
        connection; it never writes it.
    controls : CoordinatorControls, optional
        The running service, for the admin actions. Without it the admin endpoints answer 409
        and the paused/banned state shown is that of an idle coordinator.
    token : str, optional
        The bearer token of the admin endpoints (``api_token``). ``None`` or empty disables
        them. Compared in constant time; never logged or returned.
    allowed_hosts : sequence of str
        Host header values answered (others get 400): the loopback names by default, so a web
        page cannot reach the API through DNS rebinding.
    clock : callable
        Wall clock in Unix seconds (ages and deadlines).

    Returns
    -------
    fastapi.FastAPI
        The application; serve it with :func:`start_api_server`.
    """
    path = store.path if isinstance(store, CoordinatorStore) else Path(store)
    view = StoreView(path)
    expected = token_digest(token) if token else None

    app = FastAPI(
        title="siren-edge coordinator",
        version="1",
        description="Run, rounds, boards, global model and admin actions of a siren-edge "
        "coordinator. Read-only endpoints are open; admin endpoints need the bearer token.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.state.view = view
    app.state.token_digest = expected
    app.state.controls = controls

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
        )
        if request.url.path.startswith("/api/") or request.url.path == "/metrics":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(sqlite3.Error)
    async def database_error(request: Request, exc: sqlite3.Error) -> JSONResponse:
        logger.warning("API: database read failed: %s", exc)
        return JSONResponse(
            {"detail": "the coordinator database cannot be read right now; retry"},
            status_code=503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 for a body it cannot decode at all (not UTF-8 JSON); the API
        # answers every malformed body with a 422 validation error. The app raises no 400.
        if exc.status_code == 400:
            return JSONResponse(
                {
                    "detail": [
                        {
                            "loc": ["body"],
                            "msg": "the request body is not valid UTF-8 JSON",
                            "type": "json_invalid",
                        }
                    ]
                },
                status_code=422,
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "2"})

    answers = Answers(config, view, controls, admin=expected is not None, clock=clock)
    app.state.answers = answers
    app.state.metrics = metrics_registry(answers)
    for routes in (runs, boards, model, metrics, admin, dashboard):
        app.include_router(routes.router)
    app.mount("/static", StaticFiles(directory=DASHBOARD_DIR), name="static")
    return app
