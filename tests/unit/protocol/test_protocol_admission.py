"""Coordinator admission: every rule violated on purpose yields its reason code."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from protocol.admission import DEFAULT_MAX_SAMPLES, Admission, AdmissionPolicy
from protocol.envelope import (
    MAX_HEADER_INT,
    decode_message,
    encode_global,
    encode_status,
    encode_update,
)
from protocol.errors import AdmissionStateError, Reason
from protocol.keys import AllowList
from protocol.layout import TensorLayout, weights_sha256
from protocol.topics import update_topic
from tests.unit.protocol.conftest import fixed_key, frame, sha256_hex

RUN = "run-a"
ROUND = 5
NOW = 1_700_000_000_000


class Env:
    """An admission at round 5 of run-a whose current global model is ``global_weights``."""

    def __init__(self, layout: TensorLayout, global_weights: np.ndarray, allow: AllowList) -> None:
        self.layout = layout
        self.base = weights_sha256(global_weights)
        self.allow = allow
        self.keys = {"board-1": fixed_key(1), "board-2": fixed_key(2), "board-9": fixed_key(9)}
        self.nonce_counter = 0

    def admission(self, **policy: Any) -> Admission:
        return Admission(
            run=RUN,
            keys=self.allow,
            policy=AdmissionPolicy(self.layout, **policy),
            round=ROUND,
            base_sha256=self.base,
            clock=lambda: NOW,
        )

    def update(self, client: str = "board-1", **overrides: Any) -> bytes:
        self.nonce_counter += 1
        fields: dict[str, Any] = {
            "run": RUN,
            "round": ROUND,
            "client": client,
            "signing_key": self.keys.get(client, fixed_key(1)),
            "delta": np.full(self.layout.size, 0.01 * self.nonce_counter, dtype=np.float32),
            "layout": self.layout,
            "base_sha256": self.base,
            "samples": 50,
            "alarm": False,
            "nonce": self.nonce_counter.to_bytes(16, "big"),
            "timestamp_ms": NOW,
        }
        fields.update(overrides)
        return encode_update(**fields)


@pytest.fixture
def env(layout: TensorLayout, global_weights: np.ndarray, allow_list: AllowList) -> Env:
    return Env(layout, global_weights, allow_list)


def test_valid_update_is_accepted_with_its_message(env: Env) -> None:
    admission = env.admission()
    data = env.update(alarm=True)
    decision = admission.admit(data, topic=update_topic(RUN, "board-1"))
    assert decision.reason is Reason.ACCEPTED
    assert decision.accepted and not decision.rejected
    assert decision.client_id == "board-1"
    assert decision.message is not None
    assert decision.message.header.alarm is True
    assert decision.message.weights is not None
    np.testing.assert_allclose(decision.message.weights, np.full(9, 0.01, dtype=np.float32))
    assert admission.accepted_clients == frozenset({"board-1"})
    assert admission.counters == {Reason.ACCEPTED: 1}


def _signed_raw(env: Env, **header_changes: Any) -> bytes:
    payload = np.zeros(env.layout.size, dtype="<f4").tobytes()
    header: dict[str, Any] = {
        "alarm": False,
        "base_sha256": env.base,
        "client": "board-1",
        "kind": "update",
        "layout": env.layout.to_json_value(),
        "nonce": "ee" * 16,
        "payload_sha256": sha256_hex(payload),
        "round": ROUND,
        "run": RUN,
        "samples": 10,
        "status": "",
        "timestamp_ms": NOW,
        "v": 1,
    }
    header.update(header_changes)
    return frame(header, env.keys["board-1"], payload)


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x40])


def _nan_update(env: Env) -> bytes:
    delta = np.zeros(env.layout.size, dtype=np.float32)
    delta[0] = np.inf
    return env.update(delta=delta, check_finite=False)


def _status(env: Env) -> bytes:
    return encode_status(run=RUN, client="board-1", signing_key=env.keys["board-1"], online=True)


def _bad_telemetry(env: Env) -> bytes:
    """A signed status whose temperature is below absolute zero (docs/protocol.md 4.2)."""
    payload = np.array([-300.0], dtype="<f4").tobytes()
    header: dict[str, Any] = {
        "alarm": False,
        "base_sha256": env.base,
        "client": "board-1",
        "kind": "status",
        "layout": [["soc_temp_c", []]],
        "nonce": "ef" * 16,
        "payload_sha256": sha256_hex(payload),
        "round": ROUND,
        "run": RUN,
        "samples": 0,
        "status": "online",
        "timestamp_ms": NOW,
        "v": 1,
    }
    return frame(header, env.keys["board-1"], payload)


def _conflicting(env: Env, admission: Admission) -> bytes:
    assert admission.admit(env.update()).accepted
    return env.update()  # same client and round, other content


def _replayed_nonce(env: Env, admission: Admission) -> bytes:
    assert admission.admit(env.update(nonce=b"\x07" * 16)).accepted
    return env.update("board-2", nonce=b"\x07" * 16)


# reason -> (policy overrides, builder(env, admission) -> (data, topic))
Builder = Callable[[Env, Admission], tuple[bytes, str | None]]


def _not_selected(env: Env, admission: Admission) -> bytes:
    admission.start_round(ROUND + 1, env.base, ["board-2"])  # client sampling drew board-2
    return env.update(round=ROUND + 1)


def _too_stale(env: Env, admission: Admission) -> bytes:
    # Two versions later, with S = 1, an update trained on version 5 is too stale.
    admission.start_round(ROUND + 1, env.base)
    admission.start_round(ROUND + 2, env.base)
    return env.update()


def _buffered(env: Env, admission: Admission) -> bytes:
    assert admission.admit(env.update()).accepted
    return env.update()  # another update of board-1 into the same buffer


CASES: dict[Reason, tuple[dict[str, Any], Builder]] = {
    Reason.PAYLOAD_TOO_LARGE: ({"max_message_bytes": 200}, lambda e, a: (e.update(), None)),
    Reason.MALFORMED: ({}, lambda e, a: (b"SIRN\x05\x00\x00\x00{}" + b"\x00" * 80, None)),
    Reason.UNSUPPORTED_VERSION: ({}, lambda e, a: (_signed_raw(e, v=3), None)),
    Reason.INVALID_HEADER: ({}, lambda e, a: (_signed_raw(e, samples=-5), None)),
    Reason.UNKNOWN_CLIENT: ({}, lambda e, a: (e.update("board-9"), None)),
    Reason.BAD_SIGNATURE: (
        {},
        lambda e, a: (e.update("board-2", signing_key=e.keys["board-1"]), None),
    ),
    Reason.PAYLOAD_LENGTH: ({}, lambda e, a: (e.update()[:-4], None)),
    Reason.PAYLOAD_HASH_MISMATCH: ({}, lambda e, a: (_flip_last_byte(e.update()), None)),
    Reason.NON_FINITE: ({}, lambda e, a: (_nan_update(e), None)),
    Reason.BAD_TELEMETRY: ({}, lambda e, a: (_bad_telemetry(e), None)),
    Reason.WRONG_KIND: ({}, lambda e, a: (_status(e), None)),
    Reason.TOPIC_MISMATCH: ({}, lambda e, a: (e.update(), update_topic(RUN, "board-2"))),
    Reason.WRONG_RUN: ({}, lambda e, a: (e.update(run="run-b"), None)),
    Reason.STALE_ROUND: ({}, lambda e, a: (e.update(round=ROUND - 1), None)),
    Reason.FUTURE_ROUND: ({}, lambda e, a: (e.update(round=ROUND + 1), None)),
    Reason.WRONG_BASE_MODEL: ({}, lambda e, a: (e.update(base_sha256="00" * 32), None)),
    Reason.LAYOUT_MISMATCH: (
        {},
        lambda e, a: (
            e.update(layout=TensorLayout.flat(9), delta=np.zeros(9, dtype=np.float32)),
            None,
        ),
    ),
    Reason.BAD_SAMPLE_COUNT: ({}, lambda e, a: (e.update(samples=0), None)),
    Reason.CLOCK_SKEW: (
        {"max_clock_skew_ms": 60_000},
        lambda e, a: (e.update(timestamp_ms=NOW - 60_001), None),
    ),
    Reason.CONFLICTING_UPDATE: ({}, lambda e, a: (_conflicting(e, a), None)),
    Reason.NOT_SELECTED: ({}, lambda e, a: (_not_selected(e, a), None)),
    Reason.TOO_STALE: ({"max_staleness": 1}, lambda e, a: (_too_stale(e, a), None)),
    Reason.BUFFERED: ({"max_staleness": 1}, lambda e, a: (_buffered(e, a), None)),
    Reason.REPLAYED_NONCE: ({}, lambda e, a: (_replayed_nonce(e, a), None)),
}


def test_cases_cover_every_rejection_reason() -> None:
    # ``banned`` is the coordinator's verdict on top of admission (an operator ban hides the
    # board's key, so admission itself says unknown_client): see test_coord_engine.py; so is
    # ``quarantined`` (a stored update refused on restart): see test_coord_poison.py.
    coordinator_only = {Reason.BANNED, Reason.QUARANTINED, Reason.REVOKED}
    admitted = {Reason.ACCEPTED, Reason.STALE, Reason.DUPLICATE}  # not rejections
    assert set(CASES) == set(Reason) - admitted - coordinator_only


@pytest.mark.parametrize("reason", sorted(CASES, key=str), ids=str)
def test_each_violated_rule_yields_its_reason(
    reason: Reason, env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    policy, build = CASES[reason]
    admission = env.admission(**policy)
    data, topic = build(env, admission)
    before = admission.counters.get(reason, 0)
    with caplog.at_level(logging.WARNING, logger="protocol.admission"):
        decision = admission.admit(data, topic=topic)
    assert decision.reason is reason, decision.detail
    assert decision.rejected and not decision.accepted
    assert decision.message is None  # nothing rejected can reach an aggregator
    assert admission.counters[reason] == before + 1
    assert any(reason.value in record.getMessage() for record in caplog.records)


def test_identical_resend_is_duplicate_not_error(env: Env) -> None:
    admission = env.admission()
    data = env.update()
    assert admission.admit(data).accepted
    again = admission.admit(data)
    assert again.reason is Reason.DUPLICATE
    assert not again.accepted and not again.rejected
    assert again.message is None
    assert again.client_id == "board-1"
    assert admission.counters == {Reason.ACCEPTED: 1, Reason.DUPLICATE: 1}


def test_replay_from_an_earlier_round_is_refused(env: Env, global_weights: np.ndarray) -> None:
    admission = env.admission()
    old = env.update()
    assert admission.admit(old).accepted
    new_global = global_weights + 1
    admission.start_round(ROUND + 1, weights_sha256(new_global))
    assert admission.accepted_clients == frozenset()
    assert admission.admit(old).reason is Reason.STALE_ROUND
    fresh = env.update(round=ROUND + 1, base_sha256=weights_sha256(new_global))
    assert admission.admit(fresh).accepted


def test_base_hash_is_the_payload_hash_of_the_global_message(
    env: Env, global_weights: np.ndarray, coordinator_key: SigningKey
) -> None:
    published = encode_global(
        run=RUN,
        round=ROUND,
        signing_key=coordinator_key,
        weights=global_weights,
        layout=env.layout,
    )
    received = decode_message(published, coordinator_key.verify_key)
    admission = env.admission()
    data = env.update(base_sha256=received.header.payload_sha256)
    assert admission.admit(data).accepted


def test_two_clients_same_round_both_accepted(env: Env) -> None:
    admission = env.admission()
    assert admission.admit(env.update("board-1")).accepted
    assert admission.admit(env.update("board-2")).accepted
    assert admission.accepted_clients == frozenset({"board-1", "board-2"})


def test_default_size_limit_is_four_models_plus_header_room(env: Env) -> None:
    policy = AdmissionPolicy(env.layout)
    # 4 * (9 * 4) + 8 + 256 KiB + 64
    assert policy.size_limit == 144 + 8 + 262144 + 64
    assert AdmissionPolicy(env.layout, max_message_bytes=1000).size_limit == 1000


def test_max_samples_bounds_the_weight_attack(env: Env) -> None:
    admission = env.admission(max_samples=1000)
    assert admission.admit(env.update(samples=1000)).accepted
    assert admission.admit(env.update("board-2", samples=1001)).reason is Reason.BAD_SAMPLE_COUNT


def test_clock_is_ignored_unless_configured(env: Env) -> None:
    admission = env.admission()
    assert admission.admit(env.update(timestamp_ms=0)).accepted


def test_topic_of_another_run_or_kind_is_a_mismatch(env: Env) -> None:
    admission = env.admission()
    for topic in ("siren/v1/run-b/update/board-1", "siren/v1/run-a/status/board-1", "junk"):
        assert admission.admit(env.update(), topic=topic).reason is Reason.TOPIC_MISMATCH


def test_key_added_to_allow_list_later_is_used(env: Env) -> None:
    admission = env.admission()
    data = env.update("board-9")
    assert admission.admit(data).reason is Reason.UNKNOWN_CLIENT
    env.allow.add("board-9", env.keys["board-9"].verify_key)
    assert admission.admit(data).accepted


def test_admit_never_raises_on_odd_inputs(env: Env) -> None:
    admission = env.admission()
    for data in (b"", b"SIRN", bytearray(b"x" * 100), memoryview(b"SIRN" + b"\xff" * 90)):
        assert admission.admit(data).reason is Reason.MALFORMED


def test_start_round_must_advance(env: Env) -> None:
    admission = env.admission()
    with pytest.raises(ValueError):
        admission.start_round(ROUND, env.base)
    with pytest.raises(ValueError):
        admission.start_round(ROUND + 1, "xyz")


def test_state_survives_a_restart(env: Env, tmp_path: Path) -> None:
    admission = env.admission()
    first = env.update()
    assert admission.admit(first).accepted
    assert admission.admit(b"junk").reason is Reason.MALFORMED
    path = tmp_path / "state" / "admission.json"
    admission.save(path)

    restored = Admission.load(path, keys=env.allow, policy=AdmissionPolicy(env.layout))
    assert (restored.run, restored.round, restored.base_sha256) == (RUN, ROUND, env.base)
    assert restored.accepted_clients == frozenset({"board-1"})
    assert restored.counters == {Reason.ACCEPTED: 1, Reason.MALFORMED: 1}
    assert restored.admit(first).reason is Reason.DUPLICATE
    assert restored.admit(env.update()).reason is Reason.CONFLICTING_UPDATE
    reused = env.update("board-2", nonce=decision_nonce(first, env))
    assert restored.admit(reused).reason is Reason.REPLAYED_NONCE


def decision_nonce(data: bytes, env: Env) -> bytes:
    return bytes.fromhex(decode_message(data, env.allow).header.nonce)


def test_state_for_another_layout_or_garbage_is_refused(env: Env, tmp_path: Path) -> None:
    state = env.admission().state_dict()
    other = AdmissionPolicy(TensorLayout.flat(9))
    with pytest.raises(AdmissionStateError):
        Admission.from_state_dict(state, keys=env.allow, policy=other)
    for broken in ({}, {**state, "version": 99}, {**state, "round": -1}, {**state, "seen": []}):
        with pytest.raises(AdmissionStateError):
            Admission.from_state_dict(broken, keys=env.allow, policy=AdmissionPolicy(env.layout))
    bad_file = tmp_path / "state.json"
    bad_file.write_text("{not json")
    with pytest.raises(AdmissionStateError):
        Admission.load(bad_file, keys=env.allow, policy=AdmissionPolicy(env.layout))


def test_policy_validation(layout: TensorLayout) -> None:
    with pytest.raises(ValueError):
        AdmissionPolicy(TensorLayout([]))
    with pytest.raises(ValueError):
        AdmissionPolicy(layout, min_samples=10, max_samples=5)
    with pytest.raises(ValueError):
        AdmissionPolicy(layout, max_message_bytes=0)


def test_sample_counts_are_bounded_by_default(env: Env) -> None:
    # A sample count at the header's limit (2^53 - 1) made the round's total unencodable.
    admission = env.admission()
    assert AdmissionPolicy(env.layout).sample_limit == DEFAULT_MAX_SAMPLES
    assert admission.admit(env.update(samples=DEFAULT_MAX_SAMPLES)).accepted
    pill = admission.admit(env.update("board-2", samples=MAX_HEADER_INT))
    assert pill.reason is Reason.BAD_SAMPLE_COUNT
    with pytest.raises(ValueError, match="above the protocol's limit"):
        AdmissionPolicy(env.layout, max_samples=MAX_HEADER_INT + 1)


def test_an_unreadable_message_is_logged_with_the_topic_it_came_on(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"siren/v1/{RUN}/update/board-2"
    decision = env.admission().admit(b"\x00garbage", topic=topic)
    assert decision.rejected and decision.client_id is None
    assert f"rejected update from ? (on {topic})" in caplog.text
