"""Coordinate-wise order statistics in one read of the update matrix (median, trimmed mean).

The batch rules of :mod:`coordinator.aggregators.coordinatewise` sort every coordinate's ``K``
values (``O(K log K)`` per coordinate, or an insertion network for small trims). Here each tile
of columns is read from memory once and the order statistics are found by *counting* inside the
tile while it sits in the CPU cache:

1. the tile's values become order-preserving 32-bit integer keys (IEEE-754 bit patterns with the
   magnitude bits of negative numbers flipped);
2. a bracket ``(L, H]`` holding the wanted rank ``r`` is taken from 31 sample rows spread over
   the tile (sorted per column), checked with one counting pass and widened to the column's
   minimum or maximum when the sample missed;
3. bisection: each step counts, for every column at once, the keys ``<= mid`` (a compare and an
   add per value, vectorised across columns) until at most 16 keys remain in the bracket or it
   holds a single key value; the midpoint is taken in value space where the ends of the bracket
   are within a factor of 2^20 in magnitude, else in key space (which halves the range of
   exponents);
4. the few keys left in the bracket are gathered, sorted, and the one of rank ``r`` is read.

The results are the order statistics themselves, so the aggregates equal the batch rules'
bit for bit: the median of an even count is ``float32(0.5 * (float64(lo) + float64(hi)))`` and
the trimmed mean adds ``clip(x_i, low, high)`` in float64 in row order from 0.0, subtracts
``trim * (low + high)`` and divides by ``K - 2 trim`` (as :func:`coordinate_trimmed_mean`
documents). The only difference is the sign of a zero: ``-0.0`` and ``0.0`` are distinct keys
here, and a sort may return either one for a rank where both occur.

Complexity: ``O(K d)`` reads, ``O(K d (s + log₂ w))`` in-cache integer operations for ``s``
bracket checks and a few bisection steps per rank, where ``w`` is the bracket's key width;
``O(K · tile)`` extra memory per thread.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from coordinator.aggregators.base import map_column_blocks

#: Columns per tile: a tile of K rows stays in the L2 cache while it is counted.
TILE = 512
#: Keys left in a bracket at which refinement stops and the bracket is gathered and sorted.
GATHER = 16
#: Sample rows used to place the first bracket (when K >= 4 * SAMPLE).
SAMPLE = 31
#: Refinement passes after which a bracket is gathered whatever its size.
MAX_PASSES = 64
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


@njit(nogil=True, cache=True)
def _value(key: np.int64, fbuf: np.ndarray, ibuf: np.ndarray) -> np.float64:
    """The float32 (as float64) whose key is ``key`` (``ibuf`` is ``fbuf`` viewed as int32)."""
    k = np.int32(key)
    ibuf[0] = k ^ ((k >> 31) & np.int32(0x7FFFFFFF))
    return np.float64(fbuf[0])


@njit(nogil=True, cache=True)
def _key_of(value: np.float64, fbuf: np.ndarray, ibuf: np.ndarray) -> np.int64:
    """The key of ``value`` rounded to float32."""
    fbuf[0] = np.float32(value)
    b = ibuf[0]
    return np.int64(b ^ ((b >> 31) & np.int32(0x7FFFFFFF)))


@njit(nogil=True, cache=True)
def _pivot(
    lo: np.int64,
    hi: np.int64,
    frac: float,
    fbuf: np.ndarray,
    ibuf: np.ndarray,
) -> np.int64:
    """A key strictly inside ``(lo, hi)`` (``hi - lo >= 2``) at fraction ``frac`` of the bracket:
    in value space when its ends are within a factor of 2^20 in magnitude, else in key space
    (which halves the range of exponents)."""
    a = _value(lo + 1, fbuf, ibuf)
    b = _value(hi, fbuf, ibuf)
    small = min(abs(a), abs(b))
    large = max(abs(a), abs(b))
    if large <= 1048576.0 * small:
        p = _key_of(a + frac * (b - a), fbuf, ibuf)
    else:
        p = lo + np.int64(frac * (hi - lo))
    return min(max(p, lo + 1), hi - 1)


@njit(nogil=True, cache=True)
def _count_le(keys: np.ndarray, limits: np.ndarray, out: np.ndarray) -> None:
    """``out[q, j] = #{i : keys[i, j] <= limits[q, j]}`` for every limit row and column."""
    k, w = keys.shape
    nq = limits.shape[0]
    for q in range(nq):
        for j in range(w):
            out[q, j] = 0
    for i in range(k):
        row = keys[i]
        for q in range(nq):
            lim = limits[q]
            cnt = out[q]
            for j in range(w):
                cnt[j] += np.int32(row[j] <= lim[j])


@njit(nogil=True, cache=True)
def _tile_keys(
    x: np.ndarray, c0: int, c1: int, keys: np.ndarray, kmin: np.ndarray, kmax: np.ndarray
) -> None:
    """Keys of columns ``[c0, c1)`` of ``x`` into ``keys`` (``(K, c1 - c0)``), with per-column
    minimum and maximum keys."""
    k = x.shape[0]
    w = c1 - c0
    for j in range(w):
        kmin[j] = _INT32_MAX
        kmax[j] = _INT32_MIN
    for i in range(k):
        bits = x[i, c0:c1].view(np.int32)
        row = keys[i]
        for j in range(w):
            b = bits[j]
            v = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
            row[j] = v
            kmin[j] = min(kmin[j], v)
            kmax[j] = max(kmax[j], v)


@njit(nogil=True, cache=True)
def _sample_brackets(
    keys: np.ndarray,
    ranks: np.ndarray,
    kmin: np.ndarray,
    kmax: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
) -> None:
    """First brackets ``(lo, hi]`` for every rank from :data:`SAMPLE` rows spread over the
    tile: the sample's order statistics three standard deviations around the rank's quantile
    (ranks of the sample found by counting, vectorised across columns); the column's minimum
    or maximum where that falls outside the sample."""
    k, w = keys.shape
    s = SAMPLE
    rows = np.empty(s, dtype=np.int64)
    for t in range(s):
        rows[t] = (t * (k - 1)) // (s - 1)
    order = np.empty((s, w), dtype=np.int32)  # order[t, j]: rank of sample t in column j
    for t in range(s):
        rt = keys[rows[t]]
        o = order[t]
        for j in range(w):
            o[j] = 0
        for u in range(s):
            ru = keys[rows[u]]
            if u < t:
                for j in range(w):
                    o[j] += np.int32(ru[j] <= rt[j])
            elif u > t:
                for j in range(w):
                    o[j] += np.int32(ru[j] < rt[j])
    for q in range(ranks.shape[0]):
        frac = ranks[q] / max(1, k - 1)
        centre = frac * (s - 1)
        spread = 3.0 * np.sqrt(s * frac * (1.0 - frac)) + 1.0
        a = int(np.floor(centre - spread))
        b = int(np.ceil(centre + spread))
        for j in range(w):
            lo[q, j] = kmin[j] - 1
            hi[q, j] = kmax[j]
        for t in range(s):
            rt = keys[rows[t]]
            o = order[t]
            if a >= 0:
                for j in range(w):
                    if o[j] == a:
                        lo[q, j] = np.int64(rt[j]) - 1
            if b < s:
                for j in range(w):
                    if o[j] == b:
                        hi[q, j] = rt[j]


@njit(nogil=True, cache=True)
def _gather(
    keys: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    fill: np.ndarray,
    box: np.ndarray,
) -> None:
    """``box[:fill[j], j]`` = the keys of column ``j`` in ``(lo[j], hi[j]]``, row by row; the
    other slots of ``box`` (``(cap, w)``) hold the largest int32.

    A vectorised pass marks the values inside; the marks are then read eight at a time, so the
    rare hits cost a store each and everything else a compare.
    """
    k, w = keys.shape
    padded = (w + 7) // 8 * 8
    mask = np.zeros(padded, dtype=np.uint8)
    words = mask.view(np.uint64)
    box[:, :] = _INT32_MAX
    for j in range(w):
        fill[j] = 0
    for i in range(k):
        row = keys[i]
        for j in range(w):
            mask[j] = np.uint8(row[j] > lo[j]) & np.uint8(row[j] <= hi[j])
        for g in range(padded // 8):
            if words[g] != 0:
                for j in range(8 * g, min(8 * g + 8, w)):
                    if mask[j]:
                        box[fill[j], j] = row[j]
                        fill[j] += 1


@njit(nogil=True, cache=True)
def _pick(box: np.ndarray, target: np.ndarray, out: np.ndarray) -> None:
    """``out[j]`` = the element of rank ``target[j]`` (0-based) of column ``j`` of ``box``,
    found by counting ranks (vectorised across columns, no per-column sort)."""
    cap, w = box.shape
    rank = np.empty(w, dtype=np.int32)
    for a in range(cap):
        va = box[a]
        for j in range(w):
            rank[j] = 0
        for b in range(cap):
            vb = box[b]
            if b < a:
                for j in range(w):
                    rank[j] += np.int32(vb[j] <= va[j])
            elif b > a:
                for j in range(w):
                    rank[j] += np.int32(vb[j] < va[j])
        for j in range(w):
            if rank[j] == target[j]:
                out[j] = va[j]


@njit(nogil=True, cache=True)
def _select_ranks(
    keys: np.ndarray,
    spans: np.ndarray,
    kmin: np.ndarray,
    kmax: np.ndarray,
    result: np.ndarray,
) -> None:
    """``result[q, 0, j]`` / ``result[q, 1, j]`` = keys of the 0-based ranks ``spans[q, 0]`` and
    ``spans[q, 1]`` (equal, or the next rank) of every column ``j < w`` of the ``(K, w)`` tile
    (``result`` may be wider than the tile).

    Each span gets a bracket ``(lo, hi]`` with ``count(<= lo) <= spans[q, 0] < count(<= hi)``.
    The first step tests the sample's bracket; every later counting pass tests two pivots per
    bracket, interpolated ``1.5 sqrt(n)`` ranks on either side of the rank (``n`` keys in the
    bracket), or bisects a bracket that the last interpolation did not halve. Brackets of at
    most :data:`GATHER` keys (or of a single key value) are gathered and sorted; the next rank
    is read there too, or, where it lies above the bracket, found by one more pass.
    """
    k, w = keys.shape
    nq = spans.shape[0]
    lo = np.empty((nq, w), dtype=np.int64)
    hi = np.empty((nq, w), dtype=np.int64)
    c_lo = np.zeros((nq, w), dtype=np.int32)
    c_hi = np.full((nq, w), k, dtype=np.int32)
    s_lo = np.empty((nq, w), dtype=np.int64)  # the sample's brackets: the first pivots
    s_hi = np.empty((nq, w), dtype=np.int64)
    for q in range(nq):
        for j in range(w):
            lo[q, j] = kmin[j] - 1
            hi[q, j] = kmax[j]
    sampled = k >= 4 * SAMPLE
    if sampled:
        centres = np.empty(nq, dtype=np.int64)
        for q in range(nq):
            centres[q] = spans[q, 0]
        _sample_brackets(keys, centres, kmin, kmax, s_lo, s_hi)
    _refine(keys, spans, lo, hi, c_lo, c_hi, sampled, s_lo, s_hi, result)


@njit(nogil=True, cache=True)
def _refine(
    keys: np.ndarray,
    spans: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    c_lo: np.ndarray,
    c_hi: np.ndarray,
    sampled: bool,
    s_lo: np.ndarray,
    s_hi: np.ndarray,
    result: np.ndarray,
) -> None:
    """The counting selection of :func:`_select_ranks` from given brackets: ``(lo[q, j],
    hi[q, j]]`` (int64 keys) with ``c_lo = count(<= lo) <= spans[q, 0] < c_hi = count(<= hi)``
    (int32); with ``sampled``, ``(s_lo, s_hi]`` is the first pair of pivots tested. ``lo``,
    ``hi``, ``c_lo`` and ``c_hi`` are narrowed in place."""
    k, w = keys.shape
    nq = spans.shape[0]
    limits = np.empty((2 * nq, w), dtype=np.int32)
    counts = np.empty((2 * nq, w), dtype=np.int32)
    fbuf = np.empty(1, dtype=np.float32)
    ibuf = fbuf.view(np.int32)
    width = np.full((nq, w), 2 * k, dtype=np.int32)
    for step in range(MAX_PASSES):
        active = 0
        for q in range(nq):
            ra = spans[q, 0]
            rb = spans[q, 1]
            for j in range(w):
                n = c_hi[q, j] - c_lo[q, j]
                p1 = lo[q, j]
                p2 = hi[q, j]
                if n > GATHER and hi[q, j] - lo[q, j] > 1:
                    active += 1
                    if step == 0 and sampled:
                        p1 = s_lo[q, j]
                        p2 = s_hi[q, j]
                        n = 2 * k  # the next step interpolates
                    elif 2 * n <= width[q, j]:
                        margin = max(1.0, 1.5 * np.sqrt(n))
                        f1 = (ra - c_lo[q, j] + 0.5 - margin) / n
                        f2 = (ra - c_lo[q, j] + 0.5 + margin) / n
                        if f1 > 0.0:
                            p1 = _pivot(lo[q, j], hi[q, j], f1, fbuf, ibuf)
                        if f2 < 1.0:
                            p2 = _pivot(lo[q, j], hi[q, j], f2, fbuf, ibuf)
                        if p1 == lo[q, j] and p2 == hi[q, j]:
                            p1 = _pivot(lo[q, j], hi[q, j], 0.5, fbuf, ibuf)
                    else:
                        p1 = _pivot(lo[q, j], hi[q, j], 0.5, fbuf, ibuf)
                    width[q, j] = n
                limits[2 * q, j] = np.int32(max(p1, np.int64(_INT32_MIN)))
                limits[2 * q + 1, j] = np.int32(p2)
        if active == 0:
            break
        _count_le(keys, limits, counts)
        for q in range(nq):
            ra = spans[q, 0]
            for j in range(w):
                for side in range(2):
                    p = np.int64(limits[2 * q + side, j])
                    c = counts[2 * q + side, j]
                    if c <= ra and p > lo[q, j]:
                        lo[q, j] = p
                        c_lo[q, j] = c
                    elif c > ra and p < hi[q, j]:
                        hi[q, j] = p
                        c_hi[q, j] = c
    cap = 1
    for q in range(nq):
        for j in range(w):
            if hi[q, j] - lo[q, j] > 1:
                cap = max(cap, c_hi[q, j] - c_lo[q, j])
    box = np.empty((cap, w), dtype=np.int32)
    fill = np.empty(w, dtype=np.int32)
    lo32 = np.empty(w, dtype=np.int32)
    hi32 = np.empty(w, dtype=np.int32)
    target = np.empty(w, dtype=np.int32)
    picked = np.empty(w, dtype=np.int32)
    for q in range(nq):
        ra = spans[q, 0]
        rb = spans[q, 1]
        for j in range(w):
            single = hi[q, j] - lo[q, j] <= 1
            lo32[j] = np.int32(hi[q, j] if single else max(lo[q, j], np.int64(_INT32_MIN)))
            hi32[j] = np.int32(hi[q, j])
        _gather(keys, lo32, hi32, fill, box)
        for j in range(w):
            target[j] = ra - c_lo[q, j]
        _pick(box, target, picked)
        above = 0
        for j in range(w):
            result[q, 0, j] = hi[q, j] if hi[q, j] - lo[q, j] <= 1 else picked[j]
            if rb == ra or (rb < c_hi[q, j] and hi[q, j] - lo[q, j] <= 1):
                result[q, 1, j] = result[q, 0, j]
                target[j] = -1
            elif rb < c_hi[q, j]:
                target[j] = rb - c_lo[q, j]
            else:  # the next rank lies above the bracket: the smallest key above it
                result[q, 1, j] = _INT32_MAX
                target[j] = -1
                above += 1
        if rb != ra:
            _pick(box, target, picked)
            for j in range(w):
                if target[j] >= 0:
                    result[q, 1, j] = picked[j]
        if above:
            for i in range(k):
                row = keys[i]
                for j in range(w):
                    v = row[j]
                    if v > hi[q, j] and v < result[q, 1, j] and rb >= c_hi[q, j]:
                        result[q, 1, j] = v


@njit(nogil=True, cache=True)
def _tile_values(result: np.ndarray, q: int, side: int, out: np.ndarray) -> None:
    """``out[j]`` = the float32 of key ``result[q, side, j]``."""
    bits = out.view(np.int32)
    for j in range(out.shape[0]):
        k = np.int32(result[q, side, j])
        bits[j] = k ^ ((k >> 31) & np.int32(0x7FFFFFFF))


@njit(nogil=True, cache=True, inline="always")
def inside_row(row: np.ndarray, lw: np.ndarray, hw: np.ndarray) -> np.int64:
    """How many values of ``row`` lie in ``[lw, hw]`` (per column): a row's usage count for the
    median."""
    n = np.int64(0)
    for j in range(row.shape[0]):
        v = row[j]
        n += np.int64(lw[j] <= v) & np.int64(v <= hw[j])
    return n


@njit(nogil=True, cache=True, inline="always")
def clip_sum_row(row: np.ndarray, lw: np.ndarray, hw: np.ndarray, acc: np.ndarray) -> np.int64:
    """Add ``row`` clipped to ``[lw, hw]`` (per column) to the float64 ``acc``; return how many
    of its values were inside (the trimmed mean's sum in row order and usage count)."""
    n = np.int64(0)
    for j in range(row.shape[0]):
        v = row[j]
        c = lw[j] if v < lw[j] else v
        c = hw[j] if c > hw[j] else c
        acc[j] += np.float64(c)
        n += np.int64(c == v)
    return n


@njit(nogil=True, cache=True)
def coordinatewise_block(
    x: np.ndarray,
    c0: int,
    c1: int,
    trim: int,
    out: np.ndarray,
    used: np.ndarray,
) -> None:
    """Median (``trim < 0``) or trimmed mean (``trim >= 0``) of columns ``[c0, c1)`` of the
    finite ``(K, d)`` float32 matrix ``x``, tile by tile, each tile read from memory once.

    Writes ``out[c0:c1]`` and adds to ``used`` (``(K,)``) the per-row counts of the batch rules:
    for the median, the columns where the row's value equals the median (odd ``K``) or lies
    between the middle two values (even ``K``); for the trimmed mean, the columns where it lies
    in the kept range ``[low, high]``.
    """
    k = x.shape[0]
    if trim < 0:
        spans = np.empty((1, 2), dtype=np.int64)
        spans[0, 0] = (k - 1) // 2
        spans[0, 1] = k // 2
    else:
        spans = np.empty((2, 2), dtype=np.int64)
        spans[0, 0] = trim
        spans[0, 1] = trim
        spans[1, 0] = k - 1 - trim
        spans[1, 1] = k - 1 - trim
    nq = spans.shape[0]
    keys = np.empty((k, TILE), dtype=np.int32)
    kmin = np.empty(TILE, dtype=np.int32)
    kmax = np.empty(TILE, dtype=np.int32)
    result = np.empty((nq, 2, TILE), dtype=np.int64)
    low = np.empty(TILE, dtype=np.float32)
    high = np.empty(TILE, dtype=np.float32)
    acc = np.empty(TILE, dtype=np.float64)
    kept = np.float64(k - 2 * trim)
    for t0 in range(c0, c1, TILE):
        t1 = min(t0 + TILE, c1)
        w = t1 - t0
        kv = keys if w == TILE else np.empty((k, w), dtype=np.int32)
        _tile_keys(x, t0, t1, kv, kmin[:w], kmax[:w])
        _select_ranks(kv, spans, kmin[:w], kmax[:w], result)
        lw = low[:w]
        hw = high[:w]
        if trim < 0:
            _tile_values(result, 0, 0, lw)
            _tile_values(result, 0, 1, hw)
            for j in range(w):
                if spans[0, 0] == spans[0, 1]:
                    out[t0 + j] = lw[j]
                else:
                    out[t0 + j] = np.float32(0.5 * (np.float64(lw[j]) + np.float64(hw[j])))
            for i in range(k):
                used[i] += inside_row(x[i, t0:t1], lw, hw)
        else:
            _tile_values(result, 0, 0, lw)
            _tile_values(result, 1, 0, hw)
            aw = acc[:w]
            for j in range(w):
                aw[j] = 0.0
            for i in range(k):
                used[i] += clip_sum_row(x[i, t0:t1], lw, hw, aw)
            for j in range(w):
                s = aw[j] - trim * (np.float64(lw[j]) + np.float64(hw[j]))
                out[t0 + j] = np.float32(s / kept)


#: Columns per task of the thread pool.
_TASK = 8 * TILE


def _coordinatewise(x: np.ndarray, trim: int) -> tuple[np.ndarray, np.ndarray]:
    mat = np.ascontiguousarray(x, dtype=np.float32)
    k, d = mat.shape
    out = np.empty(d, dtype=np.float32)

    def task(cols: slice) -> np.ndarray:
        used = np.zeros(k, dtype=np.int64)
        coordinatewise_block(mat, cols.start, cols.stop, trim, out, used)
        return used

    parts = map_column_blocks(task, d, _TASK)
    return out, np.asarray(np.sum(parts, axis=0), dtype=np.int64)


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now, so no close pays for it."""
    x = np.arange(4 * 200, dtype=np.float32).reshape(200, 4)
    frozen = x.view()
    frozen.flags.writeable = False  # buffer views are read-only: a second compiled variant
    for m in (x, frozen):
        median_of_columns(m)
        trimmed_mean_of_columns(m, 3)


def median_of_columns(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise median and per-row usage counts of a finite ``(K, d)`` matrix, equal to
    :func:`coordinator.aggregators.coordinatewise.coordinate_median`'s (up to the sign of a
    zero median).

    Complexity: one read of the matrix plus in-cache counting passes (module docstring).
    """
    return _coordinatewise(x, -1)


def trimmed_mean_of_columns(x: np.ndarray, trim: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise trimmed mean and usage counts of a finite ``(K, d)`` matrix, equal to
    :func:`coordinator.aggregators.coordinatewise.coordinate_trimmed_mean`'s.

    Raises
    ------
    ValueError
        ``trim`` out of ``[0, (K - 1) / 2]``.
    """
    mat = np.ascontiguousarray(x, dtype=np.float32)
    k, d = mat.shape
    if trim < 0 or 2 * trim >= k:
        raise ValueError(f"trim must satisfy 0 <= trim and 2*trim < K={k}, got {trim}")
    if trim == 0:
        total = mat.sum(axis=0, dtype=np.float64)
        return (total / k).astype(np.float32), np.full(k, d, dtype=np.int64)
    return _coordinatewise(mat, trim)
