"""Per-coordinate bucket counts and value labels kept on admission, for the median and trimmed mean.

A coordinate-wise order statistic needs, for every coordinate, the value of a given rank among
the round's ``K`` values. :mod:`coordinator.streaming_select` finds it at close by counting in
cached tiles (several in-cache passes per tile). Here most of that work is done while the
updates arrive:

1. **Boundaries.** Once the first ``m`` updates of the round are admitted (``m`` = 63, 127 or
   255, the most that is at most a third of the round: :func:`sample_rows`), each
   coordinate's ``m`` values, as order-preserving int32 keys (IEEE-754 bit patterns with the
   magnitude bits of negative numbers flipped, ``-0.0`` taken as ``+0.0``), are sorted by a
   bitonic network in vector registers, and at most :data:`MAX_PICKS` of them, evenly spaced
   with the least and greatest among them, are kept (:func:`sample_picks`):
   ``s_0 <= ... <= s_{m-1}`` below. They cut the coordinate's key line into ``2m + 1``
   buckets: the open intervals ``(s_{t-1}, s_t)`` (bucket ``2t``, with ``s_{-1} = -inf``,
   ``s_m = +inf``) and the single keys ``s_t`` (bucket ``2t + 1``). A value equal to a
   boundary has a bucket of its own, so identical updates, or attackers sending one value,
   never crowd an open bucket when one of them is among the first ``m``.
2. **Counts.** Every admitted update (the first ``m`` included) adds one to the bucket of each
   of its values, found by comparing it with every one of the coordinate's boundaries
   (vectorised across coordinates: ``O(d m)`` per update, no branches), done for the updates
   admitted since the last :meth:`BucketCounts.flush` in one sweep over the boundaries and
   counts (tiles of coordinates on the thread pool). The counts are uint16 (``K < 65536``).
3. **Labels.** The same sweep stores each value's bucket as a one-byte label, tile by tile
   (``labels[j // TILE, r, j % TILE]``), so that the close
   (:mod:`coordinator.streaming_bucket_close`) finds the values of a wanted bucket by reading
   bytes and reads only those values.

Memory: ``d m`` int32 boundaries, ``d (2m + 1)`` uint16 counts and ``K d`` byte labels (``m``
the kept keys plus the tails, at most 72; ``d = 10^6``, ``K = 1000``: 288 MB, 290 MB and 1 GB,
a quarter of the updates' buffer), allocated when the first boundaries are taken and reused
round after round.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from coordinator.aggregators.base import map_column_blocks
from coordinator.streaming_simd import prefetch as _prefetch
from coordinator.streaming_simd import sort_padded as _sort_padded

#: Least number of updates whose values set the bucket boundaries (rounds of at least
#: ``3 * 127`` and ``3 * 255`` updates sample 127 and 255: :func:`sample_rows`).
SAMPLE_ROWS = 63
#: Most sampled keys kept as boundaries (with the :data:`TAIL` ones on either side, ``2 nb +
#: 1 <= 254`` buckets: labels are bytes).
MAX_PICKS = 64
#: Boundaries added beyond either end of the sample, at these multiples of the sample's spread
#: (largest minus least value): values far outside the honest updates' range (boosted
#: attackers) then fall in other buckets than the honest tail next to them.
TAIL_STEPS = np.array([0.125, 0.5, 2.0, 8.0])
TAIL = len(TAIL_STEPS)
#: Rounds with fewer updates close without buckets (the counting costs more than it saves).
MIN_ROWS = 4 * SAMPLE_ROWS
#: Largest ``K`` the uint16 counts hold.
MAX_ROWS = 65535
#: Columns per tile of the labels and of the close.
TILE = 512
#: Columns per block of the boundaries' layout ``(blocks, m, BOUNDS_BLOCK)``.
BOUNDS_BLOCK = 256
#: Coordinates per task of the admission counting and of the close (thread pool).
_TASK = 1 << 14
# Labels are bytes, 255 meaning none.
assert 2 * (MAX_PICKS + 2 * TAIL) + 1 <= 254
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
def _bounds_block(
    x: np.ndarray, rows: np.ndarray, c0: int, c1: int, picks: np.ndarray, bounds: np.ndarray
) -> None:
    """The keys of ``x[rows, j]`` sorted, for the columns ``[c0, c1)`` (whole blocks of
    :data:`BOUNDS_BLOCK`), and those of ranks ``picks`` (increasing, ``0`` and ``m - 1``
    among them) stored as ``bounds[j // BOUNDS_BLOCK, TAIL:TAIL + len(picks), j %
    BOUNDS_BLOCK]``. Each column's ``m <= 256`` keys are sorted by a bitonic network in vector
    registers (padded with the greatest key). The :data:`TAIL` boundaries on either side lie
    :data:`TAIL_STEPS` times the sample's spread beyond its least and greatest value."""
    m = rows.shape[0]
    npk = picks.shape[0]
    tail = (bounds.shape[1] - npk) // 2
    lanes = 64 if m <= 64 else (128 if m <= 128 else 256)
    f32 = np.empty(1, dtype=np.float32)
    fbits = f32.view(np.int32)
    top = np.float64(np.finfo(np.float32).max)
    ends = np.empty(2, dtype=np.float64)
    bw = bounds.shape[2]
    d = x.shape[1]
    keys = np.empty((bw, lanes), dtype=np.int32)
    for t0 in range(c0, c1, bw):
        t1 = min(t0 + bw, d)
        w = t1 - t0
        blk = bounds[t0 // bw]
        for t in range(m):
            bits = x[rows[t], t0:t1].view(np.int32)
            for j in range(w):
                keys[j, t] = _key(bits[j])
        for j in range(w):
            kj = keys[j]
            _sort_padded(kj, m)
            for s in range(npk):
                blk[tail + s, j] = kj[picks[s]]
            for side in range(2):
                k = kj[side * (m - 1)]
                fbits[0] = k ^ ((k >> 31) & np.int32(0x7FFFFFFF))
                ends[side] = np.float64(f32[0])
            spread = ends[1] - ends[0]
            for t in range(tail):
                step = spread * TAIL_STEPS[t]
                f32[0] = np.float32(max(ends[0] - step, -top))
                blk[tail - 1 - t, j] = min(_key(fbits[0]), blk[tail, j])
                f32[0] = np.float32(min(ends[1] + step, top))
                blk[tail + npk + t, j] = max(_key(fbits[0]), blk[tail + npk - 1, j])


@njit(nogil=True, cache=True)
def _count_block(
    x: np.ndarray,
    rows: np.ndarray,
    c0: int,
    c1: int,
    bounds: np.ndarray,
    counts: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Add the bucket ``u`` of every value ``x[r, j]``, ``r`` in ``rows``, ``j`` in
    ``[c0, c1)`` (whole blocks) to ``counts[j // BOUNDS_BLOCK, u, j % BOUNDS_BLOCK]`` (module
    docstring: buckets ``2t`` open, ``2t + 1`` the key ``s_t``) and store it as the value's
    label ``labels[j // TILE, r, j % TILE]``.

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
            lab = labels[t0 // TILE, r, t0 % TILE : t0 % TILE + w]
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
                lab[j] = np.uint8(2 * i + point)


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
    bucket: np.ndarray,
) -> None:
    """For each rank ``q`` and column ``j`` of the tile at ``t0`` (whole blocks of
    :data:`BOUNDS_BLOCK` from ``t0``): the bucket holding it, the bucket's inclusive key range
    ``[lo, hi]``, the number of values below it and its count (``k`` values counted per
    column). At most two ranks are counted from either end (:func:`from_top`): the median's
    and the trimmed mean's two.

    The counts are stored bucket-major per block, so the running sums over the buckets are
    vectorised across the block's columns: the buckets are visited in order, from the top for
    the ranks in the top third and from the bottom for the others (the median's two ranks in
    one sweep), until every column's running sum is past the side's ranks; a rank's bucket is
    the first whose running sum passes it, found without branches (the buckets passed before
    it are counted)."""
    m = bounds.shape[1]
    bw = bounds.shape[2]
    nb = counts.shape[1]
    nq = ranks.shape[0]
    cum = np.empty(bw, dtype=np.int32)
    count_a = np.empty(bw, dtype=np.int32)
    before_a = np.empty(bw, dtype=np.int32)
    after_a = np.empty(bw, dtype=np.int32)
    count_b = np.empty(bw, dtype=np.int32)
    before_b = np.empty(bw, dtype=np.int32)
    after_b = np.empty(bw, dtype=np.int32)
    at = np.empty((nq, bw), dtype=np.int32)
    under = np.empty((nq, bw), dtype=np.int32)
    n = np.empty((nq, bw), dtype=np.int32)
    top_side = np.empty(nq, dtype=np.bool_)
    for q in range(nq):
        top_side[q] = from_top(ranks[q], k)
    for h0 in range(0, w, bw):
        wb = min(bw, w - h0)
        blk = bounds[(t0 + h0) // bw]
        cnt = counts[(t0 + h0) // bw]
        for side in range(2):
            # The side's ranks, two at most (a second copy of the first when alone).
            qa = -1
            qb = -1
            for q in range(nq):
                if top_side[q] == (side == 1):
                    if qa < 0:
                        qa = q
                    elif qb < 0:
                        qb = q
                    else:
                        raise ValueError("_locate takes at most two ranks per side")
            if qa < 0:
                continue
            two = qb >= 0
            if not two:
                qb = qa
            ra = np.int32(k - 1 - ranks[qa] if side else ranks[qa])
            rb = np.int32(k - 1 - ranks[qb] if side else ranks[qb])
            last = max(ra, rb)
            for j in range(wb):
                cum[j] = 0
                count_a[j] = 0
                before_a[j] = 0
                after_a[j] = np.int32(k)
                count_b[j] = 0
                before_b[j] = 0
                after_b[j] = np.int32(k)
            # The bucket holding rank r (counted from this side) is the first whose running
            # sum passes r: the buckets whose running sum is still <= r are counted, and the
            # sums on either side of r kept.
            for step in range(nb):
                u = nb - 1 - step if side else step
                if side and u >= 4:
                    # Descending addresses: the hardware prefetcher does not follow them.
                    ahead = cnt[u - 4]
                    for off in range(0, wb, 32):
                        _prefetch(ahead, off)
                c = cnt[u]
                least = np.int32(k)
                for j in range(wb):
                    v = cum[j] + np.int32(c[j])
                    cum[j] = v
                    count_a[j] += np.int32(v <= ra)
                    before_a[j] = v if v <= ra else before_a[j]
                    after_a[j] = min(after_a[j], v) if v > ra else after_a[j]
                    count_b[j] += np.int32(v <= rb)
                    before_b[j] = v if v <= rb else before_b[j]
                    after_b[j] = min(after_b[j], v) if v > rb else after_b[j]
                    least = min(least, v)
                if least > last:
                    break  # every column is past the side's ranks
            for j in range(wb):
                n[qa, j] = after_a[j] - before_a[j]
                at[qa, j] = nb - 1 - count_a[j] if side else count_a[j]
                under[qa, j] = k - after_a[j] if side else before_a[j]
            if two:
                for j in range(wb):
                    n[qb, j] = after_b[j] - before_b[j]
                    at[qb, j] = nb - 1 - count_b[j] if side else count_b[j]
                    under[qb, j] = k - after_b[j] if side else before_b[j]
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
                below[q, h0 + j] = under[q, j]
                size[q, h0 + j] = n[q, j]
                bucket[q, h0 + j] = u


@njit(nogil=True, cache=True, inline="always")
def from_top(rank: int, k: int) -> bool:
    """Whether :func:`_locate` counts ``rank`` (0-based, of ``k``) from the top: in the top
    third."""
    return 3 * rank > 2 * (k - 1)


def sample_rows(expected: int) -> int:
    """Rows sampled for the boundaries of a round of ``expected`` updates: 63, 127 or 255, the
    most that is at most a third of the round (more sampled rows, smaller buckets)."""
    m = SAMPLE_ROWS
    while 2 * m + 1 <= 255 and 3 * (2 * m + 1) <= expected:
        m = 2 * m + 1
    return m


def sample_picks(m: int) -> np.ndarray:
    """Ranks (increasing) of the ``m`` sorted sampled keys kept as boundaries: all of them up
    to :data:`MAX_PICKS`, else that many evenly spaced, the least and the greatest among them.

    The open buckets between kept keys then hold about ``K / MAX_PICKS`` values each, as with
    the smallest sample, while the values beyond the sample's least and greatest (the honest
    extremes the trimmed mean's ranks fall on when attackers sit outside them) are ``K / (m +
    1)`` on either side instead of ``K / 64``; the admission's cost per value grows with the
    number of boundaries, not with ``m``."""
    if m <= MAX_PICKS:
        return np.arange(m, dtype=np.int64)
    return np.round(np.linspace(0, m - 1, MAX_PICKS)).astype(np.int64)


class BucketCounts:
    """Bucket boundaries and per-coordinate bucket counts of one round's admitted rows.

    Parameters
    ----------
    d : int
        Values per update.
    expected : int, optional
        Updates a round is expected to bring (:func:`sample_rows`); :meth:`reset` may change it.

    Notes
    -----
    Rows are registered by :meth:`add` and counted by :meth:`flush` (the boundaries are taken
    at the first flush that sees :attr:`sample` rows). Not thread-safe.
    """

    def __init__(
        self,
        d: int,
        *,
        expected: int | None = None,
    ) -> None:
        self.d = int(d)
        #: Rows sampled for this round's boundaries.
        self.sample = SAMPLE_ROWS if expected is None else sample_rows(expected)
        self._default_sample = self.sample
        self.bounds: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        #: Each counted value's bucket, ``(tiles, rows, TILE)`` uint8 (:func:`_count_block`).
        self.labels: np.ndarray | None = None
        self.ready = False
        self.order: list[int] = []
        self.counted: set[int] = set()
        self._pending: list[int] = []
        #: Tiles of the last close that used the counting selection.
        self.fallback_tiles = 0

    def reset(self, expected: int | None = None) -> None:
        """Forget the round's rows and boundaries (the arrays are reused); ``expected``: the
        number of updates the new round waits for, when known (:func:`sample_rows`)."""
        self.sample = self._default_sample if expected is None else sample_rows(expected)
        self.ready = False
        self.order = []
        self.counted = set()
        self._pending = []

    def add(self, row: int) -> None:
        """Register an admitted row (counted at the next :meth:`flush`)."""
        self.order.append(int(row))
        self._pending.append(int(row))

    def flush(self, buffer: np.ndarray, *, final: bool = False) -> int:
        """Take the boundaries once the sampled rows are in, and count every row registered
        since the last flush; return the number of rows counted. ``final``: no more rows will
        come (the round closes): a round that brought fewer rows than its sample takes its
        boundaries from the sample its own size allows (:func:`sample_rows`)."""
        if not self.ready:
            if final and len(self.order) < self.sample:
                self.sample = sample_rows(len(self.order))
            m = min(self.sample, 256)
            if len(self.order) < m:
                return 0
            picks = sample_picks(m)
            nb = picks.size + 2 * TAIL
            blocks = -(-self.d // BOUNDS_BLOCK)
            if self.bounds is None or self.counts is None or self.bounds.shape[1] != nb:
                self.bounds = np.empty((blocks, nb, BOUNDS_BLOCK), dtype=np.int32)
                self.counts = np.zeros((blocks, 2 * nb + 1, BOUNDS_BLOCK), dtype=np.uint16)
            else:
                self.counts.fill(0)
            tiles = -(-self.d // TILE)
            if self.labels is None or self.labels.shape[1] != buffer.shape[0]:
                self.labels = np.zeros((tiles, buffer.shape[0], TILE), dtype=np.uint8)
            sample = np.asarray(self.order[:m], dtype=np.int64)
            bounds = self.bounds
            map_column_blocks(
                lambda c: _bounds_block(buffer, sample, c.start, c.stop, picks, bounds),
                self.d,
                _TASK,
            )
            self.ready = True
            self._pending = list(self.order)
        if not self._pending:
            return 0
        rows = np.asarray(self._pending, dtype=np.int64)
        assert self.bounds is not None and self.counts is not None and self.labels is not None
        bounds, counts, labels = self.bounds, self.counts, self.labels
        map_column_blocks(
            lambda c: _count_block(buffer, rows, c.start, c.stop, bounds, counts, labels),
            self.d,
            _TASK,
        )
        self.counted.update(self._pending)
        self._pending = []
        return int(rows.size)

    def covers(self, rows: list[int]) -> bool:
        """Whether the counts are exactly those of ``rows`` (after a :meth:`flush`)."""
        return self.ready and not self._pending and self.counted == set(rows)
