"""The worked example of docs/protocol.md decodes exactly as the document says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from nacl.signing import SigningKey

from protocol.admission import Admission, AdmissionPolicy
from protocol.envelope import decode_message, encode_update
from protocol.errors import Reason
from protocol.keys import AllowList
from protocol.layout import TensorLayout, weights_sha256

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"


def _example_bytes() -> bytes:
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```hex\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    return bytes.fromhex("".join(blocks[0].split()))


def _documented(label_pattern: str) -> str:
    match = re.search(label_pattern, DOC.read_text(encoding="utf-8"), flags=re.S)
    assert match is not None, label_pattern
    return match.group(1)


def test_documented_public_key_belongs_to_the_documented_seed() -> None:
    key = SigningKey(bytes(range(32)))
    assert bytes(key.verify_key).hex() == _documented(r"public key\s+`([0-9a-f]{64})`")


def test_example_decodes_to_the_documented_fields() -> None:
    data = _example_bytes()
    assert len(data) == 491
    key = SigningKey(bytes(range(32))).verify_key
    message = decode_message(data, key)
    header = message.header
    assert (header.run, header.round, header.client) == ("demo", 7, "board-01")
    assert (header.samples, header.alarm) == (120, True)
    assert header.nonce == "00112233445566778899aabbccddeeff"
    assert header.timestamp_ms == 1_700_000_000_000
    assert len(message.header_bytes) == 395
    layout = TensorLayout([("dense/kernel", (2, 2)), ("dense/bias", (2,))])
    assert header.layout == layout
    assert layout.fingerprint == _documented(r"fingerprint `([0-9a-f]{64})`")
    global_w = np.array([0.5, -0.25, 1.0, 0.0, 0.125, -1.5], dtype=np.float32)
    assert header.base_sha256 == weights_sha256(global_w)
    assert message.weights is not None
    np.testing.assert_array_equal(message.weights, [0.5, -1.0, 0.25, 2.0, 0.0, -0.125])


def test_example_is_what_the_encoder_produces() -> None:
    produced = encode_update(
        run="demo",
        round=7,
        client="board-01",
        signing_key=SigningKey(bytes(range(32))),
        delta=np.array([0.5, -1.0, 0.25, 2.0, 0.0, -0.125], dtype=np.float32),
        layout=TensorLayout([("dense/kernel", (2, 2)), ("dense/bias", (2,))]),
        base_sha256=weights_sha256(np.array([0.5, -0.25, 1.0, 0.0, 0.125, -1.5], np.float32)),
        samples=120,
        alarm=True,
        nonce=bytes.fromhex("00112233445566778899aabbccddeeff"),
        timestamp_ms=1_700_000_000_000,
    )
    assert produced == _example_bytes()


def test_example_admission_outcomes_as_documented() -> None:
    data = _example_bytes()
    key = SigningKey(bytes(range(32))).verify_key
    global_w = np.array([0.5, -0.25, 1.0, 0.0, 0.125, -1.5], dtype=np.float32)
    layout = TensorLayout([("dense/kernel", (2, 2)), ("dense/bias", (2,))])
    admission = Admission(
        run="demo",
        keys=AllowList({"board-01": key}),
        policy=AdmissionPolicy(layout),
        round=7,
        base_sha256=weights_sha256(global_w),
    )
    assert admission.admit(data, topic="siren/v1/demo/update/board-01").reason is Reason.ACCEPTED
    assert admission.admit(data).reason is Reason.DUPLICATE
    admission.start_round(8, weights_sha256(global_w + 1))
    assert admission.admit(data).reason is Reason.STALE_ROUND


def test_the_selection_example_is_what_the_encoder_produces() -> None:
    """Section 4.3: the version 2 global header, its signature and its size."""
    from protocol.envelope import encode_global

    coordinator = SigningKey(bytes(range(32, 64)))
    assert bytes(coordinator.verify_key).hex() == _documented(
        r"seed is the bytes `20 21 … 3f` \(its public key is\s+`([0-9a-f]{64})`"
    )
    g7 = np.array([0.5, -0.25, 1.0, 0.0, 0.125, -1.5], dtype=np.float32)
    g8 = np.array([1.0, -1.25, 1.25, 2.0, 0.125, -1.625], dtype=np.float32)
    data = encode_global(
        run="demo",
        round=8,
        signing_key=coordinator,
        weights=g8,
        layout=TensorLayout([("dense/kernel", (2, 2)), ("dense/bias", (2,))]),
        previous_sha256=weights_sha256(g7),
        samples=120,
        selected=["board-03", "board-01"],
        nonce=bytes.fromhex("ffeeddccbbaa99887766554433221100"),
        timestamp_ms=1_700_000_060_000,
    )
    header = _documented(r"its header, 434 bytes:\n\n```\n(.*?)\n```")
    assert len(header) == 434 and data[8:442] == header.encode("ascii")
    signature = _documented(r"signed bytes is\n`([0-9a-f]{64})`") + _documented(
        r"signed bytes is\n`[0-9a-f]{64}`\n`([0-9a-f]{64})`"
    )
    assert data[442:506].hex() == signature and len(data) == 530
    message = decode_message(data, coordinator.verify_key)
    assert message.selected == ("board-01", "board-03") and message.header.version == 2
