"""The admin actions (``Authorization: Bearer <api_token>``): pause and resume the closing of
rounds, ban and unban a board, revoke a board's key, register or rotate a board's key.

Without the right token they answer 401; with no token configured admin actions are disabled
(401 as well); without a running service to act on, 409. Each action is applied by the service
(:class:`~coordinator.api.deps.CoordinatorControls`) and logged when it changed anything, never
with the token.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.exceptions import RequestValidationError
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.signing import VerifyKey

from coordinator.api.deps import AdminControls, AnswersDep, ClientId, error_responses
from coordinator.api.schemas import (
    BanState,
    KeyRegistered,
    KeyRegistration,
    PauseState,
    RevokeState,
)
from protocol.errors import KeyFileError
from protocol.keys import key_fingerprint, parse_verify_key

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin"])


def _act(action: str, call: Any, *args: Any) -> bool:
    """Run an admin action; map the service's refusals to 404, 409 and 503 (see
    :class:`CoordinatorControls`) and log what changed (never the token)."""
    try:
        changed = bool(call(*args))
    except LookupError as exc:
        # str() of a KeyError quotes its message; the message itself may end in a quote.
        raise HTTPException(404, str(exc.args[0]) if len(exc.args) == 1 else str(exc)) from None
    except TimeoutError as exc:
        raise HTTPException(
            503, f"the coordinator did not carry out {action} in time: {exc}", {"Retry-After": "5"}
        ) from None
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    if changed:
        shown = [bytes(a).hex() if isinstance(a, VerifyKey) else str(a) for a in args]
        logger.info("admin: %s", " ".join([action, *shown]))
    return changed


def _usable_key(text: str) -> VerifyKey:
    """An Ed25519 public key from 64 hex digits that is a curve point not of small order;
    anything else is a 422 naming ``public_key``."""
    try:
        key = parse_verify_key(text)
        if not crypto_core_ed25519_is_valid_point(bytes(key)):
            raise KeyFileError(
                "not a usable Ed25519 public key: not a curve point, or of small order"
            )
    except KeyFileError as exc:
        raise RequestValidationError(
            [{"loc": ("body", "public_key"), "msg": str(exc), "type": "value_error", "input": text}]
        ) from None
    return key


@router.post(
    "/api/admin/pause",
    summary="Stop closing rounds (updates are still admitted)",
    responses=error_responses(401, 409, 503),
)
def pause(ctl: AdminControls) -> PauseState:
    changed = _act("pause", ctl.pause)
    return PauseState(paused=ctl.is_paused(), changed=changed)


@router.post(
    "/api/admin/resume", summary="Close rounds again", responses=error_responses(401, 409, 503)
)
def resume(ctl: AdminControls) -> PauseState:
    changed = _act("resume", ctl.resume)
    return PauseState(paused=ctl.is_paused(), changed=changed)


@router.post(
    "/api/admin/clients/{client_id}/ban",
    summary="Refuse a board's updates",
    responses=error_responses(401, 404, 409, 503),
)
def ban(client_id: ClientId, ctl: AdminControls, answers: AnswersDep) -> BanState:
    answers.require_board(client_id)
    changed = _act("ban", ctl.ban, client_id)
    return BanState(client=client_id, banned=client_id in ctl.admin_banned(), changed=changed)


@router.post(
    "/api/admin/clients/{client_id}/unban",
    summary="Accept a board's updates again",
    responses=error_responses(401, 404, 409, 503),
)
def unban(client_id: ClientId, ctl: AdminControls, answers: AnswersDep) -> BanState:
    answers.require_board(client_id)
    changed = _act("unban", ctl.unban, client_id)
    return BanState(client=client_id, banned=client_id in ctl.admin_banned(), changed=changed)


@router.post(
    "/api/admin/clients/{client_id}/revoke",
    summary="Revoke a board's key: refuse its updates at once (re-admit with a new key)",
    responses=error_responses(401, 404, 409, 503),
)
def revoke(client_id: ClientId, ctl: AdminControls, answers: AnswersDep) -> RevokeState:
    answers.require_board(client_id)
    changed = _act("revoke", ctl.revoke, client_id)
    return RevokeState(client=client_id, revoked=client_id in ctl.revoked(), changed=changed)


@router.post(
    "/api/admin/keys",
    summary="Register or rotate a board's public key",
    responses=error_responses(401, 409, 503),
)
def register_key(body: KeyRegistration, ctl: AdminControls, answers: AnswersDep) -> KeyRegistered:
    key = _usable_key(body.public_key)
    changed = _act("register key of", ctl.register_key, body.client_id, key)
    return KeyRegistered(
        client_id=body.client_id,
        fingerprint=key_fingerprint(key),
        changed=changed,
        active=answers.is_board(body.client_id),
    )
