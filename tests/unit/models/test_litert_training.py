"""LiteRT training artifacts: builtin ops only, TensorFlow's gradients, Keras' optimizer steps."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import ArtifactError, LiteRTExportError
from models.litert_artifact import TrainingArtifact
from models.litert_trainer import LiteRTTrainer, artifact_evaluator
from models.litert_training import (
    SIGNATURES,
    export_litert_training,
    flex_ops_in_message,
    flex_ops_of_keras_step,
)
from models.training import TrainConfig, Trainer
from models.weights import get_flat_weights, set_flat_weights, unflatten
from models.zoo import build_model

#: The LiteRT training step's equivalence bound: relative error of each gradient tensor, float32.
GRADIENT_RTOL = 1e-5

SHAPES = {"digits-mlp": (8, 8, 1), "digits-cnn": (8, 8, 1), "siren-cnn": (28, 28, 1)}


@pytest.fixture(scope="module")
def exported():
    """name -> (Keras model, its artifact) for the models the tests train (built once)."""
    out = {}
    for name, shape in SHAPES.items():
        model = build_model(name, shape, 10, seed=3)
        out[name] = (model, export_litert_training(model, model_name=name))
    return out


def _bordered_batch(shape, n, seed):
    """Images with an all-zero border: max-pooling windows there hold exact ties."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, *shape), dtype=np.float32)
    x[:, 2:-2, 2:-2] = rng.random((n, shape[0] - 4, shape[1] - 4, shape[2]))
    return x, rng.integers(0, 10, n)


def _tf_gradients(model, weights, x, y):
    import keras
    import tensorflow as tf

    set_flat_weights(model, weights)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)], float(loss)


def _relative_errors(got, expected):
    return [
        float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(got, expected, strict=True)
    ]


def test_plain_keras_step_needs_flex_ops_today():
    """What the converter refuses without a Flex delegate (recorded in litert-builtins.md).

    The cross-entropy's ``SparseSoftmaxCrossEntropyWithLogits`` is among them only while
    TensorFlow's op determinism is off (with it on, as after ``seed_everything``, TensorFlow
    builds the loss from other ops); the three gradient ops are needed either way.
    """
    model = build_model("digits-cnn", (8, 8, 1), 10)
    ops = flex_ops_of_keras_step(model)
    assert {"Conv2DBackpropFilter", "MaxPoolGrad", "ReluGrad"} <= set(ops)
    assert set(ops) <= {
        "Conv2DBackpropFilter",
        "MaxPoolGrad",
        "ReluGrad",
        "SparseSoftmaxCrossEntropyWithLogits",
    }


def test_flex_ops_are_read_from_the_converter_message():
    message = "blah\nTF Select ops: ReluGrad, MaxPoolGrad\nDetails: ..."
    assert flex_ops_in_message(message) == ["MaxPoolGrad", "ReluGrad"]
    assert flex_ops_in_message("'tf.Foo' op is neither a custom op nor a flex op") == ["Foo"]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_artifact_is_builtin_only_with_every_signature(exported, name):
    from ai_edge_litert.interpreter import Interpreter

    _, artifact = exported[name]
    # export_litert_training converts with TFLITE_BUILTINS only: reaching here means it did.
    signatures = Interpreter(model_content=artifact.train_flatbuffer).get_signature_list()
    assert set(signatures) == set(SIGNATURES)
    assert set(signatures["train"]["inputs"]) == {"x", "y", "weight", "learning_rate"}
    assert artifact.model == name and artifact.input_shape == SHAPES[name]
    assert (artifact.frozen is not None) == ("cnn" in name)


def test_dspo_mlp_converts_builtin_only():
    model = build_model("dspo-mlp", (28, 28, 1), 10)
    artifact = export_litert_training(model, model_name="dspo-mlp")
    assert artifact.layout.size == 203_530


def test_unsupported_layer_is_refused_by_name():
    import keras

    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.AveragePooling2D(2, name="avg"),
            keras.layers.Flatten(),
        ]
    )
    with pytest.raises(LiteRTExportError, match=r"'avg'.*AveragePooling2D"):
        export_litert_training(model, model_name="x")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_gradients_match_tensorflow(exported, name):
    """The LiteRT step's gradients are TensorFlow's within 1e-5 (relative, float32),
    with weights away from their initial values and pooling windows full of ties."""
    model, artifact = exported[name]
    rng = np.random.default_rng(7)
    weights = get_flat_weights(model) + rng.normal(0, 0.05, artifact.layout.size).astype(np.float32)
    x, y = _bordered_batch(SHAPES[name], 24, seed=1)
    expected, expected_loss = _tf_gradients(model, weights, x, y)
    flat, loss = LiteRTTrainer(artifact, TrainConfig()).gradient(weights, x, y)
    errors = _relative_errors(unflatten(flat, artifact.layout), expected)
    assert max(errors) <= GRADIENT_RTOL, dict(zip([n for n, _ in artifact.layout.entries], errors))
    assert loss == pytest.approx(expected_loss, rel=1e-6)


def test_gradients_match_tensorflow_on_real_digits(exported, digits):
    model, artifact = exported["digits-cnn"]
    trainer = Trainer("digits-cnn", (8, 8, 1), 10, TrainConfig(epochs=1, learning_rate=0.01))
    # Trained weights: positive biases make the digits' blank background tie in every window.
    weights, _ = trainer.train(
        trainer.initial_weights,
        digits.x_train[:400],
        digits.y_train[:400],
        np.random.default_rng(0),
    )
    x, y = digits.x_train[:64], digits.y_train[:64]
    expected, _ = _tf_gradients(model, weights, x, y)
    flat, _ = LiteRTTrainer(artifact, TrainConfig()).gradient(weights, x, y)
    assert max(_relative_errors(unflatten(flat, artifact.layout), expected)) <= GRADIENT_RTOL


def _has_fashion() -> bool:
    from models.datasets import find_fashion_mnist
    from models.errors import DatasetNotFoundError

    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_fashion(), reason="dataset-fashion-mnist is not installed")
def test_siren_cnn_gradients_match_tensorflow_on_fashion_mnist(exported):
    """Real images (blank backgrounds, saturated pixels) and weights after some Keras steps."""
    from models.datasets import load_fashion_mnist

    model, artifact = exported["siren-cnn"]
    ds = load_fashion_mnist()
    trainer = Trainer("siren-cnn", (28, 28, 1), 10, TrainConfig(epochs=1), seed=3)
    weights, _ = trainer.train(
        trainer.initial_weights, ds.x_train[:640], ds.y_train[:640], np.random.default_rng(0)
    )
    lite = LiteRTTrainer(artifact, TrainConfig())
    for seed in range(2):
        idx = np.random.default_rng(seed).choice(len(ds.y_train), 64, replace=False)
        expected, _ = _tf_gradients(model, weights, ds.x_train[idx], ds.y_train[idx])
        flat, _ = lite.gradient(weights, ds.x_train[idx], ds.y_train[idx])
        errors = _relative_errors(unflatten(flat, artifact.layout), expected)
        assert max(errors) <= GRADIENT_RTOL, errors


def test_pooling_ties_go_to_the_first_maximum(exported):
    """A constant image ties every pooling window; TensorFlow's MaxPoolGrad picks the first."""
    model, artifact = exported["siren-cnn"]
    rng = np.random.default_rng(2)
    weights = get_flat_weights(model)
    # Positive biases: ReLU passes the constant, so the ties are not masked away.
    parts = unflatten(weights, artifact.layout)
    parts = [p + 0.1 if p.ndim == 1 else p for p in parts]
    weights = np.concatenate([p.ravel() for p in parts])
    x = np.full((4, 28, 28, 1), 0.5, dtype=np.float32)
    y = rng.integers(0, 10, 4)
    expected, _ = _tf_gradients(model, weights, x, y)
    flat, _ = LiteRTTrainer(artifact, TrainConfig()).gradient(weights, x, y)
    assert max(_relative_errors(unflatten(flat, artifact.layout), expected)) <= GRADIENT_RTOL


@pytest.mark.parametrize("name", ["digits-mlp", "siren-cnn"])
def test_infer_matches_the_keras_model(exported, name):
    model, artifact = exported[name]
    x, _ = _bordered_batch(SHAPES[name], 5, seed=4)
    trainer = LiteRTTrainer(artifact, TrainConfig())
    got = trainer.logits(get_flat_weights(model), x)
    np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_follows_keras_step_for_step(exported, digits, optimizer):
    """Same start, same batches (same rng): the weights stay within float32 rounding of Keras'."""
    model, _ = exported["digits-mlp"]
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=0.01, optimizer=optimizer)
    artifact = (
        exported["digits-mlp"][1]
        if optimizer == "adam"
        else export_litert_training(model, model_name="digits-mlp", optimizer="sgd")
    )
    keras_trainer = Trainer("digits-mlp", (8, 8, 1), 10, config, seed=3)
    lite = LiteRTTrainer(artifact, config)
    start = keras_trainer.initial_weights
    x, y = digits.x_train[:150], digits.y_train[:150]  # 150 = 4 full batches + a short one
    w_keras, s_keras = keras_trainer.train(start, x, y, np.random.default_rng(5))
    w_lite, s_lite = lite.train(start, x, y, np.random.default_rng(5))
    assert s_lite.steps == s_keras.steps == 10
    assert s_lite.mean_loss == pytest.approx(s_keras.mean_loss, rel=1e-5)
    np.testing.assert_allclose(w_lite, w_keras, rtol=0, atol=1e-5)
    assert np.abs(w_lite - start).max() > 1e-3  # it did train


def test_padded_short_batch_is_the_mean_over_real_samples(exported, digits):
    _, artifact = exported["digits-mlp"]
    trainer = LiteRTTrainer(artifact, TrainConfig())
    w = trainer.initial_weights
    x, y = digits.x_train[:10], digits.y_train[:10]
    exact, loss = trainer.gradient(w, x, y)
    out = trainer._gradient(
        x=np.concatenate([x, np.ones((6, 8, 8, 1), np.float32)]),
        y=np.concatenate([y, np.full(6, 3)]).astype(np.int32),
        weight=np.array([1.0] * 10 + [0.0] * 6, np.float32),
    )
    np.testing.assert_allclose(out["gradient"], exact, rtol=1e-5, atol=1e-7)
    assert float(out["loss"]) == pytest.approx(loss, rel=1e-6)


def test_evaluate_matches_keras_trainer(exported, digits):
    _, artifact = exported["digits-cnn"]
    keras_trainer = Trainer("digits-cnn", (8, 8, 1), 10, TrainConfig(), seed=3)
    w = keras_trainer.initial_weights
    loss_k, acc_k = keras_trainer.evaluate(w, digits.x_test, digits.y_test)
    loss_l, acc_l = LiteRTTrainer(artifact, TrainConfig()).evaluate(w, digits.x_test, digits.y_test)
    assert acc_l == acc_k
    assert loss_l == pytest.approx(loss_k, rel=1e-5)


def test_artifact_file_round_trip_and_evaluator(exported, digits, tmp_path):
    model, artifact = exported["digits-cnn"]
    path = artifact.save(tmp_path / "model-litert.zip")
    loaded = TrainingArtifact.load(path)
    assert loaded.train_flatbuffer == artifact.train_flatbuffer
    assert loaded.layout == artifact.layout and loaded.frozen is not None
    assert loaded.to_bytes() == artifact.to_bytes()
    w = get_flat_weights(model)
    evaluator = artifact_evaluator(loaded)
    keras_acc = float(np.mean(np.argmax(model(digits.x_test), axis=1) == digits.y_test))
    assert evaluator.accuracy(w, digits.x_test, digits.y_test) == pytest.approx(keras_acc)


def test_artifact_refuses_tampering_and_other_versions(exported, tmp_path):
    import io
    import json
    import zipfile

    _, artifact = exported["digits-mlp"]
    data = artifact.to_bytes()
    with pytest.raises(ArtifactError, match="not a readable"):
        TrainingArtifact.from_bytes(b"not a zip")

    def rewrite(change):
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
            for name in src.namelist():
                dst.writestr(name, change(name, src.read(name)))
        return out.getvalue()

    flipped = rewrite(lambda n, b: b[:-1] + bytes([b[-1] ^ 1]) if n == "train.tflite" else b)
    with pytest.raises(ArtifactError, match=r"train\.tflite does not match its SHA-256"):
        TrainingArtifact.from_bytes(flipped)

    def bump(name, blob):
        if name != "manifest.json":
            return blob
        manifest = json.loads(blob)
        manifest["version"] = 99
        return json.dumps(manifest).encode()

    with pytest.raises(ArtifactError, match="version 99"):
        TrainingArtifact.from_bytes(rewrite(bump))
    with pytest.raises(ArtifactError, match="cannot read"):
        TrainingArtifact.load(tmp_path / "missing.zip")


def test_trainer_refuses_another_model_or_optimizer(exported):
    _, artifact = exported["digits-mlp"]
    with pytest.raises(ArtifactError, match=r"holds model 'digits-mlp'.*'siren-cnn'"):
        LiteRTTrainer(artifact, TrainConfig(), model_name="siren-cnn")
    with pytest.raises(ArtifactError, match=r"runs adam.*configured for sgd"):
        LiteRTTrainer(artifact, TrainConfig(optimizer="sgd"))
