"""Per-coordinate bucket counts kept on admission: the median and trimmed mean close in one read.

A coordinate-wise order statistic needs, for every coordinate, the value of a given rank among
the round's ``K`` values. :mod:`coordinator.streaming_select` finds it at close by counting in
cached tiles (several in-cache passes per tile). Here most of that work is done while the
updates arrive:

1. **Boundaries.** Once the first :data:`SAMPLE_ROWS` (``m``) updates of the round are admitted,
   each coordinate's ``m`` values, as order-preserving int32 keys (IEEE-754 bit patterns with
   the magnitude bits of negative numbers flipped, ``-0.0`` taken as ``+0.0``), are sorted:
   ``s_0 <= ... <= s_{m-1}``. They cut the coordinate's key line into ``2m + 1`` buckets: the
   open intervals ``(s_{t-1}, s_t)`` (bucket ``2t``, with ``s_{-1} = -inf``, ``s_m = +inf``)
   and the single keys ``s_t`` (bucket ``2t + 1``). A value equal to a boundary has a bucket of
   its own, so identical updates, or attackers sending one value, never crowd an open bucket
   when one of them is among the first ``m``.
2. **Counts.** Every admitted update (the first ``m`` included) adds one to the bucket of each
   of its values: a branchless binary search over the coordinate's ``m`` keys, ``O(d log m)``
   per update, done for the updates admitted since the last :meth:`BucketCounts.flush` in one
   sweep over the boundaries and counts (tiles of coordinates on the thread pool). The counts
   are uint16 (``K < 65536``).
3. **Close** (:func:`bucket_median`, :func:`bucket_trimmed_mean`). The counts give, with no pass
   over the matrix, the bucket of every wanted rank (median: ranks ``(K-1)//2`` and ``K//2``;
   trimmed mean: ``trim`` and ``K-1-trim``) and its rank inside the bucket. The matrix is then
   read once, tile by tile, each value compared as a float with the float32 ends of the wanted
   buckets (keys are computed for the gathered values only): the values of each column's wanted
   open bucket(s) are gathered (``2K/(m+1)`` on average for continuous data), the order
   statistic is picked among them (a single-key bucket needs no gather), and a second pass over
   the tile, still in cache, adds the clipped values (trimmed mean) and the per-row usage
   counts, as :func:`coordinator.streaming_select.coordinatewise_block` does.

**Worst case.** Values concentrated between two boundaries (e.g. attackers that were not among
the first ``m``) make a wanted open bucket large; its values are still gathered and picked by
quickselect, up to :data:`COLUMN_LIMIT` values in one column and :data:`GATHER_LIMIT` per
column on average over the tile. A tile past either limit falls back to
:mod:`coordinator.streaming_select`'s counting selection, started from the buckets' exact
brackets instead of sampled ones: correct, at the counting kernel's cost for that tile only.

The results are the order statistics themselves, hence the batch rules' aggregates bit for bit
(:mod:`coordinator.streaming_select` states the definitions), up to the sign of a zero median:
``-0.0`` and ``0.0`` share a key here and a zero order statistic comes out as ``0.0``.

Memory: ``d m`` int32 boundaries and ``d (2m + 1)`` uint16 counts (``m = 63``, ``d = 10^6``:
252 MB and 254 MB), allocated when the first boundaries are taken and reused round after round.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from coordinator.aggregators.base import map_column_blocks, parallel_map
from coordinator.streaming_select import _refine, _tile_values
from coordinator.streaming_simd import inside8 as _inside8
from coordinator.streaming_simd import prefetch as _prefetch
from coordinator.streaming_simd import split16 as _split16
from coordinator.streaming_simd import trailing_zeros as _trailing_zeros

#: Updates whose values set the bucket boundaries.
SAMPLE_ROWS = 63
#: Rounds with fewer updates close without buckets (the counting costs more than it saves).
MIN_ROWS = 4 * SAMPLE_ROWS
#: Largest ``K`` the uint16 counts hold.
MAX_ROWS = 65535
#: Columns per tile of the close: ``K`` rows of a tile stay in the L2 cache between its passes.
TILE = 512
#: Rows ahead whose tile segment is prefetched while a row is read.
AHEAD = 4
#: Values gathered per column of a tile, on average over its columns, above which the tile uses
#: the counting selection instead.
GATHER_LIMIT = 256
#: Values of one column's wanted open bucket above which its tile uses the counting selection
#: (a quickselect's time is then no longer small next to the tile's read).
COLUMN_LIMIT = 4096
#: Columns per block of the boundaries' layout ``(blocks, m, BOUNDS_BLOCK)``.
BOUNDS_BLOCK = 256
#: Coordinates per task of the admission counting and of the close (thread pool).
_TASK = 1 << 14
# The close's tiles start on a block of the boundaries and counts (:func:`_locate`).
assert TILE % BOUNDS_BLOCK == 0 and _TASK % TILE == 0
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


@njit(nogil=True, cache=True, inline="always")
def _key(b: np.int32) -> np.int32:
    """Order-preserving key of the float32 with bit pattern ``b`` (``-0.0`` -> key of ``0.0``)."""
    k = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
    return k + np.int32(k == np.int32(-1))


@njit(nogil=True, cache=True)
def _bounds_block(x: np.ndarray, rows: np.ndarray, c0: int, c1: int, bounds: np.ndarray) -> None:
    """Sorted keys of ``x[rows, j]`` for the columns ``[c0, c1)`` (whole blocks of
    :data:`BOUNDS_BLOCK`) into ``bounds[j // BOUNDS_BLOCK, :, j % BOUNDS_BLOCK]``: each key's
    rank among the column's ``m`` is counted (vectorised across columns) and the key is stored
    at that rank (ties ordered by row)."""
    m = rows.shape[0]
    bw = bounds.shape[2]
    d = x.shape[1]
    keys = np.empty((m, bw), dtype=np.int32)
    rank = np.empty(bw, dtype=np.int32)
    for t0 in range(c0, c1, bw):
        t1 = min(t0 + bw, d)
        w = t1 - t0
        blk = bounds[t0 // bw]
        for t in range(m):
            bits = x[rows[t], t0:t1].view(np.int32)
            kt = keys[t]
            for j in range(w):
                kt[j] = _key(bits[j])
        for t in range(m):
            kt = keys[t]
            for j in range(w):
                rank[j] = 0
            for u in range(m):
                ku = keys[u]
                if u < t:
                    for j in range(w):
                        rank[j] += np.int32(ku[j] <= kt[j])
                elif u > t:
                    for j in range(w):
                        rank[j] += np.int32(ku[j] < kt[j])
            for j in range(w):
                blk[rank[j], j] = kt[j]


@njit(nogil=True, cache=True)
def _count_block(
    x: np.ndarray, rows: np.ndarray, c0: int, c1: int, bounds: np.ndarray, counts: np.ndarray
) -> None:
    """Add the bucket ``u`` of every value ``x[r, j]``, ``r`` in ``rows``, ``j`` in
    ``[c0, c1)`` (whole blocks) to ``counts[j // BOUNDS_BLOCK, u, j % BOUNDS_BLOCK]`` (module
    docstring: buckets ``2t`` open, ``2t + 1`` the key ``s_t``).

    The bucket is found by counting the boundaries below each value, vectorised across the
    block's columns (``m`` compares per value; a binary search's branches cannot be predicted
    and its loads cannot be vectorised)."""
    m = bounds.shape[1]
    bw = bounds.shape[2]
    d = x.shape[1]
    idx = np.empty(bw, dtype=np.int32)
    for t0 in range(c0, c1, bw):
        t1 = min(t0 + bw, d)
        w = t1 - t0
        blk = bounds[t0 // bw]
        cnt = counts[t0 // bw]
        for r in rows:
            bits = x[r, t0:t1].view(np.int32)
            for j in range(w):
                idx[j] = 0
            for t in range(m):
                bt = blk[t]
                for j in range(w):
                    idx[j] += np.int32(bt[j] < _key(bits[j]))
            for j in range(w):
                i = idx[j]
                point = 0
                if i < m:
                    point = np.int32(blk[i, j] == _key(bits[j]))
                cnt[2 * i + point, j] += np.uint16(1)


@njit(nogil=True, cache=True)
def _locate(
    bounds: np.ndarray,
    counts: np.ndarray,
    t0: int,
    w: int,
    ranks: np.ndarray,
    k: int,
    lo: np.ndarray,
    hi: np.ndarray,
    below: np.ndarray,
    size: np.ndarray,
) -> None:
    """For each rank ``q`` and column ``j`` of the tile at ``t0`` (whole blocks of
    :data:`BOUNDS_BLOCK` from ``t0``): the inclusive key range ``[lo, hi]`` of the bucket
    holding it, the number of values below that bucket and the bucket's count (``k`` values
    counted per column).

    The counts are stored bucket-major per block, so the running sums over the buckets are
    vectorised across the block's columns: the buckets are visited in order until every
    column's running sum exceeds the largest rank, and the one where a column's sum first
    exceeds a rank is kept, without branches."""
    m = bounds.shape[1]
    bw = bounds.shape[2]
    nb = counts.shape[1]
    nq = ranks.shape[0]
    cum = np.empty(bw, dtype=np.int32)
    at = np.empty((nq, bw), dtype=np.int32)
    before = np.empty((nq, bw), dtype=np.int32)
    n = np.empty((nq, bw), dtype=np.int32)
    last = np.int32(ranks.max())
    for h0 in range(0, w, bw):
        wb = min(bw, w - h0)
        blk = bounds[(t0 + h0) // bw]
        cnt = counts[(t0 + h0) // bw]
        for j in range(wb):
            cum[j] = 0
            for q in range(nq):
                at[q, j] = 0
                before[q, j] = 0
                n[q, j] = 0
        for u in range(nb):
            c = cnt[u]
            for q in range(nq):
                r = np.int32(ranks[q])
                aq = at[q]
                bq = before[q]
                nq_ = n[q]
                for j in range(wb):
                    here = np.int32(c[j])
                    hit = (cum[j] <= r) & (cum[j] + here > r)
                    aq[j] = u if hit else aq[j]
                    bq[j] = cum[j] if hit else bq[j]
                    nq_[j] = here if hit else nq_[j]
            least = np.int32(k)
            for j in range(wb):
                cum[j] += np.int32(c[j])
                least = min(least, cum[j])
            if least > last:
                break  # every column is past every rank
        for q in range(nq):
            for j in range(wb):
                u = at[q, j]
                t = u >> 1
                if u & 1:
                    lo[q, h0 + j] = blk[t, j]
                    hi[q, h0 + j] = blk[t, j]
                else:
                    lo[q, h0 + j] = blk[t - 1, j] + 1 if t > 0 else _INT32_MIN
                    hi[q, h0 + j] = blk[t, j] - 1 if t < m else _INT32_MAX
                below[q, h0 + j] = before[q, j]
                size[q, h0 + j] = n[q, j]


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
    compresses (:func:`_split`) between the three rows of ``scratch`` (``(3, >= n + 16)``
    int32): each step keeps the side holding the rank; when nothing lies below the pivot, the
    run of keys equal to it is split off (runs of equal keys end it). Rank ``r + 1`` is the
    least of what was set aside above the rank, or the next element of the run."""
    nxt = np.int32(_INT32_MAX)
    cur = -1  # vals, then a row of scratch
    size = vals.shape[0]
    while size > 1:
        src = vals if cur < 0 else scratch[cur]
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


@njit(nogil=True, cache=True, inline="always")
def _bound(key: np.int32, high: bool, buf: np.ndarray) -> np.float32:
    """The float32 bound equivalent to the key bound ``key`` of a gather range ``[a, z]`` (low
    end ``a``, or high end ``z`` with ``high``): for every finite float32 ``v``, ``v >= bound``
    iff ``_key(v) >= a`` and ``v <= bound`` iff ``_key(v) <= z``. The int32 extremes (no bound,
    or an empty range) become infinities; the key ``-1`` (``-0.0``, never a canonical key) is
    ``-0.0`` as a low end (zeros inside) and the smallest negative float32 as a high end (zeros
    outside). ``buf`` is a float32 scratch of length 1."""
    if key == np.int32(_INT32_MIN):
        return np.float32(-np.inf)
    if key == np.int32(_INT32_MAX):
        return np.float32(np.inf)
    if high and key == np.int32(-1):
        key = np.int32(-2)
    bits = buf.view(np.int32)
    bits[0] = key ^ ((key >> 31) & np.int32(0x7FFFFFFF))
    return buf[0]


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
    multiple of :data:`TILE`) of the finite float32 rows ``x[rows]``, from bucket counts of
    exactly those rows.

    Writes ``out[c0:c1]`` and adds to ``used`` (``(K,)``, in the order of ``rows``) the per-row
    counts of :func:`coordinator.streaming_select.coordinatewise_block`. Returns the number of
    tiles that needed the counting selection.
    """
    k = rows.shape[0]
    ranks = np.empty(2, dtype=np.int64)
    if trim < 0:
        ranks[0] = (k - 1) // 2
        ranks[1] = k // 2
    else:
        ranks[0] = trim
        ranks[1] = k - 1 - trim
    lo = np.empty((2, TILE), dtype=np.int32)
    hi = np.empty((2, TILE), dtype=np.int32)
    below = np.empty((2, TILE), dtype=np.int64)
    size = np.empty((2, TILE), dtype=np.int64)
    a = np.empty((2, TILE), dtype=np.int32)  # gather ranges (empty: a > z)
    z = np.empty((2, TILE), dtype=np.int32)
    fa = np.empty((2, TILE), dtype=np.float32)  # the same ranges as float32 bounds
    fz = np.empty((2, TILE), dtype=np.float32)
    scratch = np.empty(1, dtype=np.float32)
    shared = np.zeros(TILE, dtype=np.uint8)
    start = np.empty((2, TILE + 1), dtype=np.int64)  # each column's segment of the box
    fill = np.empty((2, TILE), dtype=np.int64)
    box = np.empty((2, TILE * GATHER_LIMIT + 16), dtype=np.int32)  # slack: _pick reads past
    work = np.empty((3, COLUMN_LIMIT + 16), dtype=np.int32)  # _pick's rows
    result = np.empty((2, 2, TILE), dtype=np.int64)
    low = np.empty(TILE, dtype=np.float32)
    high = np.empty(TILE, dtype=np.float32)
    acc = np.empty(TILE, dtype=np.float64)
    kept = np.float64(k - 2 * trim)
    fallbacks = 0
    keys = np.empty((0, 0), dtype=np.int32)
    for t0 in range(c0, c1, TILE):
        t1 = min(t0 + TILE, c1)
        w = t1 - t0
        _locate(bounds, counts, t0, w, ranks, k, lo, hi, below, size)
        most = 0
        for q in range(2):
            start[q, 0] = 0
        for j in range(w):
            shared[j] = np.uint8(lo[0, j] == lo[1, j])
            for q in range(2):
                n = size[q, j]
                if lo[q, j] == hi[q, j] or (q == 1 and shared[j]):
                    a[q, j] = _INT32_MAX  # a single key (or the other rank's bucket): no gather
                    z[q, j] = _INT32_MIN
                    n = 0
                else:
                    a[q, j] = lo[q, j]
                    z[q, j] = hi[q, j]
                    most = max(most, n)
                fa[q, j] = _bound(a[q, j], False, scratch)
                fz[q, j] = _bound(z[q, j], True, scratch)
                start[q, j + 1] = start[q, j] + n
                fill[q, j] = start[q, j]
        if most > COLUMN_LIMIT or max(start[0, w], start[1, w]) > w * GATHER_LIMIT:
            # Crowded bucket: the counting selection, from the buckets' exact brackets.
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
            full = w // 8  # columns in whole groups of eight lanes
            for i in range(k):
                if i + AHEAD < k:
                    ahead = x[rows[i + AHEAD], t0:t1]
                    for off in range(0, w, 16):
                        _prefetch(ahead, off)
                row = x[rows[i], t0:t1]
                bits = row.view(np.int32)
                a0 = fa[0]
                a1 = fa[1]
                z0 = fz[0]
                z1 = fz[1]
                # compared as floats, eight lanes at a time into bit masks of 64 columns; keys
                # are computed for the values gathered only
                for g in range((w + 63) // 64):
                    p0 = np.uint64(0)
                    p1 = np.uint64(0)
                    lanes = min(8, full - 8 * g)
                    for u in range(lanes):
                        off = 64 * g + 8 * u
                        p0 |= _inside8(row, a0, z0, off) << np.uint64(8 * u)
                        p1 |= _inside8(row, a1, z1, off) << np.uint64(8 * u)
                    for j in range(64 * g + 8 * lanes, min(64 * g + 64, w)):
                        v = row[j]
                        bit = np.uint64(j - 64 * g)
                        p0 |= np.uint64((v >= a0[j]) & (v <= z0[j])) << bit
                        p1 |= np.uint64((v >= a1[j]) & (v <= z1[j])) << bit
                    while p0 != 0:
                        j = 64 * g + np.int64(_trailing_zeros(p0))
                        p0 &= p0 - np.uint64(1)
                        box[0, fill[0, j]] = _key(bits[j])
                        fill[0, j] += 1
                    while p1 != 0:
                        j = 64 * g + np.int64(_trailing_zeros(p1))
                        p1 &= p1 - np.uint64(1)
                        box[1, fill[1, j]] = _key(bits[j])
                        fill[1, j] += 1
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
        if trim < 0:
            for j in range(w):
                if ranks[0] == ranks[1]:
                    out[t0 + j] = lw[j]
                else:
                    out[t0 + j] = np.float32(0.5 * (np.float64(lw[j]) + np.float64(hw[j])))
            for i in range(k):
                row = x[rows[i], t0:t1]
                n = np.int64(0)
                for j in range(w):
                    v = row[j]
                    n += np.int64(lw[j] <= v) & np.int64(v <= hw[j])
                used[i] += n
        else:
            aw = acc[:w]
            for j in range(w):
                aw[j] = 0.0
            for i in range(k):
                row = x[rows[i], t0:t1]
                n = np.int64(0)
                for j in range(w):
                    v = row[j]
                    c = lw[j] if v < lw[j] else v
                    c = hw[j] if c > hw[j] else c
                    aw[j] += np.float64(c)
                    n += np.int64(c == v)
                used[i] += n
            for j in range(w):
                s = aw[j] - trim * (np.float64(lw[j]) + np.float64(hw[j]))
                out[t0 + j] = np.float32(s / kept)
    return fallbacks


class BucketCounts:
    """Bucket boundaries and per-coordinate bucket counts of one round's admitted rows.

    Parameters
    ----------
    d : int
        Values per update.

    Notes
    -----
    Rows are registered by :meth:`add` and counted by :meth:`flush` (the boundaries are taken
    at the first flush that sees :data:`SAMPLE_ROWS` rows). Not thread-safe.
    """

    def __init__(self, d: int) -> None:
        self.d = int(d)
        self.bounds: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.ready = False
        self.order: list[int] = []
        self.counted: set[int] = set()
        self._pending: list[int] = []
        #: Tiles of the last close that used the counting selection.
        self.fallback_tiles = 0

    def reset(self) -> None:
        """Forget the round's rows and boundaries (the arrays are reused)."""
        self.ready = False
        self.order = []
        self.counted = set()
        self._pending = []

    def add(self, row: int) -> None:
        """Register an admitted row (counted at the next :meth:`flush`)."""
        self.order.append(int(row))
        self._pending.append(int(row))

    def flush(self, buffer: np.ndarray) -> int:
        """Take the boundaries once :data:`SAMPLE_ROWS` rows are in, and count every row
        registered since the last flush; return the number of rows counted."""
        if not self.ready:
            m = SAMPLE_ROWS
            if len(self.order) < m:
                return 0
            if self.bounds is None or self.counts is None or self.bounds.shape[1] != m:
                blocks = -(-self.d // BOUNDS_BLOCK)
                self.bounds = np.empty((blocks, m, BOUNDS_BLOCK), dtype=np.int32)
                self.counts = np.zeros((blocks, 2 * m + 1, BOUNDS_BLOCK), dtype=np.uint16)
            else:
                self.counts.fill(0)
            sample = np.asarray(self.order[:m], dtype=np.int64)
            bounds = self.bounds
            map_column_blocks(
                lambda c: _bounds_block(buffer, sample, c.start, c.stop, bounds), self.d, _TASK
            )
            self.ready = True
            self._pending = list(self.order)
        if not self._pending:
            return 0
        rows = np.asarray(self._pending, dtype=np.int64)
        assert self.bounds is not None and self.counts is not None
        bounds, counts = self.bounds, self.counts
        map_column_blocks(
            lambda c: _count_block(buffer, rows, c.start, c.stop, bounds, counts), self.d, _TASK
        )
        self.counted.update(self._pending)
        self._pending = []
        return int(rows.size)

    def covers(self, rows: list[int]) -> bool:
        """Whether the counts are exactly those of ``rows`` (after a :meth:`flush`)."""
        return self.ready and not self._pending and self.counted == set(rows)


def _close(
    buffer: np.ndarray, rows: list[int], buckets: BucketCounts, trim: int
) -> tuple[np.ndarray, np.ndarray]:
    assert buckets.bounds is not None and buckets.counts is not None
    idx = np.asarray(rows, dtype=np.int64)
    k = idx.size
    d = buffer.shape[1]
    out = np.empty(d, dtype=np.float32)
    bounds, counts = buckets.bounds, buckets.counts

    def task(cols: slice) -> tuple[np.ndarray, int]:
        used = np.zeros(k, dtype=np.int64)
        n = bucket_block(buffer, idx, cols.start, cols.stop, trim, bounds, counts, out, used)
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

    Complexity: one read of the rows plus in-cache work per tile (module docstring).
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
