"""Geometric median by the smoothed Weiszfeld iteration (RFA).

The geometric median minimises ``sum_i a_i |z - x_i|`` (Xie et al. 2018, "GeoMed"; Pillutla et
al., "Robust Aggregation for Federated Learning", RFA; Byzantine survey §III-B). RFA's smoothed
Weiszfeld step is

    b_i = a_i / max(nu, |z - x_i|),        z <- sum_i b_i x_i / sum_i b_i,

and here it runs until the relative decrease of the objective falls below ``tol`` (with a
``max_iter`` guard), not for a fixed three steps.

Every iterate is a convex combination ``z = X^T c`` of the updates, so the distances follow from
the Gram matrix ``G = X X^T`` (float64, one pass over the data, rows centred at their
coordinate-wise median so that a huge row does not swamp the others' distances):
``|x_i - z|^2 = G_ii - 2 (G c)_i + c^T G c``. Each iteration therefore costs O(K^2) instead of
O(K d), and the matrix is read three times in total (median, Gram matrix, final combination).
The price is cancellation for a distance much smaller than the centred norms: its absolute
error is about ``1e-8 |x − median|`` -- the float32 resolution of the updates themselves.
"""

from __future__ import annotations

import math

import numpy as np

from coordinator.aggregators.base import (
    AggregationContext,
    AggregationResult,
    InvalidParameterError,
    Verdict,
    check_count,
    check_flag,
    register,
    require_clients,
    weighted_combination,
)
from coordinator.aggregators.coordinatewise import coordinate_median
from coordinator.aggregators.krum import gram_matrix


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidParameterError(f"{name} must be a positive number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise InvalidParameterError(f"{name} must be a positive finite number, got {value!r}")
    return v


def weiszfeld_coefficients(
    gram: np.ndarray,
    alpha: np.ndarray,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    nu: float = 1e-6,
    from_origin: bool = False,
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Smoothed Weiszfeld iteration in coefficient space.

    Parameters
    ----------
    gram : np.ndarray
        ``(K, K)`` float64 Gram matrix of the points.
    alpha : np.ndarray
        ``(K,)`` non-negative point weights summing to 1.
    tol, max_iter, nu
        Stop when ``|g_old - g_new| <= tol * g_new`` for the objective
        ``g(z) = sum_i alpha_i |z - x_i|`` and the step ``|z_old - z_new|`` is at most ``tol``
        times the alpha-weighted median distance, or after ``max_iter`` steps; ``nu`` floors the
        distances (RFA's smoothing), so a point coinciding with ``z`` gets a finite weight.
        The step test matters when one point is huge: the objective is then dominated by its
        distance and stops changing long before ``z`` settles among the other points.
    from_origin : bool
        Start with one Weiszfeld step from the origin of the Gram matrix's coordinates (the
        centre the caller subtracted, e.g. the coordinate-wise median) instead of from the
        weighted mean: a huge point then gets a negligible coefficient from the start.

    Returns
    -------
    (coef, dist, iterations, converged)
        ``coef`` (``(K,)``, sums to 1) with ``z = sum_i coef_i x_i``; ``dist`` the distances
        ``|z - x_i|``; the number of steps taken; whether the tolerance was met.

    Complexity: O(K^2) per iteration.
    """
    g = np.asarray(gram, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64)
    diag = np.diag(g)

    def distances(c: np.ndarray) -> np.ndarray:
        gc = g @ c
        sq = diag - 2.0 * gc + float(c @ gc)
        return np.sqrt(np.maximum(sq, 0.0))

    def weighted_median(values: np.ndarray) -> float:
        order = np.argsort(values, kind="stable")
        cumulative = np.cumsum(a[order])
        return float(values[order][int(np.searchsorted(cumulative, 0.5 * cumulative[-1]))])

    if from_origin:
        b = a / np.maximum(np.sqrt(np.maximum(diag, 0.0)), nu)
        coef = b / b.sum()
    else:
        coef = a.copy()
    dist = distances(coef)
    objective = float(a @ dist)
    converged = objective == 0.0
    iterations = 0
    while not converged and iterations < max_iter:
        iterations += 1
        b = a / np.maximum(dist, nu)
        new_coef = b / b.sum()
        change = new_coef - coef
        step = math.sqrt(max(float(change @ (g @ change)), 0.0))
        coef = new_coef
        dist = distances(coef)
        new_objective = float(a @ dist)
        converged = abs(objective - new_objective) <= tol * new_objective and step <= tol * max(
            weighted_median(dist), nu
        )
        objective = new_objective
    return coef, dist, iterations, converged


@register("geometric_median")
def geometric_median(
    updates: np.ndarray,
    ctx: AggregationContext,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    nu: float = 1e-6,
    weighted: bool = False,
    f: int | None = None,
) -> AggregationResult:
    """Geometric median (RFA smoothed Weiszfeld), run until the objective changes by < tol.

    Pillutla et al. (RFA); Xie et al. (GeoMed); Byzantine survey §III-B. Minimises
    ``sum_i a_i |z - x_i|`` with ``a_i = 1/K`` (default) or, with ``weighted=True``, the
    clients' sample shares (RFA's weighting; a client lying about its data set size then gains
    weight). Starts with a Weiszfeld step from the coordinate-wise median (so one huge update
    starts, and stays, with a negligible coefficient); stops when the relative decrease of the
    objective and the step relative to the median distance are at most ``tol``, or after
    ``max_iter`` steps (``info["converged"]`` tells which).

    Preconditions: none, unless ``f`` is given: then ``K >= 2f + 1`` (breakdown point 1/2).
    Independent of client order. Verdicts: weight = the client's coefficient in the final convex
    combination; score = its distance to the geometric median.

    Complexity: O(K^2 d) for the Gram matrix, O(K^2) per iteration, O(K d) for the final
    combination; extra memory O(K^2 + d).
    """
    k = updates.shape[0]
    tolv = _positive("tol", tol)
    nuv = _positive("nu", nu)
    iters = check_count("max_iter", max_iter, minimum=1)
    info: dict[str, object] = {}
    if f is not None:
        fv = check_count("f", f)
        require_clients("geometric_median", k, 2 * fv + 1, "2f+1", f=fv)
        info["f"] = fv
    use_counts = check_flag("weighted", weighted)
    alpha = ctx.weights / ctx.weights.sum() if use_counts else np.full(k, 1.0 / k)
    # Distances are invariant under translation: centring the Gram matrix at the coordinate-wise
    # median keeps them exact when a few rows are huge (see gram_matrix).
    center, _ = coordinate_median(updates, ctx.device)
    coef, dist, steps, converged = weiszfeld_coefficients(
        gram_matrix(updates, center, ctx.device),
        alpha,
        tol=tolv,
        max_iter=iters,
        nu=nuv,
        from_origin=True,
    )
    vector = weighted_combination(updates, coef)
    info.update(iterations=steps, converged=converged, objective=float(alpha @ dist))
    verdicts = tuple(
        Verdict(
            kept=bool(c > 0),
            weight=float(c),
            score=float(r),
            reason=f"geometric_median: Weiszfeld weight {c:.3g}, distance {r:.3g}",
        )
        for c, r in zip(coef.tolist(), dist.tolist(), strict=True)
    )
    return AggregationResult(vector, verdicts, info=info)
