"""Krum, Multi-Krum and Bulyan, plus the distance and scoring helpers they share.

Krum (Blanchard et al., NeurIPS 2017; as restated in the SIREN paper §2 and the PDRR paper
§2.2.1): with ``f`` Byzantine clients among ``K``, client ``i``'s score is the sum of the squared
Euclidean distances to its ``K - f - 2`` nearest other clients; the update with the lowest score
is the aggregate. Multi-Krum averages the ``m`` lowest-scoring updates. Bulyan (El Mhamdi et al.,
ICML 2018; PDRR paper §2.2.2) selects ``theta = K - 2f`` updates by iterated Krum and then, per
coordinate, averages the ``beta = theta - 2f`` selected values closest to their median.

Distances come from the Gram identity ``|x_i - x_j|^2 = G_ii + G_jj - 2 G_ij`` with ``G = X X^T``
accumulated in float64 over column blocks: one BLAS pass over the matrix instead of ``K^2``
vector differences, and never a float64 copy of the whole matrix. The absolute error of a
squared distance is about ``1e-16 * (|x_i|^2 + |x_j|^2)`` (float64 rounding of the Gram
entries), far below the float32 resolution of the updates themselves.

Ties: Krum and Multi-Krum give equal scores to the lowest client index (DESIGN.md §6), so they
are invariant to client order except when two clients have exactly equal scores (which happens
systematically only with a single neighbour, ``K - f - 2 = 1``: mutual nearest neighbours).
Bulyan's iterated Krum reaches a single neighbour in its last steps, so it breaks equal scores
by the total squared distance to the remaining clients first (see :func:`iterated_krum_select`).
"""

from __future__ import annotations

import numpy as np

import coordinator.aggregators.torch_ops as torch_ops
from coordinator.aggregators.base import (
    AggregationContext,
    AggregationResult,
    InvalidParameterError,
    Verdict,
    check_count,
    check_flag,
    column_blocks,
    map_column_blocks,
    parallel_map,
    register,
    require_clients,
    single_threaded_blas,
    weighted_combination,
)
from coordinator.aggregators.coordinatewise import count_inside

_GRAM_BLOCK_BYTES = 4 << 20
#: The columns are split into this many contiguous chunks whose partial Gram matrices are
#: computed in parallel and summed in chunk order, so the result does not depend on the number
#: of threads.
_GRAM_CHUNKS = 4


def gram_matrix(
    updates: np.ndarray, center: np.ndarray | None = None, device: str = "numpy"
) -> np.ndarray:
    """Return the ``(K, K)`` float64 Gram matrix ``G = X X^T`` of the update rows.

    Column blocks of the float32 matrix are converted to float64 in a reused buffer and
    multiplied with single-threaded BLAS (``syrk``); a few contiguous chunks of blocks run on
    the shared thread pool and their partial sums are added in a fixed order. The result has
    float64 accuracy, is the same for any thread count, and the extra memory stays one small
    block per thread.

    With ``center`` (a ``(d,)`` vector ``c``) it is the Gram matrix of the rows ``x_i − c``,
    subtracted block by block in float64. Distances recovered from a Gram matrix lose about
    ``1e-16 · max_i G_ii`` to cancellation: centring at a point near most rows keeps that
    small when one row is huge (a magnitude attack).

    With a torch ``device`` (:mod:`coordinator.aggregators.devices`) the same float64 products
    run there, one column block at a time.

    Complexity: O(K^2 d) time, O(K^2 + K * block) extra memory per thread.
    """
    if device != "numpy":
        return torch_ops.gram_matrix(updates, device, center)
    x = np.asarray(updates)
    c = None if center is None else np.asarray(center, dtype=np.float64)
    k, d = x.shape
    width = max(256, _GRAM_BLOCK_BYTES // (8 * k))
    blocks = list(column_blocks(d, width))
    chunks = [c for c in np.array_split(np.arange(len(blocks)), _GRAM_CHUNKS) if c.size]

    def chunk_gram(indices: np.ndarray) -> np.ndarray:
        part = np.zeros((k, k), dtype=np.float64)
        buf = np.empty((k, min(width, d)), dtype=np.float64)
        for i in indices.tolist():
            cols = blocks[i]
            block = buf[:, : cols.stop - cols.start]
            np.copyto(block, x[:, cols])
            if c is not None:
                block -= c[cols]
            part += block @ block.T
        return part

    with single_threaded_blas():
        parts = parallel_map(chunk_gram, chunks)
    gram = parts[0]
    for part in parts[1:]:
        gram += part
    return gram


def distances_from_gram(gram: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``G_ii + G_jj - 2 G_ij`` from a Gram matrix.

    Rounding can make a distance between (near-)identical rows slightly negative; such entries
    are clamped to 0, the diagonal is exactly 0 and the result is exactly symmetric.
    """
    g = np.asarray(gram, dtype=np.float64)
    diag = np.diag(g)
    dist = diag[:, None] + diag[None, :] - 2.0 * g
    dist = 0.5 * (dist + dist.T)
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def pairwise_sq_distances(updates: np.ndarray, device: str = "numpy") -> np.ndarray:
    """Return the ``(K, K)`` float64 matrix of squared L2 distances between update rows.

    Computed through :func:`gram_matrix` (float64 accumulation, on ``device``); see
    :func:`distances_from_gram` for the guarantees on the result.

    Complexity: O(K^2 d) time, O(K^2 + K * block) extra memory.
    """
    return distances_from_gram(gram_matrix(updates, device=device))


def krum_neighbours(k: int, f: int) -> int:
    """Number of nearest neighbours in a Krum score: ``K - f - 2``."""
    return k - f - 2


def krum_scores(sq_dists: np.ndarray, f: int, *, neighbours: int | None = None) -> np.ndarray:
    """Krum score of every client: the sum of its ``K - f - 2`` smallest squared distances.

    Parameters
    ----------
    sq_dists : np.ndarray
        ``(K, K)`` squared distances (e.g. from :func:`pairwise_sq_distances`).
    f : int
        Assumed number of Byzantine clients.
    neighbours : int, optional
        Override the neighbour count (Bulyan's last iterations use this); must be in
        ``[1, K - 1]``.

    Returns
    -------
    np.ndarray
        ``(K,)`` float64 scores; lower is more central. A client's distance to itself never
        counts; which of several equally distant neighbours is taken does not change the sum.

    Complexity: O(K^2 log K).
    """
    dist = np.array(sq_dists, dtype=np.float64)
    k = dist.shape[0]
    n = krum_neighbours(k, f) if neighbours is None else neighbours
    if not 1 <= n <= k - 1:
        raise InvalidParameterError(
            f"a Krum score needs between 1 and K-1={k - 1} neighbours, got {n} (K={k}, f={f})"
        )
    np.fill_diagonal(dist, np.inf)
    dist.sort(axis=1)
    return np.asarray(dist[:, :n].sum(axis=1), dtype=np.float64)


def rank_by_score(scores: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Client indices by increasing score.

    Equal scores are ordered by ``tiebreak`` (increasing) when given, then by increasing
    client index.
    """
    s = np.asarray(scores)
    index = np.arange(s.shape[0])
    if tiebreak is None:
        return np.argsort(s, kind="stable")
    return np.lexsort((index, np.asarray(tiebreak), s))


def multi_krum_select(sq_dists: np.ndarray, f: int, m: int) -> np.ndarray:
    """Indices of the ``m`` clients with the lowest Krum scores, best first (ties: lowest index)."""
    return rank_by_score(krum_scores(sq_dists, f))[:m]


def iterated_krum_select(sq_dists: np.ndarray, f: int, count: int) -> np.ndarray:
    """Bulyan's selection: apply Krum ``count`` times, each time to the clients not yet chosen.

    At each step the remaining set ``R`` (size ``r``) is scored with ``r - f - 2`` neighbours,
    clamped to at least 1 (El Mhamdi et al. leave the last steps of small sets unspecified: with
    zero neighbours every score would be 0). A single remaining client is taken as it is.

    Ties: with one neighbour, two clients that are each other's nearest neighbour always have
    exactly equal scores, so the late steps would otherwise depend on client order on almost
    every input. Equal scores are therefore broken by the sum of squared distances to all
    remaining clients, and only then by the lowest index.

    Returns the chosen indices in selection order.

    Complexity: O(count * K^2 log K) on the precomputed distances.
    """
    dist = np.asarray(sq_dists, dtype=np.float64)
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
        chosen.append(int(remaining[best]))
        remaining = np.delete(remaining, best)
    return np.asarray(chosen, dtype=np.int64)


def _check_f(rule: str, k: int, f: object, factor: int) -> int:
    fv = check_count("f", f)
    require_clients(rule, k, factor * fv + 3, f"{factor}f+3", f=fv)
    return fv


@register("krum")
def krum(updates: np.ndarray, ctx: AggregationContext, *, f: int) -> AggregationResult:
    """Krum: the single update with the lowest sum of squared distances to its K-f-2 neighbours.

    Blanchard et al. 2017; SIREN paper §2 (score ``s_i = sum_{i->j} |x_i - x_j|^2`` over the
    ``K - f - 2`` nearest neighbours). Sample counts are ignored.

    Preconditions: ``K >= 2f + 3``. Ties go to the lowest client index.
    Verdicts: the selected client has weight 1; every client's score is its Krum score.

    Complexity: O(K^2 d) for the Gram matrix (float64 accumulation, column blocks) plus
    O(K^2 log K); extra memory O(K^2 + d).
    """
    fv = _check_f("krum", updates.shape[0], f, 2)
    dist = pairwise_sq_distances(updates, ctx.device)
    return krum_result(updates, krum_scores(dist, fv), fv)


def krum_result(updates: np.ndarray, scores: np.ndarray, f: int) -> AggregationResult:
    """Krum's result from its scores: the lowest-scoring row (ties: lowest index), verdicts."""
    k = updates.shape[0]
    order = rank_by_score(scores)
    best = int(order[0])
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    verdicts = tuple(
        Verdict(
            kept=i == best,
            weight=1.0 if i == best else 0.0,
            score=float(scores[i]),
            reason="krum: lowest score, selected"
            if i == best
            else f"krum: score rank {int(rank[i]) + 1} of {k}, not selected",
        )
        for i in range(k)
    )
    vector = np.array(updates[best], dtype=np.float32)
    info = {"selected": best, "neighbours": krum_neighbours(k, f)}
    return AggregationResult(vector, verdicts, info=info)


@register("multi_krum")
def multi_krum(
    updates: np.ndarray,
    ctx: AggregationContext,
    *,
    f: int,
    m: int | None = None,
    weighted: bool = False,
) -> AggregationResult:
    """Multi-Krum: the mean of the m updates with the lowest Krum scores (default m = K - f).

    Blanchard et al. 2017; Byzantine survey §III. ``weighted=True`` averages the selected updates
    by their sample counts (the setting the survey's weight attack exploits); the default is the
    plain mean, which a client cannot sway by lying about its data set size.

    Preconditions: ``K >= 2f + 3`` and ``1 <= m <= K - f``. Ties go to the lowest client index.

    Complexity: O(K^2 d) for the Gram matrix plus O(K d) for the mean; extra memory O(K^2 + d).
    """
    k = updates.shape[0]
    fv = _check_f("multi_krum", k, f, 2)
    mv = multi_krum_m(k, fv, m)
    scores = krum_scores(pairwise_sq_distances(updates, ctx.device), fv)
    selected = rank_by_score(scores)[:mv]
    return multi_krum_result(updates, ctx.weights, scores, selected, fv, weighted)


def multi_krum_m(k: int, f: int, m: int | None) -> int:
    """Multi-Krum's ``m`` (default ``K - f``), checked to be in ``[1, K - f]``."""
    mv = k - f if m is None else check_count("m", m, minimum=1)
    if mv > k - f:
        raise InvalidParameterError(
            f"multi_krum needs m <= K - f = {k - f} (K={k}, f={f}), got m={mv}"
        )
    return mv


def multi_krum_result(
    updates: np.ndarray,
    weights: np.ndarray,
    scores: np.ndarray,
    selected: np.ndarray,
    f: int,
    weighted: bool,
) -> AggregationResult:
    """Multi-Krum's result from its scores and the selected rows (best first)."""
    k = updates.shape[0]
    mv = int(selected.size)
    coef = np.zeros(k, dtype=np.float64)
    coef[selected] = weights[selected] if check_flag("weighted", weighted) else 1.0
    total = coef.sum()
    if total <= 0:
        # Every selected client declared zero samples: fall back to the plain mean.
        coef[selected] = 1.0
        total = float(mv)
    coef /= total
    vector = weighted_combination(updates, coef)
    chosen = set(selected.tolist())
    verdicts = tuple(
        Verdict(
            kept=bool(coef[i] > 0),
            weight=float(coef[i]),
            score=float(scores[i]),
            reason=f"multi_krum: among the {mv} lowest scores"
            if i in chosen
            else f"multi_krum: not among the {mv} lowest scores",
        )
        for i in range(k)
    )
    info = {"selected": selected.tolist(), "m": mv, "neighbours": krum_neighbours(k, f)}
    return AggregationResult(vector, verdicts, info=info)


def closest_to_median_mean(
    updates: np.ndarray, beta: int, rows: np.ndarray | None = None, device: str = "numpy"
) -> tuple[np.ndarray, np.ndarray]:
    """Per coordinate, the mean of the ``beta`` values closest to the coordinate-wise median.

    Bulyan's second stage. In one coordinate the ``beta`` values nearest the median form a
    contiguous window of the sorted values; among the ``theta - beta + 1`` windows the one with
    the smallest radius ``max(median - low end, high end - median)`` is taken (on equal radii,
    the lower window). The choice depends only on the values, never on client order. The median
    of an even number of values is the mean of the middle two.

    Parameters
    ----------
    updates : np.ndarray
        ``(K, d)`` float32 update matrix.
    beta : int
        Values kept per coordinate, ``1 <= beta <= theta``.
    rows : np.ndarray, optional
        Indices of the ``theta`` rows to use (Bulyan's selection); default all rows. The rows
        are gathered one column block at a time, never copied as a whole.
    device : str
        ``"numpy"`` or a torch device (the same stage there:
        :func:`coordinator.aggregators.torch_ops.closest_to_median_mean`).

    Returns
    -------
    (vector, used) : tuple of np.ndarray
        ``(d,)`` float32 aggregate and, for each used row (in the order of ``rows``), the number
        of coordinates whose value lay inside the chosen window (ties at the window ends count
        for every equal value).

    Complexity: O(theta d log theta) time (sorts of column blocks), O(theta * block) memory.
    """
    if device != "numpy":
        return torch_ops.closest_to_median_mean(updates, beta, rows, device)
    x = np.asarray(updates)
    idx = np.arange(x.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    theta, d = idx.size, x.shape[1]
    if not 1 <= beta <= theta:
        raise InvalidParameterError(f"beta must be in [1, {theta}], got {beta}")
    whole = rows is None
    out = np.empty(d, dtype=np.float32)
    lo_half, hi_half = (theta - 1) // 2, theta // 2
    starts = theta - beta + 1
    width = max(256, (1 << 18) // max(1, theta))

    def one_block(cols: slice) -> np.ndarray:
        block = x[:, cols] if whole else x[idx, cols]
        srt = np.array(block.T, order="C", copy=True)
        srt.sort(axis=1)
        med = srt[:, lo_half] * np.float32(0.5) + srt[:, hi_half] * np.float32(0.5)
        radius = np.maximum(med[:, None] - srt[:, :starts], srt[:, beta - 1 :] - med[:, None])
        start = np.argmin(radius, axis=1)
        sums = np.empty(srt.shape[0], dtype=np.float64)
        for a in np.unique(start).tolist():
            sel = np.flatnonzero(start == a)
            sums[sel] = srt[sel, a : a + beta].sum(axis=1)
        out[cols] = sums / beta
        pos = np.arange(srt.shape[0])
        return count_inside(block, srt[pos, start], srt[pos, start + beta - 1])

    parts = map_column_blocks(one_block, d, width)
    return out, np.asarray(np.sum(parts, axis=0), dtype=np.int64)


@register("bulyan")
def bulyan(updates: np.ndarray, ctx: AggregationContext, *, f: int) -> AggregationResult:
    """Bulyan: iterated Krum picks theta = K-2f updates; per coordinate, mean of the beta = theta-2f
    values closest to the median.

    El Mhamdi et al. 2018; PDRR paper §2.2.2; DESIGN.md §6. Sample counts are ignored.

    Preconditions: ``K >= 4f + 3``. Equal Krum scores in the selection stage are broken by the
    total distance to the remaining clients, then by the lowest index (see
    :func:`iterated_krum_select`); the coordinate stage depends on values only (see
    :func:`closest_to_median_mean`).
    Verdicts: clients not selected by iterated Krum have weight 0; a selected client's weight is
    its share of the values used across coordinates; every score is the client's Krum score
    over all K clients.

    Complexity: O(K^2 d) for the Gram matrix, O(theta K^2 log K) for iterated Krum,
    O(theta d log theta) for the coordinate stage; extra memory O(K^2 + d + theta * block).
    """
    k = updates.shape[0]
    fv = _check_f("bulyan", k, f, 4)
    dist = pairwise_sq_distances(updates, ctx.device)
    selected = iterated_krum_select(dist, fv, k - 2 * fv)
    return bulyan_result(updates, krum_scores(dist, fv), selected, fv, ctx.device)


def bulyan_result(
    updates: np.ndarray,
    scores: np.ndarray,
    selected: np.ndarray,
    f: int,
    device: str = "numpy",
) -> AggregationResult:
    """Bulyan's result from the Krum scores and the iterated-Krum selection: the coordinate
    stage over the selected rows (on ``device``), and the verdicts."""
    k, d = updates.shape
    theta = k - 2 * f
    beta = theta - 2 * f
    vector, used_sel = closest_to_median_mean(updates, beta, rows=selected, device=device)
    used = np.zeros(k, dtype=np.int64)
    used[selected] = used_sel
    total_used = used.sum()
    step = {int(c): s for s, c in enumerate(selected.tolist())}
    verdicts = []
    for i in range(k):
        if i in step:
            frac = used[i] / d
            verdicts.append(
                Verdict(
                    kept=bool(used[i] > 0),
                    weight=float(used[i] / total_used),
                    score=float(scores[i]),
                    reason=f"bulyan: selected at Krum step {step[i] + 1} of {theta}; "
                    f"value used in {frac:.1%} of coordinates",
                )
            )
        else:
            verdicts.append(
                Verdict(False, 0.0, float(scores[i]), "bulyan: not selected by iterated Krum")
            )
    info = {"selected": selected.tolist(), "theta": theta, "beta": beta}
    return AggregationResult(vector, tuple(verdicts), info=info)
