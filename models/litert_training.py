"""Convert a zoo model's training step to LiteRT with builtin operators only (TensorFlow side).

The stock LiteRT runtimes (``ai-edge-litert``, ``tflite-runtime``) run only TFLite's builtin
operators. A Keras training step converted as it is needs TensorFlow's own kernels ("Flex"
ops), which those wheels do not include: the cross-entropy's ``SparseSoftmaxCrossEntropyWithLogits``
and ``ReluGrad`` for every model, ``Conv2DBackpropFilter`` and ``MaxPoolGrad`` for the CNNs
(:func:`flex_ops_of_keras_step` records them). This module writes the backward pass by hand
from builtin operators only (:mod:`models.litert_graph`, on the layers and blocks of
:mod:`models.litert_plan`):

* ReLU: the incoming gradient where the layer's output is positive (``ReluGrad``'s rule).
* Convolution (stride 1, ``valid`` or ``same``): patches times a matrix; the filter gradient
  ``patches^T @ dy``, the bias gradient sums ``dy``, the input gradient ``dy @ W^T`` added back
  where each patch was cut.
* Max pooling (window = stride, ``valid``): the gradient goes to the *first* position
  (row-major) of each window equal to its maximum, as ``MaxPoolGrad`` does.
* Dense: two matrix products and a sum.
* Loss: the mean sparse cross-entropy of the logits, from ``LOG_SOFTMAX`` and ``ONE_HOT``;
  its gradient ``(softmax - onehot) · w / Σw``.

The forward pass applies the same operations as the Keras layers (convolution, bias add,
activation, pooling, matrix product), so the logits equal the Keras model's up to rounding.
The optimizer (Keras' Adam or SGD, same formulas and constants) updates resource variables
inside the graph. The result is a :class:`~models.litert_artifact.TrainingArtifact`; boards
run it with :class:`~models.litert_trainer.LiteRTTrainer`, without TensorFlow.

Signatures of the training flatbuffer (``B`` is the batch size, ``d`` the flat weight size)::

    train(x: f32[B, *input], y: i32[B], weight: f32[B], learning_rate: f32[1])
        -> {"loss": f32[]}          # one optimizer step on the weighted mean loss
    gradient(x, y, weight) -> {"gradient": f32[d], "loss": f32[]}   # no update
    infer(x: f32[B, *input]) -> {"logits": f32[B, C]}
    get_weights() -> {"weights": f32[d]}
    set_weights(flat: f32[d]) -> {"ok": i32[]}
    reset_optimizer() -> {"ok": i32[]}     # step counter and slots to zero

``weight`` is 1 for a real sample and 0 for padding, so a short last batch can be padded to
``B`` (the interpreter then never reallocates); the loss and gradient are the mean over the
real samples, as Keras' ``sum_over_batch_size`` is over an unpadded batch.
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

import numpy as np

from models.errors import LiteRTExportError
from models.litert_artifact import ARTIFACT_VERSION, TrainingArtifact
from models.litert_graph import Graph
from models.litert_plan import plan_layers
from models.tf_setup import native_stderr_silenced, quiet_tensorflow
from models.training import OPTIMIZERS
from models.weights import layout_of

#: Keras' Adam defaults (keras.optimizers.Adam), which the boards use.
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7

#: The signatures of a training flatbuffer.
SIGNATURES = ("train", "gradient", "infer", "get_weights", "set_weights", "reset_optimizer")


def _loss_and_dlogits(tf: Any, logits: Any, y: Any, weight: Any, num_classes: int) -> Any:
    """Weighted mean sparse cross-entropy of ``logits`` and its gradient w.r.t. the logits."""
    onehot = tf.one_hot(y, num_classes, dtype=tf.float32)
    per_sample = -tf.reduce_sum(onehot * tf.nn.log_softmax(logits), axis=1)
    total = tf.maximum(tf.reduce_sum(weight), 1e-12)
    scale = weight / total
    loss = tf.reduce_sum(per_sample * scale)
    dlogits = (tf.nn.softmax(logits) - onehot) * tf.expand_dims(scale, 1)
    return loss, dlogits


def _training_module(model: Any, optimizer: str, momentum: float) -> Any:
    """A ``tf.Module`` with the training signatures over resource variables."""
    quiet_tensorflow()
    import tensorflow as tf

    steps = plan_layers(model)
    kernels = {
        s.kernel: tuple(int(d) for d in model.weights[s.kernel].shape)
        for s in steps
        if s.kind == "conv"
    }
    graph = Graph(steps, tf, tuple(int(d) for d in model.input_shape[1:]), kernels)
    layout = layout_of(model)
    sizes = [int(n) for n in layout.sizes]
    shapes = [list(shape) for _, shape in layout.entries]
    input_shape = [None, *(int(s) for s in model.input_shape[1:])]
    num_classes = int(model.output_shape[-1])
    x_spec = tf.TensorSpec(input_shape, tf.float32, name="x")
    y_spec = tf.TensorSpec([None], tf.int32, name="y")
    w_spec = tf.TensorSpec([None], tf.float32, name="weight")
    # A one-element vector, not a scalar: LiteRT's aarch64 build crashed on a 0-d float input
    # (ai-edge-litert 2.3 under QEMU; the same graph with a [1] input runs).
    lr_spec = tf.TensorSpec([1], tf.float32, name="learning_rate")
    use_momentum = optimizer == "sgd" and momentum != 0.0

    class TrainingModule(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.params = [
                tf.Variable(np.asarray(w, dtype=np.float32), name=f"w{i}")
                for i, w in enumerate(model.get_weights())
            ]
            zeros = [np.zeros(shape, dtype=np.float32) for shape in shapes]
            self.slots_m = [tf.Variable(z, name=f"m{i}") for i, z in enumerate(zeros)]
            self.slots_v = [tf.Variable(z, name=f"v{i}") for i, z in enumerate(zeros)]
            self.step = tf.Variable(0.0, dtype=tf.float32, name="step")

        def _values(self) -> list[Any]:
            return [p.read_value() for p in self.params]

        def _gradients(self, x: Any, y: Any, weight: Any) -> tuple[Any, list[Any]]:
            values = self._values()
            logits, saved = graph.forward(values, x)
            loss, dlogits = _loss_and_dlogits(tf, logits, y, weight, num_classes)
            return loss, graph.backward(values, saved, dlogits)

        def _apply(self, grads: list[Any], lr: Any) -> None:
            if optimizer == "adam":
                t = self.step.read_value() + 1.0
                self.step.assign(t)
                b1_power = tf.pow(tf.constant(ADAM_BETA_1, tf.float32), t)
                b2_power = tf.pow(tf.constant(ADAM_BETA_2, tf.float32), t)
                alpha = lr * tf.sqrt(1.0 - b2_power) / (1.0 - b1_power)
                for p, m, v, g in zip(self.params, self.slots_m, self.slots_v, grads):
                    m_new = m.read_value() + (g - m.read_value()) * (1.0 - ADAM_BETA_1)
                    v_new = v.read_value() + (tf.square(g) - v.read_value()) * (1.0 - ADAM_BETA_2)
                    m.assign(m_new)
                    v.assign(v_new)
                    p.assign(p.read_value() - (m_new * alpha) / (tf.sqrt(v_new) + ADAM_EPSILON))
            elif use_momentum:
                for p, m, g in zip(self.params, self.slots_m, grads):
                    m_new = m.read_value() * momentum - g * lr
                    m.assign(m_new)
                    p.assign(p.read_value() + m_new)
            else:
                for p, g in zip(self.params, grads):
                    p.assign(p.read_value() - g * lr)

        @tf.function(input_signature=[x_spec, y_spec, w_spec, lr_spec])
        def train(self, x: Any, y: Any, weight: Any, learning_rate: Any) -> dict[str, Any]:
            loss, grads = self._gradients(x, y, weight)
            self._apply(grads, learning_rate)
            return {"loss": loss}

        @tf.function(input_signature=[x_spec, y_spec, w_spec])
        def gradient(self, x: Any, y: Any, weight: Any) -> dict[str, Any]:
            loss, grads = self._gradients(x, y, weight)
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
            return {"gradient": flat, "loss": loss}

        @tf.function(input_signature=[x_spec])
        def infer(self, x: Any) -> dict[str, Any]:
            logits, _ = graph.forward(self._values(), x)
            return {"logits": logits}

        @tf.function(input_signature=[])
        def get_weights(self) -> dict[str, Any]:
            return {"weights": tf.concat([tf.reshape(v, [-1]) for v in self._values()], axis=0)}

        @tf.function(input_signature=[tf.TensorSpec([layout.size], tf.float32, name="flat")])
        def set_weights(self, flat: Any) -> dict[str, Any]:
            for var, part, shape in zip(self.params, tf.split(flat, sizes), shapes):
                var.assign(tf.reshape(part, shape))
            return {"ok": tf.constant(1, dtype=tf.int32)}

        @tf.function(input_signature=[])
        def reset_optimizer(self) -> dict[str, Any]:
            self.step.assign(0.0)
            for m, v in zip(self.slots_m, self.slots_v):
                m.assign(tf.zeros_like(m))
                v.assign(tf.zeros_like(v))
            return {"ok": tf.constant(1, dtype=tf.int32)}

    return TrainingModule()


def _convert(module: Any, signatures: dict[str, Any], builtins_only: bool = True) -> bytes:
    """Save ``module`` with ``signatures`` and convert it, with builtin operators only."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="siren-litert-train-") as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.experimental_enable_resource_variables = True
        if builtins_only:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        else:
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS,
                tf.lite.OpsSet.SELECT_TF_OPS,
            ]
        return bytes(converter.convert())


def export_litert_training(
    model: Any,
    *,
    model_name: str,
    optimizer: str = "adam",
    momentum: float = 0.0,
    with_frozen_inference: bool | None = None,
) -> TrainingArtifact:
    """Convert ``model``'s training step to a builtin-only LiteRT :class:`TrainingArtifact`.

    Parameters
    ----------
    model : keras.Model
        A built zoo model; its current weights become the variables' initial values.
    model_name : str
        Its zoo name (recorded in the artifact; the board checks it against its settings).
    optimizer : {"adam", "sgd"}
        The boards' optimizer, run inside the graph (Keras' formulas and default constants).
    momentum : float
        SGD momentum (a constant of the artifact).
    with_frozen_inference : bool, optional
        Also carry a constant-weight inference flatbuffer
        (:func:`models.litert.export_litert_frozen`) for the alarm; default: for models with
        convolutions, where it is several times faster than reading variables.

    Raises
    ------
    LiteRTExportError
        A layer without a builtin-only gradient, or a conversion that needs non-builtin ops.
    ValueError
        An unknown optimizer.

    Complexity: one SavedModel write and one conversion (a few seconds for the SIREN CNN).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    quiet_tensorflow()
    import tensorflow as tf

    module = _training_module(model, optimizer, float(momentum))
    signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
    try:
        flatbuffer = _convert(module, signatures)
    except Exception as exc:  # the converter raises ConverterError with the missing ops
        raise LiteRTExportError(
            f"{model_name}: training step does not convert with builtin ops only: "
            f"{', '.join(flex_ops_in_message(str(exc))) or str(exc)[-400:]}"
        ) from exc
    frozen = None
    if with_frozen_inference is None:
        with_frozen_inference = any(s.kind == "conv" for s in plan_layers(model))
    if with_frozen_inference:
        from models.litert import export_litert_frozen

        try:
            frozen = export_litert_frozen(model)
        except LiteRTExportError:
            frozen = None
    return TrainingArtifact(
        version=ARTIFACT_VERSION,
        model=model_name,
        input_shape=tuple(int(s) for s in model.input_shape[1:]),
        num_classes=int(model.output_shape[-1]),
        optimizer=optimizer,
        momentum=float(momentum),
        layout=layout_of(model),
        train_flatbuffer=flatbuffer,
        frozen=frozen,
        built_with=f"tensorflow {tf.__version__}",
    )


def flex_ops_in_message(message: str) -> list[str]:
    """The TensorFlow ops a converter error says are neither builtin nor custom, sorted."""
    found = re.search(r"TF Select ops: ([^\n]+)", message)
    if found:
        return sorted({op.strip() for op in found.group(1).split(",") if op.strip()})
    return sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", message)))


def flex_ops_of_keras_step(model: Any, optimizer: str = "adam") -> list[str]:
    """The non-builtin ops a plain Keras training step of ``model`` needs (empty: none).

    The step is what :class:`models.training.Trainer` runs: Keras' sparse cross-entropy from
    logits, ``tf.GradientTape`` and the Keras optimizer, converted with ``TFLITE_BUILTINS`` only.
    Used to record why :func:`export_litert_training` writes its own backward pass.
    """
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    opt = keras.optimizers.Adam(1e-3) if optimizer == "adam" else keras.optimizers.SGD(0.05)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    input_shape = [None, *(int(s) for s in model.input_shape[1:])]

    class KerasStep(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.opt = opt

        @tf.function(
            input_signature=[
                tf.TensorSpec(input_shape, tf.float32),
                tf.TensorSpec([None], tf.int64),
            ]
        )
        def train(self, x: Any, y: Any) -> dict[str, Any]:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, self.net(x, training=True))
            grads = tape.gradient(loss, self.net.trainable_variables)
            self.opt.apply_gradients(zip(grads, self.net.trainable_variables))
            return {"loss": loss}

    module = KerasStep()
    try:
        with native_stderr_silenced():  # the converter prints every op it cannot convert
            _convert(module, {"train": module.train.get_concrete_function()})
    except Exception as exc:
        ops = flex_ops_in_message(str(exc))
        if not ops:
            raise
        return ops
    return []


__all__ = [
    "SIGNATURES",
    "export_litert_training",
    "flex_ops_in_message",
    "flex_ops_of_keras_step",
    "plan_layers",
]
