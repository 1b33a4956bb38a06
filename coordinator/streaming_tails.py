"""The trimmed mean's tails kept on admission: a round closes without reading its updates again.

The coordinate-wise trimmed mean drops, in every coordinate, the ``trim`` lowest and the
``trim`` highest of the round's ``K`` values and averages the rest. The mean of the rest is
``(S - L - H) / (K - 2 trim)`` with ``S`` the sum of all ``K`` values, ``L`` the sum of the
``trim`` lowest and ``H`` the sum of the ``trim`` highest. All three can be kept up to date
while the updates arrive, so the close only combines ``O(d)`` numbers:

* ``S``: each coordinate's running float64 sum;
* the lowest ``trim + 1`` values of each coordinate in a max-heap (its root is the value of
  rank ``trim``, the trimmed mean's lower bound ``low``) with the heap's float64 sum, and the
  highest ``trim + 1`` in a min-heap (root ``high``). A new value enters a heap only when it
  is beyond that heap's root (then it replaces the root), so after the first ``trim + 1``
  updates a value costs one compare per side, plus a heap step when it enters (about
  ``(trim + 1) / n`` of the values of the n-th update when they come in random order; every
  value in the worst case, still ``O(d log trim)`` per update). The updates admitted since the
  last flush are taken in together, a tile of coordinates at a time whose heaps stay in cache
  while the rows pass, the tiles spread over the thread pool;
* each coordinate's largest magnitude and least nonzero magnitude, which bound the rounding of
  the float64 sums.

**Equal to the batch rule, bit for bit.** :func:`coordinate_trimmed_mean` sums the clipped
values in float64 in client order. Every float32 value of a coordinate is a multiple of the
quantum ``q`` of its least nonzero magnitude; every partial sum here and there is a multiple of
``q`` at most ``K`` times the largest magnitude, so when ``K * max|x| < 2**53 * q`` every sum
on both sides is exact, they equal the same real number, and the results are identical. When
the magnitudes span too many binary orders for that (about 19 at ``K = 1000``), both sums may
round, each by at most a bound known from ``K``, the trim and the largest magnitude
(:func:`_reach_factor`); if every float64 within that bound of the sum here gives the same
float32 mean (float division and rounding are monotone), the batch rule's gives it too. Only
the coordinates where the bound straddles a float32 step are summed at close from the
buffer, in client order as the batch rule sums them (a tile of columns at a time, so that a
close that must sum many of them again costs about one clipped pass over the buffer: the bound
grows with the largest magnitude, and a boosted value far beyond the honest ones, trimmed away
by the batch rule, widens it for its whole coordinate).

The client ids of the heap entries give the batch rule's per-client ``used`` counts: a client's
value is left out of a coordinate exactly when it is strictly below ``low`` or above ``high``,
i.e. a heap entry other than the root and its ties. Each client's number of heap entries is
kept on admission, and the close takes off the roots and their ties (entries equal to a heap's
root form a subtree at the root). The roots, their clients and whether a child ties with them
are copied into dense per-coordinate arrays whenever a heap changes, so the close reads about
50 bytes per coordinate and no heap unless it has a tie at its root.

Memory: ``2 d (trim + 1)`` float32 values and as many int16 or int32 client rows, plus about
40 bytes per coordinate (``d = 10^6``, ``K = 1000``, 10% trimmed: 1.25 GB, 31% of the updates'
buffer).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from numba import njit

from coordinator.aggregators.base import parallel_map

#: Largest share of the updates' buffer the heaps may take (a deeper trim closes by the batch
#: function instead).
MAX_MEMORY_SHARE = 1.0
#: Bytes of heaps per tile of columns taken through a flush's rows at a time (fits the L2).
_TILE_BYTES = 256 * 1024
#: Column spans of a flush handed to the thread pool.
_SPANS = 8
#: Columns summed together when a close sums columns again from the buffer.
_RESUM_TILE = 1024


@njit(nogil=True, cache=True, inline="always")
def _above(a: float, b: float, high: bool) -> bool:
    """Whether ``a`` belongs nearer the root than ``b``: in the high heap (a min-heap of the
    highest values) the smaller, in the low heap (a max-heap of the lowest) the larger."""
    return a < b if high else a > b


@njit(nogil=True, cache=True, inline="always")
def _push(
    vals: np.ndarray, ids: np.ndarray, j: int, n: int, v: float, row: int, high: bool
) -> None:
    """Add ``v`` of ``row`` as entry ``n`` of column ``j``'s heap and sift it up."""
    pos = n
    while pos > 0:
        parent = (pos - 1) // 2
        if not _above(v, vals[j, parent], high):
            break
        vals[j, pos] = vals[j, parent]
        ids[j, pos] = ids[j, parent]
        pos = parent
    vals[j, pos] = v
    ids[j, pos] = row


@njit(nogil=True, cache=True, inline="always")
def _sift_down(vals: np.ndarray, ids: np.ndarray, j: int, size: int, high: bool) -> None:
    """Restore column ``j``'s heap after its root was replaced."""
    pos = 0
    v = vals[j, 0]
    who = ids[j, 0]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        right = child + 1
        if right < size and _above(vals[j, right], vals[j, child], high):
            child = right
        if not _above(vals[j, child], v, high):
            break
        vals[j, pos] = vals[j, child]
        ids[j, pos] = ids[j, child]
        pos = child
    vals[j, pos] = v
    ids[j, pos] = who


@njit(nogil=True, cache=True, inline="always")
def _set_root(
    vals: np.ndarray,
    ids: np.ndarray,
    j: int,
    cap: int,
    root: np.ndarray,
    root_id: np.ndarray,
    tied: np.ndarray,
) -> None:
    """Copy column ``j``'s heap root, its client and whether a child equals it (a tie at the
    root) into the dense per-column arrays the compare and the close read."""
    v = vals[j, 0]
    root[j] = v
    root_id[j] = ids[j, 0]
    tied[j] = vals[j, 1] == v or (cap > 2 and vals[j, 2] == v)


@njit(nogil=True, cache=True, inline="always")
def _enter(
    vals: np.ndarray,
    ids: np.ndarray,
    j: int,
    cap: int,
    v: float,
    row: int,
    heap_sum: np.ndarray,
    root: np.ndarray,
    root_id: np.ndarray,
    tied: np.ndarray,
    in_heap: np.ndarray,
    high: bool,
) -> None:
    """``v`` of ``row`` replaces the root of column ``j``'s full heap (it lies beyond it)."""
    in_heap[root_id[j]] -= 1
    in_heap[row] += 1
    heap_sum[j] += v
    heap_sum[j] -= vals[j, 0]
    vals[j, 0] = v
    ids[j, 0] = row
    _sift_down(vals, ids, j, cap, high)
    _set_root(vals, ids, j, cap, root, root_id, tied)


@njit(nogil=True, cache=True)
def _admit(
    buffer: np.ndarray,
    rows: np.ndarray,
    n0: int,
    cap: int,
    c0: int,
    c1: int,
    tile: int,
    state: tuple[np.ndarray, ...],
    in_heap: np.ndarray,
) -> bool:
    """Take the buffer ``rows`` (the round's updates number ``n0``, ``n0 + 1``, ... from 0)
    into columns ``[c0, c1)``, ``tile`` columns at a time so that their heaps stay in cache
    while every row passes. ``state`` is :attr:`TailSums.state`; ``in_heap`` gets the change of
    each row's number of entries in the low and the high heaps.

    Returns False when a value is a NaN or an infinity (the state is then not usable)."""
    sums, mags, vals, ids, bounds, roots, tied = state
    total, low_sum, high_sum = sums[0], sums[1], sums[2]
    max_abs, min_abs = mags[0], mags[1]
    low_vals, high_vals, low_ids, high_ids = vals[0], vals[1], ids[0], ids[1]
    low, high, low_root, high_root = bounds[0], bounds[1], roots[0], roots[1]
    low_tied, high_tied = tied[0], tied[1]
    in_low, in_high = in_heap[0], in_heap[1]
    finite = True
    for t0 in range(c0, c1, tile):
        t1 = min(c1, t0 + tile)
        for p in range(rows.shape[0]):
            row = rows[p]
            n = n0 + p
            if n < cap:  # filling: every value goes into both heaps (push, sift up)
                for j in range(t0, t1):
                    v = buffer[row, j]
                    if not np.isfinite(v):
                        finite = False  # still pushed: every heap entry stays a real row
                    total[j] += v
                    a = abs(v)
                    if a > max_abs[j]:
                        max_abs[j] = a
                    if a != 0.0 and a < min_abs[j]:
                        min_abs[j] = a
                    _push(low_vals, low_ids, j, n, v, row, False)
                    _push(high_vals, high_ids, j, n, v, row, True)
                    low_sum[j] += v
                    high_sum[j] += v
                    if n == cap - 1:
                        _set_root(low_vals, low_ids, j, cap, low, low_root, low_tied)
                        _set_root(high_vals, high_ids, j, cap, high, high_root, high_tied)
                in_low[row] += t1 - t0
                in_high[row] += t1 - t0
                continue
            for j in range(t0, t1):
                v = buffer[row, j]
                if not np.isfinite(v):
                    finite = False
                    continue
                total[j] += v
                a = abs(v)
                if a > max_abs[j]:
                    max_abs[j] = a
                if a != 0.0 and a < min_abs[j]:
                    min_abs[j] = a
                if v < low[j]:
                    _enter(low_vals, low_ids, j, cap, v, row, low_sum, low, low_root, low_tied,
                           in_low, False)  # fmt: skip
                if v > high[j]:
                    _enter(high_vals, high_ids, j, cap, v, row, high_sum, high, high_root,
                           high_tied, in_high, True)  # fmt: skip
    return finite


@njit(nogil=True, cache=True)
def _ties_below_root(vals: np.ndarray, ids: np.ndarray, j: int, cap: int, out: np.ndarray) -> None:
    """Add one to ``out`` for the client of every entry of column ``j``'s heap below the root
    that equals the root; those entries form a subtree at the root."""
    root = vals[j, 0]
    stack = [1, 2]
    while len(stack) > 0:
        pos = stack.pop()
        if pos < cap and vals[j, pos] == root:
            out[ids[j, pos]] += 1
            stack.append(2 * pos + 1)
            stack.append(2 * pos + 2)


@njit(nogil=True, cache=True)
def _reach_factor(k: int, cap: int) -> float:
    """A bound, in units of a coordinate's largest magnitude, on the rounding errors of both
    ways of summing (module notes): the batch rule's ``k`` float64 additions of clipped values
    and its ``trim (low + high)`` term, and here ``k`` additions into the total, at most ``2 k``
    additions into each heap sum (magnitudes up to ``(cap + 1)`` values) and the four terms of
    the difference; each rounding is at most ``2**-53`` of its result, taken at its largest."""
    n = float(k)
    c = float(cap)
    return 2.0**-53 * (2.0 * n * n + 4.0 * n * (c + 1.0) + 8.0 * n + 8.0 * c + 16.0) * 1.05


@njit(nogil=True, cache=True)
def _resum(
    buffer: np.ndarray,
    rows: np.ndarray,
    trim: int,
    cols: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    out: np.ndarray,
) -> None:
    """The batch rule's mean of the (increasing) columns ``cols``: clipped values added in
    float64 in client order from 0.0, less ``trim (low + high)``. The columns of a tile of
    :data:`_RESUM_TILE` are summed together, the rows' segments read one after the other."""
    k = rows.shape[0]
    kept = float(k - 2 * trim)
    acc = np.empty(_RESUM_TILE, dtype=np.float64)
    i = 0
    n = cols.shape[0]
    while i < n:
        base = cols[i] - cols[i] % _RESUM_TILE
        end = i
        while end < n and cols[end] < base + _RESUM_TILE:
            end += 1
        m = end - i
        acc[:m] = 0.0
        first = cols[i]
        if cols[end - 1] - first == m - 1:  # a run of consecutive columns: contiguous reads
            lo = low[first : first + m]
            hi = high[first : first + m]
            for r in range(k):
                seg = buffer[rows[r], first : first + m]
                for q in range(m):
                    acc[q] += np.float64(min(max(seg[q], lo[q]), hi[q]))
        else:
            for r in range(k):
                row = rows[r]
                for q in range(m):
                    j = cols[i + q]
                    acc[q] += np.float64(min(max(buffer[row, j], low[j]), high[j]))
        for q in range(m):
            j = cols[i + q]
            total = acc[q] - trim * (np.float64(low[j]) + np.float64(high[j]))
            out[j] = np.float32(total / kept)
        i = end


@njit(nogil=True, cache=True)
def _close(
    buffer: np.ndarray,
    rows: np.ndarray,
    trim: int,
    c0: int,
    c1: int,
    state: tuple[np.ndarray, ...],
    out: np.ndarray,
    ties: np.ndarray,
) -> int:
    """The trimmed mean of columns ``[c0, c1)`` into ``out``; the ties at the roots counted per
    client. Returns the number of columns summed again from the buffer (their sums neither
    exact nor certified)."""
    sums, mags, vals, ids, bounds, roots, tied = state
    total, low_sum, high_sum = sums[0], sums[1], sums[2]
    max_abs, min_abs = mags[0], mags[1]
    low_vals, high_vals, low_ids, high_ids = vals[0], vals[1], ids[0], ids[1]
    low, high, low_root, high_root = bounds[0], bounds[1], roots[0], roots[1]
    low_tied, high_tied = tied[0], tied[1]
    low_ties, high_ties = ties[0], ties[1]
    k = rows.shape[0]
    cap = trim + 1
    kept = float(k - 2 * trim)
    reach_factor = _reach_factor(k, cap)
    again = np.empty(c1 - c0, dtype=np.int64)  # columns to sum again from the buffer
    resummed = 0
    for j in range(c0, c1):
        lo = low[j]
        hi = high[j]
        low_ties[low_root[j]] += 1
        high_ties[high_root[j]] += 1
        if low_tied[j]:
            _ties_below_root(low_vals, low_ids, j, cap, low_ties)
        if high_tied[j]:
            _ties_below_root(high_vals, high_ids, j, cap, high_ties)
        biggest = np.float64(max_abs[j])
        if biggest == 0.0:
            out[j] = np.float32(0.0)
            continue
        lo64 = np.float64(lo)
        hi64 = np.float64(hi)
        acc = total[j] - (low_sum[j] - lo64) - (high_sum[j] - hi64)
        _, e = math.frexp(np.float64(min_abs[j]))
        if k * biggest * (1.0 + 2.0**-40) < math.ldexp(1.0, e - 24 + 53):
            out[j] = np.float32(acc / kept)  # every sum on both sides exact
            continue
        # Both sums rounded: the batch rule's lies within ``reach`` of ``acc``; when every
        # value in that interval gives the same float32 mean, so does the batch rule's (the
        # same zero too: -0.0 == +0.0 as numbers, so the signs are compared as well).
        reach = biggest * reach_factor
        below = np.float32((acc - reach) / kept)
        above = np.float32((acc + reach) / kept)
        if below == above and math.copysign(1.0, below) == math.copysign(1.0, above):
            out[j] = below
            continue
        again[resummed] = j
        resummed += 1
    if resummed:
        _resum(buffer, rows, trim, again[:resummed], low, high, out)
    return resummed


class TailSums:
    """The running sums and tail heaps of one round's updates (module docstring).

    Parameters
    ----------
    d : int
        Values per update.
    capacity : int
        Rows of the round's buffer (client rows are stored as int16 below 32768 rows).
    """

    def __init__(self, d: int, capacity: int) -> None:
        self.d = int(d)
        self.capacity = int(capacity)
        self._id_type = np.int16 if capacity <= np.iinfo(np.int16).max else np.int32
        self.trim = -1
        self.rows: list[int] = []
        self._pending: list[int] = []
        self.finite = True
        #: Coordinates the last :meth:`close` summed again from the buffer (None: no close yet).
        self.resummed: int | None = None
        #: Per coordinate: the total, the low heap's and the high heap's float64 sums.
        self.sums = np.zeros((3, self.d), dtype=np.float64)
        #: Per coordinate: the largest and the least nonzero magnitude.
        self.magnitudes = np.zeros((2, self.d), dtype=np.float32)
        #: Per coordinate: the low and high heaps' roots (the trimmed mean's bounds once the
        #: heaps are full), their rows, and whether a child ties with the root.
        self.bounds = np.zeros((2, self.d), dtype=np.float32)
        self._roots = np.zeros((2, self.d), dtype=self._id_type)
        self._tied = np.zeros((2, self.d), dtype=np.bool_)
        #: Per row: its entries in the low and in the high heaps.
        self.in_heap = np.zeros((2, self.capacity), dtype=np.int64)
        self._vals: np.ndarray | None = None  # (2, d, trim + 1): low heap, high heap
        self._ids: np.ndarray | None = None

    @property
    def state(self) -> tuple[np.ndarray, ...]:
        """The arrays the kernels read and write, in their order."""
        assert self._vals is not None and self._ids is not None
        return (
            self.sums,
            self.magnitudes,
            self._vals,
            self._ids,
            self.bounds,
            self._roots,
            self._tied,
        )

    @staticmethod
    def fits(capacity: int, trim: int) -> bool:
        """Whether the heaps of ``trim`` fit :data:`MAX_MEMORY_SHARE` of a buffer of
        ``capacity`` float32 rows (and ``trim`` leaves values to average)."""
        id_bytes = 2 if capacity <= np.iinfo(np.int16).max else 4
        heaps = 2 * (trim + 1) * (4 + id_bytes)
        return trim > 0 and 2 * trim < capacity and heaps <= MAX_MEMORY_SHARE * 4 * capacity

    def reset(self, trim: int) -> None:
        """Start a round whose close trims ``trim`` values per side (the heaps' arrays are
        reused while ``trim`` stays the same)."""
        if trim < 1:
            raise ValueError(f"trim must be >= 1, got {trim}")
        if self._vals is None or trim != self.trim:
            shape = (2, self.d, trim + 1)
            self._vals = np.empty(shape, np.float32)
            self._ids = np.empty(shape, self._id_type)
        self.trim = trim
        self.rows = []
        self._pending = []
        self.finite = True
        self.resummed = None
        self.sums.fill(0)
        self.magnitudes[0].fill(0)
        self.magnitudes[1].fill(np.inf)
        self.in_heap.fill(0)

    def add(self, row: int) -> None:
        """Note that buffer row ``row`` holds the round's next update; it is taken into the
        sums and heaps at the next :meth:`flush`."""
        self.rows.append(int(row))
        self._pending.append(int(row))

    def flush(self, buffer: np.ndarray) -> int:
        """Take the rows added since the last flush into the sums and heaps (column spans on
        the thread pool, tiles of columns whose heaps stay in cache while the rows pass);
        returns how many rows were taken."""
        if not self._pending:
            return 0
        if self._vals is None or self._ids is None:
            raise RuntimeError("TailSums.reset(trim) must start the round")
        rows = np.asarray(self._pending, dtype=np.int64)
        n0 = len(self.rows) - len(self._pending)
        cap = self.trim + 1
        tile = max(16, _TILE_BYTES // (2 * cap * (4 + np.dtype(self._id_type).itemsize)))
        state = self.state

        def span(cols: tuple[int, int]) -> tuple[bool, np.ndarray]:
            in_heap = np.zeros((2, self.capacity), dtype=np.int64)
            ok = _admit(buffer, rows, n0, cap, cols[0], cols[1], tile, state, in_heap)
            return bool(ok), in_heap

        pieces = max(1, min(_SPANS, self.d // tile))
        edges = np.linspace(0, self.d, pieces + 1).astype(np.int64)
        for ok, in_heap in parallel_map(span, itertools.pairwise(edges.tolist())):
            self.finite &= ok
            self.in_heap += in_heap
        self._pending = []
        return len(rows)

    def covers(self, rows: Sequence[int], trim: int) -> bool:
        """Whether :meth:`close` can answer for ``rows`` trimmed by ``trim``: exactly the rows
        added, all finite, with heaps of that trim."""
        return (
            not self._pending
            and self.finite
            and trim == self.trim
            and len(rows) == len(self.rows)
            and sorted(rows) == sorted(self.rows)
            and len(rows) > 2 * trim
        )

    def close(self, buffer: np.ndarray, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """``(vector, used, resummed)``: what :func:`coordinate_trimmed_mean` returns for the
        buffer's ``rows`` (in that order), and how many coordinates were summed again from the
        buffer. Call only when :meth:`covers` holds."""
        self.flush(buffer)
        order = np.asarray(rows, dtype=np.int64)
        out = np.empty(self.d, dtype=np.float32)
        state = self.state

        def span(cols: tuple[int, int]) -> tuple[int, np.ndarray]:
            ties = np.zeros((2, self.capacity), dtype=np.int64)
            resummed = _close(buffer, order, self.trim, cols[0], cols[1], state, out, ties)
            return int(resummed), ties

        edges = np.linspace(0, self.d, min(_SPANS, self.d) + 1).astype(np.int64)
        outside = self.in_heap.sum(axis=0)
        resummed = 0
        for count, ties in parallel_map(span, itertools.pairwise(edges.tolist())):
            resummed += count
            outside -= ties.sum(axis=0)
        used = self.d - outside[order]
        self.resummed = resummed
        return out, used.astype(np.int64), resummed


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels on a tiny round."""
    tails = TailSums(4, 5)
    tails.reset(1)
    buffer = np.arange(20, dtype=np.float32).reshape(5, 4)
    for r in range(5):
        tails.add(r)
    tails.flush(buffer)
    tails.close(buffer, range(5))
