"""PyTorch versions of the heavy parts of the rules (see :mod:`coordinator.aggregators.devices`
for which rule uses what and what stays numpy).

Every function takes the numpy ``(K, d)`` float32 update matrix and a resolved torch device
(``"cpu"``, ``"cuda"``, ``"cuda:N"``), sends it one column block at a time (:class:`_Blocks`,
:data:`DEVICE_BLOCK_BYTES`), and returns numpy arrays with the meaning, dtype and shape of the
numpy function it stands for. PyTorch is imported on first use only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from coordinator.aggregators.base import (
    InvalidParameterError,
    column_blocks,
    map_column_blocks,
    reject_non_finite,
)
from coordinator.aggregators.devices import require_torch

T = TypeVar("T")

#: Bytes of one column block sent to the device at a time (float32 input; the float64 Gram
#: blocks are twice this). On the CPU blocks stay near the caches; on a GPU they are large
#: enough that kernel launches and transfers are amortised.
DEVICE_BLOCK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}
#: Elements of one ``(B, K, K)`` slope tensor of the repeated-median fit.
SLOPE_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


def _kind(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda"


def block_columns(k: int, device: str, itemsize: int = 4) -> int:
    """Columns of one ``(k, width)`` block sent to ``device`` (about
    :data:`DEVICE_BLOCK_BYTES` bytes of ``itemsize``-byte values)."""
    return int(max(256, DEVICE_BLOCK_BYTES[_kind(device)] // max(1, k * itemsize)))


def map_blocks(func: Callable[[slice], T], d: int, width: int, device: str) -> list[T]:
    """``func`` over the column blocks of ``range(d)`` in block order: on the rules' thread pool
    for ``numpy``, one after the other for a torch device (PyTorch parallelises each operation
    itself)."""
    if device == "numpy":
        return map_column_blocks(func, d, width)
    return [func(cols) for cols in column_blocks(d, width)]


def _from_numpy(torch: Any, array: np.ndarray) -> Any:
    """A CPU tensor sharing ``array``'s memory (read-only arrays are only ever read here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class _Blocks:
    """Sends column blocks of a ``(K, d)`` numpy matrix to a device, reusing one buffer.

    ``blocks(cols)`` returns the block ``x[rows, cols]`` as a device tensor of ``dtype``:
    ``(len(rows), w)``, or ``(w, len(rows))`` with ``transpose`` (one coordinate per row, the
    layout the sorts want). On the CPU the values are copied (and converted) straight from the
    numpy view into the buffer; on a GPU the float32 block crosses once and is converted on the
    device. The returned tensor is a view of the buffer, valid until the next call.
    """

    def __init__(
        self,
        torch: Any,
        x: np.ndarray,
        device: str,
        dtype: Any,
        width: int,
        *,
        rows: np.ndarray | None = None,
        transpose: bool = False,
    ) -> None:
        self.torch = torch
        self.x = x
        self.dev = torch.device(device)
        self.cpu = device == "cpu"
        self.rows = rows
        self.transpose = transpose
        n = x.shape[0] if rows is None else int(rows.size)
        width = min(width, x.shape[1])
        shape = (width, n) if transpose else (n, width)
        self.buffer = torch.empty(shape, dtype=dtype, device=self.dev)

    def __call__(self, cols: slice) -> Any:
        torch = self.torch
        host = self.x[:, cols] if self.rows is None else self.x[self.rows, cols]
        w = host.shape[1]
        if self.cpu:
            source = _from_numpy(torch, host)
        else:
            source = _from_numpy(torch, np.ascontiguousarray(host, dtype=np.float32)).to(self.dev)
        if self.transpose:
            out = self.buffer[:w]
            out.copy_(source.T)
        else:
            out = self.buffer[:, :w]
            out.copy_(source)
        return out


def _to_host(tensor: Any) -> np.ndarray:
    return np.asarray(tensor.detach().cpu().numpy())


# ---------------------------------------------------------------------------------------------
# Gram matrix and dot products (Krum, Multi-Krum, Bulyan, FoolsGold, geometric median, FLTrust)
# ---------------------------------------------------------------------------------------------


def gram_matrix(updates: np.ndarray, device: str, center: np.ndarray | None = None) -> np.ndarray:
    """:func:`coordinator.aggregators.krum.gram_matrix` on ``device``: ``G = X X^T`` (rows
    centred at ``center`` when given), float64, accumulated over column blocks.

    Each float32 block is sent to the device, widened to float64 there and multiplied
    (``G += B B^T``); the result is symmetrised (``(G + G^T) / 2``, exact for the symmetric
    products) and returned as a numpy ``(K, K)`` float64 array.

    Complexity: O(K^2 d) on the device, O(K^2 + K * block) device memory.
    """
    torch = require_torch()
    x = np.asarray(updates)
    k, d = x.shape
    width = block_columns(k, device, itemsize=8)
    blocks = _Blocks(torch, x, device, torch.float64, width)
    c = None if center is None else np.asarray(center, dtype=np.float64)
    gram = torch.zeros((k, k), dtype=torch.float64, device=blocks.dev)
    for cols in column_blocks(d, width):
        block = blocks(cols)
        if c is not None:
            block -= _from_numpy(torch, np.ascontiguousarray(c[cols])).to(blocks.dev)
        gram.addmm_(block, block.T)
    gram = 0.5 * (gram + gram.T)
    return _to_host(gram)


def dots_and_norms(
    updates: np.ndarray, reference: np.ndarray, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`coordinator.aggregators.fltrust.dots_and_norms` on ``device``: ``(X g, |x_i|)``
    accumulated in float64 over column blocks.

    Complexity: O(K d) on the device, O(K * block) device memory.
    """
    torch = require_torch()
    x = np.asarray(updates)
    k, d = x.shape
    width = block_columns(k, device, itemsize=8)
    blocks = _Blocks(torch, x, device, torch.float64, width)
    ref = np.asarray(reference, dtype=np.float64)
    dots = torch.zeros(k, dtype=torch.float64, device=blocks.dev)
    sq = torch.zeros(k, dtype=torch.float64, device=blocks.dev)
    for cols in column_blocks(d, width):
        block = blocks(cols)
        dots += block @ _from_numpy(torch, np.ascontiguousarray(ref[cols])).to(blocks.dev)
        sq += (block * block).sum(dim=1)
    return _to_host(dots), np.sqrt(_to_host(sq))


# ---------------------------------------------------------------------------------------------
# Sorted column blocks (median, trimmed mean, Bulyan's coordinate stage). Blocks are transposed
# to (w, K): one coordinate per row, its client values contiguous, sorted along dim 1.
# ---------------------------------------------------------------------------------------------


def _count_inside(torch: Any, block: Any, low: Any, high: Any) -> Any:
    """Per client (column of a ``(w, K)`` block), the number of coordinates (rows) whose value
    lies in ``[low, high]`` of its row."""
    inside = (block >= low[:, None]) & (block <= high[:, None])
    return inside.sum(dim=0, dtype=torch.int64)


def coordinate_median(updates: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`coordinator.aggregators.coordinatewise.coordinate_median` on ``device``: per
    column block, the sorted client values' middle one (float32), or the mean of the middle two
    computed in float64 and rounded to float32, and the per-client count of coordinates whose
    value was (one of) the middle.

    Complexity: O(K d log K) on the device, O(K * block) device memory.
    """
    torch = require_torch()
    x = np.asarray(updates)
    k, d = x.shape
    width = block_columns(k, device)
    blocks = _Blocks(torch, x, device, torch.float32, width, transpose=True)
    lo, hi = (k - 1) // 2, k // 2
    out = np.empty(d, dtype=np.float32)
    used = torch.zeros(k, dtype=torch.int64, device=blocks.dev)
    for cols in column_blocks(d, width):
        block = blocks(cols)
        srt = torch.sort(block, dim=1).values
        low, high = srt[:, lo], srt[:, hi]
        if lo == hi:
            mid = low
        else:
            mid = (0.5 * (low.to(torch.float64) + high.to(torch.float64))).to(torch.float32)
        out[cols] = _to_host(mid)
        used += _count_inside(torch, block, low, high)
    return out, _to_host(used).astype(np.int64)


def coordinate_trimmed_mean(
    updates: np.ndarray, trim: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`coordinator.aggregators.coordinatewise.coordinate_trimmed_mean` on ``device``.

    Per column block: the order statistics ``low``/``high`` of ranks ``trim`` and
    ``K - 1 - trim`` from a sort, ``sum_i clip(x_i, low, high) - trim (low + high)`` in float64,
    divided by ``K - 2 trim`` and rounded once to float32 (the numpy rule's formula; only the
    order of the float64 additions may differ), and the per-client count of values inside
    ``[low, high]``. NaN/inf raise :class:`InvalidUpdatesError` naming the clients.

    Complexity: O(K d log K) on the device, O(K * block) device memory.
    """
    torch = require_torch()
    x = np.asarray(updates)
    k, d = x.shape
    if trim < 0 or 2 * trim >= k:
        raise InvalidParameterError(f"trim must satisfy 0 <= trim and 2*trim < K={k}, got {trim}")
    width = block_columns(k, device)
    blocks = _Blocks(torch, x, device, torch.float32, width, transpose=True)
    kept = float(k - 2 * trim)
    out = np.empty(d, dtype=np.float32)
    used = torch.zeros(k, dtype=torch.int64, device=blocks.dev)
    for cols in column_blocks(d, width):
        block = blocks(cols)
        srt = torch.sort(block, dim=1).values  # NaN sorts last
        if not bool(torch.isfinite(srt[:, 0]).all() & torch.isfinite(srt[:, k - 1]).all()):
            reject_non_finite(x)
        low, high = srt[:, trim : trim + 1], srt[:, k - 1 - trim : k - trim]
        clipped = torch.minimum(torch.maximum(block, low), high)
        acc = clipped.to(torch.float64).sum(dim=1)
        acc -= trim * (low[:, 0].to(torch.float64) + high[:, 0].to(torch.float64))
        out[cols] = _to_host((acc / kept).to(torch.float32))
        used += (clipped == block).sum(dim=0, dtype=torch.int64)
    return out, _to_host(used).astype(np.int64)


def closest_to_median_mean(
    updates: np.ndarray, beta: int, rows: np.ndarray | None, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`coordinator.aggregators.krum.closest_to_median_mean` (Bulyan's coordinate stage)
    on ``device``.

    Per column block of the ``theta`` chosen rows: sort, median (the mean of the middle two in
    float32, as the numpy rule), the window of ``beta`` sorted values with the smallest radius
    around it (``argmin`` takes the first, i.e. lowest, window on equal radii), its mean summed
    in float64, and the per-row count of values inside the window.

    Complexity: O(theta d log theta) on the device, O(theta * block) device memory.
    """
    torch = require_torch()
    x = np.asarray(updates)
    idx = None if rows is None else np.asarray(rows, dtype=np.int64)
    theta = x.shape[0] if idx is None else int(idx.size)
    d = x.shape[1]
    if not 1 <= beta <= theta:
        raise InvalidParameterError(f"beta must be in [1, {theta}], got {beta}")
    width = block_columns(theta, device)
    blocks = _Blocks(torch, x, device, torch.float32, width, rows=idx, transpose=True)
    lo_half, hi_half = (theta - 1) // 2, theta // 2
    starts = theta - beta + 1
    offsets = torch.arange(beta, device=blocks.dev)[None, :]
    out = np.empty(d, dtype=np.float32)
    used = torch.zeros(theta, dtype=torch.int64, device=blocks.dev)
    for cols in column_blocks(d, width):
        block = blocks(cols)
        srt = torch.sort(block, dim=1).values
        med = (srt[:, lo_half] * 0.5 + srt[:, hi_half] * 0.5)[:, None]
        radius = torch.maximum(med - srt[:, :starts], srt[:, beta - 1 :] - med)
        start = torch.argmin(radius, dim=1)
        window = torch.gather(srt, 1, start[:, None] + offsets)
        out[cols] = _to_host((window.to(torch.float64).sum(dim=1) / beta).to(torch.float32))
        used += _count_inside(torch, block, window[:, 0], window[:, beta - 1])
    return out, _to_host(used).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Repeated-median line (repeated median, residual-based reweighting)
# ---------------------------------------------------------------------------------------------


def slope_block(k: int, device: str) -> int:
    """Parameters per ``(B, K, K)`` slope tensor of the repeated-median fit on ``device``."""
    return int(max(8, min(1 << 16, SLOPE_ELEMENTS[_kind(device)] // (k * k))))


def _row_median(torch: Any, a: Any) -> Any:
    k = a.shape[1]
    s = torch.sort(a, dim=1).values
    return 0.5 * (s[:, (k - 1) // 2] + s[:, k // 2])


def _inner_slope_medians(torch: Any, ys: Any, dx: Any, lo: int, hi: int) -> Any:
    """``m[b, i] = median_{j != i} (ys[b, j] - ys[b, i]) / (x_j - x_i)`` as float64.

    As in the numpy rule, the slopes (all >= 0 or -0.0, since ``ys`` is sorted) are ordered
    through their signed-integer bit patterns, so equal values and zeros rank exactly as there.
    """
    slopes = (ys[:, None, :] - ys[:, :, None]) / dx.to(ys.dtype)
    slopes.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # the point itself sorts last
    as_int = slopes.view(torch.int32 if ys.dtype == torch.float32 else torch.int64)
    srt = torch.sort(as_int, dim=-1).values.view(ys.dtype)
    low = srt[..., lo].to(torch.float64)
    if lo == hi:
        return low
    return 0.5 * (low + srt[..., hi].to(torch.float64))


def repeated_median_fit(
    yt: np.ndarray, x: np.ndarray, dx: np.ndarray, lo: int, hi: int, device: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Siegel's repeated-median line of each row of ``yt`` over its sorted values, on ``device``.

    The computation of :func:`coordinator.aggregators.residual._fit_block`: a stable sort of
    every row (``-0.0`` first made ``+0.0``; ties keep client order), float32 slopes
    ``(y_j - y_i) / (x_j - x_i)`` with the point itself set to ``+inf``, the inner medians at
    positions ``lo``/``hi`` of the ``K - 1`` slopes, ``beta1 = median_i m_i`` and
    ``beta0 = median_i (y_i - x_i m_i)`` in float64; rows whose float32 slopes overflowed are
    redone in float64. The order statistics are exact, so the line equals the numpy rule's.

    Parameters
    ----------
    yt : np.ndarray
        ``(B, K)`` float32 values, one parameter per row, clients in index order.
    x : np.ndarray
        ``(K,)`` float64 ranks ``1..K``.
    dx : np.ndarray
        ``(K, K)`` float32 ``x_j - x_i`` with a diagonal of ones.
    lo, hi : int
        Positions of the middle order statistics among ``K - 1`` slopes.

    Returns
    -------
    (order, ys, beta0, beta1)
        ``(B, K)`` client index at each rank, ``(B, K)`` float64 sorted values, ``(B,)``
        intercepts and slopes (numpy arrays).

    Complexity: O(B K^2) on the device, O(B K^2) device memory (one slope tensor).
    """
    torch = require_torch()
    dev = torch.device(device)
    host = np.ascontiguousarray(yt, dtype=np.float32)
    values = _from_numpy(torch, host).to(dev) + 0.0  # -0.0 -> +0.0
    srt = torch.sort(values, dim=1, stable=True)
    ys32, order = srt.values, srt.indices
    dx_t = torch.from_numpy(np.ascontiguousarray(dx, dtype=np.float32)).to(dev)
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(dev)
    m = _inner_slope_medians(torch, ys32, dx_t, lo, hi)
    ys = ys32.to(torch.float64)
    beta1 = _row_median(torch, m)
    beta0 = _row_median(torch, ys - xs * m)
    bad = ~(torch.isfinite(beta0) & torch.isfinite(beta1))
    if bool(bad.any()):  # float32 slope overflow (|values| near 3e38): redo those rows in float64
        m64 = _inner_slope_medians(torch, ys[bad], dx_t, lo, hi)
        beta1[bad] = _row_median(torch, m64)
        beta0[bad] = _row_median(torch, ys[bad] - xs * m64)
    return (
        _to_host(order).astype(np.intp),
        _to_host(ys),
        _to_host(beta0),
        _to_host(beta1),
    )
