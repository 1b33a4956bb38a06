"""Convert a zoo model's training step to LiteRT with builtin operators only (TensorFlow side).

The stock LiteRT runtimes (``ai-edge-litert``, ``tflite-runtime``) run only TFLite's builtin
operators. A Keras training step converted as it is needs TensorFlow's own kernels ("Flex"
ops), which those wheels do not include: the cross-entropy's ``SparseSoftmaxCrossEntropyWithLogits``
and ``ReluGrad`` for every model, ``Conv2DBackpropFilter`` and ``MaxPoolGrad`` for the CNNs
(:func:`flex_ops_of_keras_step` records them). This module writes the backward pass by hand,
layer by layer, from builtin operators only:

* ReLU: the incoming gradient where the layer's output is positive (a comparison and a select;
  ``ReluGrad`` does the same with the output as its ``features``).
* Convolution (stride 1, ``valid`` or ``same``): the filter gradient is ``patches^T @ dy``, the
  patches cut from the (padded) input by ``kh·kw`` slices and concatenated along the channels
  in the kernel's ``[kh, kw, c_in]`` order; the bias gradient sums ``dy``; the input gradient is
  a transposed convolution (TFLite ``TRANSPOSE_CONV``).
* Max pooling (window = stride, ``valid``): each of the ``ph·pw`` window positions is a strided
  slice; the gradient goes to the *first* position (row-major) equal to the pooled maximum,
  as ``MaxPoolGrad`` does, and the positions are interleaved back by stack and reshape.
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
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import LiteRTExportError
from models.litert_artifact import ARTIFACT_VERSION, TrainingArtifact
from models.tf_setup import native_stderr_silenced, quiet_tensorflow
from models.training import OPTIMIZERS
from models.weights import layout_of

#: Keras' Adam defaults (keras.optimizers.Adam), which the boards use.
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7

#: The signatures of a training flatbuffer.
SIGNATURES = ("train", "gradient", "infer", "get_weights", "set_weights", "reset_optimizer")


@dataclass(frozen=True)
class _Layer:
    """One step of the forward pass: ``kind`` and what it needs.

    ``kind`` is ``conv``, ``dense``, ``pool`` or ``flatten``; ``kernel``/``bias`` index the
    model's weights (``-1``: none); ``relu`` says whether a ReLU follows; ``padding`` is
    ``VALID`` or ``SAME``; ``pool`` the pooling window (= its strides).
    """

    kind: str
    name: str
    kernel: int = -1
    bias: int = -1
    relu: bool = False
    padding: str = "VALID"
    pool: tuple[int, int] = (1, 1)


def _activation(layer: Any) -> bool:
    name = getattr(layer.activation, "__name__", str(layer.activation))
    if name == "relu":
        return True
    if name == "linear":
        return False
    raise LiteRTExportError(f"layer {layer.name!r}: activation {name!r} is not supported")


def plan_layers(model: Any) -> list[_Layer]:
    """The forward pass of a Sequential Keras model as :class:`_Layer` steps.

    Supported: ``Conv2D`` (stride 1, no dilation, ``valid``/``same``, ReLU or linear),
    ``MaxPooling2D`` (window = strides, ``valid``), ``Flatten``, ``Dense`` (ReLU or linear):
    every layer of the zoo.

    Raises
    ------
    LiteRTExportError
        For any other layer or setting (the message names the layer).
    """
    index = {id(w): i for i, w in enumerate(model.weights)}
    steps: list[_Layer] = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            if tuple(layer.strides) != (1, 1) or tuple(layer.dilation_rate) != (1, 1):
                raise LiteRTExportError(f"layer {layer.name!r}: only stride 1, no dilation")
            if layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1:
                raise LiteRTExportError(f"layer {layer.name!r}: only channels_last, one group")
            steps.append(
                _Layer(
                    "conv",
                    layer.name,
                    kernel=index[id(layer.kernel)],
                    bias=index[id(layer.bias)] if layer.use_bias else -1,
                    relu=_activation(layer),
                    padding=str(layer.padding).upper(),
                )
            )
        elif kind == "Dense":
            steps.append(
                _Layer(
                    "dense",
                    layer.name,
                    kernel=index[id(layer.kernel)],
                    bias=index[id(layer.bias)] if layer.use_bias else -1,
                    relu=_activation(layer),
                )
            )
        elif kind == "MaxPooling2D":
            pool = tuple(int(p) for p in layer.pool_size)
            if tuple(layer.strides) != pool or str(layer.padding).lower() != "valid":
                raise LiteRTExportError(
                    f"layer {layer.name!r}: only windows equal to their strides, valid padding"
                )
            if layer.data_format != "channels_last":
                raise LiteRTExportError(f"layer {layer.name!r}: only channels_last")
            steps.append(_Layer("pool", layer.name, pool=(pool[0], pool[1])))
        elif kind == "Flatten":
            steps.append(_Layer("flatten", layer.name))
        else:
            raise LiteRTExportError(
                f"layer {layer.name!r} of type {kind} has no builtin-only gradient; supported: "
                "Conv2D, MaxPooling2D, Flatten, Dense"
            )
    used = sorted(i for s in steps for i in (s.kernel, s.bias) if i >= 0)
    if used != list(range(len(model.weights))):
        raise LiteRTExportError("the model holds weights outside its Conv2D and Dense layers")
    return steps


#: Patches are cut by a constant one-hot convolution when a patch has at most this many values
#: (its cost grows with their square); by slices and a concatenation otherwise. Measured on the
#: SIREN CNN (batch 64, one core): conv1's 9-value patches 0.17 ms by convolution, 1.2 ms by
#: slices; conv2's 288-value patches 5.8 ms by convolution, 1.35 ms by slices.
ONE_HOT_PATCHES_MAX = 32


class _Graph:
    """Forward and hand-written backward pass of a planned model (TensorFlow ops).

    Written for the speed of TFLite's CPU kernels as much as for builtin-only conversion:
    convolutions run as patches times a matrix (``BATCH_MATMUL``, which the XNNPACK delegate
    runs with variable weights; ``CONV_2D`` with a variable filter is 4-6x slower), and every
    product whose right operand is transposed goes through :meth:`_transposed`, since the
    converter turns ``a @ b^T`` into a ``FULLY_CONNECTED`` that is 4x slower with variable
    weights.
    """

    def __init__(self, steps: list[_Layer], tf: Any) -> None:
        self.steps = steps
        self.tf = tf

    # -- forward ----------------------------------------------------------------------------

    def forward(self, params: list[Any], x: Any) -> tuple[Any, list[dict[str, Any]]]:
        """Logits, and for each step what its backward pass needs."""
        tf = self.tf
        saved: list[dict[str, Any]] = []
        for s in self.steps:
            keep: dict[str, Any] = {"input": x}
            if s.kind == "conv":
                kernel = params[s.kernel]
                kh, kw, cin, cout = (int(d) for d in kernel.shape)
                patches = self._patches(x, kh, kw, cin, s.padding)
                ho, wo = int(patches.shape[1]), int(patches.shape[2])
                cols = tf.reshape(patches, [-1, kh * kw * cin])
                x = tf.matmul(cols, tf.reshape(kernel, [kh * kw * cin, cout]))
                keep["cols"] = cols
                keep["spatial"] = (ho, wo, cout)
            elif s.kind == "dense":
                x = tf.matmul(x, params[s.kernel])
            elif s.kind == "pool":
                x = tf.nn.max_pool2d(x, s.pool, s.pool, "VALID")
            else:
                x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])
            if s.bias >= 0:
                x = x + params[s.bias]
            if s.relu:
                x = tf.nn.relu(x)
            if s.kind == "conv":
                ho, wo, cout = keep["spatial"]
                x = tf.reshape(x, [-1, ho, wo, cout])
            keep["output"] = x
            saved.append(keep)
        return x, saved

    def _patches(self, x: Any, kh: int, kw: int, cin: int, padding: str) -> Any:
        """``[N, Ho, Wo, kh·kw·cin]``: the input window of every output position, in the
        kernel's ``[kh, kw, c_in]`` order (zero padded for ``SAME``)."""
        tf = self.tf
        size = kh * kw * cin
        if size <= ONE_HOT_PATCHES_MAX:
            one_hot = np.eye(size, dtype=np.float32).reshape(kh, kw, cin, size)
            return tf.nn.conv2d(x, tf.constant(one_hot), strides=1, padding=padding)
        if padding == "SAME":
            top, bottom = self._same_padding(kh)
            left, right = self._same_padding(kw)
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        ho, wo = int(x.shape[1]) - kh + 1, int(x.shape[2]) - kw + 1
        return tf.concat(
            [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=3
        )

    @staticmethod
    def _same_padding(size: int) -> tuple[int, int]:
        """TensorFlow's ``SAME`` padding of a stride-1 window of ``size``: (before, after)."""
        total = size - 1
        return total // 2, total - total // 2

    def _transposed(self, matrix: Any) -> Any:
        """``matrix^T`` by way of a 3-D transpose, which the converter leaves a ``TRANSPOSE``
        feeding a ``BATCH_MATMUL`` (a 2-D one becomes a slow variable ``FULLY_CONNECTED``)."""
        tf = self.tf
        rows, cols = (int(d) for d in matrix.shape)
        cube = tf.transpose(tf.reshape(matrix, [rows, 1, cols]), [2, 1, 0])
        return tf.reshape(cube, [cols, rows])

    # -- backward ---------------------------------------------------------------------------

    def backward(self, params: list[Any], saved: list[dict[str, Any]], dlogits: Any) -> list[Any]:
        """Gradients of every weight, in the model's weight order."""
        tf = self.tf
        grads: list[Any] = [None] * len(params)
        dy = dlogits
        relu_applied = False  # a max pooling already kept only positive maxima
        for position in range(len(self.steps) - 1, -1, -1):
            s = self.steps[position]
            keep = saved[position]
            # Nothing before this step has weights: its input gradient is not needed.
            need_dx = any(earlier.kernel >= 0 for earlier in self.steps[:position])
            if s.relu and not relu_applied:
                dy = tf.where(keep["output"] > 0, dy, tf.zeros_like(dy))
            relu_applied = False
            dx = None
            if s.kind == "dense":
                if s.bias >= 0:
                    grads[s.bias] = tf.reduce_sum(dy, axis=0)
                grads[s.kernel] = tf.matmul(keep["input"], dy, transpose_a=True)
                if need_dx:
                    dx = tf.matmul(dy, self._transposed(params[s.kernel]))
            elif s.kind == "conv":
                dx = self._conv_backward(params, s, keep, dy, grads, need_dx)
            elif s.kind == "pool":
                before = self.steps[position - 1] if position > 0 else None
                if before is not None and before.relu:
                    # The gradient reaches only each window's maximum, which is the pooled
                    # value: ReLU's mask there is `pooled > 0`, applied at a quarter the size.
                    dy = tf.where(keep["output"] > 0, dy, tf.zeros_like(dy))
                    relu_applied = True
                dx = self._pool_backward(keep["input"], keep["output"], dy, s.pool)
            else:
                dx = tf.reshape(dy, [-1, *(int(d) for d in keep["input"].shape[1:])])
            if not need_dx:
                break
            dy = dx
        return grads

    def _conv_backward(
        self,
        params: list[Any],
        s: _Layer,
        keep: dict[str, Any],
        dy: Any,
        grads: list[Any],
        need_dx: bool,
    ) -> Any:
        """Filter and bias gradients into ``grads``; the input gradient when ``need_dx``."""
        tf = self.tf
        kernel = params[s.kernel]
        kh, kw, cin, cout = (int(d) for d in kernel.shape)
        size = kh * kw * cin
        flat_dy = tf.reshape(dy, [-1, cout])
        if s.bias >= 0:
            grads[s.bias] = tf.reduce_sum(flat_dy, axis=0)
        grads[s.kernel] = tf.reshape(
            tf.matmul(keep["cols"], flat_dy, transpose_a=True), [kh, kw, cin, cout]
        )
        if not need_dx:
            return None
        ho, wo, _ = keep["spatial"]
        # The gradient of each patch value, then every patch added back where it was cut.
        dcols = tf.matmul(flat_dy, self._transposed(tf.reshape(kernel, [size, cout])))
        dcols = tf.reshape(dcols, [-1, ho, wo, size])
        h, w = (int(d) for d in keep["input"].shape[1:3])
        full_h, full_w = ho + kh - 1, wo + kw - 1
        # A chain of ADDs (XNNPACK) is 30% faster here than one ADD_N (TFLite's own kernel).
        dx: Any = None
        for i in range(kh):
            for j in range(kw):
                k = (i * kw + j) * cin
                part = tf.pad(
                    dcols[:, :, :, k : k + cin], [[0, 0], [i, kh - 1 - i], [j, kw - 1 - j], [0, 0]]
                )
                dx = part if dx is None else dx + part
        if (full_h, full_w) != (h, w):  # SAME: drop the padding's gradient
            top, left = self._same_padding(kh)[0], self._same_padding(kw)[0]
            dx = dx[:, top : top + h, left : left + w, :]
        return dx

    def _pool_backward(self, x: Any, pooled: Any, dy: Any, pool: tuple[int, int]) -> Any:
        """``MaxPoolGrad``: each window's gradient goes to its first maximum (row-major)."""
        tf = self.tf
        ph, pw = pool
        h, w, c = (int(d) for d in x.shape[1:])
        ho, wo = int(pooled.shape[1]), int(pooled.shape[2])
        if (ho * ph, wo * pw) != (h, w):
            x = x[:, : ho * ph, : wo * pw, :]
        if ph == pw:
            blocks = tf.nn.space_to_depth(x, ph)  # window position k at channels k·c..(k+1)·c
            windows = [blocks[:, :, :, k * c : (k + 1) * c] for k in range(ph * pw)]
        else:
            windows = [
                x[:, i : ho * ph : ph, j : wo * pw : pw, :] for i in range(ph) for j in range(pw)
            ]
        # `rest` is the gradient not yet given to an earlier maximum; sign(pooled - value) is 0
        # exactly where the window holds the maximum (pooled >= value) and 1 elsewhere.
        rest = dy
        parts = []
        for k, window in enumerate(windows):
            if k == len(windows) - 1:
                parts.append(rest)
                break
            miss = tf.sign(pooled - window)
            kept = rest * miss
            parts.append(rest - kept)
            rest = kept
        if ph == pw:
            dx = tf.nn.depth_to_space(tf.concat(parts, axis=3), ph)
        else:
            rows = [
                tf.reshape(tf.stack(parts[i * pw : (i + 1) * pw], axis=3), [-1, ho, wo * pw, c])
                for i in range(ph)
            ]
            dx = tf.reshape(tf.stack(rows, axis=2), [-1, ho * ph, wo * pw, c])
        if (ho * ph, wo * pw) != (h, w):
            dx = tf.pad(dx, [[0, 0], [0, h - ho * ph], [0, w - wo * pw], [0, 0]])
        return dx


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
    graph = _Graph(steps, tf)
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
