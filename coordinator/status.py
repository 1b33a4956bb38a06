"""Status messages of the boards (online/offline, telemetry figures): the checks a status passes.

A board's status is a signed message on its status topic (``docs/protocol.md`` section 8.8). It
carries no model, so its size limit is small, and it has no freshness rule: a resent status
only sets again what the dashboard shows. :func:`check_status` is pure (no store, no clock); the
round engine counts its outcomes and records what passes.
"""

from __future__ import annotations

from collections.abc import Mapping

from nacl.signing import VerifyKey

from protocol.envelope import Kind, Message, decode_message
from protocol.errors import (
    FutureRoundError,
    TopicError,
    TopicMismatchError,
    WrongKindError,
    WrongRunError,
    brief,
)
from protocol.topics import KIND_STATUS, parse_topic

#: Size limit of a status message (it carries no payload: a header of a few hundred bytes).
STATUS_MAX_BYTES = 64 * 1024


def check_status(
    payload: bytes,
    keys: Mapping[str, VerifyKey],
    *,
    run: str,
    latest_round: int,
    topic: str | None = None,
) -> Message:
    """Decode and check one message of a status topic; return it when it passes.

    The decoding checks run with ``keys`` (every board's key: an operator-banned board still
    announces its status), then: kind ``status`` (``wrong_kind``), the topic, when given, is
    the signer's status topic of the signed run (``topic_mismatch``), the run is ``run``
    (``wrong_run``), and a status carrying telemetry figures describes a round no later than
    ``latest_round`` (``future_round``), which bounds what a board can store to one row per
    round.

    Raises
    ------
    protocol.errors.InvalidMessageError
        The first check that failed, with its reason code and the claimed client id.
    """
    message = decode_message(payload, keys, max_message_bytes=STATUS_MAX_BYTES)
    client = message.client
    if message.kind is not Kind.STATUS:
        raise WrongKindError(
            f"expected a status, got a {message.kind.value} message", client_id=client
        )
    if topic is not None:
        try:
            parsed = parse_topic(topic)
        except TopicError as exc:
            raise TopicMismatchError(str(exc), client_id=client) from None
        if parsed.kind != KIND_STATUS or parsed.run != message.run or parsed.client != client:
            raise TopicMismatchError(
                f"topic {brief(topic)} does not match the signed run {message.run!r} "
                f"and client {client!r}",
                client_id=client,
            )
    if message.run != run:
        raise WrongRunError(
            f"status is for run {message.run!r}, current is {run!r}", client_id=client
        )
    if message.telemetry and message.round > latest_round:
        raise FutureRoundError(
            f"status carries figures of round {message.round}; the latest round of "
            f"this run so far is {latest_round}",
            client_id=client,
        )
    return message
