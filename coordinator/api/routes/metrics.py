"""``GET /metrics``: the Prometheus series of the run (``docs/api.md`` section 4)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from coordinator.api.deps import AnswersDep
from coordinator.api.metrics import PROMETHEUS_TYPE

router = APIRouter(tags=["read"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format 0.0.4)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(answers: AnswersDep) -> PlainTextResponse:
    return PlainTextResponse(answers.metrics(), media_type=PROMETHEUS_TYPE)
