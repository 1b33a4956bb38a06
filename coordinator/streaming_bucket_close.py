"""The median and trimmed mean closed from the bucket counts and labels kept on admission.

:mod:`coordinator.streaming_buckets` leaves, for every coordinate, the count of each bucket
and, for every admitted value, its bucket as a one-byte label stored tile by tile. The close:

1. **Buckets of the ranks** (:func:`coordinator.streaming_buckets._locate`, no pass over the
   matrix): for each column the bucket of every wanted rank (median: ``(K-1)//2`` and
   ``K//2``; trimmed mean: ``trim`` and ``K-1-trim``) and the rank inside that bucket.
2. **Gather from the labels.** The tile's labels (``K x TILE`` bytes, contiguous) are compared
   with each column's wanted bucket, 64 columns per compare; only the values whose label
   matches are read from the matrix (about ``2K/(n+1)`` per open bucket for continuous data,
   ``n`` the kept boundaries between the tails: 63 or 64). A single-key bucket needs no
   gather: its key is the order statistic.
3. **Pick** the order statistic among the gathered keys (quickselect with 16-lane compresses).
4. **Usage counts and sums.** The median's per-row usage counts come from the labels and the
   gathered values (only its two adjacent ranks' buckets can hold values between them), so the
   median reads about a quarter of the matrix's bytes plus the gathered values. The trimmed
   mean reads the tile's values once more for the clipped float64 sum in row order that keeps
   it bit-identical to the batch rule.

**Worst case.** Values concentrated in a wanted open bucket (e.g. attackers that were not among
the sampled rows) are still gathered and picked, up to :data:`COLUMN_LIMIT` values in one column
and :data:`GATHER_LIMIT` per column on average over the tile. A tile past either limit falls
back to :mod:`coordinator.streaming_select`'s counting selection, started from the buckets'
exact brackets: correct, at the counting kernel's cost for that tile only.

The results are the order statistics themselves, hence the batch rules' aggregates bit for bit
(:mod:`coordinator.streaming_select` states the definitions), up to the sign of a zero median:
``-0.0`` and ``0.0`` share a key here and a zero order statistic comes out as ``0.0``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from coordinator.aggregators.base import parallel_map
from coordinator.streaming_buckets import _TASK, MIN_ROWS, TILE, BucketCounts, _key, _locate
from coordinator.streaming_select import _refine, _tile_values, clip_sum_row, inside_row
from coordinator.streaming_simd import equal64 as _equal64
from coordinator.streaming_simd import popcount as _popcount
from coordinator.streaming_simd import prefetch as _prefetch
from coordinator.streaming_simd import sort_padded as _sort_padded
from coordinator.streaming_simd import split16 as _split16
from coordinator.streaming_simd import trailing_zeros as _trailing_zeros
from coordinator.streaming_simd import within16 as _within16

#: Values gathered per column of a tile, on average over its columns, above which the tile uses
#: the counting selection instead.
GATHER_LIMIT = 256
#: Values of one column's wanted open bucket above which its tile uses the counting selection
#: (a quickselect's time is then no longer small next to the tile's read).
COLUMN_LIMIT = 4096
#: Keys sorted by a bitonic network instead of partitioned further (16, 32 or 64).
NETWORK = 64
#: Rows ahead whose labels are compared (and their values' cache lines prefetched) before a
#: row's values are gathered, and whose tile segment is prefetched while a row is summed.
AHEAD = 4
#: Rows of compared labels kept (at least ``AHEAD + 1``).
RING = 8
#: Label of no bucket: the buckets are numbered below ``2 * 127 + 1``.
_NONE = np.uint8(255)
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


@njit(nogil=True, cache=True, inline="always")
def _split(src: np.ndarray, size: int, p: np.int32, left: np.ndarray, right: np.ndarray) -> int:
    """``src[:size]`` split by ``< p`` into ``left`` and the rest into ``right`` (order kept);
    returns how many went left. 16 elements of slack past ``size`` in the three arrays
    (:func:`_split16_typer`)."""
    nl = 0
    for off in range(0, size, 16):
        lanes = min(16, size - off)
        c = _split16(src, off, lanes, p, left, nl, right, off - nl)
        nl += c
    return nl


@njit(nogil=True, cache=True)
def _pick(
    vals: np.ndarray, r: int, want_next: bool, scratch: np.ndarray
) -> tuple[np.int32, np.int32]:
    """The elements of ranks ``r`` and (with ``want_next``) ``r + 1`` (0-based) of ``vals``,
    which is left as it is (it must be readable 16 elements past its end).

    Quickselect with a median-of-three pivot whose partitions are 16-lane compares and
    compresses (:func:`_split`) between the first three rows of ``scratch`` (``(4, >= n +
    16)`` int32, at least 64 wide): each step keeps the side holding the rank; when nothing
    lies below the pivot, the run of keys equal to it is split off (runs of equal keys end
    it). At most :data:`NETWORK` keys left are sorted by a bitonic network in vector registers
    (in the fourth row). Rank ``r + 1`` is the least of what was set aside above the rank, or
    the next element of the run or of the sorted keys."""
    nxt = np.int32(_INT32_MAX)
    cur = -1  # vals, then a row of scratch
    size = vals.shape[0]
    while size > 1:
        src = vals if cur < 0 else scratch[cur]
        if size <= NETWORK:
            net = scratch[3]
            for t in range(size):
                net[t] = src[t]
            _sort_padded(net, size)
            if want_next and r + 1 < size:
                nxt = min(nxt, net[r + 1])
            return net[r], nxt
        a = src[0]
        b = src[size >> 1]
        c = src[size - 1]
        p = max(min(a, b), min(max(a, b), c))
        free = 2 if cur < 0 else cur  # the row not written by this step's split
        il = 1 if free == 0 else 0
        ir_ = 1 if free == 2 else 2
        nl = _split(src, size, p, scratch[il], scratch[ir_])
        if nl == 0:  # p is the least key left: split off its run
            ne = _split(scratch[ir_], size, p + np.int32(1), scratch[il], scratch[free])
            if r < ne:
                if want_next:
                    if r + 1 < ne:
                        return p, p
                    rest = scratch[free]
                    for i in range(size - ne):
                        nxt = min(nxt, rest[i])
                return p, nxt
            r -= ne
            size -= ne
            cur = free
        elif r < nl:
            if want_next:
                above = scratch[ir_]
                for i in range(size - nl):
                    nxt = min(nxt, above[i])
            size = nl
            cur = il
        else:
            r -= nl
            size -= nl
            cur = ir_
    src = vals if cur < 0 else scratch[cur]
    return src[0], nxt


@njit(nogil=True, cache=True)
def _tile_keys(x: np.ndarray, rows: np.ndarray, t0: int, t1: int, keys: np.ndarray) -> None:
    """Canonical keys of columns ``[t0, t1)`` of ``x[rows]`` into ``keys`` (``(K, t1 - t0)``)."""
    for i in range(rows.shape[0]):
        bits = x[rows[i], t0:t1].view(np.int32)
        row = keys[i]
        for j in range(t1 - t0):
            row[j] = _key(bits[j])


@njit(nogil=True, cache=True)
def bucket_block(
    x: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    c0: int,
    c1: int,
    trim: int,
    bounds: np.ndarray,
    counts: np.ndarray,
    out: np.ndarray,
    used: np.ndarray,
) -> int:
    """Median (``trim < 0``) or trimmed mean (``trim >= 0``) of columns ``[c0, c1)`` (``c0`` a
    multiple of :data:`TILE`) of the finite float32 rows ``x[rows]``, from the bucket counts and
    labels of exactly those rows.

    Writes ``out[c0:c1]`` and adds to ``used`` (``(K,)``, in the order of ``rows``) the per-row
    counts of :func:`coordinator.streaming_select.coordinatewise_block`. Returns the number of
    tiles that needed the counting selection.
    """
    k = rows.shape[0]
    median = trim < 0
    ranks = np.empty(2, dtype=np.int64)
    if median:
        ranks[0] = (k - 1) // 2
        ranks[1] = k // 2
    else:
        ranks[0] = trim
        ranks[1] = k - 1 - trim
    lo = np.empty((2, TILE), dtype=np.int32)
    hi = np.empty((2, TILE), dtype=np.int32)
    below = np.empty((2, TILE), dtype=np.int64)
    size = np.empty((2, TILE), dtype=np.int64)
    bucket = np.empty((2, TILE), dtype=np.int32)
    gather = np.empty((2, TILE), dtype=np.uint8)  # the open bucket to gather, or _NONE
    single = np.empty((2, TILE), dtype=np.uint8)  # the single-key bucket to count, or _NONE
    shared = np.zeros(TILE, dtype=np.uint8)
    start = np.empty((2, TILE + 1), dtype=np.int64)  # each column's segment of the box
    fill = np.empty((2, TILE), dtype=np.int64)
    box = np.empty((2, TILE * GATHER_LIMIT + 16), dtype=np.int32)  # slack: _pick reads past
    who = np.empty((2, TILE * GATHER_LIMIT if median else 0), dtype=np.int32)  # rows (median)
    work = np.empty((4, COLUMN_LIMIT + 16), dtype=np.int32)  # _pick's rows
    result = np.empty((2, 2, TILE), dtype=np.int64)
    low = np.empty(TILE, dtype=np.float32)
    high = np.empty(TILE, dtype=np.float32)
    acc = np.empty(TILE, dtype=np.float64)
    kept = np.float64(k - 2 * trim)
    fallbacks = 0
    keys = np.empty((0, 0), dtype=np.int32)
    masks = np.empty((RING, 2, TILE // 64), dtype=np.uint64)
    for t0 in range(c0, c1, TILE):
        t1 = min(t0 + TILE, c1)
        w = t1 - t0
        groups = (w + 63) // 64
        tile_labels = labels[t0 // TILE]
        _locate(bounds, counts, t0, w, ranks, k, lo, hi, below, size, bucket)
        most = 0
        for q in range(2):
            start[q, 0] = 0
            for j in range(w, TILE):
                gather[q, j] = _NONE
                single[q, j] = _NONE
        for j in range(w):
            shared[j] = np.uint8(bucket[0, j] == bucket[1, j])
            for q in range(2):
                n = size[q, j]
                gather[q, j] = _NONE
                single[q, j] = _NONE
                if q == 1 and shared[j]:
                    n = 0  # the other rank's bucket: gathered (or counted) once
                elif lo[q, j] == hi[q, j]:
                    single[q, j] = np.uint8(bucket[q, j])
                    n = 0
                else:
                    gather[q, j] = np.uint8(bucket[q, j])
                    most = max(most, n)
                start[q, j + 1] = start[q, j] + n
                fill[q, j] = start[q, j]
        crowded = most > COLUMN_LIMIT or max(start[0, w], start[1, w]) > w * GATHER_LIMIT
        if crowded:
            # The counting selection, from the buckets' exact brackets.
            fallbacks += 1
            if keys.shape[0] != k:
                keys = np.empty((k, TILE), dtype=np.int32)
            kv = keys[:, :w]
            _tile_keys(x, rows, t0, t1, kv)
            spans = np.empty((2, 2), dtype=np.int64)
            blo = np.empty((2, w), dtype=np.int64)
            bhi = np.empty((2, w), dtype=np.int64)
            clo = np.empty((2, w), dtype=np.int32)
            chi = np.empty((2, w), dtype=np.int32)
            for q in range(2):
                spans[q, 0] = ranks[q]
                spans[q, 1] = ranks[q]
                for j in range(w):
                    blo[q, j] = np.int64(lo[q, j]) - 1
                    bhi[q, j] = hi[q, j]
                    clo[q, j] = below[q, j]
                    chi[q, j] = below[q, j] + size[q, j]
            _refine(kv, spans, blo, bhi, clo, chi, False, blo, bhi, result)
        else:
            g0 = gather[0]
            g1 = gather[1]
            s0 = single[0]
            s1 = single[1]
            # Row ii's labels are compared AHEAD rows before its values are gathered, and the
            # cache lines holding its hits are prefetched meanwhile (the whole row segment for
            # the trimmed mean, which reads it again for its sum).
            for ii in range(k + AHEAD):
                if ii < k:
                    lab = tile_labels[rows[ii]]
                    ahead = x[rows[ii], t0:t1]
                    slot = ii % RING
                    singles = np.uint64(0)
                    for g in range(groups):
                        off = 64 * g
                        p0 = _equal64(lab, off, g0, off)
                        p1 = _equal64(lab, off, g1, off)
                        masks[slot, 0, g] = p0
                        masks[slot, 1, g] = p1
                        if median:
                            singles += _popcount(
                                _equal64(lab, off, s0, off) | _equal64(lab, off, s1, off)
                            )
                        for line in range(4):
                            if off + 16 * line < w:
                                _prefetch(ahead, off + 16 * line)
                    used[ii] += np.int64(singles)
                i = ii - AHEAD
                if i < 0:
                    continue
                bits = x[rows[i], t0:t1].view(np.int32)
                slot = i % RING
                for g in range(groups):
                    off = 64 * g
                    for q in range(2):
                        hits = masks[slot, q, g]
                        while hits != 0:
                            j = off + np.int64(_trailing_zeros(hits))
                            hits &= hits - np.uint64(1)
                            box[q, fill[q, j]] = _key(bits[j])
                            if median:
                                who[q, fill[q, j]] = i
                            fill[q, j] += 1
            for j in range(w):
                for q in range(2):
                    if lo[q, j] == hi[q, j]:
                        result[q, 0, j] = lo[q, j]
                        continue
                    if q == 1 and shared[j]:
                        continue  # read with rank 0, from the same values
                    seg = box[q, start[q, j] : start[q, j + 1]]
                    adjacent = q == 0 and shared[j] == 1 and ranks[1] == ranks[0] + 1
                    first, second = _pick(seg, ranks[q] - below[q, j], adjacent, work)
                    result[q, 0, j] = first
                    if q == 0 and shared[j]:
                        if ranks[1] == ranks[0]:
                            result[1, 0, j] = first
                        elif adjacent:
                            result[1, 0, j] = second
                        else:
                            result[1, 0, j] = _pick(seg, ranks[1] - below[0, j], False, work)[0]
        lw = low[:w]
        hw = high[:w]
        _tile_values(result, 0, 0, lw)
        _tile_values(result, 1, 0, hw)
        if median:
            for j in range(w):
                if ranks[0] == ranks[1]:
                    out[t0 + j] = lw[j]
                else:
                    out[t0 + j] = np.float32(0.5 * (np.float64(lw[j]) + np.float64(hw[j])))
            if crowded:
                for i in range(k):
                    used[i] += inside_row(x[rows[i], t0:t1], lw, hw)
            else:
                # Values between the two ranks lie in their buckets (the buckets between
                # adjacent ranks are empty): the single-key ones were counted from the labels,
                # the gathered ones are compared here.
                for q in range(2):
                    for j in range(w):
                        if gather[q, j] == _NONE:
                            continue
                        a = np.int32(result[0, 0, j])
                        z = np.int32(result[1, 0, j])
                        e0 = start[q, j]
                        e1 = start[q, j + 1]
                        for e in range(e0, e1, 16):
                            hit = _within16(box[q], e, a, z)
                            if e + 16 > e1:
                                hit &= (np.uint64(1) << np.uint64(e1 - e)) - np.uint64(1)
                            while hit != 0:
                                u = np.int64(_trailing_zeros(hit))
                                hit &= hit - np.uint64(1)
                                used[who[q, e + u]] += 1
        else:
            aw = acc[:w]
            for j in range(w):
                aw[j] = 0.0
            for i in range(k):
                if i + AHEAD < k:
                    ahead = x[rows[i + AHEAD], t0:t1]
                    for off in range(0, w, 16):
                        _prefetch(ahead, off)
                used[i] += clip_sum_row(x[rows[i], t0:t1], lw, hw, aw)
            for j in range(w):
                s = aw[j] - trim * (np.float64(lw[j]) + np.float64(hw[j]))
                out[t0 + j] = np.float32(s / kept)
    return fallbacks


def _close(
    buffer: np.ndarray, rows: list[int], buckets: BucketCounts, trim: int
) -> tuple[np.ndarray, np.ndarray]:
    assert buckets.bounds is not None and buckets.counts is not None
    assert buckets.labels is not None
    idx = np.asarray(rows, dtype=np.int64)
    k = idx.size
    d = buffer.shape[1]
    out = np.empty(d, dtype=np.float32)
    bounds, counts, labels = buckets.bounds, buckets.counts, buckets.labels

    def task(cols: slice) -> tuple[np.ndarray, int]:
        used = np.zeros(k, dtype=np.int64)
        n = bucket_block(
            buffer, labels, idx, cols.start, cols.stop, trim, bounds, counts, out, used
        )
        return used, int(n)

    spans = [slice(s, min(s + _TASK, d)) for s in range(0, d, _TASK)]
    parts = parallel_map(task, spans)
    buckets.fallback_tiles = sum(n for _, n in parts)
    used = np.sum([u for u, _ in parts], axis=0, dtype=np.int64)
    return out, np.asarray(used, dtype=np.int64)


def bucket_median(
    buffer: np.ndarray, rows: list[int], buckets: BucketCounts
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise median and per-row usage counts of ``buffer[rows]`` (rows in the batch
    rule's order), equal to :func:`coordinator.aggregators.coordinatewise.coordinate_median`'s
    up to the sign of a zero median. ``buckets`` must cover exactly ``rows``
    (:meth:`BucketCounts.covers`).

    Complexity: one read of the labels plus the gathered values (module docstring).
    """
    return _close(buffer, rows, buckets, -1)


def bucket_trimmed_mean(
    buffer: np.ndarray, rows: list[int], buckets: BucketCounts, trim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise trimmed mean and usage counts of ``buffer[rows]``, equal to
    :func:`coordinator.aggregators.coordinatewise.coordinate_trimmed_mean`'s bit for bit
    (``0 < trim``, ``2 trim < K``; ``buckets`` as for :func:`bucket_median`)."""
    k = len(rows)
    if trim <= 0 or 2 * trim >= k:
        raise ValueError(f"trim must satisfy 0 < trim and 2*trim < K={k}, got {trim}")
    return _close(buffer, rows, buckets, trim)


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now, so no admission or close pays."""
    k = MIN_ROWS
    x = np.arange(k * 3, dtype=np.float32).reshape(k, 3)
    b = BucketCounts(3)
    for r in range(k):
        b.add(r)
    b.flush(x)
    bucket_median(x, list(range(k)), b)
    bucket_trimmed_mean(x, list(range(k)), b, 1)
