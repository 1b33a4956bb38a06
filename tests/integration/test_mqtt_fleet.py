"""The simulated fleet over a real Mosquitto reproduces the in-process engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import digits_config

pytestmark = pytest.mark.integration


def test_fleet_of_three_boards_matches_the_in_process_engine(tmp_path: Path) -> None:
    from firmware_sim.engine import run_simulation
    from firmware_sim.fleet import run_fleet
    from firmware_sim.fleet_spec import FleetOptions

    config = digits_config()
    seen: list[int] = []
    history = run_fleet(
        config,
        FleetOptions(broker="mosquitto"),
        tmp_path / "fleet",
        progress=lambda r: seen.append(r["round"]),
        timeout=120,
    )
    reference = run_simulation(config)

    assert seen == [1, 2, 3]
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3]
    assert history["fleet"]["transport"]["broker"] == "mosquitto"
    for mqtt_round, engine_round in zip(history["rounds"], reference["rounds"]):
        # Stated tolerance: half a percentage point of test accuracy per round (the same
        # functions with the same seeds; identical in practice).
        assert abs(mqtt_round["test_accuracy"] - engine_round["test_accuracy"]) <= 0.005
        assert mqtt_round["selected"] == engine_round["selected"] == [0, 1, 2]
        assert mqtt_round["sample_counts"] == engine_round["sample_counts"]
        net = mqtt_round["network"]
        # Three updates up, and the global model delivered to each of the three boards.
        assert net["updates"] == 3
        assert net["update_bytes"] == net["update_bytes_sent"] > 3 * 4 * 4810
        assert net["global_deliveries"] >= 3
        assert net["bytes_total"] == net["update_bytes_sent"] + net["global_bytes_delivered"]
        assert mqtt_round["timing"]["wall_seconds"] > 0
        # No attack: each update went out as soon as its board was done.
        assert mqtt_round["timing"]["pipelined"] is True
    np.testing.assert_allclose(history["final_global"], reference["final_global"], atol=1e-4)

    # Every board reported each round's figures in its status, before its update: measured
    # times, the worker's shared peak RSS said to be shared, and only the sensors this machine
    # really has.
    from coordinator.store import CoordinatorStore
    from edge_client.telemetry import read_ina3221_hwmon, read_thermal_zones, soc_zones

    store = CoordinatorStore(tmp_path / "fleet" / "coordinator" / "coordinator.sqlite")
    try:
        rows = store.telemetry()
    finally:
        store.close()
    assert sorted((r.client, r.round) for r in rows) == [
        (f"board-{i:03d}", t) for i in range(3) for t in (1, 2, 3)
    ]
    zones = read_thermal_zones() or {}
    for row in rows:
        f = row.figures
        assert f["process_boards"] == 3  # one worker hosts the three boards
        assert f["train_s"] > 0 and f["train_cpu_s"] > 0 and f["rss_peak_mib"] > 100
        assert ("alarm_s" in f) == config.alarm_enabled
        assert ("soc_temp_c" in f) == bool(soc_zones(zones))
        assert {k for k in f if k.startswith("temp_c.")} == {f"temp_c.{z}" for z in zones}
        assert ("power_mw" in f) == ("VDD_IN" in (read_ina3221_hwmon() or {}))


def test_the_simulators_broker_has_a_deployments_accounts_and_acls(tmp_path) -> None:
    """Before, anyone on the machine could replace the retained global model of a simulated
    fleet (boards refused the fake, but new boards waited behind it)."""
    import threading
    import time

    import paho.mqtt.client as mqtt

    from firmware_sim.broker import free_port, start_mosquitto
    from firmware_sim.fleet_spec import (
        FleetOptions,
        WorkerSpec,
        board_broker,
        fleet_broker_auth,
        prepare_fleet,
    )
    from protocol.keys import load_signing_key
    from protocol.mqtt import make_mqtt_client
    from tests.integration.conftest import digits_config

    port = free_port()
    _, specs = prepare_fleet(
        digits_config(), FleetOptions(run_id="acl"), tmp_path / "run", host="127.0.0.1",
        port=port, protocol=5, broker_auth=True,
    )  # fmt: skip
    spec = WorkerSpec.from_json(specs[0].read_text())
    auth = fleet_broker_auth(tmp_path / "run", "acl", ["board-000", "board-001", "board-002"])
    broker = start_mosquitto(tmp_path / "broker", port=port, auth=auth)
    try:
        key = load_signing_key(tmp_path / "run" / "keys" / "board-000")
        settings = board_broker(spec, "board-000", key)
        acks: dict[int, int] = {}
        connected = threading.Event()
        board = make_mqtt_client(settings, "board-000")
        board.on_connect = lambda c, u, f, rc, p: connected.set()
        board.on_publish = lambda c, u, mid, rc, p: acks.__setitem__(mid, rc.value)
        board.connect("127.0.0.1", port)
        board.loop_start()
        assert connected.wait(10)

        def publish(topic: str) -> int:
            info = board.publish(topic, b"x", qos=1)
            deadline = time.monotonic() + 10
            while info.mid not in acks and time.monotonic() < deadline:
                time.sleep(0.02)
            return acks[info.mid]

        assert publish("siren/v1/acl/update/board-000") < 128
        assert publish("siren/v1/acl/global") == 135
        assert publish("siren/v1/acl/update/board-001") == 135
        board.disconnect()
        board.loop_stop()
        anonymous = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        codes: list = []
        anonymous.on_connect = lambda c, u, f, rc, p: codes.append(rc)
        anonymous.connect("127.0.0.1", port)
        for _ in range(30):
            anonymous.loop(timeout=0.1)
        assert codes and codes[0].is_failure
    finally:
        broker.stop()


def test_fleet_summary_counts_bans_like_the_in_process_engine(tmp_path: Path) -> None:
    from firmware_sim.engine import run_simulation
    from firmware_sim.fleet import run_fleet
    from firmware_sim.fleet_spec import FleetOptions

    config = digits_config(
        clients=5, aggregator="siren", attack="sign_flip", malicious_ids=(1, 3), learning_rate=0.01
    )
    history = run_fleet(config, FleetOptions(broker="mosquitto"), tmp_path / "fleet", timeout=180)
    reference = run_simulation(config)
    bans = history["summary"]["bans"]
    assert history["summary"]["malicious_ids"] == [1, 3]
    assert bans == reference["summary"]["bans"]
    assert bans["banned"] == history["rounds"][-1]["decision"]["banned"]
    assert set(bans["attackers_missed"]) | (set(bans["banned"]) & {1, 3}) == {1, 3}
