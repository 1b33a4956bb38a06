"""Where the heavy part of a rule runs: the numpy rules (default) or PyTorch on a CPU or a GPU.

This module selects the device (:func:`resolve_device`) without importing PyTorch unless a
torch device is asked for; the PyTorch code is in :mod:`coordinator.aggregators.torch_ops`.

The rules of this package are numpy code. For the rules whose cost is more than one pass over
the ``(K, d)`` update matrix, the super-linear part can run in PyTorch on a chosen device
instead; everything else (scores, selections, verdicts, the final combination) stays the
numpy code, so a result means the same on every device:

==========================  ==========================================================
rule                        computed on the device
==========================  ==========================================================
krum, multi_krum            the float64 Gram matrix (pairwise squared distances)
bulyan                      the Gram matrix and the coordinate stage (sorted column
                            blocks, window closest to the median)
median, trimmed_mean        sorted column blocks: order statistics, clipped float64 sums,
                            per-client usage counts
geometric_median            the coordinate-wise median (the centre) and the centred Gram
                            matrix; the Weiszfeld iterations work on the ``(K, K)`` Gram
                            matrix and stay in numpy
fltrust                     float64 dot products with the server update and row norms
foolsgold                   the Gram matrix of the histories (cosine matrix)
repeated_median,            the repeated-median line of every parameter (stable sort,
residual_reweighting        ``(B, K, K)`` slope tensors, inner and outer medians)
==========================  ==========================================================

Devices (:func:`resolve_device`): ``"numpy"`` the numpy rules; ``"cpu"`` PyTorch on the CPU;
``"cuda"`` (or ``"cuda:N"``) PyTorch on a CUDA GPU; ``"auto"`` the GPU when PyTorch sees one,
else the numpy rules. PyTorch is an optional dependency (the ``torch`` extra); asking for
``cpu`` or ``cuda`` without it, or for ``cuda`` without a visible GPU, raises
:class:`~coordinator.errors.DeviceUnavailableError` saying what to install or check.

Precision and equality with the numpy rules: Gram matrices and dot products are accumulated in
float64 on the device, as the numpy rules do (GPUs with slow float64 pay for it; a float32 Gram
matrix would change Krum's selections on near ties). Order statistics are exact on every
device; sums differ from numpy's only in summation order (float64, rounded once to float32).
Selections and verdicts are therefore the numpy rules' except where two scores are equal to
within float64 rounding.

Memory: the matrix never moves to the device as a whole. Every pass sends one column block
(:data:`coordinator.aggregators.torch_ops.DEVICE_BLOCK_BYTES`) at a time, so a
``(1000, 10**6)`` float32 matrix (4 GB) needs a few blocks of device memory, not copies of it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from coordinator.errors import DeviceUnavailableError, InvalidParameterError

#: The accepted device names (``"cuda:N"`` selects GPU N).
DEVICES = ("numpy", "cpu", "cuda", "auto")
#: The rules whose heavy part runs on the selected device; the others always run numpy
#: (their cost is one pass over the matrix, which a transfer to a GPU would not beat).
DEVICE_RULES = frozenset(
    {
        "krum",
        "multi_krum",
        "bulyan",
        "median",
        "trimmed_mean",
        "geometric_median",
        "fltrust",
        "foolsgold",
        "repeated_median",
        "residual_reweighting",
    }
)
#: The PyTorch release the ``torch`` extra pins.
TORCH_REQUIREMENT = "torch==2.13.0"

_torch_lock = threading.Lock()
_torch: Any = None
_torch_error: str | None = None


def torch_module() -> Any | None:
    """The ``torch`` module, or None when PyTorch is not installed (imported once, lazily)."""
    global _torch, _torch_error
    with _torch_lock:
        if _torch is None and _torch_error is None:
            try:
                import torch

                _torch = torch
            except Exception as exc:  # not installed, or a broken install
                _torch_error = f"{type(exc).__name__}: {exc}"
        return _torch


def require_torch() -> Any:
    """The ``torch`` module; raises :class:`DeviceUnavailableError` when it is not installed."""
    torch = torch_module()
    if torch is None:
        raise DeviceUnavailableError(
            "the cpu and cuda aggregation devices need PyTorch, which is not importable here "
            f"({_torch_error}); install it with pip install 'siren-edge[torch]' "
            f"({TORCH_REQUIREMENT}), or use device numpy"
        )
    return torch


def resolve_device(device: str | None) -> str:
    """The device a rule runs on: ``"numpy"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``None`` and ``"numpy"`` give ``"numpy"``; ``"auto"`` gives ``"cuda"`` when PyTorch is
    installed and sees a GPU, else ``"numpy"``.

    Raises
    ------
    InvalidParameterError
        Not one of :data:`DEVICES` (or ``cuda:N``).
    DeviceUnavailableError
        ``cpu``/``cuda`` without PyTorch, or ``cuda`` without a GPU visible to it (the message
        says which).
    """
    if device is None or device == "numpy":
        return "numpy"
    if not isinstance(device, str):
        raise InvalidParameterError(f"device must be a string, got {device!r}")
    name = device.strip().lower()
    gpu_index: int | None = None
    if name.startswith("cuda:"):
        suffix = name[5:]
        if not suffix.isdigit():
            raise InvalidParameterError(f"device {device!r}: expected cuda:N with N a GPU number")
        gpu_index = int(suffix)
        name = "cuda"
    if name not in DEVICES:
        raise InvalidParameterError(
            f"unknown aggregation device {device!r}; valid: {', '.join(DEVICES)} (or cuda:N)"
        )
    if name == "numpy":
        return "numpy"
    if name == "auto":
        torch = torch_module()
        return "cuda" if torch is not None and torch.cuda.is_available() else "numpy"
    torch = require_torch()
    if name == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        build = (
            "a CPU-only build"
            if torch.version.cuda is None
            else f"built for CUDA {torch.version.cuda}"
        )
        raise DeviceUnavailableError(
            f"device {device!r}: PyTorch {torch.__version__} ({build}) sees no CUDA GPU; "
            "check the driver (nvidia-smi) and install a CUDA build of PyTorch, or use device "
            "cpu, numpy or auto"
        )
    count = int(torch.cuda.device_count())
    if gpu_index is not None:
        if gpu_index >= count:
            raise DeviceUnavailableError(
                f"device {device!r}: PyTorch sees {count} GPU(s) (cuda:0..cuda:{count - 1})"
            )
        return f"cuda:{gpu_index}"
    return "cuda"


def available_devices() -> list[str]:
    """Every device this machine can run the rules on: ``numpy``, then ``cpu`` and each
    ``cuda:N`` when PyTorch is installed (used by ``benchmarks/aggregator_devices.py``)."""
    out = ["numpy"]
    torch = torch_module()
    if torch is not None:
        out.append("cpu")
        if torch.cuda.is_available():
            out.extend(f"cuda:{i}" for i in range(int(torch.cuda.device_count())))
    return out


def device_description(device: str) -> str:
    """Human-readable name of a resolved device (the GPU model for ``cuda``)."""
    if device == "numpy":
        return f"numpy {np.__version__}"
    torch = require_torch()
    if device == "cpu":
        return f"torch {torch.__version__} cpu ({torch.get_num_threads()} threads)"
    gpu = torch.cuda.get_device_name(torch.device(device))
    return f"torch {torch.__version__} {device} ({gpu})"
