"""LiteRT export with ``infer`` and ``set_weights`` signatures, and an evaluator that uses it.

A board converts its model once; every round it loads the received global weights (and its own
previous local weights) into the same interpreter through ``set_weights`` — one flat float32
vector in the :mod:`models.weights` layout — and runs ``infer``. Nothing is reconverted per round
and no ``.tflite`` file ever travels over the network.

The exported graph holds the weights in resource variables (the converter's
``experimental_enable_resource_variables``) shared by both signatures of one interpreter.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import LiteRTUnavailableError
from models.tf_setup import native_stderr_silenced, quiet_tensorflow
from models.weights import WeightLayout, get_flat_weights, layout_of, set_flat_weights


def export_litert(model: Any) -> bytes:
    """Convert a Keras model to a LiteRT flatbuffer with ``infer`` and ``set_weights``.

    Signatures
    ----------
    ``infer(x: float32[None, *input_shape]) -> {"logits": float32[None, C]}``
    ``set_weights(flat: float32[d]) -> {"ok": int32}``

    Complexity: one conversion (about a second for the SIREN CNN); the flatbuffer embeds the
    model's current weights as the variables' initial values.
    """
    quiet_tensorflow()
    import tensorflow as tf

    layout = layout_of(model)
    sizes = list(layout.sizes)
    shapes = [list(shape) for _, shape in layout.entries]
    input_shape = [None, *(int(s) for s in model.input_shape[1:])]

    class _Exportable(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.vars = [
                tf.Variable(np.asarray(w), name=f"w{i}") for i, w in enumerate(model.get_weights())
            ]

        @tf.function(input_signature=[tf.TensorSpec(input_shape, tf.float32)])
        def infer(self, x: Any) -> dict[str, Any]:
            logits, _ = self.net.stateless_call(list(self.vars), [], x)
            return {"logits": logits}

        @tf.function(input_signature=[tf.TensorSpec([layout.size], tf.float32)])
        def set_weights(self, flat: Any) -> dict[str, Any]:
            for var, part, shape in zip(self.vars, tf.split(flat, sizes), shapes):
                var.assign(tf.reshape(part, shape))
            return {"ok": tf.constant(1, dtype=tf.int32)}

    module = _Exportable()
    with tempfile.TemporaryDirectory(prefix="siren-litert-") as tmp:
        tf.saved_model.save(
            module,
            tmp,
            signatures={
                "infer": module.infer.get_concrete_function(),
                "set_weights": module.set_weights.get_concrete_function(),
            },
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=["infer", "set_weights"]
        )
        converter.experimental_enable_resource_variables = True
        return bytes(converter.convert())


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # older board images

        return Interpreter
    except ImportError as exc:
        raise LiteRTUnavailableError(
            "no LiteRT runtime: install `ai-edge-litert` (or `tflite-runtime` on old images)"
        ) from exc


def litert_available() -> bool:
    """Whether a LiteRT interpreter can be imported."""
    try:
        _interpreter_class()
    except LiteRTUnavailableError:
        return False
    return True


class LiteRTEvaluator:
    """Accuracy/prediction with one LiteRT interpreter whose weights are swapped per call.

    Parameters
    ----------
    flatbuffer : bytes
        Output of :func:`export_litert`.
    layout : WeightLayout
        Layout of the flat vectors that will be loaded.
    num_threads : int
        Interpreter threads (1 on a single-core budget).
    """

    backend = "litert"

    def __init__(self, flatbuffer: bytes, layout: WeightLayout, num_threads: int = 1) -> None:
        interpreter_cls = _interpreter_class()
        self.layout = layout
        self._interpreter = interpreter_cls(model_content=flatbuffer, num_threads=num_threads)
        self._set = self._interpreter.get_signature_runner("set_weights")
        self._infer = self._interpreter.get_signature_runner("infer")
        self._started = False

    @classmethod
    def from_model(cls, model: Any, num_threads: int = 1) -> LiteRTEvaluator:
        """Export ``model`` and build an evaluator for it."""
        return cls(export_litert(model), layout_of(model), num_threads=num_threads)

    def load(self, weights: np.ndarray) -> None:
        """Load a flat weight vector into the interpreter's variables."""
        vec = np.ascontiguousarray(weights, dtype=np.float32)
        if vec.shape != (self.layout.size,):
            raise ValueError(f"weights of shape {vec.shape}, expected ({self.layout.size},)")
        if self._started:
            self._set(flat=vec)
            return
        # The first run applies the CPU delegate, which the runtime announces on stderr.
        with native_stderr_silenced():
            self._set(flat=vec)
        self._started = True

    def logits(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Logits of the currently loaded weights on ``x``."""
        outs = [
            self._infer(x=np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))["logits"]
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)

    def accuracy(self, weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy of ``weights`` on ``(x, y)``; 0.0 on an empty set."""
        if len(y) == 0:
            return 0.0
        self.load(weights)
        return float(np.mean(np.argmax(self.logits(x), axis=1) == y))


class KerasEvaluator:
    """The same interface as :class:`LiteRTEvaluator`, running the Keras model (fallback)."""

    backend = "keras"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layout = layout_of(model)

    def load(self, weights: np.ndarray) -> None:
        """Load a flat weight vector into the Keras model."""
        set_flat_weights(self.model, weights)

    def logits(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Logits of the currently loaded weights on ``x``."""
        outs = [
            np.asarray(self.model(x[i : i + batch_size], training=False))
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)

    def accuracy(self, weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy of ``weights`` on ``(x, y)``; 0.0 on an empty set."""
        if len(y) == 0:
            return 0.0
        self.load(weights)
        return float(np.mean(np.argmax(self.logits(x), axis=1) == y))


def make_evaluator(model: Any, prefer: str = "litert", num_threads: int = 1) -> Any:
    """A LiteRT evaluator when available and preferred, else the Keras fallback."""
    if prefer == "litert" and litert_available():
        return LiteRTEvaluator.from_model(model, num_threads=num_threads)
    return KerasEvaluator(model)


def save_flatbuffer(flatbuffer: bytes, path: Path) -> None:
    """Write a flatbuffer to disk (for flashing a board image)."""
    Path(path).write_bytes(flatbuffer)


__all__ = [
    "KerasEvaluator",
    "LiteRTEvaluator",
    "export_litert",
    "get_flat_weights",
    "litert_available",
    "make_evaluator",
    "save_flatbuffer",
]
