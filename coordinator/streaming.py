"""Streaming round state: each admitted update does its share of the round's work on admission.

The batch rules (:mod:`coordinator.aggregators`) receive the round's ``(K, d)`` update matrix only
when the round closes, and the distance-based ones then compute its Gram matrix
``G = X X^T`` — ``O(K² d)`` on the critical path. A :class:`StreamingRound` keeps instead:

* a preallocated ``(capacity, d)`` float32 buffer, one row per board (row = the board's index),
  into which each admitted update is copied once (and which the engine's admitted entries then
  point into: no second copy of the matrix, no ``np.stack`` at close);
* the Gram matrix in float64, extended by the rows of every update admitted since the last
  :meth:`StreamingRound.flush` (``O(n d)`` per update against the ``n`` rows already there;
  updates admitted together share one pass over the old rows);
* per row: the update's payload digest (duplicate detection), its squared norm and largest
  absolute value (the global-model guard), its dot product with the server's own update when
  one is set (FLTrust);
* the number of rows admitted, in admission order.

At close, :mod:`coordinator.streaming_rules` computes Krum, Multi-Krum, Bulyan's selection,
FLTrust's trust scores and SIREN's weight analysis from these, in ``O(K²)`` plus the rule's own
final pass over the buffer.

**The dot-product kernel.** Every Gram entry (and every dot with the server update) is the same
function of its two rows, whatever the order the updates arrived in or how many were flushed
together: the columns are cut into :data:`BLOCK`-wide blocks grouped into :data:`CHUNKS` fixed
chunks; within a block the exact float64 products of the float32 values are summed by one
compiled loop (a fixed vectorised reduction, the same for every pair), block sums are added in
column order within a chunk, and chunk sums in chunk order. Hence ``G[i, j] == G[j, i]``
exactly, two bit-identical rows have bit-identical Gram rows (their distances to every other
row are exactly equal and their mutual distance is exactly 0, so Krum's ties stay ties), and
the in-process simulator and the MQTT coordinator get the same bits whatever the arrival order.

**Error bound.** Each entry is a float64 sum of exact products; any summation order of ``n``
terms is within ``γ_n Σ|x_i x_j| <= γ_n |x_i| |x_j|`` of the exact value, with
``γ_n = n u / (1 - n u)``, ``u = 2^-53``. :func:`dot_error_factor` returns ``γ_n`` for ``n`` the
longest chain of additions either this kernel or the batch rule's blocked BLAS products can
form; :mod:`coordinator.streaming_rules` uses it to certify that a selection made from these
entries is the one the batch rule makes from its own.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence

import numpy as np
from numba import njit

from coordinator import streaming_buckets
from coordinator.aggregators.base import InvalidParameterError, parallel_map
from coordinator.aggregators.coordinatewise import trim_count
from coordinator.streaming_buckets import BucketCounts
from coordinator.streaming_tails import TailSums

#: Columns per block of the dot-product kernel.
BLOCK = 1024
#: Column chunks computed in parallel and summed in chunk order (fixed: results never depend on
#: the number of threads).
CHUNKS = 8
#: New rows whose dot products share one pass over the old rows.
GROUP = 16
_UNIT = 2.0**-53
#: Products below which pair_dots runs its chunks on the calling thread (waking the pool would
#: cost more than the work).
_PARALLEL_WORK = 1 << 24


@njit(nogil=True, fastmath={"reassoc", "contract"}, cache=True)
def _block_dot(a: np.ndarray, b: np.ndarray) -> float:
    """``sum_k a[k] * b[k]``: float64 ``a``, float32 ``b``; the products are exact."""
    acc = 0.0
    for k in range(a.shape[0]):
        acc += a[k] * b[k]
    return acc


@njit(nogil=True, cache=True)
def _chunk_dots(
    x: np.ndarray,
    new: np.ndarray,
    old: np.ndarray,
    b0: int,
    b1: int,
    width: int,
    out: np.ndarray,
) -> None:
    """``out[a, b] = sum`` over column blocks ``[b0, b1)`` (in order) of the dot of rows
    ``new[a]`` and ``old[b]`` of ``x`` restricted to the block."""
    d = x.shape[1]
    nn = new.shape[0]
    scratch = np.empty((min(nn, GROUP), width), dtype=np.float64)
    for a in range(nn):
        for b in range(old.shape[0]):
            out[a, b] = 0.0
    for g0 in range(0, nn, GROUP):
        g1 = min(g0 + GROUP, nn)
        for blk in range(b0, b1):
            s = blk * width
            e = min(s + width, d)
            w = e - s
            for a in range(g0, g1):
                src = x[new[a], s:e]
                dst = scratch[a - g0]
                for k in range(w):
                    dst[k] = src[k]
            for b in range(old.shape[0]):
                row = x[old[b], s:e]
                for a in range(g0, g1):
                    out[a, b] += _block_dot(scratch[a - g0, :w], row)


def _chunks(d: int) -> list[tuple[int, int]]:
    """The fixed column chunks, as ranges of block indices."""
    blocks = -(-d // BLOCK)
    edges = np.linspace(0, blocks, CHUNKS + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def pair_dots(x: np.ndarray, new: Sequence[int], old: Sequence[int]) -> np.ndarray:
    """``(len(new), len(old))`` float64 dot products of rows of the C-contiguous float32 ``x``,
    each computed by the module's fixed kernel (module docstring).

    Complexity: ``O(len(new) len(old) d)`` time, one pass over the ``old`` rows per
    :data:`GROUP` new rows, ``O(GROUP · BLOCK)`` extra memory per thread.
    """
    mat = np.asarray(x)
    if mat.dtype != np.float32 or not mat.flags.c_contiguous:
        raise ValueError("pair_dots needs a C-contiguous float32 matrix")
    a = np.asarray(new, dtype=np.int64)
    b = np.asarray(old, dtype=np.int64)
    if a.size == 0 or b.size == 0:
        return np.zeros((a.size, b.size), dtype=np.float64)

    def chunk(span: tuple[int, int]) -> np.ndarray:
        part = np.empty((a.size, b.size), dtype=np.float64)
        _chunk_dots(mat, a, b, span[0], span[1], BLOCK, part)
        return part

    spans = _chunks(mat.shape[1])
    if a.size * b.size * mat.shape[1] < _PARALLEL_WORK:
        parts = [chunk(span) for span in spans]  # the same chunks: the same sums
    else:
        parts = parallel_map(chunk, spans)
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now, so no admission pays for it."""
    x = np.ones((2, BLOCK + 3), dtype=np.float32)
    pair_dots(x, [0], [0, 1])


def chain_length(d: int) -> int:
    """Longest chain of additions behind one entry of :func:`pair_dots`."""
    blocks = -(-d // BLOCK)
    return min(d, BLOCK) + -(-blocks // CHUNKS) + CHUNKS


def dot_error_factor(d: int, k: int) -> float:
    """``γ_n`` bounding ``|computed − exact| / sum_i |a_i b_i|`` for a dot product of two of the
    ``K``-row round's length-``d`` rows, both for :func:`pair_dots` and for the batch rules'
    blocked float64 products (:func:`coordinator.aggregators.krum.gram_matrix`,
    :func:`coordinator.aggregators.fltrust.dots_and_norms`), doubled as a safety margin.

    The batch products multiply column blocks of ``w = max(256, 4 MiB / 8K)`` columns with BLAS
    (any summation tree of the block's ``w`` products), then add the blocks (at most
    ``d / w``) and 4 chunks in order.
    """
    width = max(256, (4 << 20) // (8 * max(1, k)))
    batch = min(d, width) + -(-d // width) + 4
    n = 2 * max(chain_length(d), batch)
    return n * _UNIT / (1.0 - n * _UNIT)


class StreamingRound:
    """One round's admitted updates and what has been computed from them so far.

    Parameters
    ----------
    capacity : int
        Rows of the buffer: the run's number of boards (a board's row is its index).
    d : int
        Values per update.
    pairwise : bool
        Maintain the Gram matrix (Krum, Multi-Krum, Bulyan; SIREN's weight analysis). Without
        it only the buffer and the per-row figures are kept.
    coordinatewise : bool
        Keep per-coordinate bucket counts (:mod:`coordinator.streaming_buckets`: the median and
        the trimmed mean), when ``capacity`` is in ``[MIN_ROWS, MAX_ROWS]``.
    trimmed : int or float, optional
        The trimmed mean's ``beta`` (a count, or a fraction of the round's updates): keep its
        running sums and tail heaps (:mod:`coordinator.streaming_tails`), for rounds whose trim
        the heaps fit (:meth:`TailSums.fits`).

    Notes
    -----
    Not thread-safe: one thread (the coordinator's round loop) calls it.
    """

    def __init__(
        self,
        capacity: int,
        d: int,
        *,
        pairwise: bool = True,
        coordinatewise: bool = False,
        trimmed: int | float | None = None,
    ) -> None:
        if capacity < 1 or d < 1:
            raise ValueError(f"capacity and d must be >= 1, got {capacity} and {d}")
        self.capacity = int(capacity)
        self.d = int(d)
        self.pairwise = bool(pairwise)
        # Zero pages: rows of boards that never report cost no memory and hold finite zeros.
        self.buffer = np.zeros((self.capacity, self.d), dtype=np.float32)
        self.gram = np.zeros((self.capacity, self.capacity), dtype=np.float64) if pairwise else None
        self.max_abs = np.zeros(self.capacity, dtype=np.float64)
        self.sq_norms = np.zeros(self.capacity, dtype=np.float64)
        self.server_dots = np.zeros(self.capacity, dtype=np.float64)
        self.server_update: np.ndarray | None = None
        self.round: int | None = None
        self.order: list[int] = []
        self.digests: dict[int, str] = {}
        self._pending: list[int] = []
        self._gram_rows: set[int] = set()
        #: Bucket counts of the round's rows (None: not kept, or not for this round).
        self.buckets: BucketCounts | None = None
        self._buckets = (
            BucketCounts(self.d, expected=self.capacity)
            if coordinatewise
            and streaming_buckets.MIN_ROWS <= capacity <= streaming_buckets.MAX_ROWS
            else None
        )
        self.buckets = self._buckets
        #: Sums and tail heaps of the trimmed mean (None: not kept, or not for this round).
        self.tails: TailSums | None = None
        self._trimmed = trimmed
        self._tails = TailSums(self.d, self.capacity) if trimmed is not None else None
        self._reset_tails(None)

    def _reset_tails(self, expected: int | None) -> None:
        self.tails = None
        if self._tails is None or self._trimmed is None:
            return
        try:
            trim = trim_count(self._trimmed, self.capacity if expected is None else expected)
        except InvalidParameterError:  # the rule refuses it at close, as the batch engine does
            return
        if TailSums.fits(self.capacity, trim):
            self._tails.reset(trim)
            self.tails = self._tails

    # -- admission ------------------------------------------------------------------------------

    def reset(self, round_index: int | None = None, *, expected: int | None = None) -> None:
        """Start a new round: forget every row (the buffer's memory is reused).

        ``expected``: the number of updates the round waits for (client sampling), when known;
        bucket counts are kept only for rounds of at least ``MIN_ROWS`` updates.
        """
        self.round = round_index
        self.buckets = None
        if self._buckets is not None and (
            expected is None or expected >= streaming_buckets.MIN_ROWS
        ):
            self._buckets.reset(self.capacity if expected is None else expected)
            self.buckets = self._buckets
        self._reset_tails(expected)
        self.order = []
        self.digests = {}
        self._pending = []
        self._gram_rows = set()
        self.server_update = None

    @property
    def rows(self) -> list[int]:
        """Rows holding an update of the round, in increasing order."""
        return sorted(self.order)

    def add(self, row: int, vector: np.ndarray, *, digest: str | None = None) -> np.ndarray:
        """Copy an admitted update into buffer row ``row``; return a view of that row.

        ``digest`` identifies the update's values (the payload's SHA-256; computed from the
        values when omitted): equal digests mean bit-identical rows. The row's Gram entries are
        computed at the next :meth:`flush` (with any other rows added before it).

        Raises
        ------
        ValueError
            If ``row`` is out of range or already holds an update of this round, or the vector
            does not have ``d`` values.
        """
        if not 0 <= row < self.capacity:
            raise ValueError(f"row {row} is not in [0, {self.capacity})")
        if row in self.digests:
            raise ValueError(f"row {row} already holds an update of this round")
        vec = np.asarray(vector).reshape(-1)
        if vec.size != self.d:
            raise ValueError(f"update has {vec.size} values, expected {self.d}")
        target = self.buffer[row]
        np.copyto(target, vec, casting="same_kind")
        if digest is None:
            digest = hashlib.sha256(np.ascontiguousarray(target, dtype="<f4").tobytes()).hexdigest()
        self.digests[row] = digest
        self.order.append(row)
        self.max_abs[row] = float(np.abs(target).max(initial=0.0))
        self.sq_norms[row] = float(pair_dots(self.buffer, [row], [row])[0, 0])
        if self.server_update is not None:
            self.server_dots[row] = float(
                server_dot_products(self.buffer, [row], self.server_update)[0]
            )
        if self.pairwise:
            self._pending.append(row)
        if self.buckets is not None:
            self.buckets.add(row)
        if self.tails is not None:
            self.tails.add(row)
        view = target.view()
        view.flags.writeable = False
        return view

    def flush(self) -> int:
        """Count the rows added since the last flush into the bucket counts and the trimmed
        mean's sums and heaps (when kept) and compute their Gram entries; return how many rows
        got Gram entries. One pass over the old rows per :data:`GROUP` new rows."""
        if self.buckets is not None:
            self.buckets.flush(self.buffer)
        if self.tails is not None:
            self.tails.flush(self.buffer)
        if not self.pairwise or not self._pending:
            return 0
        assert self.gram is not None
        new = list(self._pending)
        old = sorted(self._gram_rows | set(new))
        dots = pair_dots(self.buffer, new, old)
        for a, r in enumerate(new):
            self.gram[r, old] = dots[a]
            self.gram[old, r] = dots[a]
        self._gram_rows.update(new)
        self._pending = []
        return len(new)

    # -- the server's own update (FLTrust) --------------------------------------------------------

    def set_server_update(self, vector: np.ndarray | None) -> None:
        """Set the server's own update of the round (FLTrust) and compute its dot product with
        every row admitted so far; rows admitted later get theirs on admission."""
        if vector is None:
            self.server_update = None
            return
        g0 = np.asarray(vector, dtype=np.float32).reshape(-1)
        if g0.size != self.d:
            raise ValueError(f"server update has {g0.size} values, expected {self.d}")
        self.server_update = g0.copy()
        if self.order:
            dots = server_dot_products(self.buffer, self.order, self.server_update)
            self.server_dots[self.order] = dots

    # -- what the close reads ---------------------------------------------------------------------

    @property
    def computed_rows(self) -> set[int]:
        """Rows whose Gram entries are computed (those admitted before the last flush)."""
        return self._gram_rows

    def gram_of(self, rows: Sequence[int]) -> np.ndarray:
        """The ``(n, n)`` Gram matrix of the given rows (flushes first)."""
        if self.gram is None:
            raise ValueError("this round keeps no Gram matrix (pairwise=False)")
        self.flush()
        idx = np.asarray(rows, dtype=np.int64)
        missing = [int(r) for r in idx if int(r) not in self._gram_rows]
        if missing:
            raise ValueError(f"rows {missing[:5]} hold no update of this round")
        return self.gram[np.ix_(idx, idx)]

    def matrix(self, rows: Sequence[int]) -> np.ndarray:
        """The ``(n, d)`` updates of ``rows``: a view of the buffer when they are its first ``n``
        rows in order, else a copy."""
        idx = [int(r) for r in rows]
        if idx == list(range(len(idx))):
            view = self.buffer[: len(idx)].view()
            view.flags.writeable = False
            return view
        return self.buffer[idx]

    def groups(self, rows: Sequence[int]) -> np.ndarray:
        """For each of ``rows``, the position in ``rows`` of the first row with the same digest
        (bit-identical updates share a group)."""
        first: dict[str, int] = {}
        out = np.empty(len(rows), dtype=np.int64)
        for i, r in enumerate(rows):
            out[i] = first.setdefault(self.digests[int(r)], i)
        return out


def server_dot_products(x: np.ndarray, rows: Iterable[int], vector: np.ndarray) -> np.ndarray:
    """Dot products of rows of ``x`` with ``vector`` by :func:`pair_dots`' kernel (the vector
    is appended as a row of a small copy; only the requested rows are read)."""
    idx = [int(r) for r in rows]
    if not idx:
        return np.zeros(0, dtype=np.float64)
    ext = np.empty((len(idx) + 1, x.shape[1]), dtype=np.float32)
    ext[: len(idx)] = x[idx]
    ext[len(idx)] = vector
    return pair_dots(ext, list(range(len(idx))), [len(idx)])[:, 0]


def norms_from_gram(gram: np.ndarray) -> np.ndarray:
    """``sqrt(max(G_ii, 0))`` for every row."""
    return np.sqrt(np.maximum(np.diag(gram), 0.0))
