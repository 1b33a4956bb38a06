"""LiteRT with frozen weights: every weight located, patched per load, same logits as Keras."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from models.litert import (
    FrozenLiteRTEvaluator,
    LiteRTEvaluator,
    export_litert_frozen,
    litert_evaluator,
)
from models.weights import get_flat_weights, set_flat_weights
from models.zoo import build_model


@pytest.fixture(scope="module")
def cnn():
    return build_model("digits-cnn", (8, 8, 1), 10, seed=3)


def test_export_locates_every_weight_once_and_restores_the_model(cnn):
    before = get_flat_weights(cnn)
    export = export_litert_frozen(cnn)
    assert np.array_equal(get_flat_weights(cnn), before)
    sources = np.concatenate([src for _, src in export.patches])
    assert np.array_equal(np.sort(sources), np.arange(export.layout.size))
    # Writing the probe values back reproduces the converted bytes exactly.
    probe = np.arange(1, export.layout.size + 1, dtype=np.float32)
    assert export.with_weights(probe) == export.flatbuffer
    with pytest.raises(ValueError, match="expected"):
        export.with_weights(probe[:-1])


def test_frozen_logits_match_keras_for_weights_unlike_the_exported_ones(cnn):
    evaluator = FrozenLiteRTEvaluator.from_model(cnn)
    rng = np.random.default_rng(0)
    x = rng.random((70, 8, 8, 1), dtype=np.float32)
    original = get_flat_weights(cnn)
    for scale in (0.5, -1.5):
        w = (original * np.float32(scale) + rng.normal(0, 0.05, original.size)).astype(np.float32)
        evaluator.load(w)
        got = evaluator.logits(x, batch_size=32)  # batches of 32, 32 and 6
        set_flat_weights(cnn, w)
        want = np.asarray(cnn(x, training=False))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    set_flat_weights(cnn, original)
    y = np.argmax(want, axis=1)
    assert evaluator.accuracy(w, x, y) == 1.0
    assert evaluator.accuracy(w, x[:0], y[:0]) == 0.0


def test_logits_need_weights_first(cnn):
    with pytest.raises(RuntimeError, match="load"):
        FrozenLiteRTEvaluator(export_litert_frozen(cnn)).logits(np.zeros((1, 8, 8, 1), np.float32))


def test_litert_evaluator_freezes_convolutional_models_only(cnn):
    assert isinstance(litert_evaluator(cnn), FrozenLiteRTEvaluator)
    mlp = build_model("digits-mlp", (8, 8, 1), 10)
    assert type(litert_evaluator(mlp)) is LiteRTEvaluator
    assert isinstance(litert_evaluator(mlp, frozen=True), FrozenLiteRTEvaluator)
