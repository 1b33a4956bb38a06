"""Local training and evaluation of flat weight vectors with one reusable Keras model.

A :class:`Trainer` owns one Keras model, one optimizer and two compiled ``tf.function`` steps.
Any number of boards (or the server's root-set training for FLTrust) share it: each call loads
the starting weights, resets the optimizer state, trains, and returns the new flat weights.
Shuffling uses a NumPy Generator passed by the caller, so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.tf_setup import quiet_tensorflow
from models.weights import WeightLayout, get_flat_weights, layout_of, set_flat_weights
from models.zoo import build_model

OPTIMIZERS = ("sgd", "adam")

#: Default local learning rate per optimizer, used wherever a learning rate is left unset
#: (board, coordinator and simulator settings alike).
DEFAULT_LR = {"adam": 0.001, "sgd": 0.05}

#: Models whose default differs: the digits models see about 130 samples per board (two Adam
#: steps per epoch), and at 1e-3 they stay near chance for several rounds; 1e-2 learns.
MODEL_DEFAULT_LR: dict[str, dict[str, float]] = {
    "digits-mlp": {"adam": 0.01},
    "digits-cnn": {"adam": 0.01},
}


def default_learning_rate(optimizer: str, model: str | None = None) -> float:
    """The learning rate used when none is set, for ``optimizer`` and (optionally) ``model``.

    Raises
    ------
    ValueError
        For an optimizer other than ``adam`` or ``sgd``.
    """
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LR)}, got {optimizer!r}")
    return MODEL_DEFAULT_LR.get(model or "", {}).get(optimizer, DEFAULT_LR[optimizer])


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters (SIREN Table 2: E=5, B=64).

    Attributes
    ----------
    epochs : int
        Local epochs E.
    batch_size : int
        Mini-batch size B.
    learning_rate : float
        Step size of the optimizer.
    optimizer : {"sgd", "adam"}
        Local optimizer; its state is reset at the start of every local training.
    momentum : float
        SGD momentum (ignored by Adam).
    """

    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.001
    optimizer: str = "adam"
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


@dataclass(frozen=True)
class TrainStats:
    """What one local training did."""

    steps: int
    samples: int
    mean_loss: float


class Trainer:
    """Train/evaluate flat weight vectors of one zoo model.

    Parameters
    ----------
    model_name : str
        Zoo name (see :mod:`models.zoo`).
    input_shape : tuple[int, ...]
        Shape of one input sample.
    num_classes : int
        Number of classes.
    config : TrainConfig
        Local training hyper-parameters.
    seed : int
        Seed of the initial weights.
    """

    #: Training runtime (boards may use :class:`~models.litert_trainer.LiteRTTrainer`).
    backend = "keras"

    def __init__(
        self,
        model_name: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        config: TrainConfig,
        seed: int = 0,
    ) -> None:
        quiet_tensorflow()
        import keras
        import tensorflow as tf

        self.config = config
        self.model_name = model_name
        self.num_classes = num_classes
        self.model = build_model(model_name, input_shape, num_classes, seed=seed)
        self.layout: WeightLayout = layout_of(self.model)
        self.initial_weights = get_flat_weights(self.model)
        if config.optimizer == "sgd":
            self.optimizer = keras.optimizers.SGD(config.learning_rate, momentum=config.momentum)
        else:
            self.optimizer = keras.optimizers.Adam(config.learning_rate)
        self.optimizer.build(self.model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model = self.model
        optimizer = self.optimizer
        spec_x = tf.TensorSpec([None, *input_shape], tf.float32)
        spec_y = tf.TensorSpec([None], tf.int64)

        @tf.function(input_signature=[spec_x, spec_y])
        def train_step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        @tf.function(input_signature=[spec_x, spec_y])
        def eval_step(x: Any, y: Any) -> Any:
            logits = model(x, training=False)
            loss = tf.reduce_sum(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            )
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), y), tf.float32))
            return loss, correct

        variables = list(model.weights)
        sizes = [int(n) for n in self.layout.sizes]
        shapes = [list(shape) for _, shape in self.layout.entries]

        def assign_parts(flat: Any) -> None:
            for var, part, shape in zip(variables, tf.split(flat, sizes), shapes, strict=True):
                var.assign(tf.reshape(part, shape))

        @tf.function(input_signature=[tf.TensorSpec([self.layout.size], tf.float32)])
        def assign_flat(flat: Any) -> Any:
            assign_parts(flat)
            return tf.constant(0)

        @tf.function(
            input_signature=[tf.TensorSpec([None, self.layout.size], tf.float32), spec_x, spec_y]
        )
        def eval_many(flats: Any, x: Any, y: Any) -> Any:
            # One graph call for every candidate: load it, then count its correct predictions.
            count = tf.shape(flats)[0]

            def body(i: Any, out: Any) -> Any:
                assign_parts(flats[i])
                loss, correct = eval_step(x, y)
                return i + 1, out.write(i, tf.stack([loss, correct]))

            _, out = tf.while_loop(
                lambda i, _: i < count, body, [tf.constant(0), tf.TensorArray(tf.float32, count)]
            )
            return out.stack()

        @tf.function(input_signature=[])
        def read_flat() -> Any:
            return tf.concat([tf.reshape(var.value, [-1]) for var in variables], axis=0)

        self._train_step = train_step
        self._eval_step = eval_step
        self._assign_flat = assign_flat
        self._read_flat = read_flat
        self._eval_many = eval_many

    def load(self, weights: np.ndarray) -> None:
        """Load a flat weight vector into the model in one graph call (checked against the layout).

        About 20x cheaper than ``keras.Model.set_weights`` for small models, whose evaluation on
        a root set of 100 samples it otherwise dominates.
        """
        vec = np.asarray(weights, dtype=np.float32)
        if vec.shape != (self.layout.size,):
            # The layout names what was expected.
            set_flat_weights(self.model, vec)
        self._assign_flat(vec)

    def weights(self) -> np.ndarray:
        """The model's current weights as one float32 vector (a fresh array)."""
        return np.array(self._read_flat(), dtype=np.float32)

    def _reset_optimizer(self) -> None:
        """Zero the step counter and the slot variables (momenta); keep the learning rate."""
        for var in self.optimizer.variables:
            if var.name != "learning_rate":
                var.assign(np.zeros(var.shape, dtype=var.dtype))

    def train(
        self,
        start: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
        epochs: int | None = None,
    ) -> tuple[np.ndarray, TrainStats]:
        """Train from flat weights ``start`` on ``(x, y)``; return the new flat weights.

        Each epoch visits the data once in a fresh random order drawn from ``rng``; the last
        batch may be smaller. Cost: ``epochs · ceil(N / B)`` optimizer steps.
        """
        n = len(y)
        if n == 0:
            return np.array(start, dtype=np.float32, copy=True), TrainStats(0, 0, 0.0)
        self.load(start)
        self._reset_optimizer()
        bs = self.config.batch_size
        total_loss, steps = 0.0, 0
        y64 = np.asarray(y, dtype=np.int64)
        for _ in range(epochs if epochs is not None else self.config.epochs):
            order = rng.permutation(n)
            for i in range(0, n, bs):
                idx = order[i : i + bs]
                total_loss += float(self._train_step(x[idx], y64[idx]))
                steps += 1
        return self.weights(), TrainStats(steps, n, total_loss / max(steps, 1))

    def evaluate(
        self, weights: np.ndarray, x: np.ndarray, y: np.ndarray, batch_size: int = 2048
    ) -> tuple[float, float]:
        """Mean cross-entropy loss and top-1 accuracy of ``weights`` on ``(x, y)``."""
        n = len(y)
        if n == 0:
            return 0.0, 0.0
        self.load(weights)
        y64 = np.asarray(y, dtype=np.int64)
        loss_sum, correct = 0.0, 0.0
        for i in range(0, n, batch_size):
            loss, corr = self._eval_step(x[i : i + batch_size], y64[i : i + batch_size])
            loss_sum += float(loss)
            correct += float(corr)
        return loss_sum / n, correct / n

    def evaluate_many(
        self, candidates: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> list[tuple[float, float]]:
        """:meth:`evaluate` for several weight vectors in one graph call (a small ``x``).

        The per-call overhead of TensorFlow (about a millisecond) otherwise dominates when a
        server scores fifty small models on a root set of 100 samples. Sets of more than 2,048
        samples fall back to one :meth:`evaluate` per candidate. The model is left holding the
        last candidate.
        """
        n = len(y)
        if not candidates:
            return []
        if n == 0 or n > 2048:
            return [self.evaluate(w, x, y) for w in candidates]
        flats = np.stack([np.asarray(w, dtype=np.float32) for w in candidates])
        if flats.shape[1] != self.layout.size:
            self.load(flats[0])  # raises with the layout
        out = np.asarray(self._eval_many(flats, x, np.asarray(y, dtype=np.int64)))
        return [(float(loss) / n, float(correct) / n) for loss, correct in out]

    def predict(self, weights: np.ndarray, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
        """Softmax probabilities of ``weights`` on ``x``."""
        self.load(weights)
        outs = []
        for i in range(0, len(x), batch_size):
            logits = np.asarray(self.model(x[i : i + batch_size], training=False), dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            outs.append(p / p.sum(axis=1, keepdims=True))
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes))
