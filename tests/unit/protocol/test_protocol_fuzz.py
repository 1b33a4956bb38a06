"""Property tests of the decoder: any input yields a verified message or the protocol's error.

Inputs: arbitrary bytes, bytes behind a plausible frame prefix, valid messages with random
mutations, and headers or payloads mutated *and re-signed* with a registered key (so validation
beyond the signature is exercised). About 8,000 cases in total.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol.admission import Admission, AdmissionPolicy
from protocol.envelope import (
    HEADER_FIELDS,
    Kind,
    Message,
    decode_message,
    encode_global,
    encode_status,
    encode_update,
)
from protocol.errors import InvalidMessageError, Reason
from protocol.keys import AllowList
from protocol.layout import TensorLayout, weights_sha256
from protocol.telemetry import FIGURES, MAX_TELEMETRY_ENTRIES, figure_of
from tests.unit.protocol.conftest import fixed_key, frame, split_frame

pytestmark = pytest.mark.timeout(120)

BOARD = fixed_key(1)
COORDINATOR = fixed_key(7)
ALLOW = AllowList({"board-1": BOARD.verify_key, "coordinator": COORDINATOR.verify_key})
LAYOUT = TensorLayout([("dense/kernel", (2, 3)), ("dense/bias", (3,))])
GLOBAL_WEIGHTS = np.linspace(-1, 1, 9, dtype=np.float32)
LIMIT = 1 << 20

UPDATE = encode_update(
    run="run-a",
    round=5,
    client="board-1",
    signing_key=BOARD,
    delta=np.arange(9, dtype=np.float32) / 4,
    layout=LAYOUT,
    base_sha256=weights_sha256(GLOBAL_WEIGHTS),
    samples=40,
    alarm=True,
    nonce=b"\x01" * 16,
    timestamp_ms=1_700_000_000_000,
)
GLOBAL = encode_global(
    run="run-a",
    round=5,
    signing_key=COORDINATOR,
    weights=GLOBAL_WEIGHTS,
    layout=LAYOUT,
    nonce=b"\x02" * 16,
    timestamp_ms=1_700_000_000_000,
)
STATUS = encode_status(
    run="run-a",
    client="board-1",
    signing_key=BOARD,
    online=True,
    nonce=b"\x03" * 16,
    timestamp_ms=1_700_000_000_000,
)
STATUS_FIGURES = encode_status(
    run="run-a",
    client="board-1",
    signing_key=BOARD,
    online=True,
    round=5,
    telemetry={"alarm_s": 0.02, "soc_temp_c": 61.5, "throttled_flags": float(0x50005)},
    nonce=b"\x04" * 16,
    timestamp_ms=1_700_000_000_000,
)
VALID = (UPDATE, GLOBAL, STATUS, STATUS_FIGURES)

FAST = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def decode_or_reject(data: bytes) -> Message | None:
    """Decode; a rejection must be the protocol's error with a reason and a message."""
    try:
        message = decode_message(data, ALLOW, max_message_bytes=LIMIT)
    except InvalidMessageError as exc:
        assert isinstance(exc.reason, Reason)
        assert exc.reason not in (Reason.ACCEPTED, Reason.DUPLICATE)
        assert str(exc)
        event(f"rejected: {exc.reason.value}")
        return None
    event(f"decoded: {message.kind.value}")
    # A returned message satisfies every property the specification promises.
    (length,) = struct.unpack_from("<I", data, 4)
    assert data[:4] == b"SIRN"
    assert message.header_bytes == data[8 : 8 + length]
    assert message.header.canonical_bytes() == message.header_bytes
    ALLOW[message.client].verify(data[: 8 + length], message.signature)
    payload = data[72 + length :]
    assert hashlib.sha256(payload).hexdigest() == message.header.payload_sha256
    assert len(payload) == 4 * message.layout.size
    if message.weights is not None:
        assert message.weights.shape == (message.layout.size,)
        assert bool(np.isfinite(message.weights).all())
    if message.kind is Kind.STATUS:
        # A status carries nothing but telemetry scalars, each within its figure's domain.
        assert len(message.layout) <= MAX_TELEMETRY_ENTRIES
        assert message.layout.size == 0 or message.round >= 1
        for name, value in message.telemetry.items():
            figure = figure_of(name)
            assert figure is not None
            figure.check(name, value)
    return message


@settings(FAST, max_examples=2000)
@given(st.binary(max_size=700))
def test_arbitrary_bytes(data: bytes) -> None:
    assert decode_or_reject(data) is None


@settings(FAST, max_examples=1200)
@given(
    header=st.binary(min_size=0, max_size=300),
    tail=st.binary(max_size=200),
    declared=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_bytes_behind_a_frame_prefix(header: bytes, tail: bytes, declared: int | None) -> None:
    length = len(header) if declared is None else declared
    data = b"SIRN" + struct.pack("<I", length) + header + tail
    assert decode_or_reject(data) is None


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=64)),
)


def apply(data: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    out = bytearray(data)
    for op, where, arg in mutations:
        at = where % (len(out) + 1)
        if op == "flip" and out:
            out[at % len(out)] ^= arg
        elif op == "insert":
            out[at:at] = arg
        elif op == "delete":
            del out[at : at + arg]
        elif op == "truncate":
            del out[at:]
        elif op == "append":
            out += arg
    return bytes(out)


@settings(FAST, max_examples=2000)
@given(original=st.sampled_from(VALID), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_valid_messages(original: bytes, mutations: list[tuple[str, int, Any]]) -> None:
    data = apply(original, mutations)
    message = decode_or_reject(data)
    # Every byte is covered by the signature or the signed payload hash: a message that still
    # decodes is one of the originals, unchanged.
    assert message is None or data in VALID


def _header_text(data: bytes) -> str:
    (length,) = struct.unpack_from("<I", data, 4)
    return data[8 : 8 + length].decode("ascii")


@settings(FAST, max_examples=1200)
@given(
    original=st.sampled_from(VALID),
    edits=st.lists(
        st.tuples(
            st.integers(0, 10_000),
            st.integers(0, 3),
            st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=6),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_resigned_header_text_mutations(original: bytes, edits: list[tuple[int, int, str]]) -> None:
    text = _header_text(original)
    for where, cut, insert in edits:
        at = where % (len(text) + 1)
        text = text[:at] + insert + text[at + cut :]
    _, _, payload = split_frame(original)
    key = COORDINATOR if original is GLOBAL else BOARD
    decode_or_reject(frame(text.encode("ascii"), key, payload))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.text(max_size=20)
    | st.sampled_from(["update", "global", "status", "online", "", "run-a", "board-1", "0" * 64]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(FAST, max_examples=500)
@given(
    original=st.sampled_from(VALID),
    replaced=st.dictionaries(st.sampled_from(HEADER_FIELDS), json_values, min_size=1, max_size=4),
    dropped=st.sets(st.sampled_from(HEADER_FIELDS), max_size=2),
)
def test_resigned_structured_header_fuzz(
    original: bytes, replaced: dict[str, Any], dropped: set[str]
) -> None:
    header, _, payload = split_frame(original)
    header.update(replaced)
    for name in dropped:
        header.pop(name, None)
    try:
        header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    except ValueError:
        return
    key = COORDINATOR if original is GLOBAL else BOARD
    message = decode_or_reject(frame(header_bytes, key, payload))
    if message is not None:
        assert message.header.to_json_value() == header


@settings(FAST, max_examples=400)
@given(payload=st.binary(min_size=36, max_size=36))
def test_resigned_arbitrary_payload(payload: bytes) -> None:
    header, _, _ = split_frame(UPDATE)
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    message = decode_or_reject(frame(header_bytes, BOARD, payload))
    values = np.frombuffer(payload, dtype="<f4")
    if bool(np.isfinite(values).all()):
        assert message is not None
        assert message.weights is not None
        np.testing.assert_array_equal(message.weights, values)
    else:
        assert message is None


figure_names = st.one_of(
    st.sampled_from(sorted(FIGURES)),
    st.tuples(
        st.sampled_from(["temp_c", "power_mw"]),
        st.text(alphabet="AZaz09_-", min_size=1, max_size=8),
    ).map(lambda pair: f"{pair[0]}.{pair[1]}"),
    st.sampled_from(["temp_c.", "power_mw.", "w", "temp_c.a.b", "Alarm_s", "alarm_s "]),
    st.tuples(
        st.sampled_from(["temp_c", "power_mw", "train_s", "volt"]),
        st.text(alphabet="AZaz09_-.", min_size=0, max_size=50),
    ).map(lambda pair: f"{pair[0]}.{pair[1]}"),
)
figure_values = st.one_of(
    st.floats(width=32),
    st.floats(min_value=-500, max_value=500, width=32),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, -273.15, -274.0, float(2**24), 2.0**24 - 1]),
)


def _expected_valid(entries: list[tuple[str, list[int]]], values: list[float], rnd: int) -> bool:
    names = [n for n, _ in entries]
    if len(set(names)) != len(names) or len(entries) > MAX_TELEMETRY_ENTRIES:
        return False
    if entries and rnd == 0:
        return False
    for (name, shape), value in zip(entries, values):
        figure = figure_of(name)
        if figure is None or shape != [] or " " in name:
            return False
        value32 = float(np.float32(value))
        if not np.isfinite(value32):
            return False
        try:
            figure.check(name, value32)
        except InvalidMessageError:
            return False
    return True


@settings(FAST, max_examples=600)
@given(
    entries=st.lists(
        st.tuples(figure_names, st.sampled_from([[]] * 8 + [[1], [0]])), min_size=0, max_size=4
    ),
    values=st.lists(figure_values, min_size=4, max_size=4),
    rnd=st.sampled_from([0, 1, 5]),
)
def test_resigned_status_figures_match_the_specification(
    entries: list[tuple[str, list[int]]], values: list[float], rnd: int
) -> None:
    """A status re-signed with any layout and values decodes exactly when the layout is a list
    of distinct allowed scalar names (with a round >= 1) and every value is in its domain."""
    header, _, _ = split_frame(STATUS)
    header["layout"] = [[name, shape] for name, shape in entries]
    header["round"] = rnd
    count = sum(1 for _, shape in entries if shape == []) + sum(
        int(np.prod(shape)) for _, shape in entries if shape != []
    )
    payload = np.asarray(values[:count] + [0.0] * (count - len(values)), dtype="<f4").tobytes()
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    message = decode_or_reject(frame(header_bytes, BOARD, payload))
    assert (message is not None) == _expected_valid(entries, values, rnd)
    if message is not None:
        assert list(message.telemetry) == [name for name, _ in entries]


@settings(FAST, max_examples=500)
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.tuples(st.sampled_from(VALID), st.lists(mutation, min_size=1, max_size=3)).map(
            lambda pair: apply(pair[0], pair[1])
        ),
    ),
    topic=st.one_of(st.none(), st.text(max_size=40), st.just("siren/v1/run-a/update/board-1")),
)
def test_admission_never_raises(data: bytes, topic: str | None) -> None:
    admission = Admission(
        run="run-a",
        keys=ALLOW,
        policy=AdmissionPolicy(LAYOUT),
        round=5,
        base_sha256=weights_sha256(GLOBAL_WEIGHTS),
    )
    decision = admission.admit(data, topic=topic)
    assert isinstance(decision.reason, Reason)
    assert (decision.message is not None) == decision.accepted
    if decision.accepted:
        assert data == UPDATE
    assert sum(admission.counters.values()) == 1
