"""Assembling the fleet's history: the coordinator's round record plus the workers' figures."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from firmware_sim.engine import SimConfig
from firmware_sim.fleet_history import merge_round, read_worker_stats
from firmware_sim.fleet_spec import FleetOptions, client_name, prepare_fleet, sim_config_from_dict


def _worker_round(boards: int, update_bytes: int, global_bytes: int, **extra) -> dict:
    line = {
        "kind": "round", "round": 2, "received_at": 100.5, "boards": boards, "dropped": [],
        "board_seconds": 0.5, "alarm_ms_sum": 10.0 * boards, "train_ms_sum": 40.0 * boards,
        "alarms": 0, "update_bytes": update_bytes, "global_bytes": global_bytes,
        "global_deliveries": boards, "trained_at": 101.0, "published_at": 101.1, "resends": 0,
        "metrics": {},
    }  # fmt: skip
    line.update(extra)
    return line


def test_merge_sums_workers_and_derives_the_time_breakdown() -> None:
    record = {"round": 2, "seconds": 1.5, "network": {"updates": 5, "update_bytes": 500},
              "timing": {"collect_seconds": 1.2}}  # fmt: skip
    workers = [
        _worker_round(3, 300, 3000, dropped=[4]),
        _worker_round(2, 200, 2000, received_at=100.2, trained_at=101.4,
                      metrics={"attack_success_rate": 0.25}),
    ]  # fmt: skip
    out = merge_round(record, workers, opened_at=100.0)
    assert out["board_seconds"] == 1.0
    # (3*10 + 2*10) / 5 boards and (3*40 + 2*40) / 5
    assert out["alarm_ms_mean"] == 10.0 and out["train_ms_mean"] == 40.0
    assert out["dropped"] == [4] and out["attack_success_rate"] == 0.25
    net = out["network"]
    assert (net["update_bytes_sent"], net["global_bytes_delivered"]) == (500, 5000)
    assert net["bytes_total"] == 5500 and net["global_deliveries"] == 5
    assert net["updates"] == 5  # the coordinator's own figures are kept
    timing = out["timing"]
    assert timing["global_delivery_seconds"] == pytest.approx(0.2)  # first receipt - opened
    assert timing["train_and_tamper_seconds"] == pytest.approx(1.2)  # last trained - first
    assert timing["wall_seconds"] == 1.5 and timing["collect_seconds"] == 1.2
    assert record["network"] == {"updates": 5, "update_bytes": 500}  # input left untouched


def test_worker_stats_lines_are_grouped_by_round(tmp_path: Path) -> None:
    a, b = tmp_path / "w0.jsonl", tmp_path / "w1.jsonl"
    a.write_text(json.dumps({"kind": "fleet", "dataset": "digits"}) + "\n"
                 + json.dumps(_worker_round(1, 1, 1)) + "\n")  # fmt: skip
    b.write_text(json.dumps(_worker_round(1, 2, 2)) + "\n\n")
    describe, rounds = read_worker_stats([a, b, tmp_path / "missing.jsonl"])
    assert describe["dataset"] == "digits"
    assert [r["update_bytes"] for r in rounds[2]] == [1, 2]


def test_prepared_fleet_splits_boards_over_workers(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorConfig
    from firmware_sim.fleet_spec import WorkerSpec
    from protocol.keys import AllowList

    config = SimConfig(dataset="digits", clients=5, rounds=2, aggregator="krum",
                       aggregator_params={"f": 1}, malicious_ids=(1, 3))  # fmt: skip
    coord_toml, specs = prepare_fleet(
        config, FleetOptions(workers=2, round_timeout=9.0), tmp_path, host="127.0.0.1",
        port=1883, protocol=5,
    )  # fmt: skip
    coord = CoordinatorConfig.load(coord_toml)
    assert coord.clients == tuple(client_name(i) for i in range(5))
    assert coord.simulation is not None and coord.simulation.malicious == ()  # no attack
    assert coord.aggregator.params == {"f": 1} and coord.round_timeout == 9.0
    assert coord.data.root == "split" and coord.data.split_seed == config.seed
    assert coord.run.startswith("fleet-0-")
    assert sorted(AllowList.load(coord.allow_list)) == list(coord.clients)
    w0, w1 = (WorkerSpec.from_json(p.read_text()) for p in specs)
    assert (w0.boards, w1.boards) == ([0, 2, 4], [1, 3])
    assert sim_config_from_dict(w0.sim) == config
    assert asdict(sim_config_from_dict(w1.sim)) == asdict(config)
    assert len(w0.profiles) == 5 and client_name(7) == "board-007"


def test_prepared_fleet_passes_the_siren_profile_to_coordinator_and_boards(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorConfig
    from firmware_sim.fleet_spec import WorkerSpec, board_config_for

    config = SimConfig(dataset="digits", clients=3, rounds=4, aggregator="siren",
                       siren_profile="paper-text", alarm_rule="relative")  # fmt: skip
    coord_toml, specs = prepare_fleet(
        config, FleetOptions(), tmp_path, host="127.0.0.1", port=1883, protocol=5
    )
    coord = CoordinatorConfig.load(coord_toml)
    assert coord.aggregator.profile == "paper-text" and coord.rounds == 4
    assert coord.simulation is not None and coord.simulation.malicious == ()
    spec = WorkerSpec.from_json(specs[0].read_text())
    board = board_config_for(spec, 1, tmp_path / "state")
    # The board keeps the profile and the explicit rule that overrides the profile's.
    assert (board.alarm.profile, board.alarm.rule) == ("paper-text", "relative")
    assert sim_config_from_dict(spec.sim).alarm_rule == "relative"


def test_prepared_fleet_tells_the_coordinator_which_boards_attack(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorConfig

    config = SimConfig(dataset="digits", clients=5, rounds=2, aggregator="siren",
                       attack="sign_flip", malicious=0.4, seed=3)  # fmt: skip
    coord_toml, _ = prepare_fleet(
        config, FleetOptions(), tmp_path, host="127.0.0.1", port=1883, protocol=5
    )
    from firmware_sim.attacks import select_malicious_ids

    expected, _ = select_malicious_ids(5, 0.4, None, 3)
    coord = CoordinatorConfig.load(coord_toml)
    assert coord.simulation is not None
    assert coord.simulation.malicious == tuple(client_name(i) for i in expected)
    assert len(coord.simulation.malicious) == 2
