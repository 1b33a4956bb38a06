"""The simulated fleet over a real Mosquitto reproduces the in-process engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import digits_config

pytestmark = pytest.mark.integration


def test_fleet_of_three_boards_matches_the_in_process_engine(tmp_path: Path) -> None:
    from firmware_sim.engine import run_simulation
    from firmware_sim.fleet import FleetOptions, run_fleet

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


def test_fleet_summary_counts_bans_like_the_in_process_engine(tmp_path: Path) -> None:
    from firmware_sim.engine import run_simulation
    from firmware_sim.fleet import FleetOptions, run_fleet

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
