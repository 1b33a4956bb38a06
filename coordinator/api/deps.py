"""What the routes depend on: the answers, the running service's controls, the admin token.

:func:`get_answers` gives a route the app's :class:`~coordinator.api.answers.Answers`;
:func:`admin_controls` admits an admin request (the bearer token must match, compared in
constant time on SHA-256 digests) and gives it the service's
:class:`~coordinator.api.controls.CoordinatorControls`. Also the path parameter types and the
documented error answers the routes share.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coordinator.api.answers import Answers
from coordinator.api.controls import CoordinatorControls
from coordinator.api.schemas import CLIENT_ID_PATTERN, MAX_ROUND, ErrorBody

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "No such client or round"},
    409: {"model": ErrorBody, "description": "Refused in the current state"},
    503: {"model": ErrorBody, "description": "The run has not started or the service is busy"},
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: ERRORS[code] for code in codes}


RoundNumber = Annotated[int, PathParam(ge=1, le=MAX_ROUND, description="Round number (from 1)")]
ClientId = Annotated[
    str, PathParam(pattern=CLIENT_ID_PATTERN, max_length=64, description="Board client id")
]

BEARER = HTTPBearer(
    auto_error=False, description="The coordinator's api_token (admin actions only)"
)


def token_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def admin_controls(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> CoordinatorControls:
    """Admit an admin request: the bearer token must match (compared in constant time)."""
    expected: bytes | None = request.app.state.token_digest
    controls: CoordinatorControls | None = request.app.state.controls
    challenge = {"WWW-Authenticate": "Bearer"}
    if expected is None:
        raise HTTPException(
            401, "admin actions are disabled: the coordinator has no api_token", challenge
        )
    # Both sides are SHA-256 digests, so the comparison time does not depend on the token.
    presented = token_digest(credentials.credentials) if credentials is not None else bytes(32)
    if not hmac.compare_digest(presented, expected):
        raise HTTPException(401, "missing or wrong bearer token", challenge)
    if controls is None:
        raise HTTPException(409, "no running coordinator service to act on")
    return controls


AdminControls = Annotated[CoordinatorControls, Depends(admin_controls)]


def get_answers(request: Request) -> Answers:
    """The app's :class:`~coordinator.api.answers.Answers` (one per app)."""
    answers: Answers = request.app.state.answers
    return answers


AnswersDep = Annotated[Answers, Depends(get_answers)]
