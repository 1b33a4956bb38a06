"""The current global model: ``/api/model`` (metadata) and ``/api/model/download`` (the signed
message, byte for byte, so a board can verify it with the pinned coordinator key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from coordinator.api.deps import ERRORS, AnswersDep, error_responses
from coordinator.api.schemas import ModelInfo

router = APIRouter(tags=["read"])


@router.get(
    "/api/model", summary="Metadata of the current global model", responses=error_responses(503)
)
def model_info(answers: AnswersDep) -> ModelInfo:
    return answers.model()


@router.get(
    "/api/model/download",
    summary="The signed global message, byte for byte (verify with the pinned key)",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "The message as published on the global topic",
        },
        304: {"description": "Not modified (If-None-Match matched)"},
        503: ERRORS[503],
    },
)
def model_download(request: Request, answers: AnswersDep) -> Response:
    return answers.download(request.headers.get("if-none-match", ""))
