"""Forward and hand-written backward pass of a LiteRT training graph (TensorFlow ops).

Used by :mod:`models.litert_training` to build the ``train``, ``gradient`` and ``infer``
signatures of a training artifact from TFLite builtin operators only, and written for the speed
of the stock runtime on one core as much as for builtin-only conversion. What XNNPACK (the
runtime's CPU delegate) runs fast, and what it does not, decides the shape of the graph:

* Products of two variable operands run as ``BATCH_MATMUL`` (XNNPACK packs the right operand on
  every call; ``CONV_2D``, ``TRANSPOSE_CONV`` and ``FULLY_CONNECTED`` with a variable filter fall
  back to TFLite's own kernels, 4-6x slower). So a convolution is patches times a matrix, its
  filter gradient ``patches^T @ dy`` and its input gradient ``dy @ W^T`` added back where each
  patch was cut. A product with a transposed right operand goes through :meth:`_transposed`.
* Patches of a small kernel (at most :data:`~models.litert_plan.ONE_HOT_PATCHES_MAX` values)
  come from a constant one-hot ``CONV_2D``, which XNNPACK runs as an ordinary convolution;
  larger ones from one ``GATHER`` of input pixels with constant indices (TFLite's kernel copies
  whole pixels; nine slices and a concatenation copy everything twice).
* Comparisons and selections (``GREATER``, ``SELECT_V2``, ``SIGN``, ``CAST``) are not delegated;
  masks are built from ``SUB``/``MUL`` with a fused clamp to ``[-1, 1]`` instead: for
  ``d >= 0``, ``clamp(d · 2^126)`` is 0 when ``d`` is zero and 1 when ``d >= 2^-126``
  (products past the largest float saturate to 1). A positive difference of two float32 values
  is below ``2^-126`` only when both are below ``2^-102`` in magnitude, and an activation is
  below ``2^-126`` only when it is a subnormal: neither happens in a trained network.
* XNNPACK reshapes a tensor in place only when the reshape is its one reader and the result has
  one reader; any other reshape is a copy. Products are reshaped straight after they are made,
  the gathered patches are reshaped by TFLite (a row count computed at run time keeps that
  reshape out of the delegate) and a gather reads its producer's ``[N·H·W, C]`` rows.

Per layer:

* ReLU: the incoming gradient times ``clamp(out · 2^126)`` (``out > 0``, as ``ReluGrad``).
* Convolution (stride 1, ``valid`` or ``same``, by explicit padding): as above; the input
  gradient is one product per kernel position (``dy @ W[i, j]^T``), each padded to where its
  patches were cut and added up. Followed by a max pooling, the first layer of a model (no input
  gradient) is computed once per position of the pooling window -- ``ph·pw`` products of strided
  one-hot patches -- and the pooled maximum is the ``MAXIMUM`` of their outputs, so its
  full-resolution output is never written; the bias rides in the products as a constant-one
  patch column, so the compared values are exactly the biased outputs. ReLU and bias commute
  with the maximum (both are monotone), so the pooled values are the Keras layers' bit for bit
  given the products. Its filter gradient ``sum_k P_k^T part_k`` is summed by parts,
  ``sum_k (P_k - P_(k-1))^T rest_k``, where ``rest_k`` is the gradient not yet taken by an
  earlier position.
* Max pooling (window = stride, ``valid``): the gradient goes to the *first* position of each
  window (row-major) holding the maximum, as ``MaxPoolGrad`` does: ``miss_k = clamp((max -
  value_k) · 2^126)`` is 0 exactly at a maximum, and what an earlier maximum took is removed
  from later positions.
* Dense: two matrix products and a sum. Flatten: a reshape.

Only the part of each output that later layers read is computed (:func:`plan_blocks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.litert_plan import ONE_HOT_PATCHES_MAX, Block, Layer, plan_blocks

#: The mask scale: ``clamp(d · BIG)`` is 1 for every float32 ``d >= 2^-126`` (normal numbers).
BIG = 2.0**126


class Graph:
    """Forward and backward pass of planned layers with static input and kernel shapes.

    Parameters
    ----------
    steps : list of Layer
        :func:`~models.litert_plan.plan_layers` of the model.
    tf : module
        TensorFlow.
    input_shape : tuple of int
        One sample's shape.
    kernels : dict
        Kernel index -> kernel shape of every convolution.
    """

    def __init__(
        self,
        steps: list[Layer],
        tf: Any,
        input_shape: tuple[int, ...],
        kernels: dict[int, tuple[int, ...]],
    ) -> None:
        self.tf = tf
        self.blocks = plan_blocks(steps, input_shape, kernels)
        self._batch: Any = None
        #: id of a [N, H, W, C] tensor -> the [N·H·W, C] tensor it was reshaped from.
        self._rows: dict[int, Any] = {}

    # -- helpers ----------------------------------------------------------------------------

    def _mask(self, values: Any) -> Any:
        """1 where ``values`` (>= 0) is positive, 0 where it is zero (delegated ops only)."""
        tf = self.tf
        return tf.minimum(tf.maximum(values * BIG, -1.0), 1.0)

    def _transposed(self, matrix: Any) -> Any:
        """``matrix^T`` by way of a 3-D transpose, which the converter leaves a ``TRANSPOSE``
        feeding a ``BATCH_MATMUL`` (a 2-D one becomes a slow variable ``FULLY_CONNECTED``)."""
        tf = self.tf
        rows, cols = (-1 if d is None else int(d) for d in matrix.shape)
        cube = tf.transpose(tf.reshape(matrix, [rows, 1, cols]), [2, 1, 0])
        return tf.reshape(cube, [cols, rows])

    @staticmethod
    def _same_padding(size: int) -> tuple[int, int]:
        """TensorFlow's ``SAME`` padding of a stride-1 window of ``size``: (before, after)."""
        total = size - 1
        return total // 2, total - total // 2

    def _pad_same(self, x: Any, kh: int, kw: int) -> Any:
        top, bottom = self._same_padding(kh)
        left, right = self._same_padding(kw)
        return self.tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])

    def _patches(self, x: Any, kh: int, kw: int, cin: int) -> Any:
        """``[N·Ho·Wo, kh·kw·cin]``: the (padded) input window of every output position, in
        the kernel's ``[kh, kw, c_in]`` order."""
        tf = self.tf
        size = kh * kw * cin
        if size <= ONE_HOT_PATCHES_MAX:
            one_hot = np.eye(size, dtype=np.float32).reshape(kh, kw, cin, size)
            cut = tf.nn.conv2d(x, tf.constant(one_hot), strides=1, padding="VALID")
            return tf.reshape(cut, [-1, size])
        h, w = int(x.shape[1]), int(x.shape[2])
        ho, wo = h - kh + 1, w - kw + 1
        # Patch (p, i, j) holds input pixel p + (i, j): one GATHER of the pixels of every patch
        # of every image, from the input as [N·H·W, cin] rows.
        base = (np.arange(ho)[:, None] * w + np.arange(wo)[None, :]).reshape(-1)
        offsets = (np.arange(kh)[:, None] * w + np.arange(kw)[None, :]).reshape(-1)
        index = (base[:, None] + offsets[None, :]).reshape(1, -1).astype(np.int32)
        starts = tf.reshape(tf.range(self._batch) * (h * w), [-1, 1])
        pixels = self._rows.get(id(x))
        if pixels is None:
            pixels = tf.reshape(x, [-1, cin])
        cols = tf.gather(pixels, tf.reshape(starts + index, [-1]))
        # The row count computed at run time keeps this reshape out of XNNPACK, which would
        # copy the gathered patches (TFLite's reshape shares the buffer).
        return tf.reshape(cols, tf.stack([self._batch * (ho * wo), size]))

    def _route(self, windows: list[Any], peak: Any, grad: Any) -> list[Any]:
        """``MaxPoolGrad``: each window's gradient ``grad`` goes to the first of ``windows``
        (in row-major window order) equal to ``peak``, the window's maximum."""
        parts = []
        rest = grad
        for k, window in enumerate(windows):
            if k == len(windows) - 1:
                parts.append(rest)
                break
            kept = rest * self._mask(peak - window)  # 0 where this position holds the max
            parts.append(rest - kept)
            rest = kept
        return parts

    # -- forward ----------------------------------------------------------------------------

    def forward(self, params: list[Any], x: Any) -> tuple[Any, list[dict[str, Any]]]:
        """Logits, and for each block what its backward pass needs."""
        tf = self.tf
        saved: list[dict[str, Any]] = []
        self._batch = tf.shape(x)[0]  # read from the graph's input: no activation gains a reader
        self._rows = {}  # per trace: tensors of another trace never match
        for b in self.blocks:
            keep: dict[str, Any] = {}
            if b.crop is not None:
                x = x[:, : b.crop[0], : b.crop[1], :]
            if b.conv is not None and b.phases:
                x = self._phases_forward(params, b, x, keep)
            elif b.conv is not None:
                x = self._conv_forward(params, b, x, keep)
            elif b.pool is not None:
                keep["input"] = x
                x = tf.nn.max_pool2d(x, b.pool.pool, b.pool.pool, "VALID")
                keep["pooled"] = x
            elif b.dense is not None:
                keep["input"] = x
                x = tf.matmul(x, params[b.dense.kernel])
                if b.dense.bias >= 0:
                    x = x + params[b.dense.bias]
                if b.dense.relu:
                    x = tf.nn.relu(x)
                keep["output"] = x
            else:
                keep["shape"] = [int(d) for d in x.shape[1:]]
                x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])
            saved.append(keep)
        return x, saved

    def _conv_forward(self, params: list[Any], b: Block, x: Any, keep: dict[str, Any]) -> Any:
        tf = self.tf
        s = b.conv
        assert s is not None
        kh, kw, cin, cout = b.kernel
        keep["size"] = (int(x.shape[1]), int(x.shape[2]))
        if s.padding == "SAME":
            x = self._pad_same(x, kh, kw)
        ho, wo = int(x.shape[1]) - kh + 1, int(x.shape[2]) - kw + 1
        cols = self._patches(x, kh, kw, cin)
        # Reshaped straight after the product, whose only reader it is: XNNPACK then reshapes
        # in place (a reshape whose input or output has several readers is a copy).
        y = tf.reshape(
            tf.matmul(cols, tf.reshape(params[s.kernel], [kh * kw * cin, cout])),
            [-1, ho, wo, cout],
        )
        if s.bias >= 0:
            y = y + params[s.bias]
        keep["cols"] = cols
        if b.pool is None:
            if s.relu:
                y = tf.nn.relu(y)
            keep["output"] = y
            return y
        keep["conv"] = y
        peak = tf.nn.max_pool2d(y, b.pool.pool, b.pool.pool, "VALID")
        keep["peak"] = peak
        out = tf.nn.relu(peak) if s.relu else peak
        keep["output"] = out
        return out

    def _phases_forward(self, params: list[Any], b: Block, x: Any, keep: dict[str, Any]) -> Any:
        """The convolution once per pooling-window position; the pooled maximum of them."""
        tf = self.tf
        s, pool = b.conv, b.pool
        assert s is not None and pool is not None
        kh, kw, cin, cout = b.kernel
        ph, pw = pool.pool
        oh, ow = b.size_out
        if s.padding == "SAME":
            x = self._pad_same(x, kh, kw)
        size = kh * kw * cin
        width = size + (1 if s.bias >= 0 else 0)
        one_hot = np.eye(size, width, dtype=np.float32).reshape(kh, kw, cin, width)
        matrix = tf.reshape(params[s.kernel], [size, cout])
        if s.bias >= 0:
            matrix = tf.concat([matrix, tf.reshape(params[s.bias], [1, cout])], axis=0)
            ones = np.zeros(width, dtype=np.float32)
            ones[size] = 1.0
        patches, windows = [], []
        for qi in range(ph):
            for qj in range(pw):
                part = x[:, qi : qi + (oh - 1) * ph + kh, qj : qj + (ow - 1) * pw + kw, :]
                cut = tf.nn.conv2d(part, tf.constant(one_hot), [1, ph, pw, 1], "VALID")
                if s.bias >= 0:
                    cut = tf.nn.bias_add(cut, tf.constant(ones))
                cut = tf.reshape(cut, [-1, width])
                patches.append(cut)
                windows.append(tf.matmul(cut, matrix))
        peak = windows[0]
        for window in windows[1:]:
            peak = tf.maximum(peak, window)
        out = tf.nn.relu(peak) if s.relu else peak
        keep.update(patches=patches, windows=windows, peak=peak, output=out, width=width)
        shaped = tf.reshape(out, [-1, oh, ow, cout])
        self._rows[id(shaped)] = out  # a gather reads the rows, not the reshape (a copy)
        return shaped

    # -- backward ---------------------------------------------------------------------------

    def backward(self, params: list[Any], saved: list[dict[str, Any]], dlogits: Any) -> list[Any]:
        """Gradients of every weight, in the model's weight order."""
        tf = self.tf
        grads: list[Any] = [None] * len(params)
        dy = dlogits
        for position in range(len(self.blocks) - 1, -1, -1):
            b = self.blocks[position]
            keep = saved[position]
            # Nothing before this block has weights: its input gradient is not needed.
            need_dx = any(earlier.weighted for earlier in self.blocks[:position])
            dx = None
            if b.dense is not None:
                s = b.dense
                if s.relu:
                    dy = dy * self._mask(keep["output"])
                if s.bias >= 0:
                    grads[s.bias] = tf.reduce_sum(dy, axis=0)
                grads[s.kernel] = tf.matmul(keep["input"], dy, transpose_a=True)
                if need_dx:
                    # (W @ dy^T)^T: transposes dy and the product, both small, not W.
                    dx = self._transposed(tf.matmul(params[s.kernel], self._transposed(dy)))
            elif b.conv is not None and b.phases:
                self._phases_backward(b, keep, dy, grads)
            elif b.conv is not None:
                dx = self._conv_backward(params, b, keep, dy, grads, need_dx)
            elif b.pool is not None:
                dx = self._pool_backward(keep["input"], keep["pooled"], dy, b.pool.pool)
            else:
                dx = tf.reshape(dy, [-1, *keep["shape"]])
            if not need_dx:
                break
            assert b.crop is None  # only the first block crops, and nothing precedes it
            dy = dx
        return grads

    def _phases_backward(self, b: Block, keep: dict[str, Any], dz: Any, grads: list[Any]) -> None:
        tf = self.tf
        s = b.conv
        assert s is not None
        kh, kw, cin, cout = b.kernel
        size = kh * kw * cin
        dz = tf.reshape(dz, [-1, cout])
        if s.relu:
            dz = dz * self._mask(keep["output"])
        # sum_k P_k^T part_k with part_k = rest_k - rest_(k+1) (rest_0 = dz, rest_last+1 = 0):
        # sum_k (P_k - P_(k-1))^T rest_k, differences of the narrow patches, not of the gradient.
        windows, peak, cuts = keep["windows"], keep["peak"], keep["patches"]
        rest = dz
        total: Any = tf.matmul(cuts[0], rest, transpose_a=True)
        for k in range(1, len(cuts)):
            rest = rest * self._mask(peak - windows[k - 1])
            term = tf.matmul(cuts[k] - cuts[k - 1], rest, transpose_a=True)
            total = total + term
        grads[s.kernel] = tf.reshape(total[:size], [kh, kw, cin, cout])
        if s.bias >= 0:
            grads[s.bias] = tf.reshape(total[size:], [cout])

    def _conv_backward(
        self,
        params: list[Any],
        b: Block,
        keep: dict[str, Any],
        dz: Any,
        grads: list[Any],
        need_dx: bool,
    ) -> Any:
        """Filter and bias gradients into ``grads``; the input gradient when ``need_dx``."""
        tf = self.tf
        s = b.conv
        assert s is not None
        kh, kw, cin, cout = b.kernel
        if s.relu:
            dz = dz * self._mask(keep["output"])
        if b.pool is not None:
            dz = self._pool_backward(keep["conv"], keep["peak"], dz, b.pool.pool)
        flat_dy = tf.reshape(dz, [-1, cout])
        if s.bias >= 0:
            grads[s.bias] = tf.reduce_sum(flat_dy, axis=0)
        grads[s.kernel] = tf.reshape(
            tf.matmul(keep["cols"], flat_dy, transpose_a=True), [kh, kw, cin, cout]
        )
        if not need_dx:
            return None
        h, w = keep["size"]
        full_h, full_w = (h + kh - 1, w + kw - 1) if s.padding == "SAME" else (h, w)
        ho, wo = full_h - kh + 1, full_w - kw + 1
        # Each kernel position's share of the input gradient, ``dy @ W[i, j]^T``, added back
        # where its patches were cut (one product per position: no slicing of a [N, K] result).
        flipped = tf.transpose(params[s.kernel], [0, 1, 3, 2])  # [kh, kw, cout, cin]
        dx: Any = None
        for i in range(kh):
            for j in range(kw):
                # A slice keeping its axes (XNNPACK does not take shrinking ones), reshaped.
                matrix = tf.reshape(flipped[i : i + 1, j : j + 1], [cout, cin])
                part = tf.reshape(tf.matmul(flat_dy, matrix), [-1, ho, wo, cin])
                part = tf.pad(part, [[0, 0], [i, kh - 1 - i], [j, kw - 1 - j], [0, 0]])
                dx = part if dx is None else dx + part
        if s.padding == "SAME":  # drop the padding's gradient
            top, left = self._same_padding(kh)[0], self._same_padding(kw)[0]
            dx = dx[:, top : top + h, left : left + w, :]
        return dx

    def _pool_backward(self, x: Any, pooled: Any, dy: Any, pool: tuple[int, int]) -> Any:
        """``MaxPoolGrad`` of a pooling of ``x`` (its windows tile ``x``'s used part)."""
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
        parts = self._route(windows, pooled, dy)
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


__all__ = ["BIG", "Graph"]
