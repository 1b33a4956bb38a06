"""Client sampling over a real Mosquitto: the coordinator draws each round's boards, names them in
the global model, and the fleet reproduces the in-process engine's rounds with the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import digits_config, query

pytestmark = pytest.mark.integration


def test_sampled_siren_fleet_matches_the_in_process_engine(tmp_path: Path) -> None:
    from firmware_sim.engine import run_simulation, select_clients
    from firmware_sim.fleet import run_fleet
    from firmware_sim.fleet_spec import FleetOptions
    from protocol.envelope import header_of

    config = digits_config(
        clients=5,
        rounds=4,
        clients_per_round=3,
        aggregator="siren",
        attack="sign_flip",
        malicious_ids=(1, 3),
        learning_rate=0.01,
    )
    history = run_fleet(config, FleetOptions(broker="mosquitto"), tmp_path / "fleet", timeout=240)
    reference = run_simulation(config)

    assert [r["round"] for r in history["rounds"]] == [1, 2, 3, 4]
    for mqtt_round, engine_round in zip(history["rounds"], reference["rounds"]):
        drawn = select_clients(config, mqtt_round["round"])
        assert mqtt_round["sampled"] == engine_round["sampled"] == drawn and len(drawn) == 3
        # Every drawn board reported; the others sat the round out and were not missing.
        assert mqtt_round["selected"] == drawn and mqtt_round["missing"] == []
        assert mqtt_round["sat_out"] == [i for i in range(5) if i not in drawn]
        assert mqtt_round["network"]["rejected"] == {}
        assert mqtt_round["alarms"] == engine_round["alarms"]
        for key in ("case", "rollback", "banned", "penalty_counts"):
            assert mqtt_round["decision"][key] == engine_round["decision"][key], key
        assert abs(mqtt_round["test_accuracy"] - engine_round["test_accuracy"]) <= 0.005
    np.testing.assert_allclose(history["final_global"], reference["final_global"], atol=1e-4)

    # Each global model named its round's boards in a version 2 header; the final one none.
    db = tmp_path / "fleet" / "coordinator" / "coordinator.sqlite"
    rows = query(db, "SELECT round, message FROM models ORDER BY round")
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    for round_index, message in rows:
        header = header_of(bytes(message))
        expected = None
        if round_index <= 4:
            expected = tuple(f"board-{i:03d}" for i in select_clients(config, round_index))
        assert header.selected == expected
        assert header.version == (1 if expected is None else 2)
    record = json.loads(query(db, "SELECT record FROM rounds WHERE round = 1")[0][0])
    assert record["sampled"] == select_clients(config, 1)
