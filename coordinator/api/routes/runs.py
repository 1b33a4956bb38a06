"""The run and its rounds: ``/api/health``, ``/api/run``, ``/api/rounds`` and
``/api/rounds/{round}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Query as QueryParam

from coordinator.api.deps import AnswersDep, RoundNumber, error_responses
from coordinator.api.schemas import MAX_ROUND, Health, RoundDetail, RoundSummary, RunInfo

router = APIRouter(tags=["read"])


@router.get("/api/health", summary="Liveness and position")
def health(answers: AnswersDep) -> Health:
    return answers.health()


@router.get("/api/run", summary="The run and the open round", responses=error_responses(503))
def run_info(answers: AnswersDep) -> RunInfo:
    return answers.run()


@router.get("/api/rounds", summary="History of the closed rounds", responses=error_responses(503))
def rounds(
    answers: AnswersDep,
    first: Annotated[int, QueryParam(ge=1, le=MAX_ROUND, description="First round")] = 1,
    last: Annotated[
        int | None, QueryParam(ge=1, le=MAX_ROUND, description="Last round (inclusive)")
    ] = None,
) -> list[RoundSummary]:
    return answers.rounds(first, last)


@router.get(
    "/api/rounds/{round}",
    summary="One round: verdicts, SIREN decision, network and timing",
    responses=error_responses(404, 503),
)
def round_detail(round: RoundNumber, answers: AnswersDep) -> RoundDetail:
    return answers.round(round)
