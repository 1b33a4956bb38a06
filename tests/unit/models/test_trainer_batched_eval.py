"""The trainer's one-call weight loading and batched evaluation agree with the plain paths."""

from __future__ import annotations

import numpy as np
import pytest

from models.training import TrainConfig, Trainer
from models.weights import LayoutMismatchError, get_flat_weights


@pytest.fixture(scope="module")
def trainer(digits):
    return Trainer(
        "digits-mlp",
        digits.input_shape,
        digits.num_classes,
        TrainConfig(epochs=1, batch_size=32, learning_rate=0.01),
    )


def test_load_and_weights_round_trip_exactly(trainer):
    w = trainer.initial_weights + np.linspace(-1, 1, trainer.layout.size, dtype=np.float32)
    trainer.load(w)
    assert np.array_equal(trainer.weights(), w)
    assert np.array_equal(get_flat_weights(trainer.model), w)
    with pytest.raises(LayoutMismatchError):
        trainer.load(w[:-1])


def test_evaluate_many_matches_one_evaluation_per_candidate(trainer, digits):
    x, y = digits.x_test[:100], digits.y_test[:100]
    rng = np.random.default_rng(3)
    candidates = [trainer.initial_weights]
    candidates += [
        trainer.train(trainer.initial_weights, digits.x_train, digits.y_train, rng)[0]
        for _ in range(2)
    ]
    candidates.append(candidates[1] * np.float32(-1.0))  # a poor model
    many = trainer.evaluate_many(candidates, x, y)
    one = [trainer.evaluate(w, x, y) for w in candidates]
    assert [acc for _, acc in many] == [acc for _, acc in one]
    assert np.allclose([loss for loss, _ in many], [loss for loss, _ in one], rtol=1e-5)
    # The trained models are far better than the untrained and the negated ones.
    assert min(many[1][1], many[2][1]) > max(many[0][1], many[3][1]) + 0.2
    assert trainer.evaluate_many([], x, y) == []


def test_evaluate_many_falls_back_for_large_sets(trainer, digits):
    x = np.concatenate([digits.x_train] * 2)[:2100]
    y = np.concatenate([digits.y_train] * 2)[:2100]
    w = [trainer.initial_weights, trainer.initial_weights * np.float32(0.5)]
    assert trainer.evaluate_many(w, x, y) == [trainer.evaluate(v, x, y) for v in w]
