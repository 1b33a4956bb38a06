"""Status messages with telemetry figures: names, shapes, domains, and the empty status."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from protocol.envelope import EMPTY_SHA256, Kind, decode_message, encode_status
from protocol.errors import (
    InvalidHeaderError,
    NonFiniteValuesError,
    Reason,
    TelemetryValueError,
)
from protocol.layout import TensorLayout
from protocol.telemetry import (
    FIGURES,
    MAX_TELEMETRY_ENTRIES,
    check_status_layout,
    figure_of,
    pack,
    sensor_name,
    throttled_conditions,
    unpack,
)
from tests.unit.protocol.conftest import frame, sha256_hex

FIGURES_OF_A_PI = {
    "rss_peak_mib": 612.5,
    "alarm_s": 0.031,
    "alarm_cpu_s": 0.029,
    "train_s": 41.2,
    "train_cpu_s": 80.7,
    "soc_temp_c": 71.4,
    "temp_c.cpu-thermal": 71.4,
    "throttled_flags": float(0x50005),
}


def _status(key: SigningKey, **kwargs: Any) -> bytes:
    fields: dict[str, Any] = {
        "run": "run-a",
        "client": "board-1",
        "signing_key": key,
        "online": True,
        "round": 4,
        "nonce": b"\x05" * 16,
        "timestamp_ms": 1_700_000_000_000,
    }
    fields.update(kwargs)
    return encode_status(**fields)


def _signed_status(
    key: SigningKey, layout: list[Any], values: list[float], **changes: Any
) -> bytes:
    """A status built by hand (so that the encoder's own checks are bypassed), then signed."""
    payload = struct.pack(f"<{len(values)}f", *values)
    header: dict[str, Any] = {
        "alarm": False,
        "base_sha256": "0" * 64,
        "client": "board-1",
        "kind": "status",
        "layout": layout,
        "nonce": "00" * 16,
        "payload_sha256": sha256_hex(payload),
        "round": 2,
        "run": "r",
        "samples": 0,
        "status": "online",
        "timestamp_ms": 0,
        "v": 1,
    }
    header.update(changes)
    return frame(header, key, payload)


def test_figures_round_trip_sorted_by_name_as_float32(board1: SigningKey) -> None:
    data = _status(board1, telemetry=FIGURES_OF_A_PI)
    message = decode_message(data, board1.verify_key)
    assert message.kind is Kind.STATUS and message.round == 4
    assert list(message.layout.names) == sorted(FIGURES_OF_A_PI)
    assert all(shape == () for shape in message.layout.shapes)
    # Each value comes back as the shortest decimal of its float32: here, exactly as sent.
    assert message.telemetry == FIGURES_OF_A_PI
    assert all(
        np.float32(v) == np.float32(FIGURES_OF_A_PI[k]) for k, v in message.telemetry.items()
    )
    assert decode_message(
        _status(board1, telemetry={"train_s": 1 / 3}), board1.verify_key
    ).telemetry == {"train_s": float(str(np.float32(1 / 3)))}
    assert message.telemetry["throttled_flags"] == 0x50005  # exact in float32
    assert message.header.payload_sha256 != EMPTY_SHA256


def test_a_status_without_figures_is_unchanged(board1: SigningKey) -> None:
    for telemetry in (None, {}):
        message = decode_message(_status(board1, telemetry=telemetry), board1.verify_key)
        assert message.weights is None and message.telemetry == {}
        assert message.header.payload_sha256 == EMPTY_SHA256
        assert len(message.layout) == 0
    # ... and so is a Last Will: offline, round 0, nothing held.
    will = decode_message(_status(board1, online=False, round=0), board1.verify_key)
    assert will.header.status == "offline" and will.telemetry == {}


def test_hand_built_status_with_figures_is_accepted(board1: SigningKey) -> None:
    data = _signed_status(board1, [["power_mw", []], ["power_mw.VDD_IN", []]], [5012.0, 5012.0])
    assert decode_message(data, board1.verify_key).telemetry == {
        "power_mw": 5012.0,
        "power_mw.VDD_IN": 5012.0,
    }


@pytest.mark.parametrize(
    ("layout", "values", "changes"),
    [
        ([["w", []]], [1.0], {}),  # not a figure name
        ([["alarm_s", [1]]], [1.0], {}),  # not a scalar
        ([["alarm_s", [2]]], [1.0, 2.0], {}),
        ([["power_mw.", []]], [1.0], {}),  # empty sensor name
        ([["power_mw.VDD IN", []]], [1.0], {}),  # space is not a header character anyway
        ([["power_mw.a.b", []]], [1.0], {}),  # '.' is not allowed in a sensor name
        ([["temp_c." + "x" * 49, []]], [1.0], {}),  # sensor name too long
        ([["voltage_mv.VDD_IN", []]], [1.0], {}),  # unknown family
        ([["alarm_s", []]], [1.0], {"round": 0}),  # figures describe a round >= 1
        ([["alarm_s", []]], [1.0], {"samples": 3}),
        ([["alarm_s", []]], [1.0], {"alarm": True}),
    ],
)
def test_invalid_status_layouts_are_refused_even_when_signed(
    board1: SigningKey, layout: list[Any], values: list[float], changes: dict[str, Any]
) -> None:
    with pytest.raises(InvalidHeaderError):
        decode_message(_signed_status(board1, layout, values, **changes), board1.verify_key)


def test_too_many_figures_are_refused(board1: SigningKey) -> None:
    names = [f"temp_c.z{i}" for i in range(MAX_TELEMETRY_ENTRIES + 1)]
    layout = [[n, []] for n in sorted(names)]
    values = [40.0] * len(names)
    with pytest.raises(InvalidHeaderError, match="at most 64"):
        decode_message(_signed_status(board1, layout, values), board1.verify_key)
    ok = _signed_status(board1, layout[:-1], values[:-1])
    assert len(decode_message(ok, board1.verify_key).telemetry) == MAX_TELEMETRY_ENTRIES


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("alarm_s", -0.5),
        ("train_cpu_s", -1e-3),
        ("rss_peak_mib", -1.0),
        ("power_mw", -1.0),
        ("power_mw.VDD_IN", -2.0),
        ("soc_temp_c", -274.0),
        ("temp_c.cpu-thermal", -300.0),
        ("throttled_flags", 0.5),
        ("throttled_flags", -1.0),
        ("throttled_flags", float(2**24)),
        ("process_boards", 0.0),
        ("process_boards", 2.5),
    ],
)
def test_figures_outside_their_domain_are_refused_after_the_signature(
    board1: SigningKey, name: str, value: float
) -> None:
    data = _signed_status(board1, [[name, []]], [value])
    with pytest.raises(TelemetryValueError) as info:
        decode_message(data, board1.verify_key)
    assert info.value.reason is Reason.BAD_TELEMETRY
    assert info.value.client_id == "board-1"
    with pytest.raises(TelemetryValueError):
        _status(board1, telemetry={name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("soc_temp_c", -40.0),
        ("temp_c.cpu-thermal", -273.15),
        ("throttled_flags", 0.0),
        ("throttled_flags", float(0xF000F)),
        ("process_boards", 500.0),
        ("alarm_s", 0.0),
        ("power_mw", 3.0e38),
    ],
)
def test_values_at_the_edges_of_their_domain_are_accepted(
    board1: SigningKey, name: str, value: float
) -> None:
    message = decode_message(_status(board1, telemetry={name: value}), board1.verify_key)
    assert message.telemetry[name] == pytest.approx(value)


def test_non_finite_figures_are_refused_as_non_finite(board1: SigningKey) -> None:
    data = _signed_status(board1, [["soc_temp_c", []]], [math.nan])
    with pytest.raises(NonFiniteValuesError):
        decode_message(data, board1.verify_key)
    with pytest.raises(TelemetryValueError):
        pack({"soc_temp_c": math.inf})


def test_every_fixed_name_and_both_families_are_figures() -> None:
    for name in FIGURES:
        assert figure_of(name) is FIGURES[name]
    assert figure_of("temp_c.GPU-therm") is not None
    assert figure_of("power_mw.POM_5V_IN") is not None
    assert figure_of("temp_c") is None
    assert figure_of("rss_peak_mib.x") is None
    check_status_layout(TensorLayout([]))


def test_sensor_names_are_cleaned_not_dropped() -> None:
    assert sensor_name("CPU therm") == "CPU_therm"
    assert sensor_name("  VDD_IN\n") == "VDD_IN"
    assert sensor_name("a.b/c") == "a_b_c"
    assert sensor_name("x" * 60) == "x" * 48
    assert sensor_name("") is None
    assert sensor_name("...") is None


def test_pack_and_unpack_are_inverse() -> None:
    layout, vector = pack({"train_s": 2.0, "alarm_s": 1.0})
    assert layout.names == ("alarm_s", "train_s")
    assert vector.dtype == np.float32
    assert unpack(layout, vector) == {"alarm_s": 1.0, "train_s": 2.0}
    assert unpack(TensorLayout([]), None) == {}


def test_throttled_bits_follow_the_raspberry_pi_documentation() -> None:
    assert throttled_conditions(0) == []
    assert throttled_conditions(0x50005) == [
        "under-voltage detected",
        "currently throttled",
        "under-voltage has occurred",
        "throttling has occurred",
    ]
    assert throttled_conditions(0x80008) == [
        "soft temperature limit active",
        "soft temperature limit has occurred",
    ]
    assert throttled_conditions(0x20002) == [
        "ARM frequency capped",
        "ARM frequency capping has occurred",
    ]


def test_the_specification_lists_exactly_these_figures() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "protocol.md").read_text()
    section = text[text.index("### 4.2") : text.index("### 4.3")]
    listed = re.findall(r"^\| `([a-z_]+(?:\.<[a-z]+>)?)` \|", section, flags=re.MULTILINE)
    assert sorted(listed) == sorted([*FIGURES, "temp_c.<zone>", "power_mw.<rail>"])
    # The example is what the reference encoder writes for those figures.
    example = re.search(r'^"layout":(\[.*\]),"round":3$', section, flags=re.MULTILINE)
    assert example is not None
    names = [n for n in FIGURES_OF_A_PI]
    layout, _ = pack(dict.fromkeys(names, 1.0))
    assert example.group(1).encode() == layout.canonical_bytes()
