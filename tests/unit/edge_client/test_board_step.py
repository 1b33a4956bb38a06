"""The board's round step (SIREN Algorithm 1) with a real trainer and the LiteRT evaluator."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edge_client.alarm import AlarmConfig
from edge_client.board import BoardData, BoardState, board_step
from models.datasets import load_digits
from models.training import TrainConfig, Trainer

PAPER = AlarmConfig(threshold=0.04, rule="paper")


@pytest.fixture(scope="module")
def setup():
    from models.litert import make_evaluator

    ds = load_digits()
    data = BoardData(ds.x_train[:300], ds.y_train[:300], ds.x_train[300:400], ds.y_train[300:400])
    trainer = Trainer(
        "digits-mlp", ds.input_shape, ds.num_classes, TrainConfig(epochs=1, learning_rate=0.01)
    )
    evaluator = make_evaluator(trainer.model, prefer="litert")
    # A decent local model: 20 epochs on the board's own training data.
    good, _ = trainer.train(
        trainer.initial_weights, data.x_train, data.y_train, np.random.default_rng(1), epochs=20
    )
    return data, trainer, evaluator, good


def test_alarm_runs_on_litert(setup):
    from models.litert import litert_available

    _, _, evaluator, _ = setup
    assert evaluator.backend == ("litert" if litert_available() else "keras")


def test_first_round_never_alarms_and_keeps_the_new_local_model(setup):
    data, trainer, evaluator, _ = setup
    g = trainer.initial_weights
    update, state = board_step(
        BoardState(3),
        g,
        1,
        data,
        trainer,
        np.random.default_rng(0),
        evaluator=evaluator,
        alarm=PAPER,
    )
    assert update.alarm is False and update.local_accuracy is None
    assert update.global_accuracy == pytest.approx(evaluator.accuracy(g, data.x_test, data.y_test))
    assert update.client_id == 3 and update.round == 1 and state.last_round == 1
    assert update.num_samples == 300 and update.delta.dtype == np.float32
    # Δ = g_{t+1}^(i) − g_t and the board keeps g_{t+1}^(i).
    assert state.previous_local is not None
    np.testing.assert_allclose(g + update.delta, state.previous_local, atol=1e-6)
    assert update.alarm_seconds > 0 and update.train_seconds > 0
    # CPU time of the process during each phase: positive, and no more than every core busy
    # for the phase's wall time.
    cores = len(os.sched_getaffinity(0))
    assert 0 < update.alarm_cpu_seconds <= cores * update.alarm_seconds + 0.01
    assert 0 < update.train_cpu_seconds <= cores * update.train_seconds + 0.01


def test_poisoned_global_alarms_and_training_starts_from_the_local_model(setup):
    data, trainer, evaluator, good = setup
    poisoned = (-4.0 * good).astype(np.float32)
    update, state = board_step(
        BoardState(0, previous_local=good, last_round=1),
        poisoned,
        2,
        data,
        trainer,
        np.random.default_rng(0),
        evaluator=evaluator,
        alarm=PAPER,
    )
    assert update.alarm is True
    assert update.local_accuracy is not None and update.global_accuracy is not None
    assert update.local_accuracy - update.global_accuracy > 0.5
    new_local = poisoned + update.delta
    # One epoch from `good` stays near it; from the poisoned global it could not get there.
    assert np.linalg.norm(new_local - good) < 0.1 * np.linalg.norm(new_local - poisoned)
    # Δ is still taken against the received global (Alg. 1 line 11).
    assert state.previous_local is not None
    np.testing.assert_allclose(new_local, state.previous_local, atol=1e-5)


def test_better_global_does_not_alarm_and_training_starts_from_it(setup):
    data, trainer, evaluator, good = setup
    weak = trainer.initial_weights
    update, _ = board_step(
        BoardState(0, previous_local=weak, last_round=1),
        good,
        2,
        data,
        trainer,
        np.random.default_rng(0),
        evaluator=evaluator,
        alarm=PAPER,
    )
    assert update.alarm is False
    assert update.global_accuracy is not None and update.local_accuracy is not None
    assert update.global_accuracy - update.local_accuracy >= 0.04
    # Started from `good`: one more epoch moves it only a little.
    assert np.linalg.norm(update.delta) < 0.1 * np.linalg.norm(good - weak)


def test_without_alarm_config_the_board_is_plain_fedavg(setup):
    data, trainer, _, good = setup
    update, _ = board_step(
        BoardState(0, previous_local=good, last_round=1),
        trainer.initial_weights,
        2,
        data,
        trainer,
        np.random.default_rng(0),
    )
    assert update.alarm is False and update.global_accuracy is None
    assert update.alarm_seconds == 0.0 and update.alarm_cpu_seconds == 0.0
    assert update.train_cpu_seconds > 0


def test_alarm_needs_an_evaluator(setup):
    data, trainer, _, _ = setup
    with pytest.raises(ValueError, match="evaluator"):
        board_step(
            BoardState(0),
            trainer.initial_weights,
            1,
            data,
            trainer,
            np.random.default_rng(0),
            alarm=PAPER,
        )
