"""The boards of the run: ``/api/clients`` and ``/api/clients/{client_id}``."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.api.deps import AnswersDep, ClientId, error_responses
from coordinator.api.schemas import ClientDetail, ClientSummary

router = APIRouter(tags=["read"])


@router.get("/api/clients", summary="Every board of the run", responses=error_responses(503))
def clients(answers: AnswersDep) -> list[ClientSummary]:
    return answers.clients()


@router.get(
    "/api/clients/{client_id}",
    summary="One board: status, alarm history, penalty, bans, rejections",
    responses=error_responses(404, 503),
)
def client_detail(client_id: ClientId, answers: AnswersDep) -> ClientDetail:
    return answers.client(client_id)
