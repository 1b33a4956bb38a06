"""The forward pass of a zoo model as steps and blocks, for the LiteRT training graph.

:func:`plan_layers` reads a Sequential Keras model into :class:`Layer` steps (convolution,
max pooling, flatten, dense). :func:`plan_blocks` groups them into the :class:`Block` units the
graph computes (:mod:`models.litert_graph`): a convolution with the max pooling that follows it
is one block, and every block computes only the part of its output that later layers read.

That part is smaller than the whole output when a pooling window does not tile its input: the
SIREN CNN's second pooling reads 10 of conv2's 11 rows and columns, so conv2 needs 12 of pool1's
13, conv1 24 of its 26 and the network 26 of the image's 28. The rest never reaches the logits,
so leaving it out changes neither the logits nor any gradient; it saves 15-20% of the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.errors import LiteRTExportError


@dataclass(frozen=True)
class Layer:
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


def plan_layers(model: Any) -> list[Layer]:
    """The forward pass of a Sequential Keras model as :class:`Layer` steps.

    Supported: ``Conv2D`` (stride 1, no dilation, ``valid``/``same``, ReLU or linear),
    ``MaxPooling2D`` (window = strides, ``valid``), ``Flatten``, ``Dense`` (ReLU or linear):
    every layer of the zoo.

    Raises
    ------
    LiteRTExportError
        For any other layer or setting (the message names the layer).
    """
    index = {id(w): i for i, w in enumerate(model.weights)}
    steps: list[Layer] = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            if tuple(layer.strides) != (1, 1) or tuple(layer.dilation_rate) != (1, 1):
                raise LiteRTExportError(f"layer {layer.name!r}: only stride 1, no dilation")
            if layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1:
                raise LiteRTExportError(f"layer {layer.name!r}: only channels_last, one group")
            steps.append(
                Layer(
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
                Layer(
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
            steps.append(Layer("pool", layer.name, pool=(pool[0], pool[1])))
        elif kind == "Flatten":
            steps.append(Layer("flatten", layer.name))
        else:
            raise LiteRTExportError(
                f"layer {layer.name!r} of type {kind} has no builtin-only gradient; supported: "
                "Conv2D, MaxPooling2D, Flatten, Dense"
            )
    used = sorted(i for s in steps for i in (s.kernel, s.bias) if i >= 0)
    if used != list(range(len(model.weights))):
        raise LiteRTExportError("the model holds weights outside its Conv2D and Dense layers")
    return steps


#: A convolution whose patch holds at most this many values cuts its patches with a constant
#: one-hot convolution (XNNPACK runs it as a convolution with a constant filter); larger patches
#: are one ``GATHER`` of input pixels (the one-hot convolution's cost grows with the square of
#: the patch). Measured on the SIREN CNN (batch 64, one core): conv1's 9-value patches 0.17 ms by
#: convolution, 1.2 ms by slices; conv2's 288-value patches 5.8 ms by convolution, about 0.75 ms
#: by nine slices and a concatenation, about 0.3 ms by the gather.
ONE_HOT_PATCHES_MAX = 32


@dataclass(frozen=True)
class Block:
    """A unit of the graph: a convolution (with the pooling after it), a pooling, a dense layer
    or a flatten, and the spatial sizes it works on.

    Attributes
    ----------
    conv, pool, dense, flatten : Layer or None
        The steps it computes (``conv`` and ``pool`` together when the pooling follows the
        convolution).
    size_in : tuple of int
        ``(H, W)`` of its input as the graph hands it over (after cropping; for a ``SAME``
        convolution before padding).
    crop : tuple of int or None
        Crop the input to this ``(H, W)`` first (only at the image: every other block is handed
        exactly what it reads).
    kernel : tuple of int
        ``(kh, kw, c_in, c_out)`` of the convolution.
    size_out : tuple of int
        ``(H, W)`` of what it hands on (the pooled size for a convolution with its pooling).
    phases : bool
        Compute the convolution once per pooling-window position (``ph·pw`` products of
        ``[N, K]`` patches, the pooled maximum as ``MAXIMUM`` of their outputs): for a first
        layer with one-hot patches, whose outputs are then never written at full resolution.
    """

    conv: Layer | None = None
    pool: Layer | None = None
    dense: Layer | None = None
    flatten: Layer | None = None
    size_in: tuple[int, int] = (0, 0)
    crop: tuple[int, int] | None = None
    kernel: tuple[int, int, int, int] = (0, 0, 0, 0)
    size_out: tuple[int, int] = (0, 0)
    phases: bool = False

    @property
    def weighted(self) -> bool:
        """Whether the block holds weights (a convolution or a dense layer)."""
        return self.conv is not None or self.dense is not None


def _same_before(size: int) -> int:
    """TensorFlow's ``SAME`` padding before a stride-1 window of ``size``."""
    return (size - 1) // 2


def plan_blocks(
    steps: list[Layer], input_shape: tuple[int, ...], kernels: dict[int, tuple[int, ...]]
) -> list[Block]:
    """Group ``steps`` into blocks and size each to the part of its output later layers read.

    ``input_shape`` is one sample's ``(H, W, C)`` (or ``(D,)`` for a dense model); ``kernels``
    maps a convolution's kernel index to its shape. Sizes go backward from the flatten (which
    reads everything) through each pooling (``out·p`` of its input) and convolution
    (``out + k - 1``, its ``SAME`` padding included).
    """
    groups: list[list[Layer]] = []
    i = 0
    while i < len(steps):
        if steps[i].kind == "conv" and i + 1 < len(steps) and steps[i + 1].kind == "pool":
            groups.append([steps[i], steps[i + 1]])
            i += 2
        else:
            groups.append([steps[i]])
            i += 1
    # Full sizes, forward.
    full: list[tuple[tuple[int, int], tuple[int, int]]] = []
    h, w = (int(input_shape[0]), int(input_shape[1])) if len(input_shape) == 3 else (0, 0)
    for group in groups:
        start = (h, w)
        for s in group:
            if s.kind == "conv" and s.padding == "VALID":
                kh, kw = kernels[s.kernel][:2]
                h, w = h - kh + 1, w - kw + 1
            elif s.kind == "pool":
                h, w = h // s.pool[0], w // s.pool[1]
        full.append((start, (h, w)))
    # Needed sizes, backward: what each group reads of its input.
    need_in: list[tuple[int, int]] = [(0, 0)] * len(groups)
    need: tuple[int, int] | None = None
    for g in range(len(groups) - 1, -1, -1):
        (hin, win), out = full[g]
        n = need if need is not None else out
        for s in reversed(groups[g]):
            if s.kind == "pool":
                n = (n[0] * s.pool[0], n[1] * s.pool[1])
            elif s.kind == "conv":
                kh, kw = kernels[s.kernel][:2]
                if s.padding == "VALID":
                    n = (n[0] + kh - 1, n[1] + kw - 1)
                elif n != (hin, win):
                    n = (hin, win)  # SAME: the padding sits at the true edge; keep it all
            elif s.kind == "flatten":
                n = (hin, win)
        need_in[g] = n
        need = n if groups[g][0].kind != "dense" else None
    blocks: list[Block] = []
    first_weighted = next(
        (g for g, grp in enumerate(groups) if grp[0].kind in ("conv", "dense")), -1
    )
    for g, group in enumerate(groups):
        (hin, win), _ = full[g]
        size = need_in[g] if group[0].kind != "dense" else (0, 0)
        crop = size if g == 0 and size != (hin, win) and group[0].kind != "dense" else None
        head = group[0]
        if head.kind == "conv":
            kernel = tuple(int(d) for d in kernels[head.kernel])
            kh, kw = kernel[0], kernel[1]
            pool = group[1] if len(group) > 1 else None
            oh, ow = size if head.padding == "SAME" else (size[0] - kh + 1, size[1] - kw + 1)
            if pool is not None:
                oh, ow = oh // pool.pool[0], ow // pool.pool[1]
            patch = kernel[0] * kernel[1] * kernel[2]
            blocks.append(
                Block(
                    conv=head,
                    pool=pool,
                    size_in=size,
                    crop=crop,
                    kernel=(kernel[0], kernel[1], kernel[2], kernel[3]),
                    size_out=(oh, ow),
                    phases=(
                        pool is not None and g == first_weighted and patch <= ONE_HOT_PATCHES_MAX
                    ),
                )
            )
        elif head.kind == "pool":
            blocks.append(
                Block(
                    pool=head,
                    size_in=size,
                    crop=crop,
                    size_out=(size[0] // head.pool[0], size[1] // head.pool[1]),
                )
            )
        elif head.kind == "dense":
            blocks.append(Block(dense=head))
        else:
            blocks.append(Block(flatten=head, size_in=size, crop=crop, size_out=size))
    return blocks


__all__ = ["ONE_HOT_PATCHES_MAX", "Block", "Layer", "plan_blocks", "plan_layers"]
