"""Closing a round from its streaming state (:class:`coordinator.streaming.StreamingRound`).

Each rule here returns exactly what the batch rule of :mod:`coordinator.aggregators` returns for
the same updates, computed from what admission already prepared:

* **Krum, Multi-Krum, Bulyan's selection**: squared distances ``G_ii + G_jj - 2 G_ij`` from the
  streamed float64 Gram matrix (``O(K²)``), then the batch rule's own scoring code;
* **FLTrust**: cosines from the dot products with the server update taken on admission and the
  rows' squared norms (``O(K)``), then the batch rule's combination (one pass over the rows);
* **trimmed mean**: from the running sums and tail heaps kept on admission
  (:mod:`coordinator.streaming_tails`, ``O(d)`` numbers, the rows not read again) when they
  hold exactly the round's rows at the round's trim;
* **median** and **trimmed mean**: from the bucket counts kept on admission
  (:mod:`coordinator.streaming_buckets`, one read of the rows) when the round has at least
  ``MIN_ROWS`` updates and the counts are exactly those of its rows; else the median by
  :mod:`coordinator.streaming_select` from :data:`COUNTING_FROM` updates on, and the batch
  functions below (equal results on every path);
* **SIREN's weight analysis**: :class:`StreamingCosines` (``O(1)`` per pair from the Gram
  matrix, or ``O(d)`` from the rows).

**Certified selections.** The streamed Gram entries and the batch rule's differ in their last
bits (another summation order). A selection is therefore taken from the streamed values only
when it is *certified*: every score is bounded by ``[S - Δ, S + Δ]`` where ``Δ`` covers both
computations' rounding (:func:`coordinator.streaming.dot_error_factor`), and the chosen rows'
upper bounds lie below every other row's lower bound. Bit-identical rows (equal payload
digests) have bit-identical streamed scores, as they have in the batch rule, so their exact
ties are resolved the same way (lowest index) and need no margin. An uncertified selection
(scores equal within rounding) is recomputed by the batch rule on the buffer: the result is
then the batch rule's by construction, at the batch rule's cost. Signs of FLTrust's and SIREN's
cosines are certified the same way (FLTrust falls back to the batch rule, SIREN recomputes the
one uncertain cosine exactly as the batch code does).

What may differ from the batch rule, within float tolerance: scores, trust values and cosines
as numbers (last bits); FLTrust's aggregate (its weights are those numbers); the order in which
Multi-Krum's ``info["selected"]`` lists clients whose scores are equal within rounding (the set
is certified).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from coordinator import streaming_buckets
from coordinator.aggregators import aggregate
from coordinator.aggregators.base import (
    AggregationResult,
    check_count,
    require_clients,
    validate_weights,
)
from coordinator.aggregators.coordinatewise import (
    coordinate_median,
    coordinate_trimmed_mean,
    trim_count,
    usage_verdicts,
)
from coordinator.aggregators.devices import resolve_device
from coordinator.aggregators.fltrust import fltrust_result, validate_server_update
from coordinator.aggregators.krum import (
    bulyan_result,
    distances_from_gram,
    krum_result,
    krum_scores,
    multi_krum_m,
    multi_krum_result,
    rank_by_score,
)
from coordinator.streaming import StreamingRound, dot_error_factor, pair_dots
from coordinator.streaming_bucket_close import bucket_median, bucket_trimmed_mean
from coordinator.streaming_select import median_of_columns

_UNIT = 2.0**-53
#: Rules closed from the streaming state; every other rule runs as a batch rule on the buffer.
STREAMED = frozenset({"krum", "multi_krum", "bulyan", "fltrust", "median", "trimmed_mean"})
#: From this many updates the median is found by counting (coordinator.streaming_select)
#: instead of sorting every coordinate (equal results; which is faster depends on K).
COUNTING_FROM = 512
#: Rules that need the Gram matrix.
PAIRWISE = frozenset({"krum", "multi_krum", "bulyan"})
#: Streamed rules that run as the batch rule on a torch device when one is selected: their
#: close reads every row anyway (sorted column blocks), which is what the device speeds up.
ON_DEVICE_AT_CLOSE = frozenset({"median", "trimmed_mean"})


class Margins:
    """Squared distances from a streamed Gram matrix and bounds on how far the batch rule's
    distances and Krum scores can be from them.

    Both computations' distances are within ``(γ + 4u)(|x_i| + |x_j|)²`` of the exact one (the
    Gram entries' error plus the three float64 operations), so they differ by at most
    ``E_ij = c (|x_i| + |x_j|)²`` with ``c = 2 (γ + 4u)``, norms taken slightly above the
    computed ones.
    """

    def __init__(self, gram: np.ndarray, gamma: float) -> None:
        self.dist = distances_from_gram(gram)
        self.norms = np.sqrt(np.maximum(np.diag(gram), 0.0)) * (1.0 + 2.0 * gamma)
        self.c = 2.0 * (gamma + 4.0 * _UNIT) * (1.0 + 4.0 * gamma)

    def pairs(self, rows: np.ndarray) -> np.ndarray:
        """``E`` for every pair of ``rows``."""
        s = self.norms[rows]
        total = s[:, None] + s[None, :]
        return self.c * total * total

    def score_errors(self, nth: np.ndarray, n: int, rows: np.ndarray) -> np.ndarray:
        """Per row of ``rows``, a bound on how far the batch rule's Krum score (sum of the ``n``
        smallest distances to the other rows) can be from the streamed one, given ``nth``, the
        ``n``-th smallest streamed distance of each row.

        A row ``k`` can count in either score only if ``D_ik <= nth + max E`` over the nearest
        rows (plus its own ``E_ik``); by the triangle inequality such a row has
        ``|x_k| <= |x_i| + sqrt(D_ik)``, so every ``E_ik`` involved is at most
        ``c (2|x_i| + sqrt(t))²`` for a reach ``t`` slightly above ``nth``: ``O(1)`` per row,
        and a huge-norm update far from row ``i`` does not loosen row ``i``'s bound.
        """
        s = self.norms[rows]
        a = np.maximum(nth, 0.0)

        def bound(t: np.ndarray) -> np.ndarray:
            return 1.01 * self.c * (2.0 * s + np.sqrt(np.maximum(t, 0.0))) ** 2

        near = bound(a)
        reach = (a + 2.0 * near + 8.0 * self.c * s * s) * (1.0 + 1e-6)
        return n * bound(reach)


def sorted_rows(dist: np.ndarray) -> np.ndarray:
    """Each row's distances to the other rows in increasing order (itself last, as ``inf``):
    exactly the array :func:`coordinator.aggregators.krum.krum_scores` sums."""
    out = np.array(dist, dtype=np.float64)
    np.fill_diagonal(out, np.inf)
    out.sort(axis=1)
    return out


def _bounds(scores: np.ndarray, delta: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    slack = 4.0 * (n + 1) * _UNIT * (np.abs(scores) + delta)
    return scores + delta + slack, scores - delta - slack


def _separated(
    upper: np.ndarray, lower: np.ndarray, groups: np.ndarray, inside: np.ndarray
) -> bool:
    """Whether every row of ``inside`` (boolean mask) scores strictly below every row outside
    it in any computation within the bounds, bit-identical rows (same group) excepted."""
    ins = np.flatnonzero(inside)
    out = np.flatnonzero(~inside)
    if ins.size == 0 or out.size == 0:
        return True
    clash = upper[ins][:, None] >= lower[out][None, :]
    clash &= groups[ins][:, None] != groups[out][None, :]
    return not bool(clash.any())


def certified_scores(margins: Margins, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Krum scores with ``n`` neighbours (bit-identical to the batch code's on the same
    distances) and their upper and lower bounds for the batch computation."""
    srt = sorted_rows(margins.dist)
    scores = np.asarray(srt[:, :n].sum(axis=1), dtype=np.float64)
    rows = np.arange(srt.shape[0])
    upper, lower = _bounds(scores, margins.score_errors(srt[:, n - 1], n, rows), n)
    return scores, upper, lower


def _nearest(dist: np.ndarray, margin: np.ndarray, groups: np.ndarray, i: int) -> int | None:
    """Row ``i``'s nearest other row when certified (every row outside that row's group is
    farther in any computation within the margins), else None."""
    d = dist[i].copy()
    d[i] = np.inf
    j = int(np.argmin(d))
    others = (groups != groups[j]) & (np.arange(d.size) != i)
    if np.any(d[others] - margin[i, others] <= d[j] + margin[i, j]):
        return None
    return j


def _nearest_pair_tie(
    dist: np.ndarray,
    margin: np.ndarray,
    groups: np.ndarray,
    scores: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    best: int,
) -> bool:
    """Certify a one-neighbour Krum step whose best row ties with others.

    With one neighbour two rows that are each other's nearest have *exactly* equal scores (the
    same distance) in both computations; the batch rule then orders them by their total
    distance to the remaining rows. The step is certified when every row whose score bounds
    overlap ``best``'s is such a partner of ``best`` and its total distance is larger than
    ``best``'s in any computation within the margins.
    """
    partner = _nearest(dist, margin, groups, best)
    if partner is None or _nearest(dist, margin, groups, partner) not in (
        best,
        *np.flatnonzero(groups == groups[best]).tolist(),
    ):
        return False
    totals = dist.sum(axis=1)
    spread = margin.sum(axis=1) + 4.0 * dist.shape[0] * _UNIT * totals
    for j in range(dist.shape[0]):
        if j == best or groups[j] == groups[best] or upper[best] < lower[j]:
            continue
        if groups[j] != groups[partner] or scores[j] != scores[best]:
            return False
        if not totals[best] + spread[best] < totals[j] - spread[j]:
            return False
    return True


def certified_iterated_krum(
    margins: Margins, groups: np.ndarray, f: int, count: int
) -> tuple[np.ndarray, bool]:
    """Bulyan's selection (the steps of
    :func:`coordinator.aggregators.krum.iterated_krum_select`, with bit-identical scores), and
    whether every step's choice is certified.

    The rows' sorted distances are sorted once and updated as rows are chosen (each chosen
    row's distance is removed from every other row), ``O(r²)`` per step instead of a sort.
    """
    dist = margins.dist
    remaining = np.arange(dist.shape[0])
    srt = sorted_rows(dist)
    chosen: list[int] = []
    for _ in range(count):
        r = remaining.size
        best = 0
        if r > 1:
            n = min(max(r - f - 2, 1), r - 1)
            scores = np.asarray(srt[:, :n].sum(axis=1), dtype=np.float64)
            tied = np.flatnonzero(scores == scores.min())
            if tied.size > 1:  # the batch rule's tie-break: total distance, then index
                totals = dist[np.ix_(remaining[tied], remaining)].sum(axis=1)
                best = int(tied[np.lexsort((tied, totals))[0]])
            else:
                best = int(tied[0])
            upper, lower = _bounds(scores, margins.score_errors(srt[:, n - 1], n, remaining), n)
            g = groups[remaining]
            others = g != g[best]
            if np.any(lower[others] <= upper[best]):
                sub = dist[np.ix_(remaining, remaining)]
                if n != 1 or not _nearest_pair_tie(
                    sub, margins.pairs(remaining), g, scores, upper, lower, best
                ):
                    return np.asarray(chosen, dtype=np.int64), False
            # Remove the chosen row, and its distance from every other row's sorted list.
            gone = dist[remaining, remaining[best]]
            pos = np.argmax(srt == gone[:, None], axis=1)
            keep = np.ones(srt.shape, dtype=bool)
            keep[np.arange(r), pos] = False
            rows = np.ones(r, dtype=bool)
            rows[best] = False
            srt = srt[keep].reshape(r, r - 1)[rows]
        chosen.append(int(remaining[best]))
        remaining = np.delete(remaining, best)
    return np.asarray(chosen, dtype=np.int64), True


class StreamedClose:
    """Close one round's rule from a :class:`StreamingRound`.

    Parameters
    ----------
    stream : StreamingRound
        The round's state.
    rows : sequence of int
        The buffer rows of the updates to aggregate, in the order the batch rule would see
        them (increasing board index).
    """

    def __init__(self, stream: StreamingRound, rows: Sequence[int]) -> None:
        self.stream = stream
        self.rows = [int(r) for r in rows]
        self.k = len(self.rows)
        self.gamma = dot_error_factor(stream.d, self.k)
        #: How the last :meth:`aggregate` was computed: ``streamed`` or ``batch: <why>``.
        self.how = ""
        #: The device of the last :meth:`aggregate` (Bulyan's coordinate stage runs there).
        self.device = "numpy"
        self._matrix: np.ndarray | None = None

    @property
    def matrix(self) -> np.ndarray:
        """The ``(K, d)`` updates (a view of the buffer when possible)."""
        if self._matrix is None:
            self._matrix = self.stream.matrix(self.rows)
        return self._matrix

    def _distances(self) -> tuple[Margins, np.ndarray]:
        gram = self.stream.gram_of(self.rows)
        return Margins(gram, self.gamma), self.stream.groups(self.rows)

    def aggregate(
        self,
        name: str,
        *,
        weights: Any = None,
        rng: np.random.Generator | None = None,
        state: Any = None,
        device: str | None = None,
        **params: Any,
    ) -> AggregationResult:
        """The result of rule ``name`` on the rows: the batch rule's, computed from the
        streaming state when the rule is in :data:`STREAMED` (and certified), else by the
        batch rule on the buffer.

        With a torch ``device`` (:mod:`coordinator.aggregators.devices`) the rules that read
        every row at close anyway (median, trimmed mean) and every batch fallback run there;
        the Gram-based closes stay streamed (their ``O(K^2 d)`` work was done on admission),
        Bulyan's coordinate stage excepted.
        """
        where = self.device = resolve_device(device)
        if where != "numpy" and name in ON_DEVICE_AT_CLOSE:
            self.how = f"batch on {where}"
            return aggregate(
                name, self.matrix, weights=weights, rng=rng, state=state, device=where, **params
            )
        streamed = None
        if name in STREAMED and not (name in PAIRWISE and self.stream.gram is None):
            streamed = getattr(self, f"_{name}")(validate_weights(weights, self.k), **params)
        if streamed is not None:
            self.how = "streamed"
            return streamed
        if not self.how.startswith("batch"):
            self.how = "batch: not streamed"
        return aggregate(
            name, self.matrix, weights=weights, rng=rng, state=state, device=where, **params
        )

    def _fallback(self, why: str) -> AggregationResult | None:
        """Record why the batch rule must close the round; returns None (no streamed result)."""
        self.how = f"batch: {why}"
        return None

    # -- the rules --------------------------------------------------------------------------------

    def _krum(self, weights: np.ndarray, *, f: int) -> AggregationResult | None:
        fv = check_count("f", f)
        require_clients("krum", self.k, 2 * fv + 3, "2f+3", f=fv)
        margins, groups = self._distances()
        scores, upper, lower = certified_scores(margins, self.k - fv - 2)
        inside = np.zeros(self.k, dtype=bool)
        inside[rank_by_score(scores)[0]] = True
        if not _separated(upper, lower, groups, inside):
            return self._fallback("Krum scores equal within rounding")
        return krum_result(self.matrix, scores, fv)

    def _multi_krum(
        self, weights: np.ndarray, *, f: int, m: int | None = None, weighted: bool = False
    ) -> AggregationResult | None:
        fv = check_count("f", f)
        require_clients("multi_krum", self.k, 2 * fv + 3, "2f+3", f=fv)
        mv = multi_krum_m(self.k, fv, m)
        margins, groups = self._distances()
        scores, upper, lower = certified_scores(margins, self.k - fv - 2)
        selected = rank_by_score(scores)[:mv]
        inside = np.zeros(self.k, dtype=bool)
        inside[selected] = True
        if not _separated(upper, lower, groups, inside):
            return self._fallback("Multi-Krum scores at the cut equal within rounding")
        return multi_krum_result(self.matrix, weights, scores, selected, fv, weighted)

    def _bulyan(self, weights: np.ndarray, *, f: int) -> AggregationResult | None:
        fv = check_count("f", f)
        require_clients("bulyan", self.k, 4 * fv + 3, "4f+3", f=fv)
        margins, groups = self._distances()
        selected, ok = certified_iterated_krum(margins, groups, fv, self.k - 2 * fv)
        if not ok:
            return self._fallback("a Bulyan selection step had scores equal within rounding")
        scores = krum_scores(margins.dist, fv)
        return bulyan_result(self.matrix, scores, selected, fv, self.device)

    def _fltrust(
        self, weights: np.ndarray, *, server_update: np.ndarray
    ) -> AggregationResult | None:
        g0 = validate_server_update(server_update, self.stream.d)
        stream = self.stream
        if stream.server_update is None or not np.array_equal(stream.server_update, g0):
            stream.set_server_update(g0)  # O(K d): the dots could not be taken on admission
        rows = self.rows
        dots = stream.server_dots[rows]
        norms = np.sqrt(np.maximum(stream.sq_norms[rows], 0.0))
        g0_norm = float(np.linalg.norm(g0.astype(np.float64)))
        bound = 2.0 * self.gamma * norms * g0_norm * (1.0 + 4.0 * self.gamma)
        unsure = (norms > 0) & (np.abs(dots) <= bound) & (g0_norm > 0)
        if unsure.any():
            return self._fallback("a cosine with the server update is 0 within rounding")
        denom = norms * g0_norm
        cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
        ts = np.maximum(np.clip(cos, -1.0, 1.0), 0.0)
        return fltrust_result(self.matrix, ts, norms, g0_norm)

    def _buckets(self) -> bool:
        """Whether the stream's bucket counts are exactly those of the rows (flushed first)."""
        buckets = self.stream.buckets
        if buckets is None or self.k < streaming_buckets.MIN_ROWS:
            return False
        buckets.flush(self.stream.buffer, final=True)
        return buckets.covers(self.rows)

    def _median(self, weights: np.ndarray, *, f: int | None = None) -> AggregationResult:
        info: dict[str, object] = {}
        if f is not None:
            fv = check_count("f", f)
            require_clients("median", self.k, 2 * fv + 1, "2f+1", f=fv)
            info["f"] = fv
        if self._buckets():
            assert self.stream.buckets is not None
            vector, used = bucket_median(self.stream.buffer, self.rows, self.stream.buckets)
        elif self.k >= COUNTING_FROM:
            vector, used = median_of_columns(self.matrix)
        else:  # a vectorised sort of a few hundred values per coordinate is faster
            vector, used = coordinate_median(self.matrix)
        return AggregationResult(vector, usage_verdicts("median", used, self.stream.d), info=info)

    def _trimmed_mean(self, weights: np.ndarray, *, beta: int | float = 0.1) -> AggregationResult:
        trim = trim_count(beta, self.k)
        require_clients("trimmed_mean", self.k, 2 * trim + 1, "2*beta+1", beta=trim)
        tails = self.stream.tails
        if tails is not None:
            tails.flush(self.stream.buffer)
        if trim > 0 and tails is not None and tails.covers(self.rows, trim):
            vector, used, _ = tails.close(self.stream.buffer, self.rows)
        elif trim > 0 and self._buckets():
            assert self.stream.buckets is not None
            buckets = self.stream.buckets
            vector, used = bucket_trimmed_mean(self.stream.buffer, self.rows, buckets, trim)
        else:
            # Without bucket counts the batch function (insertion network for small trims, a
            # vectorised sort per coordinate otherwise) measured faster than counting for both
            # order statistics (benchmarks/results/round-close.md); the results are equal.
            vector, used = coordinate_trimmed_mean(self.matrix, trim)
        verdicts = usage_verdicts("trimmed_mean", used, self.stream.d)
        return AggregationResult(vector, verdicts, info={"trim": trim})


class StreamingCosines:
    """SIREN's weight analysis cosines from a :class:`StreamingRound`.

    ``cosine(a, b)`` for two boards' indices (= buffer rows) returns ``cos(Δ_a, Δ_b)``, or
    ``None`` when either update is zero, like :func:`coordinator.siren.cosine`. With the Gram
    matrix a cosine costs ``O(1)``, else one ``O(d)`` dot product. A cosine whose sign is not
    certain (``|G_ab|`` within the rounding bound) is recomputed by ``exact`` (the batch code,
    given the two rows), so the verdict ``cos >= 0`` is always the batch rule's.
    """

    def __init__(
        self,
        stream: StreamingRound,
        exact: Callable[[np.ndarray, np.ndarray], float | None],
        k: int,
    ) -> None:
        self.stream = stream
        self.exact = exact
        self.gamma = dot_error_factor(stream.d, k)
        self.exact_calls = 0

    def __call__(self, a: int, b: int) -> float | None:
        s = self.stream
        na, nb = s.sq_norms[a], s.sq_norms[b]
        if na == 0.0 or nb == 0.0:
            return None
        if s.gram is not None and {a, b} <= s.computed_rows:
            dot = float(s.gram[a, b])
        else:
            dot = float(pair_dots(s.buffer, [a], [b])[0, 0])
        scale = float(np.sqrt(na * nb))
        if abs(dot) <= 2.0 * self.gamma * scale * (1.0 + 4.0 * self.gamma):
            self.exact_calls += 1
            return self.exact(s.buffer[a], s.buffer[b])
        return float(np.clip(dot / scale, -1.0, 1.0))
