"""The in-process engine on digits: learning happens, runs are reproducible, files are written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from firmware_sim.engine import SimConfig, run_simulation, select_clients
from siren_cli.main import main

FAST = dict(dataset="digits", clients=4, local_epochs=1, learning_rate=0.01, seed=3)


def test_three_digits_rounds_raise_accuracy_and_repeat_exactly(digits):
    cfg = SimConfig(rounds=3, aggregator="fedavg", **FAST)
    first = run_simulation(cfg, dataset=digits)
    acc = [r["test_accuracy"] for r in first["rounds"]]
    assert acc[2] > acc[0] + 0.05, acc
    assert acc[2] > 0.6, acc
    second = run_simulation(cfg, dataset=digits)
    assert [r["test_accuracy"] for r in second["rounds"]] == acc
    np.testing.assert_array_equal(first["final_global"], second["final_global"])
    # Sample counts recorded per client and per round add up to the boards' data.
    counts = first["rounds"][0]["sample_counts"]
    assert sum(counts.values()) == sum(first["fleet"]["train_samples_per_client"])


def test_client_fraction_selects_a_seeded_subset():
    cfg = SimConfig(clients=10, client_fraction=0.3, seed=1)
    picks = [select_clients(cfg, t) for t in range(1, 6)]
    assert all(len(p) == 3 and len(set(p)) == 3 for p in picks)
    assert len({tuple(p) for p in picks}) > 1, "different rounds pick different boards"
    assert picks == [select_clients(cfg, t) for t in range(1, 6)]


def test_alarm_runs_on_boards_when_enabled(digits):
    cfg = SimConfig(rounds=2, aggregator="fedavg", alarm=True, **FAST)
    hist = run_simulation(cfg, dataset=digits)
    assert hist["fleet"]["alarm_backend"] == "litert"
    # Round 1 has no previous local model: never an alarm; round 2 measured the alarm.
    assert not any(hist["rounds"][0]["alarms"].values())
    assert hist["rounds"][1]["alarm_ms_mean"] > 0


def test_sim_run_command_writes_history_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "sim",
            "run",
            "--dataset",
            "digits",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--learning-rate",
            "0.01",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "round   2/2" in printed and "final test accuracy" in printed
    hist = json.loads((out / "history.json").read_text())
    assert hist["config"]["clients"] == 3
    assert [r["round"] for r in hist["rounds"]] == [1, 2]
    for key in ("round", "test_accuracy", "test_loss", "seconds", "sample_counts"):
        assert key in hist["rounds"][0]
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--aggregator", "nosuchrule"], "unknown aggregator 'nosuchrule'; valid:"),
        (["--clients", "0"], "--clients must be >= 1"),
        (["--malicious-ids", "1,x"], "comma-separated integers"),
        (["--attack", "nosuchattack"], "unknown attack 'nosuchattack'; valid:"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--agg-param", "f=2", "--agg-param", "f=3"], "--agg-param gives f twice"),
        (["--test-samples", "0"], "--test-samples must be >= 1"),
        (["--train-samples", "0"], "--train-samples must be >= 1"),
        (["--malicious", "0.4"], "choose the boards of an attack: give --attack"),
        (["--malicious-ids", "1", "--attack", "none"], "choose the boards of an attack"),
    ],
)
def test_sim_run_rejects_bad_options_cleanly(tmp_path, capsys, argv, message):
    code = main(["sim", "run", "--dataset", "digits", "--out", str(tmp_path), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "history.json").exists()


def test_siren_profile_option_sets_the_alarm_rule_and_the_server_profile():
    import argparse

    from firmware_sim.cli import add_run_options
    from firmware_sim.options import config_from_args

    parser = argparse.ArgumentParser()
    add_run_options(parser)
    default = config_from_args(parser.parse_args([]))
    assert (default.siren_profile, default.alarm_rule) == ("authors", "relative")
    printed = config_from_args(parser.parse_args(["--siren-profile", "paper-text"]))
    assert printed.alarm_rule == "paper"
    mixed = config_from_args(
        parser.parse_args(["--siren-profile", "paper-text", "--alarm-rule", "relative"])
    )
    assert (mixed.siren_profile, mixed.alarm_rule) == ("paper-text", "relative")
    with pytest.raises(ValueError, match="unknown SIREN profile"):
        SimConfig(siren_profile="printed")


def test_sim_run_siren_profile_reaches_the_server(digits):
    hist = run_simulation(
        SimConfig(dataset="digits", clients=4, rounds=2, aggregator="siren",
                  siren_profile="paper-text", learning_rate=0.01),
        dataset=digits,
    )  # fmt: skip
    decision = hist["rounds"][-1]["decision"]
    assert decision["profile"] == "paper-text" and decision["server_threshold"] == "absolute"
    assert decision["c_p"] == pytest.approx(0.45 * 4)
    assert hist["config"]["alarm_rule"] == "paper"
