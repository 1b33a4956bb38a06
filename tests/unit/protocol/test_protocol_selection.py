"""Client sampling on the wire: a version 2 global header names the boards drawn for its round
(docs/protocol.md 4.3), and admission refuses an update from a board it does not name."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from protocol.admission import Admission, AdmissionPolicy
from protocol.envelope import (
    HEADER_FIELDS_V2,
    SELECTION_VERSION,
    ZERO_SHA256,
    check_global,
    decode_message,
    encode_global,
    encode_update,
    header_of,
)
from protocol.errors import BadSignatureError, InvalidHeaderError, Reason
from protocol.keys import AllowList
from protocol.layout import TensorLayout, weights_sha256
from tests.unit.protocol.conftest import RUN, frame, reframe, sha256_hex, split_frame


def _global(key: SigningKey, weights: np.ndarray, layout: TensorLayout, **kw: Any) -> bytes:
    return encode_global(
        run=RUN, round=5, signing_key=key, weights=weights, layout=layout, samples=30, **kw
    )


def test_a_selection_makes_a_version_2_global_header_sorted_by_code_point(
    coordinator_key: SigningKey, layout: TensorLayout, global_weights: np.ndarray
) -> None:
    data = _global(coordinator_key, global_weights, layout, selected=["b2", "b10", "b1", "b2"])
    header, _, _ = split_frame(data)
    assert list(header) == list(HEADER_FIELDS_V2) and header["v"] == SELECTION_VERSION
    assert b'"samples":30,"selected":["b1","b10","b2"],"status":""' in data
    message = check_global(data, coordinator_key.verify_key, run=RUN, expected_layout=layout)
    assert message.selected == ("b1", "b10", "b2")
    assert message.header.selects("b10") and not message.header.selects("b3")
    assert header_of(data) == message.header
    plain = check_global(
        _global(coordinator_key, global_weights, layout), coordinator_key.verify_key, run=RUN
    )
    assert plain.selected is None and plain.header.version == 1 and plain.header.selects("b3")


def test_changing_the_selection_breaks_the_signature(
    coordinator_key: SigningKey, layout: TensorLayout, global_weights: np.ndarray
) -> None:
    header, signature, payload = split_frame(
        _global(coordinator_key, global_weights, layout, selected=["b1", "b2"])
    )
    header["selected"] = ["b1", "b3"]
    with pytest.raises(BadSignatureError):
        decode_message(reframe(header, signature, payload), coordinator_key.verify_key)


def _signed(key: SigningKey, **changes: Any) -> bytes:
    payload = struct.pack("<2f", 1.0, 2.0)
    header: dict[str, Any] = {
        "alarm": False,
        "base_sha256": ZERO_SHA256,
        "client": "coordinator",
        "kind": "global",
        "layout": [["w", [2]]],
        "nonce": "00" * 16,
        "payload_sha256": sha256_hex(payload),
        "round": 3,
        "run": "r",
        "samples": 0,
        "selected": ["b1", "b2"],
        "status": "",
        "timestamp_ms": 0,
        "v": 2,
    }
    header.update(changes)
    return frame({k: v for k, v in header.items() if v is not None}, key, payload)


def test_a_hand_built_version_2_global_is_accepted(coordinator_key: SigningKey) -> None:
    message = decode_message(_signed(coordinator_key), coordinator_key.verify_key)
    assert message.selected == ("b1", "b2")


@pytest.mark.parametrize(
    "changes",
    [
        {"selected": []},  # a selection names at least one board
        {"selected": ["b2", "b1"]},  # not sorted
        {"selected": ["b1", "b1"]},  # twice
        {"selected": ["b 1"]},  # not an identifier
        {"selected": "b1"},
        {"selected": [1]},
        {"selected": None},  # version 2 needs the key
        {"v": 1},  # version 1 has no such key
        {"kind": "update", "client": "b1"},  # only a global message is version 2
    ],
)
def test_invalid_selections_are_refused_even_when_signed(
    coordinator_key: SigningKey, changes: dict[str, Any]
) -> None:
    with pytest.raises(InvalidHeaderError):
        decode_message(_signed(coordinator_key, **changes), coordinator_key.verify_key)


def test_an_update_can_not_be_written_with_a_selection(
    board1: SigningKey, layout: TensorLayout
) -> None:
    from protocol.envelope import encode_message

    with pytest.raises(InvalidHeaderError, match="only a global message"):
        encode_message(
            "update", run=RUN, round=1, client="board-1", signing_key=board1,
            weights=np.ones(9, np.float32), layout=layout, samples=1, selected=["board-1"],
        )  # fmt: skip


def _update(key: SigningKey, client: str, layout: TensorLayout, base: str, round_: int) -> bytes:
    return encode_update(
        run=RUN,
        round=round_,
        client=client,
        signing_key=key,
        delta=np.ones(9, np.float32),
        layout=layout,
        base_sha256=base,
        samples=3,
        alarm=False,
    )


def test_admission_refuses_boards_the_round_did_not_draw(
    board1: SigningKey, board2: SigningKey, allow_list: AllowList, layout: TensorLayout
) -> None:
    base = weights_sha256(np.zeros(9, np.float32))
    admission = Admission(
        run=RUN,
        keys=allow_list,
        policy=AdmissionPolicy(layout),
        round=4,
        base_sha256=base,
        selected=["board-2"],
    )
    refused = admission.admit(_update(board1, "board-1", layout, base, 4))
    assert refused.reason is Reason.NOT_SELECTED and refused.client_id == "board-1"
    # The round and base model rules come first: a straggler is stale, not unselected.
    stale = admission.admit(_update(board1, "board-1", layout, base, 3))
    assert stale.reason is Reason.STALE_ROUND
    assert admission.admit(_update(board2, "board-2", layout, base, 4)).accepted
    # The selection is part of the saved state; a state saved before sampling has none.
    state = admission.state_dict()
    assert state["selected"] == ["board-2"]
    again = Admission.from_state_dict(state, keys=allow_list, policy=AdmissionPolicy(layout))
    assert again.selected == {"board-2"}
    del state["selected"]
    older = Admission.from_state_dict(state, keys=allow_list, policy=AdmissionPolicy(layout))
    assert older.selected is None
    # The next round draws other boards; without a selection every board may send.
    admission.start_round(5, base, ["board-1"])
    assert admission.admit(_update(board1, "board-1", layout, base, 5)).accepted
    admission.start_round(6, base)
    assert admission.admit(_update(board2, "board-2", layout, base, 6)).accepted


def test_buffered_async_admission_takes_stale_updates_within_the_bound(
    board1: SigningKey, board2: SigningKey, allow_list: AllowList, layout: TensorLayout
) -> None:
    """docs/protocol.md 8.9: with S = 2 an update trained on any of versions v-2..v is admitted
    (``stale`` below v) against that version's model hash; one update per board per buffer and
    per base version."""
    hashes = {r: weights_sha256(np.full(9, r, np.float32)) for r in range(1, 6)}
    policy = AdmissionPolicy(layout, max_staleness=2)
    admission = Admission(run=RUN, keys=allow_list, policy=policy, round=1, base_sha256=hashes[1])
    for r in (2, 3, 4):
        admission.start_round(r, hashes[r])
    fresh = admission.admit(_update(board1, "board-1", layout, hashes[4], 4))
    assert fresh.reason is Reason.ACCEPTED
    stale = admission.admit(_update(board2, "board-2", layout, hashes[2], 2))
    assert stale.reason is Reason.STALE and stale.accepted and not stale.rejected
    again = admission.admit(_update(board2, "board-2", layout, hashes[3], 3))
    assert again.reason is Reason.BUFFERED
    admission.start_round(5, hashes[5])
    assert admission.admit(_update(board2, "board-2", layout, hashes[2], 2)).reason is (
        Reason.TOO_STALE
    )
    # The same board may not have two updates trained on one version admitted.
    twice = admission.admit(_update(board1, "board-1", layout, hashes[4], 4))
    assert twice.reason is Reason.CONFLICTING_UPDATE
    wrong = admission.admit(_update(board2, "board-2", layout, hashes[4], 3))
    assert wrong.reason is Reason.WRONG_BASE_MODEL
    assert admission.admit(_update(board2, "board-2", layout, hashes[3], 3)).reason is (
        Reason.STALE
    )
    # The window and the per-version record survive a save.
    state = admission.state_dict()
    assert sorted(state["bases"]) == ["3", "4", "5"]
    loaded = Admission.from_state_dict(state, keys=allow_list, policy=policy)
    assert loaded.counters == admission.counters
    assert loaded.admit(_update(board1, "board-1", layout, hashes[4], 4)).reason is (
        Reason.CONFLICTING_UPDATE
    )
