"""Envelope encoding and decoding: byte layout, round trips, tamper detection, board checks."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from protocol.envelope import (
    EMPTY_SHA256,
    HEADER_FIELDS,
    MAX_HEADER_BYTES,
    ZERO_SHA256,
    Header,
    Kind,
    check_global,
    decode_message,
    encode_global,
    encode_message,
    encode_status,
    encode_update,
)
from protocol.errors import (
    BadSignatureError,
    InvalidHeaderError,
    InvalidMessageError,
    LayoutError,
    LayoutMismatchError,
    MalformedMessageError,
    NonFiniteValuesError,
    PayloadHashMismatchError,
    PayloadLengthError,
    PayloadTooLargeError,
    StaleRoundError,
    UnknownClientError,
    UnsupportedVersionError,
    WrongKindError,
    WrongRunError,
)
from protocol.keys import AllowList
from protocol.layout import TensorLayout, weights_sha256
from tests.unit.protocol.conftest import fixed_key, frame, reframe, sha256_hex, split_frame

NONCE = bytes.fromhex("00112233445566778899aabbccddeeff")
TS = 1_700_000_000_000


def _update(key: SigningKey, layout: TensorLayout, delta: np.ndarray, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "run": "run-a",
        "round": 5,
        "client": "board-1",
        "signing_key": key,
        "delta": delta,
        "layout": layout,
        "base_sha256": "ab" * 32,
        "samples": 120,
        "alarm": False,
        "nonce": NONCE,
        "timestamp_ms": TS,
    }
    fields.update(overrides)
    return encode_update(**fields)


def test_update_matches_a_message_built_by_hand_from_the_specification() -> None:
    key = SigningKey(bytes(range(32)))
    layout = TensorLayout([("dense/kernel", (2, 2)), ("dense/bias", (2,))])
    values = [0.5, -1.0, 0.25, 2.0, 0.0, -0.125]
    payload = struct.pack("<6f", *values)
    header = (
        '{"alarm":true,"base_sha256":"' + "ab" * 32 + '","client":"board-01","kind":"update",'
        '"layout":[["dense/kernel",[2,2]],["dense/bias",[2]]],'
        '"nonce":"00112233445566778899aabbccddeeff",'
        '"payload_sha256":"' + sha256_hex(payload) + '","round":7,"run":"demo","samples":120,'
        '"status":"","timestamp_ms":1700000000000,"v":1}'
    ).encode("ascii")
    expected = frame(header, key, payload)
    produced = encode_update(
        run="demo",
        round=7,
        client="board-01",
        signing_key=key,
        delta=np.array(values, dtype=np.float32),
        layout=layout,
        base_sha256="ab" * 32,
        samples=120,
        alarm=True,
        nonce=NONCE,
        timestamp_ms=TS,
    )
    assert produced == expected
    # 8-byte prefix + header + 64-byte signature + 24-byte payload.
    assert len(produced) == 8 + len(header) + 64 + 24


def test_update_round_trip(board1: SigningKey, layout: TensorLayout) -> None:
    delta = np.arange(9, dtype=np.float32) / 8
    data = _update(board1, layout, delta, alarm=True)
    message = decode_message(data, board1.verify_key)
    header = message.header
    assert message.kind is Kind.UPDATE
    assert (header.run, header.round, header.client) == ("run-a", 5, "board-1")
    assert (header.samples, header.alarm, header.nonce) == (120, True, NONCE.hex())
    assert header.timestamp_ms == TS
    assert header.base_sha256 == "ab" * 32
    assert header.layout == layout
    assert header.payload_sha256 == weights_sha256(delta)
    assert message.weights is not None
    np.testing.assert_array_equal(message.weights, delta)
    assert message.header_bytes == header.canonical_bytes()
    assert len(message.signature) == 64


def test_encoding_is_deterministic_given_nonce_and_time(
    board1: SigningKey, layout: TensorLayout
) -> None:
    delta = np.ones(9, dtype=np.float32)
    assert _update(board1, layout, delta) == _update(board1, layout, delta)


def test_random_nonce_differs_between_messages(board1: SigningKey, layout: TensorLayout) -> None:
    delta = np.ones(9, dtype=np.float32)
    one = decode_message(_update(board1, layout, delta, nonce=None), board1.verify_key)
    two = decode_message(_update(board1, layout, delta, nonce=None), board1.verify_key)
    assert one.header.nonce != two.header.nonce
    assert one.message_id != two.message_id


def test_global_and_status_round_trip(coordinator_key: SigningKey, layout: TensorLayout) -> None:
    weights = np.linspace(0, 1, 9, dtype=np.float32)
    data = encode_global(
        run="run-a", round=3, signing_key=coordinator_key, weights=weights, layout=layout
    )
    message = decode_message(data, coordinator_key.verify_key)
    assert message.kind is Kind.GLOBAL
    assert message.client == "coordinator"
    assert message.header.base_sha256 == ZERO_SHA256
    assert message.header.payload_sha256 == weights_sha256(weights)

    status = encode_status(run="run-a", client="board-1", signing_key=coordinator_key, online=False)
    decoded = decode_message(status, coordinator_key.verify_key)
    assert decoded.kind is Kind.STATUS
    assert decoded.header.status == "offline"
    assert decoded.weights is None
    assert decoded.header.payload_sha256 == EMPTY_SHA256
    assert len(decoded.layout) == 0


def test_key_lookup_by_mapping_and_by_function(
    board1: SigningKey, board2: SigningKey, layout: TensorLayout, allow_list: AllowList
) -> None:
    data = _update(board2, layout, np.zeros(9, dtype=np.float32), client="board-2")
    assert decode_message(data, allow_list).client == "board-2"
    assert decode_message(data, {"board-2": board2.verify_key}.get).client == "board-2"
    with pytest.raises(UnknownClientError) as info:
        decode_message(data, {"board-1": board1.verify_key})
    assert info.value.client_id == "board-2"


def test_message_signed_by_unknown_key_is_refused(
    outsider: SigningKey, layout: TensorLayout, allow_list: AllowList
) -> None:
    data = _update(outsider, layout, np.zeros(9, dtype=np.float32), client="board-9")
    with pytest.raises(UnknownClientError):
        decode_message(data, allow_list)
    # Claiming a registered id with an unregistered key fails the signature check.
    forged = _update(outsider, layout, np.zeros(9, dtype=np.float32), client="board-1")
    with pytest.raises(BadSignatureError):
        decode_message(forged, allow_list)


# Altered value of every header field, and the error expected when the original signature is
# kept. A field change that leaves the header valid must be caught by the signature.
TAMPERED: dict[str, tuple[Any, type[InvalidMessageError]]] = {
    "alarm": (True, BadSignatureError),
    "base_sha256": ("cd" * 32, BadSignatureError),
    "client": ("board-2", BadSignatureError),
    "kind": ("global", BadSignatureError),
    "layout": ([["dense/kernel", [3, 2]], ["dense/bias", [3]]], BadSignatureError),
    "nonce": ("ff" * 16, BadSignatureError),
    "payload_sha256": ("00" * 32, BadSignatureError),
    "round": (6, BadSignatureError),
    "run": ("run-b", BadSignatureError),
    "samples": (100000, BadSignatureError),
    "status": ("online", InvalidHeaderError),
    "timestamp_ms": (TS + 1, BadSignatureError),
    "v": (3, UnsupportedVersionError),
}


def test_tamper_table_covers_every_header_field() -> None:
    assert set(TAMPERED) == set(HEADER_FIELDS)


@pytest.mark.parametrize("field", sorted(TAMPERED))
def test_tampering_any_header_field_is_detected(
    field: str, board1: SigningKey, layout: TensorLayout, allow_list: AllowList
) -> None:
    data = _update(board1, layout, np.ones(9, dtype=np.float32))
    header, signature, payload = split_frame(data)
    value, error = TAMPERED[field]
    assert header[field] != value
    header[field] = value
    with pytest.raises(error):
        decode_message(reframe(header, signature, payload), allow_list)


def test_flipping_any_header_or_signature_bit_is_detected(
    board1: SigningKey, layout: TensorLayout
) -> None:
    data = _update(board1, layout, np.ones(9, dtype=np.float32))
    (length,) = struct.unpack_from("<I", data, 4)
    for position in range(0, 8 + length + 64):
        for bit in (0x01, 0x80):
            altered = bytearray(data)
            altered[position] ^= bit
            with pytest.raises(InvalidMessageError):
                decode_message(bytes(altered), board1.verify_key)


def test_altering_any_payload_byte_is_detected(board1: SigningKey, layout: TensorLayout) -> None:
    data = _update(board1, layout, np.ones(9, dtype=np.float32))
    start = len(data) - 36
    for position in range(start, len(data)):
        altered = bytearray(data)
        altered[position] ^= 0x01
        with pytest.raises(PayloadHashMismatchError):
            decode_message(bytes(altered), board1.verify_key)


def test_truncated_or_extended_payload_is_refused(board1: SigningKey, layout: TensorLayout) -> None:
    data = _update(board1, layout, np.ones(9, dtype=np.float32))
    with pytest.raises(PayloadLengthError):
        decode_message(data[:-4], board1.verify_key)
    with pytest.raises(PayloadLengthError):
        decode_message(data + b"\x00\x00\x00\x00", board1.verify_key)


def test_signed_non_finite_payload_is_refused(board1: SigningKey, layout: TensorLayout) -> None:
    delta = np.zeros(9, dtype=np.float32)
    delta[4] = np.nan
    with pytest.raises(LayoutError):
        _update(board1, layout, delta)
    data = _update(board1, layout, delta, check_finite=False)
    with pytest.raises(NonFiniteValuesError):
        decode_message(data, board1.verify_key)


def test_size_limit_is_checked_first(board1: SigningKey, layout: TensorLayout) -> None:
    data = _update(board1, layout, np.ones(9, dtype=np.float32))
    assert decode_message(data, board1.verify_key, max_message_bytes=len(data)).round == 5
    with pytest.raises(PayloadTooLargeError):
        decode_message(data, board1.verify_key, max_message_bytes=len(data) - 1)


def _signed_header(key: SigningKey, **changes: Any) -> bytes:
    payload = struct.pack("<2f", 1.0, 2.0)
    header: dict[str, Any] = {
        "alarm": False,
        "base_sha256": ZERO_SHA256,
        "client": "board-1",
        "kind": "update",
        "layout": [["w", [2]]],
        "nonce": "00" * 16,
        "payload_sha256": sha256_hex(payload),
        "round": 0,
        "run": "r",
        "samples": 1,
        "status": "",
        "timestamp_ms": 0,
        "v": 1,
    }
    header.update(changes)
    return frame({k: v for k, v in header.items() if v is not None}, key, payload)


def test_hand_built_header_is_accepted(board1: SigningKey) -> None:
    message = decode_message(_signed_header(board1), board1.verify_key)
    assert message.weights is not None
    np.testing.assert_array_equal(message.weights, [1.0, 2.0])


@pytest.mark.parametrize(
    "changes",
    [
        {"round": -1},
        {"round": 2**53},
        {"round": True},
        {"samples": "1"},
        {"alarm": 1},
        {"kind": "delta"},
        {"kind": "status"},  # a status message carries no tensors
        {"run": "a/b"},
        {"client": ""},
        {"nonce": "00" * 15},
        {"nonce": "AB" * 16},  # upper-case hex is not canonical
        {"base_sha256": "0" * 63},
        {"layout": [["w", [2]], ["w", [0]]]},
        {"layout": []},
        {"layout": "w:2"},
        {"timestamp_ms": 1.5},
        {"status": None},  # missing key
        {"extra": 1},
        {"v": "1"},
    ],
)
def test_invalid_header_fields_are_refused_even_when_signed(
    board1: SigningKey, changes: dict[str, Any]
) -> None:
    with pytest.raises(InvalidHeaderError):
        decode_message(_signed_header(board1, **changes), board1.verify_key)


def test_unsupported_version(board1: SigningKey) -> None:
    with pytest.raises(UnsupportedVersionError):
        decode_message(_signed_header(board1, v=3), board1.verify_key)


@pytest.mark.parametrize(
    "header_bytes",
    [
        b'{"v": 1}',  # whitespace
        b'{"v":1,"alarm":false}',  # keys not sorted
        b'{"v":1,"v":1}',  # duplicate key
        b'{"v":NaN}',
        b'{"v":1e999}',
        b"[1,2]",
        b"\xff\xfe",
        b"[" * 5000 + b"]" * 5000,
        b'{"v":' + b"9" * 5000 + b"}",
    ],
)
def test_non_canonical_or_non_json_header_is_malformed(
    board1: SigningKey, header_bytes: bytes
) -> None:
    with pytest.raises((MalformedMessageError, InvalidHeaderError)):
        decode_message(frame(header_bytes, board1), board1.verify_key)


def test_framing_errors(board1: SigningKey) -> None:
    good = _signed_header(board1)
    cases = [
        b"",
        b"SIRN",
        b"XIRN" + good[4:],
        good[:4] + struct.pack("<I", 0) + good[8:],
        good[:4] + struct.pack("<I", MAX_HEADER_BYTES + 1) + good[8:],
        good[:4] + struct.pack("<I", len(good)) + good[8:],
        good[:100],
    ]
    for data in cases:
        with pytest.raises(MalformedMessageError):
            decode_message(data, board1.verify_key)


def test_non_bytes_input_raises_protocol_error(board1: SigningKey) -> None:
    with pytest.raises(MalformedMessageError):
        decode_message("SIRN" * 40, board1.verify_key)  # type: ignore[arg-type]
    message = decode_message(bytearray(_signed_header(board1)), board1.verify_key)
    assert message.round == 0


def test_header_object_validates_on_construction(layout: TensorLayout) -> None:
    with pytest.raises(InvalidHeaderError):
        Header(
            kind=Kind.GLOBAL,
            run="r",
            round=0,
            client="coordinator",
            payload_sha256=ZERO_SHA256,
            base_sha256=ZERO_SHA256,
            samples=0,
            alarm=True,  # a global model has no alarm bit
            nonce="00" * 16,
            timestamp_ms=0,
            status="",
            layout=layout,
        )


def test_encoder_requires_weights_and_layout_together(
    board1: SigningKey, layout: TensorLayout
) -> None:
    with pytest.raises(LayoutError):
        encode_message("update", run="r", round=0, client="b", signing_key=board1, layout=layout)
    with pytest.raises(InvalidHeaderError):
        encode_message("update", run="r", round=0, client="b", signing_key=board1)


# -- board side -----------------------------------------------------------------------------


@pytest.fixture
def global_message(coordinator_key: SigningKey, layout: TensorLayout) -> bytes:
    return encode_global(
        run="run-a",
        round=4,
        signing_key=coordinator_key,
        weights=np.full(9, 0.5, dtype=np.float32),
        layout=layout,
        previous_sha256="11" * 32,
        samples=600,
    )


def test_board_accepts_newer_global(
    global_message: bytes, coordinator_key: SigningKey, layout: TensorLayout
) -> None:
    message = check_global(
        global_message,
        coordinator_key.verify_key,
        run="run-a",
        last_round=3,
        expected_layout=layout,
    )
    assert message.round == 4
    assert message.header.samples == 600
    assert message.weights is not None
    np.testing.assert_array_equal(message.weights, np.full(9, 0.5, dtype=np.float32))
    assert check_global(global_message, coordinator_key.verify_key, run="run-a").round == 4


def test_board_refuses_global_not_signed_by_pinned_key(
    coordinator_key: SigningKey, layout: TensorLayout
) -> None:
    impostor = fixed_key(66)
    data = encode_global(
        run="run-a", round=4, signing_key=impostor, weights=np.zeros(9, np.float32), layout=layout
    )
    with pytest.raises(BadSignatureError):
        check_global(data, coordinator_key.verify_key, run="run-a", last_round=3)


def test_board_refuses_wrong_run_old_round_layout_and_kind(
    global_message: bytes, coordinator_key: SigningKey, layout: TensorLayout
) -> None:
    pinned = coordinator_key.verify_key
    with pytest.raises(WrongRunError):
        check_global(global_message, pinned, run="run-b", last_round=3)
    with pytest.raises(StaleRoundError):
        check_global(global_message, pinned, run="run-a", last_round=4)  # redelivered
    with pytest.raises(StaleRoundError):
        check_global(global_message, pinned, run="run-a", last_round=9)
    with pytest.raises(LayoutMismatchError):
        check_global(global_message, pinned, run="run-a", expected_layout=TensorLayout.flat(9))
    update = _update(coordinator_key, layout, np.zeros(9, np.float32), client="coordinator")
    with pytest.raises(WrongKindError):
        check_global(update, pinned, run="run-a")


def test_header_json_has_exactly_the_documented_keys(
    board1: SigningKey, layout: TensorLayout
) -> None:
    data = _update(board1, layout, np.ones(9, dtype=np.float32))
    header, _, _ = split_frame(data)
    assert list(header) == sorted(HEADER_FIELDS)
    assert json.dumps(header, sort_keys=True, separators=(",", ":")).encode() in data


def test_error_messages_about_untrusted_values_are_bounded(board1: SigningKey) -> None:
    data = _signed_header(board1, run="r" * 100_000)
    with pytest.raises(InvalidHeaderError) as info:
        decode_message(data, board1.verify_key)
    assert len(str(info.value)) < 300
    data = _signed_header(board1, layout=[["bad\nname" * 1000, [2]]])
    with pytest.raises(InvalidHeaderError) as info:
        decode_message(data, board1.verify_key)
    assert len(str(info.value)) < 300
    assert "\n" not in str(info.value)
