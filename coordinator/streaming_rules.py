"""Closing a round from its streaming state (:class:`coordinator.streaming.StreamingRound`).

Each rule here returns exactly what the batch rule of :mod:`coordinator.aggregators` returns for
the same updates, computed from what admission already prepared:

* **Krum, Multi-Krum, Bulyan's selection**: squared distances ``G_ii + G_jj - 2 G_ij`` from the
  streamed float64 Gram matrix (``O(K²)``), then the batch rule's own scoring code;
* **FLTrust**: cosines from the dot products with the server update taken on admission and the
  rows' squared norms (``O(K)``), then the batch rule's combination (one pass over the rows);
* **median, trimmed mean**: :mod:`coordinator.streaming_select` (one read of the rows);
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

from coordinator.aggregators import aggregate
from coordinator.aggregators.base import (
    AggregationResult,
    check_count,
    require_clients,
    validate_weights,
)
from coordinator.aggregators.coordinatewise import trim_count, usage_verdicts
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
from coordinator.streaming_select import median_of_columns, trimmed_mean_of_columns

_UNIT = 2.0**-53
#: Rules closed from the streaming state; every other rule runs as a batch rule on the buffer.
STREAMED = frozenset({"krum", "multi_krum", "bulyan", "fltrust", "median", "trimmed_mean"})
#: Rules that need the Gram matrix.
PAIRWISE = frozenset({"krum", "multi_krum", "bulyan"})


def distance_margins(gram: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances from a Gram matrix and, per pair, a bound ``E`` on the difference
    between them and the batch rule's (both within ``(γ + 4u)(|x_i| + |x_j|)²`` of the exact
    distance)."""
    dist = distances_from_gram(gram)
    s = np.sqrt(np.maximum(np.diag(gram), 0.0)) * (1.0 + 2.0 * gamma)
    total = s[:, None] + s[None, :]
    margin = 2.0 * (gamma + 4.0 * _UNIT) * total * total
    return dist, margin


def score_margins(dist: np.ndarray, margin: np.ndarray, n: int) -> np.ndarray:
    """Per row, a bound on how far the batch rule's Krum score (sum of the ``n`` smallest
    distances to other rows) can be from the one computed from ``dist``, when every distance
    may differ by ``margin``.

    The ``n`` nearest rows of the batch computation lie among the rows ``k`` with
    ``D_ik - E_ik <= a + max_{k in N} E_ik`` (``a`` the ``n``-th smallest distance, ``N`` the
    ``n`` nearest rows here); the scores differ by at most ``n`` times the largest ``E`` over
    them, plus the rounding of two sums of ``n`` terms.
    """
    d = np.array(dist, dtype=np.float64)
    np.fill_diagonal(d, np.inf)
    nth = np.partition(d, n - 1, axis=1)[:, n - 1]
    near = d <= nth[:, None]
    e_near = np.where(near, margin, 0.0).max(axis=1)
    reach = (d - margin) <= (nth + e_near)[:, None]
    return n * np.where(reach, margin, 0.0).max(axis=1)


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


def certified_krum(
    dist: np.ndarray, margin: np.ndarray, groups: np.ndarray, f: int, n: int | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Krum scores (the batch code on ``dist``), rows by increasing score, and whether the best
    row is certified to be the batch rule's choice."""
    scores = krum_scores(dist, f, neighbours=n)
    k = dist.shape[0]
    nn = k - f - 2 if n is None else n
    order = rank_by_score(scores)
    upper, lower = _bounds(scores, score_margins(dist, margin, nn), nn)
    inside = np.zeros(k, dtype=bool)
    inside[order[0]] = True
    return scores, order, _separated(upper, lower, groups, inside)


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
    dist: np.ndarray, margin: np.ndarray, groups: np.ndarray, scores: np.ndarray, best: int
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
    upper, lower = _bounds(scores, score_margins(dist, margin, 1), 1)
    for j in range(dist.shape[0]):
        if j == best or groups[j] == groups[best] or upper[best] < lower[j]:
            continue
        if groups[j] != groups[partner] or scores[j] != scores[best]:
            return False
        if not totals[best] + spread[best] < totals[j] - spread[j]:
            return False
    return True


def certified_iterated_krum(
    dist: np.ndarray, margin: np.ndarray, groups: np.ndarray, f: int, count: int
) -> tuple[np.ndarray, bool]:
    """Bulyan's selection (:func:`coordinator.aggregators.krum.iterated_krum_select`'s steps on
    ``dist``), and whether every step's choice is certified."""
    remaining = np.arange(dist.shape[0])
    chosen: list[int] = []
    for _ in range(count):
        r = remaining.size
        if r == 1:
            best = 0
        else:
            sub = dist[np.ix_(remaining, remaining)]
            n = min(max(r - f - 2, 1), r - 1)
            scores = krum_scores(sub, f, neighbours=n)
            best = int(rank_by_score(scores, tiebreak=sub.sum(axis=1))[0])
            upper, lower = _bounds(
                scores, score_margins(sub, margin[np.ix_(remaining, remaining)], n), n
            )
            inside = np.zeros(r, dtype=bool)
            inside[best] = True
            sub_margin = margin[np.ix_(remaining, remaining)]
            if not _separated(upper, lower, groups[remaining], inside) and not (
                n == 1 and _nearest_pair_tie(sub, sub_margin, groups[remaining], scores, best)
            ):
                return np.asarray(chosen, dtype=np.int64), False
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
        self._matrix: np.ndarray | None = None

    @property
    def matrix(self) -> np.ndarray:
        """The ``(K, d)`` updates (a view of the buffer when possible)."""
        if self._matrix is None:
            self._matrix = self.stream.matrix(self.rows)
        return self._matrix

    def _distances(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gram = self.stream.gram_of(self.rows)
        dist, margin = distance_margins(gram, self.gamma)
        return dist, margin, self.stream.groups(self.rows)

    def aggregate(
        self,
        name: str,
        *,
        weights: Any = None,
        rng: np.random.Generator | None = None,
        state: Any = None,
        **params: Any,
    ) -> AggregationResult:
        """The result of rule ``name`` on the rows: the batch rule's, computed from the
        streaming state when the rule is in :data:`STREAMED` (and certified), else by the
        batch rule on the buffer."""
        streamed = None
        if name in STREAMED and not (name in PAIRWISE and self.stream.gram is None):
            streamed = getattr(self, f"_{name}")(validate_weights(weights, self.k), **params)
        if streamed is not None:
            self.how = "streamed"
            return streamed
        if not self.how.startswith("batch"):
            self.how = "batch: not streamed"
        return aggregate(name, self.matrix, weights=weights, rng=rng, state=state, **params)

    def _fallback(self, why: str) -> AggregationResult | None:
        """Record why the batch rule must close the round; returns None (no streamed result)."""
        self.how = f"batch: {why}"
        return None

    # -- the rules --------------------------------------------------------------------------------

    def _krum(self, weights: np.ndarray, *, f: int) -> AggregationResult | None:
        fv = check_count("f", f)
        require_clients("krum", self.k, 2 * fv + 3, "2f+3", f=fv)
        dist, margin, groups = self._distances()
        scores, _, ok = certified_krum(dist, margin, groups, fv)
        if not ok:
            return self._fallback("Krum scores equal within rounding")
        return krum_result(self.matrix, scores, fv)

    def _multi_krum(
        self, weights: np.ndarray, *, f: int, m: int | None = None, weighted: bool = False
    ) -> AggregationResult | None:
        fv = check_count("f", f)
        require_clients("multi_krum", self.k, 2 * fv + 3, "2f+3", f=fv)
        mv = multi_krum_m(self.k, fv, m)
        dist, margin, groups = self._distances()
        n = self.k - fv - 2
        scores = krum_scores(dist, fv)
        selected = rank_by_score(scores)[:mv]
        upper, lower = _bounds(scores, score_margins(dist, margin, n), n)
        inside = np.zeros(self.k, dtype=bool)
        inside[selected] = True
        if not _separated(upper, lower, groups, inside):
            return self._fallback("Multi-Krum scores at the cut equal within rounding")
        return multi_krum_result(self.matrix, weights, scores, selected, fv, weighted)

    def _bulyan(self, weights: np.ndarray, *, f: int) -> AggregationResult | None:
        fv = check_count("f", f)
        require_clients("bulyan", self.k, 4 * fv + 3, "4f+3", f=fv)
        dist, margin, groups = self._distances()
        selected, ok = certified_iterated_krum(dist, margin, groups, fv, self.k - 2 * fv)
        if not ok:
            return self._fallback("a Bulyan selection step had scores equal within rounding")
        return bulyan_result(self.matrix, krum_scores(dist, fv), selected, fv)

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

    def _median(self, weights: np.ndarray, *, f: int | None = None) -> AggregationResult:
        info: dict[str, object] = {}
        if f is not None:
            fv = check_count("f", f)
            require_clients("median", self.k, 2 * fv + 1, "2f+1", f=fv)
            info["f"] = fv
        vector, used = median_of_columns(self.matrix)
        return AggregationResult(vector, usage_verdicts("median", used, self.stream.d), info=info)

    def _trimmed_mean(self, weights: np.ndarray, *, beta: int | float = 0.1) -> AggregationResult:
        trim = trim_count(beta, self.k)
        require_clients("trimmed_mean", self.k, 2 * trim + 1, "2*beta+1", beta=trim)
        vector, used = trimmed_mean_of_columns(self.matrix, trim)
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
