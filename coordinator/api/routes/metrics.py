"""``GET /metrics``: the Prometheus series of the run (``docs/api.md`` section 4), written by
``prometheus_client`` from the app's :class:`~coordinator.api.metrics.StoreCollector`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from coordinator.api.metrics import PROMETHEUS_TYPE, exposition

router = APIRouter(tags=["read"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format 0.0.4)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(exposition(request.app.state.metrics), media_type=PROMETHEUS_TYPE)
