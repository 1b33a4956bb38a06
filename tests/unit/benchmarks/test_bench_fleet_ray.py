"""siren bench fleet-ray: its MQTT probe packet, the connection-limit probe, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fleet_ray import _mqtt_connect_packet, format_table, probe_connections
from firmware_sim.broker import find_mosquitto


def test_the_probe_connect_packet_is_a_well_formed_mqtt5_connect():
    packet = _mqtt_connect_packet("probe-7")
    assert packet[0] == 0x10  # CONNECT
    assert packet[1] == len(packet) - 2  # one-byte remaining length
    assert packet[2:8] == b"\x00\x04MQTT" and packet[8] == 5  # protocol name, version 5
    assert packet[9] == 0x02  # clean start, no credentials
    assert packet[-9:] == b"\x00\x07probe-7"
    long = _mqtt_connect_packet("x" * 200)
    assert long[1] & 0x80 and long[2] == 1  # two-byte remaining length (varint)
    assert (long[1] & 0x7F) + 128 * long[2] == len(long) - 3


@pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")
def test_mosquitto_refuses_connections_beyond_its_open_files_limit(tmp_path: Path):
    low = probe_connections(64, 100, tmp_path / "low")
    assert 40 < low["accepted"] < 64 and low["failure"] is not None
    high = probe_connections(1024, 100, tmp_path / "high")
    assert high["accepted"] == 100 and high["failure"] is None


def test_the_table_has_one_row_per_fleet_and_the_loads():
    parts = {
        k: 0.5
        for k in (
            "wall",
            "broadcast",
            "encode_sign",
            "network",
            "admission",
            "aggregation",
            "evaluation",
        )
    }
    row = {
        "mode": "ray",
        "boards": 2000,
        "setup_seconds": 59.0,
        "breakdown": parts,
        "compute": 10.0,
        "final_test_accuracy": 0.1,
        "load": ("11.70, 12.0, 13.0", "4.78, 8.8, 11.7"),
    }
    lines = format_table([row]).splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("| ray | 2000 | 59 s | 0.50 s |")
    assert lines[2].endswith("| 10.00% | 11.70 / 4.78 |")
