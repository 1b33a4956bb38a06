"""LiteRT export and evaluators for the board's alarm: no ``.tflite`` file travels over the network.

A board converts its model once and evaluates each round's weights (the received global model
and its own previous local model) without converting again. Two ways to hand weights over:

* :class:`FrozenLiteRTEvaluator` (convolutional models): the model is converted with its weights
  as constants, and :func:`export_litert_frozen` records where each weight sits in the
  flatbuffer. Each load writes the new values there and opens a fresh interpreter, so the CPU
  delegate (XNNPACK) packs the weights as it does for any ordinary model.
* :class:`LiteRTEvaluator`: the graph holds the weights in resource variables (the converter's
  ``experimental_enable_resource_variables``) shared by two signatures of one interpreter,
  ``set_weights`` (one flat float32 vector in the :mod:`models.weights` layout) and ``infer``.
  No interpreter is rebuilt, but the delegate cannot pack variable weights.

:func:`litert_evaluator` picks between them.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import LiteRTExportError, LiteRTUnavailableError
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


def interpreter_class() -> Any:
    """The LiteRT ``Interpreter`` class: ``ai-edge-litert``'s, else ``tflite-runtime``'s.

    Raises
    ------
    LiteRTUnavailableError
        Neither runtime is installed.
    """
    return _interpreter_class()


def litert_available() -> bool:
    """Whether a LiteRT interpreter can be imported."""
    try:
        _interpreter_class()
    except LiteRTUnavailableError:
        return False
    return True


class _Evaluator:
    """What every evaluator shares: accuracy from ``load`` and ``logits``, batched inference."""

    def load(self, weights: np.ndarray) -> None:  # pragma: no cover - overridden
        """Make ``weights`` the evaluated model."""
        raise NotImplementedError

    def logits(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:  # pragma: no cover
        """Logits of the loaded weights on ``x``."""
        raise NotImplementedError

    def accuracy(self, weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy of ``weights`` on ``(x, y)``; 0.0 on an empty set."""
        if len(y) == 0:
            return 0.0
        self.load(weights)
        return float(np.mean(np.argmax(self.logits(x), axis=1) == y))

    @staticmethod
    def _batched(run: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
        """``run`` over consecutive float32 batches of ``x``, concatenated."""
        outs = [
            np.asarray(run(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)))
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)


class LiteRTEvaluator(_Evaluator):
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
        return self._batched(lambda b: self._infer(x=b)["logits"], x, batch_size)


@dataclass(frozen=True)
class FrozenExport:
    """A LiteRT flatbuffer with constant weights, and where each weight lives in it.

    Attributes
    ----------
    flatbuffer : bytes
        The converted model (signature ``infer(x) -> logits``), weights stored as constants.
    patches : tuple of (int, np.ndarray)
        ``(offset, source)`` per weight tensor: the float32 values at byte ``offset`` of the
        flatbuffer are ``flat[source]`` for a flat vector ``flat`` in the model's layout (the
        converter may transpose a tensor, e.g. dense kernels to ``[out, in]``).
    layout : WeightLayout
        The layout of the flat vectors.
    """

    flatbuffer: bytes
    patches: tuple[tuple[int, np.ndarray], ...]
    layout: WeightLayout

    def with_weights(self, flat: np.ndarray) -> bytes:
        """The flatbuffer with ``flat``'s values written over the constant weights."""
        vec = np.ascontiguousarray(flat, dtype="<f4")
        if vec.shape != (self.layout.size,):
            raise ValueError(f"weights of shape {vec.shape}, expected ({self.layout.size},)")
        buf = bytearray(self.flatbuffer)
        for offset, source in self.patches:
            values = vec[source]
            buf[offset : offset + values.nbytes] = values.tobytes()
        return bytes(buf)


#: Probe values must be exact in float32 (integers up to 2**24).
_MAX_FROZEN_PARAMETERS = 1 << 24


def export_litert_frozen(model: Any) -> FrozenExport:
    """Convert ``model`` with its weights as constants and locate every weight in the result.

    The model is converted once with probe weights ``1, 2, ..., d`` (its own weights are
    restored afterwards). Each constant float32 tensor of the result that holds probe values is
    found in the flatbuffer's bytes; its values name the flat index each element came from.
    Every index must appear exactly once, otherwise the converter changed the weights (e.g. by
    folding) and :class:`LiteRTExportError` is raised.

    Constant weights let the runtime's CPU delegate (XNNPACK) pack them once per interpreter,
    which makes the SIREN CNN's inference about 3.5x faster than reading resource variables.
    Complexity: one conversion (about a second for the SIREN CNN).
    """
    quiet_tensorflow()
    import tensorflow as tf

    layout = layout_of(model)
    d = layout.size
    if d >= _MAX_FROZEN_PARAMETERS:
        raise LiteRTExportError(f"{d} parameters: too many to locate by probe values")
    input_shape = [None, *(int(s) for s in model.input_shape[1:])]
    original = get_flat_weights(model)
    set_flat_weights(model, np.arange(1, d + 1, dtype=np.float32))
    try:
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )

        @tf.function(input_signature=[tf.TensorSpec(input_shape, tf.float32, name="x")])
        def infer(x: Any) -> dict[str, Any]:
            return {"logits": model(x, training=False)}

        frozen = convert_variables_to_constants_v2(infer.get_concrete_function())
        # The converter warns that it was given no trackable object: a frozen graph has none
        # to give (the weights are constants of the function).
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
        finally:
            absl.setLevel(level)
        flatbuffer = bytes(converter.convert())
    finally:
        set_flat_weights(model, original)
    return FrozenExport(flatbuffer, _locate_weights(flatbuffer, d), layout)


def _locate_weights(flatbuffer: bytes, d: int) -> tuple[tuple[int, np.ndarray], ...]:
    """Locate the probe-valued constant tensors of ``flatbuffer`` (:func:`export_litert_frozen`)."""
    with native_stderr_silenced():
        interpreter = _interpreter_class()(model_content=flatbuffer)
        interpreter.allocate_tensors()
    patches = []
    covered = np.zeros(d, dtype=np.int64)
    for detail in interpreter.get_tensor_details():
        if detail["dtype"] != np.float32 or not detail["shape"].size:
            continue
        try:
            values = np.asarray(interpreter.get_tensor(detail["index"]), dtype=np.float32)
        except ValueError:
            continue
        if values.size == 0 or not np.all(np.isfinite(values)):
            continue
        if values.min() < 1 or values.max() > d:
            continue
        if not np.array_equal(values, np.round(values)):
            continue
        raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
        offset = flatbuffer.find(raw)
        if offset < 0 or flatbuffer.find(raw, offset + 1) >= 0:
            continue
        source = values.ravel().astype(np.int64) - 1
        covered[source] += 1
        patches.append((offset, source))
    if not np.all(covered == 1):
        raise LiteRTExportError(
            f"{int(np.sum(covered == 0))} of {d} weights not found once in the converted model"
        )
    return tuple(patches)


#: Inference batch of :class:`FrozenLiteRTEvaluator`. Small batches keep the activations in
#: cache: load + 600 SIREN-CNN images on one core took 55 ms at 100, 68 ms at 256 and 111 ms as
#: one batch of 600 (whose first run also pays for a 50 MB activation arena).
FROZEN_BATCH = 100


class FrozenLiteRTEvaluator(_Evaluator):
    """LiteRT evaluation with the weights written into the flatbuffer as constants per load.

    Every :meth:`load` patches a copy of the flatbuffer (:meth:`FrozenExport.with_weights`) and
    opens a fresh interpreter on it; the CPU delegate packs the weights on the first run. For the
    SIREN CNN this costs a few milliseconds and makes inference several times faster than
    :class:`LiteRTEvaluator`, whose weights live in resource variables the delegate cannot pack.

    Parameters
    ----------
    export : FrozenExport
        Output of :func:`export_litert_frozen`.
    num_threads : int
        Interpreter threads (1 on a single-core budget).
    """

    backend = "litert"

    def __init__(self, export: FrozenExport, num_threads: int = 1) -> None:
        self._interpreter_cls = _interpreter_class()
        self.export = export
        self.layout = export.layout
        self.num_threads = num_threads
        self._interpreter: Any = None
        self._batch = -1

    @classmethod
    def from_model(cls, model: Any, num_threads: int = 1) -> FrozenLiteRTEvaluator:
        """Export ``model`` and build an evaluator for it."""
        return cls(export_litert_frozen(model), num_threads=num_threads)

    def load(self, weights: np.ndarray) -> None:
        """Open an interpreter whose constant weights are ``weights``."""
        content = self.export.with_weights(weights)
        # The first run applies the CPU delegate, which the runtime announces on stderr.
        with native_stderr_silenced():
            self._interpreter = self._interpreter_cls(
                model_content=content, num_threads=self.num_threads
            )
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = -1

    def _run(self, batch: np.ndarray) -> np.ndarray:
        interpreter = self._interpreter
        if len(batch) != self._batch:
            interpreter.resize_tensor_input(self._input, list(batch.shape))
            with native_stderr_silenced():
                interpreter.allocate_tensors()
            self._batch = len(batch)
        interpreter.set_tensor(self._input, batch)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(self._output))

    def logits(self, x: np.ndarray, batch_size: int = FROZEN_BATCH) -> np.ndarray:
        """Logits of the currently loaded weights on ``x``, :data:`FROZEN_BATCH` at a time."""
        if self._interpreter is None:
            raise RuntimeError("load() weights before asking for logits")
        return self._batched(self._run, x, batch_size)


class KerasEvaluator(_Evaluator):
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
        return self._batched(lambda b: self.model(b, training=False), x, batch_size)


def litert_evaluator(model: Any, num_threads: int = 1, frozen: bool | None = None) -> Any:
    """A LiteRT evaluator for ``model``: :class:`FrozenLiteRTEvaluator` or :class:`LiteRTEvaluator`.

    ``frozen=None`` picks frozen weights for models with convolutions, where the CPU delegate's
    packed weights make inference 2-4x faster; for small dense models a fresh interpreter per
    load costs more than it saves (measured: digits MLP 0.9 ms vs 0.2 ms per load and 600
    images). A model whose converted weights cannot all be located falls back to variables.
    """
    if frozen is None:
        frozen = any("conv" in type(layer).__name__.lower() for layer in model.layers)
    if frozen:
        try:
            return FrozenLiteRTEvaluator.from_model(model, num_threads=num_threads)
        except LiteRTExportError:
            pass
    return LiteRTEvaluator.from_model(model, num_threads=num_threads)


def make_evaluator(model: Any, prefer: str = "litert", num_threads: int = 1) -> Any:
    """A LiteRT evaluator when available and preferred, else the Keras fallback."""
    if prefer == "litert" and litert_available():
        return litert_evaluator(model, num_threads=num_threads)
    return KerasEvaluator(model)


def save_flatbuffer(flatbuffer: bytes, path: Path) -> None:
    """Write a flatbuffer to disk (for flashing a board image)."""
    Path(path).write_bytes(flatbuffer)


__all__ = [
    "FrozenExport",
    "FrozenLiteRTEvaluator",
    "KerasEvaluator",
    "LiteRTEvaluator",
    "export_litert",
    "export_litert_frozen",
    "get_flat_weights",
    "interpreter_class",
    "litert_available",
    "litert_evaluator",
    "make_evaluator",
    "save_flatbuffer",
]
