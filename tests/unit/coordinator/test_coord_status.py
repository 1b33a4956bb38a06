"""Status-topic messages on the coordinator: every one is counted under a reason code, apart
from the updates' admission counts, and only a valid one sets a board's status.

Uses the round engine of ``test_coord_engine`` (real SQLite store, real Ed25519 keys).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nacl.signing import SigningKey

from coordinator.status import STATUS_MAX_BYTES
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


def _figures(client: str, round_index: int, online: bool = True, **figures: float) -> bytes:
    return encode_status(
        run="demo",
        client=client,
        signing_key=BOARDS[client],
        online=online,
        round=round_index,
        telemetry=figures or None,
    )


def _close_round(engine) -> None:
    for client in BOARDS:
        assert engine.handle_update(_update(engine, client, np.ones(4), 10)).accepted
    assert engine.close_round() is not None


def test_figures_are_stored_per_board_and_round(tmp_path: Path) -> None:
    engine = _engine(tmp_path, rounds=2)
    engine.start()
    topic = status_topic("demo", "b0")
    first = _figures("b0", 1, train_s=2.0, train_cpu_s=3.5, soc_temp_c=61.0)
    assert engine.handle_status(first, topic=topic).accepted
    rows = engine.store.telemetry("b0")
    assert [(r.client, r.round, r.figures) for r in rows] == [
        ("b0", 1, {"train_s": 2.0, "train_cpu_s": 3.5, "soc_temp_c": 61.0})
    ]
    # The same round again replaces its figures; a status without figures keeps them, and a
    # Last Will (offline, nothing measured) does not erase them either.
    assert engine.handle_status(_figures("b0", 1, train_s=2.5), topic=topic).accepted
    assert engine.handle_status(_status("b0"), topic=topic).accepted
    assert engine.handle_status(_figures("b0", 1, online=False), topic=topic).accepted
    assert [r.figures for r in engine.store.telemetry("b0")] == [{"train_s": 2.5}]
    assert engine.store.statuses()["b0"]["status"] == "offline"
    _close_round(engine)
    assert engine.handle_status(_figures("b0", 2, train_s=4.0), topic=topic).accepted
    assert engine.handle_status(_figures("b1", 2, alarm_s=0.1), topic=None).accepted
    assert [(r.round, r.figures) for r in engine.store.telemetry("b0")] == [
        (1, {"train_s": 2.5}),
        (2, {"train_s": 4.0}),
    ]
    latest = engine.store.latest_telemetry()
    assert {c: (r.round, r.figures) for c, r in latest.items()} == {
        "b0": (2, {"train_s": 4.0}),
        "b1": (2, {"alarm_s": 0.1}),
    }
    assert engine.store.status_counts() == {"accepted": 6}


def test_figures_of_a_round_not_yet_open_are_refused_and_stored_nowhere(tmp_path: Path) -> None:
    engine = _engine(tmp_path, rounds=1)
    engine.start()
    topic = status_topic("demo", "b2")
    decision = engine.handle_status(_figures("b2", 2, train_s=1.0), topic=topic)
    assert decision.reason is Reason.FUTURE_ROUND and decision.client_id == "b2"
    assert engine.store.telemetry() == [] and engine.store.statuses() == {}
    # Without figures a status may name any round (it is only what the board holds).
    assert engine.handle_status(_status("b2"), topic=topic).accepted
    _close_round(engine)  # the run's only round: it is finished, its open round is 2
    assert engine.store.finished
    refused = engine.handle_status(_figures("b2", 2, train_s=1.0), topic=topic)
    assert refused.reason is Reason.FUTURE_ROUND
    assert engine.handle_status(_figures("b2", 1, train_s=1.0), topic=topic).accepted
    assert [r.round for r in engine.store.telemetry()] == [1]
    assert engine.store.status_counts() == {"future_round": 2, "accepted": 2}
    assert engine.store.decision_counts().get("future_round") is None  # not an update outcome


def test_a_status_with_a_figure_outside_its_domain_is_counted_as_bad_telemetry(
    tmp_path: Path,
) -> None:
    import struct

    from tests.unit.protocol.conftest import frame, sha256_hex

    engine = _engine(tmp_path)
    engine.start()
    payload = struct.pack("<f", -1.0)
    header = {
        "alarm": False,
        "base_sha256": "0" * 64,
        "client": "b1",
        "kind": "status",
        "layout": [["power_mw", []]],
        "nonce": "00" * 16,
        "payload_sha256": sha256_hex(payload),
        "round": 1,
        "run": "demo",
        "samples": 0,
        "status": "online",
        "timestamp_ms": 0,
        "v": 1,
    }
    data = frame(header, BOARDS["b1"], payload)
    decision = engine.handle_status(data, topic=status_topic("demo", "b1"))
    assert decision.reason is Reason.BAD_TELEMETRY
    assert engine.store.telemetry() == [] and engine.store.statuses() == {}
    assert engine.store.status_counts() == {"bad_telemetry": 1}


def test_a_database_from_before_the_telemetry_table_gains_it(tmp_path: Path) -> None:
    import sqlite3

    from coordinator.store import CoordinatorStore

    engine = _engine(tmp_path)
    engine.start()
    engine.store.close()
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        db.execute("DROP TABLE telemetry")  # as an older coordinator left it
    reader = sqlite3.connect(tmp_path / "c.sqlite")
    view = CoordinatorStore.__new__(CoordinatorStore)
    view._db = reader  # the readers alone, as the API's read-only view uses them
    assert view.telemetry() == [] and view.latest_telemetry() == {}
    reader.close()
    reopened = CoordinatorStore(tmp_path / "c.sqlite")
    reopened.set_status("b0", "online", 1, 5.0, telemetry={"train_s": 1.0})
    assert [r.figures for r in reopened.telemetry()] == [{"train_s": 1.0}]
    reopened.close()
