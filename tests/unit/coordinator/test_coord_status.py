"""Status-topic messages on the coordinator: every one is counted under a reason code, apart
from the updates' admission counts, and only a valid one sets a board's status.

Uses the round engine of ``test_coord_engine`` (real SQLite store, real Ed25519 keys).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nacl.signing import SigningKey

from coordinator.service import STATUS_MAX_BYTES
from protocol.envelope import encode_status
from protocol.errors import Reason
from protocol.topics import status_topic
from tests.unit.coordinator.test_coord_engine import BOARDS, _engine, _update


def _status(client: str, *, key: SigningKey | None = None, run: str = "demo", online=True):
    return encode_status(
        run=run, client=client, signing_key=key or BOARDS[client], online=online, round=1
    )


def test_a_valid_status_is_accepted_counted_and_recorded(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    engine.start()
    decision = engine.handle_status(_status("b1", online=False), topic=status_topic("demo", "b1"))
    assert decision.reason is Reason.ACCEPTED and decision.client_id == "b1"
    assert engine.store.statuses()["b1"]["status"] == "offline"
    assert engine.store.status_counts() == {"accepted": 1}
    assert engine.store.status_counts(1) == {"accepted": 1}
    assert engine.store.decision_counts() == {}  # the update counters are untouched


def test_every_refused_status_message_is_counted_under_its_reason(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    engine.start()
    topic = status_topic("demo", "b0")
    cases = [
        (b"not a message", topic, Reason.MALFORMED),
        (_status("b0", key=SigningKey(b"x" * 32)), topic, Reason.BAD_SIGNATURE),
        (_status("b9", key=SigningKey(b"y" * 32)), status_topic("demo", "b9"),
         Reason.UNKNOWN_CLIENT),
        (_update(engine, "b0", np.ones(4), 10), topic, Reason.WRONG_KIND),
        (_status("b0"), status_topic("demo", "b1"), Reason.TOPIC_MISMATCH),
        (_status("b0", run="other"), topic, Reason.TOPIC_MISMATCH),
        (_status("b0", run="other"), None, Reason.WRONG_RUN),
        (_status("b0") + bytes(STATUS_MAX_BYTES), topic, Reason.PAYLOAD_TOO_LARGE),
        (_status("b0") + b"\x00", topic, Reason.PAYLOAD_LENGTH),
    ]  # fmt: skip
    for payload, where, reason in cases:
        assert engine.handle_status(payload, topic=where).reason is reason
    assert engine.store.statuses() == {}
    expected: dict[str, int] = {}
    for _, _, reason in cases:
        expected[reason.value] = expected.get(reason.value, 0) + 1
    assert engine.store.status_counts() == expected
    assert engine.store.decision_counts() == {}


def test_a_banned_board_still_announces_its_status_and_counts_are_per_round(
    tmp_path: Path,
) -> None:
    engine = _engine(tmp_path)
    engine.start()
    engine.set_banned("b2", True)
    assert engine.handle_status(_status("b2"), topic=status_topic("demo", "b2")).accepted
    engine.set_banned("b2", False)
    for client in BOARDS:
        assert engine.handle_update(_update(engine, client, np.ones(4), 10)).accepted
    assert engine.close_round() is not None
    assert engine.handle_status(b"", topic=status_topic("demo", "b0")).reason is Reason.MALFORMED
    assert engine.store.status_counts(1) == {"accepted": 1}
    assert engine.store.status_counts(2) == {"malformed": 1}
