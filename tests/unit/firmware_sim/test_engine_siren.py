"""The engine with ``--aggregator siren``: both sides wired, decision records in the history,
late defense start (SIREN §5.9) and the malicious-index plot."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import numpy as np

from edge_client.board import BoardUpdate
from firmware_sim.adversary import Adversary
from firmware_sim.cli import add_run_options
from firmware_sim.engine import SimConfig, build_fleet, play_round, run_simulation
from firmware_sim.options import config_from_args
from firmware_sim.report import malicious_index, plot_malicious_index, write_history

FAST: dict[str, Any] = dict(
    dataset="digits", clients=10, local_epochs=3, learning_rate=0.01, seed=0, aggregator="siren"
)


class FlipSigns(Adversary):
    """Boards train honestly and send ``-4 Δ`` (SIREN §5.3); their alarm bit stays honest."""

    name = "test_sign_flip"

    def tamper_round(
        self,
        round_index: int,
        global_weights: np.ndarray,
        updates: list[BoardUpdate],
        rng: np.random.Generator,
    ) -> list[BoardUpdate]:
        return [
            u.with_delta(np.float32(-4.0) * u.delta) if self.is_malicious(u.client_id) else u
            for u in updates
        ]


def test_siren_history_holds_alarms_board_accuracies_and_decisions(digits, tmp_path):
    cfg = SimConfig(rounds=3, **FAST)
    hist = run_simulation(cfg, dataset=digits)
    path = write_history(hist, tmp_path)
    saved = json.loads(path.read_text())
    first, later = saved["rounds"][0], saved["rounds"][1:]
    assert saved["fleet"]["alarm_backend"] == "litert"
    assert not any(first["alarms"].values()) and first["decision"]["case"] == 1
    assert all(b["local_accuracy"] is None for b in first["boards"].values())
    for r in later:
        assert set(r["alarms"]) == {str(i) for i in range(10)}
        assert all(b["local_accuracy"] is not None for b in r["boards"].values())
        assert all(b["alarm_ms"] > 0 and b["train_ms"] > 0 for b in r["boards"].values())
        d = r["decision"]
        assert d["rule"] == "siren" and d["case"] in (1, 3, 4)
        # S_a and S_s are exactly the alarm bits the boards sent.
        assert d["alarming"] == sorted(int(c) for c, a in r["alarms"].items() if a)
        # The default (authors) profile: C_p = int(0.45 · T) = int(1.35) with T = 3 rounds.
        assert len(d["penalty_counts"]) == 10 and d["c_p"] == 1.0
        assert (d["profile"], d["server_threshold"]) == ("authors", "relative")
    assert "strategy_state" not in saved  # the model-sized state lives in its own file
    state = json.loads((tmp_path / "strategy_state.json").read_text())
    assert state["version"] == 1
    assert state["previous_global"]["size"] == hist["fleet"]["parameters"]


def test_sign_flipping_boards_are_caught_once_benign_boards_alarm(digits):
    fleet = build_fleet(SimConfig(rounds=3, **FAST), dataset=digits)
    fleet.adversary = FlipSigns([0, 1, 2, 3])
    g = fleet.trainer.initial_weights.copy()
    records = []
    for t in (1, 2, 3):
        rec = play_round(fleet, t, g)
        g = rec.pop("global")
        records.append(rec)
    r1, r2 = records[0], records[1]
    # Round 1: nobody can alarm yet, the flipped updates go through and poison the global.
    assert r1["decision"]["case"] == 1 and r1["test_accuracy"] < 0.3
    # Round 2: the benign boards alarm; SIREN keeps only benign updates and rolls back.
    assert all(r2["alarms"][str(i)] for i in range(4, 10))
    d = r2["decision"]
    assert d["case"] in (3, 4) and d["rollback"] is True
    assert set(d["malicious"]) >= {0, 1, 2, 3}
    assert d["benign"] and set(d["benign"]) <= set(range(4, 10))
    assert r2["test_accuracy"] > 0.6 and records[2]["test_accuracy"] > 0.6


def test_defense_starts_late_and_restores_the_model(digits):
    cfg = SimConfig(rounds=4, defense_start_round=3, **FAST)
    fleet = build_fleet(cfg, dataset=digits)
    fleet.adversary = FlipSigns([0, 1, 2, 3])
    g = fleet.trainer.initial_weights.copy()
    records = []
    for t in range(1, 5):
        rec = play_round(fleet, t, g)
        g = rec.pop("global")
        records.append(rec)
    assert [r["defense_active"] for r in records] == [False, False, True, True]
    assert [r["decision"].get("rule") for r in records] == ["fedavg", "fedavg", "siren", "siren"]
    # Undefended rounds still carry the boards' alarms (their alarm runs throughout).
    assert sum(records[1]["alarms"].values()) >= 6
    assert max(r["test_accuracy"] for r in records[:2]) < 0.3
    assert records[3]["test_accuracy"] > 0.6


def test_malicious_index_series_and_plot(tmp_path):
    history = {
        "fleet": {"malicious_ids": [1]},
        "rounds": [
            {"round": 1, "decision": {"rule": "fedavg"}},
            {"round": 2, "decision": {"penalty_counts": {"0": 0.0, "1": 1.0}, "c_p": 0.9}},
            {"round": 3, "decision": {"penalty_counts": {"0": 0.0, "1": 2.0}, "c_p": 0.9}},
        ],
    }
    index = malicious_index(history)
    assert list(index) == [0, 1]
    assert math.isnan(index[1][0]) and index[1][1:] == [1.0, 2.0]
    png = plot_malicious_index(history, tmp_path / "index.png")
    assert png is not None and png.stat().st_size > 1000
    assert (
        plot_malicious_index({"rounds": [{"round": 1, "decision": {}}]}, tmp_path / "x.png") is None
    )


def test_defense_start_round_option():
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    cfg = config_from_args(
        parser.parse_args(["--aggregator", "siren", "--defense-start-round", "4"])
    )
    assert cfg.defense_start_round == 4
    assert config_from_args(parser.parse_args([])).defense_start_round == 1


def test_sim_run_summary_counts_honest_boards_banned_and_attackers_missed(tmp_path, capsys):
    from siren_cli.main import main

    out = tmp_path / "run"
    argv = ["sim", "run", "--dataset", "digits", "--clients", "5", "--rounds", "2",
            "--learning-rate", "0.01", "--aggregator", "siren", "--attack", "sign_flip",
            "--malicious-ids", "1,3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    hist = json.loads((out / "history.json").read_text())
    bans = hist["summary"]["bans"]
    final = set(hist["rounds"][-1]["decision"]["banned"])
    assert bans["banned"] == sorted(final)
    assert bans["honest_banned"] == sorted(final - {1, 3})
    assert bans["attackers_missed"] == sorted({1, 3} - final)
    line = next(ln for ln in printed.splitlines() if ln.startswith("banned ["))
    assert f"{len(bans['honest_banned'])} honest board" in line
    assert f"{bans['attackers_missed_count']} of 2 attackers missed" in line
