"""Simulated fleets training in LiteRT: the same run as with Keras, within half a point."""

from __future__ import annotations

import pytest

from firmware_sim.engine import SimConfig, run_simulation
from siren_cli.main import main

FAST = dict(dataset="digits", clients=5, rounds=4, local_epochs=1, learning_rate=0.01, seed=2)


@pytest.mark.parametrize(
    "aggregator,model", [("fedavg", "digits-mlp"), ("siren", "digits-cnn")], ids=["fedavg", "siren"]
)
def test_litert_run_ends_within_half_a_point_of_keras(digits, aggregator, model):
    """A whole run (digits, fixed seed) ends within 0.5 points of the Keras backend."""
    runs = {
        backend: run_simulation(
            SimConfig(aggregator=aggregator, model=model, train_backend=backend, **FAST),
            dataset=digits,
        )
        for backend in ("keras", "litert")
    }
    keras, lite = runs["keras"], runs["litert"]
    assert lite["fleet"]["train_backend"] == "litert"
    assert keras["fleet"]["train_backend"] == "keras"
    acc_keras = keras["summary"]["final_test_accuracy"]
    acc_lite = lite["summary"]["final_test_accuracy"]
    assert acc_keras > 0.6  # the run learned something to compare
    assert abs(acc_lite - acc_keras) <= 0.005, (acc_lite, acc_keras)
    if aggregator == "siren":
        # Same alarms and decisions: the boards' local models agree round by round.
        assert [r["alarms"] for r in lite["rounds"]] == [r["alarms"] for r in keras["rounds"]]
        assert [r["decision"]["case"] for r in lite["rounds"]] == [
            r["decision"]["case"] for r in keras["rounds"]
        ]


def test_train_backend_is_validated():
    with pytest.raises(ValueError, match="--train-backend must be litert or keras"):
        SimConfig(train_backend="torch")


def test_sim_run_takes_the_train_backend_option(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sim", "run", "--dataset", "digits", "--clients", "3", "--rounds", "1"]
    code = main([*args, "--train-backend", "litert", "--out", str(out)])
    assert code == 0
    import json

    history = json.loads((out / "history.json").read_text())
    assert history["config"]["train_backend"] == "litert"
    assert history["fleet"]["train_backend"] == "litert"
