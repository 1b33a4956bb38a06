"""FLTrust: trust scores from the cosine similarity with the server's own update.

Cao et al., "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping" (NDSS 2021);
SIREN paper §2. The server trains on its small root data set to get its own update ``g0``
(an input here: computing it is the caller's job). Each client update ``g_i`` gets the trust
score ``TS_i = ReLU(cos(g_i, g0))`` and is rescaled to the norm of ``g0``; the aggregate is

    sum_i TS_i * (|g0| / |g_i|) g_i  /  sum_i TS_i.

Dot products and norms are accumulated in float64 over column blocks (a float32 dot product
over a million parameters could misjudge the sign of a near-orthogonal cosine).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import coordinator.aggregators.torch_ops as torch_ops
from coordinator.aggregators.base import (
    AggregationContext,
    AggregationResult,
    Verdict,
    column_blocks,
    register,
    single_threaded_blas,
    weighted_combination,
)
from coordinator.errors import InvalidUpdatesError

_BLOCK_BYTES = 4 << 20


def validate_server_update(server_update: Any, d: int) -> np.ndarray:
    """Return the server update as a finite ``(d,)`` float32 array, or raise InvalidUpdatesError."""
    g0 = np.asarray(server_update)
    if g0.shape != (d,):
        raise InvalidUpdatesError(
            f"server_update must be a vector of the update length ({d},), got shape {g0.shape}"
        )
    if not np.issubdtype(g0.dtype, np.number):
        raise InvalidUpdatesError(f"server_update must be numeric, got dtype {g0.dtype}")
    g0 = g0.astype(np.float32, copy=False)
    if not np.isfinite(g0).all():
        raise InvalidUpdatesError("server_update contains NaN or infinite values")
    return g0


def dots_and_norms(
    updates: np.ndarray, reference: np.ndarray, device: str = "numpy"
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(X g, |x_i|)`` for every row, accumulated in float64 over column blocks
    (on ``device``: :func:`coordinator.aggregators.torch_ops.dots_and_norms`).

    Complexity: O(K d) time, O(K * block) extra memory.
    """
    if device != "numpy":
        return torch_ops.dots_and_norms(updates, reference, device)
    x = np.asarray(updates)
    k, d = x.shape
    width = max(256, _BLOCK_BYTES // (8 * k))
    dots = np.zeros(k, dtype=np.float64)
    sq = np.zeros(k, dtype=np.float64)
    buf = np.empty((k, min(width, d)), dtype=np.float64)
    with single_threaded_blas():
        for cols in column_blocks(d, width):
            block = buf[:, : cols.stop - cols.start]
            np.copyto(block, x[:, cols])
            dots += block @ reference[cols].astype(np.float64)
            sq += np.einsum("ij,ij->i", block, block)
    return dots, np.sqrt(sq)


def trust_scores(
    updates: np.ndarray, server_update: np.ndarray, device: str = "numpy"
) -> tuple[np.ndarray, np.ndarray]:
    """FLTrust trust scores ``ReLU(cos(g_i, g0))`` and the client norms ``|g_i|``.

    A zero client update (or a zero server update) has no direction and gets trust 0. The dot
    products and norms are taken on ``device``.
    """
    g0 = np.asarray(server_update, dtype=np.float32)
    dots, norms = dots_and_norms(updates, g0, device)
    g0_norm = float(np.sqrt(np.dot(g0.astype(np.float64), g0.astype(np.float64))))
    denom = norms * g0_norm
    cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    return np.maximum(np.clip(cos, -1.0, 1.0), 0.0), norms


@register("fltrust")
def fltrust(
    updates: np.ndarray, ctx: AggregationContext, *, server_update: np.ndarray
) -> AggregationResult:
    """FLTrust: ReLU-cosine trust scores against the server update; updates rescaled to its norm.

    Cao et al. 2021; SIREN paper §2. ``server_update`` is the update the server computed on its
    root data set, shape ``(d,)``. Sample counts are ignored.

    Preconditions: none on ``K`` (no majority assumption). When no client has a positive cosine
    with the server update the aggregate is the zero vector (the global model stays as it is)
    and ``info["all_distrusted"]`` is True. Independent of client order.
    Verdicts: weight = the client's share ``TS_i / sum TS`` of the trust; score = ``TS_i``.

    Complexity: O(K d) time (float64 block-wise dot products and norms, one float32 BLAS pass
    for the combination), O(K * block + d) extra memory.
    """
    g0 = validate_server_update(server_update, updates.shape[1])
    ts, norms = trust_scores(updates, g0, ctx.device)
    return fltrust_result(updates, ts, norms, float(np.linalg.norm(g0.astype(np.float64))))


def fltrust_result(
    updates: np.ndarray, ts: np.ndarray, norms: np.ndarray, g0_norm: float
) -> AggregationResult:
    """FLTrust's result from the trust scores ``ts``, the client norms and the server update's
    norm: the rescaled, trust-weighted combination and the verdicts."""
    k, d = updates.shape
    total = float(ts.sum())
    if total > 0:
        share = ts / total
        coef = np.divide(share * g0_norm, norms, out=np.zeros(k), where=norms > 0)
        vector = weighted_combination(updates, coef)
    else:
        share = np.zeros(k)
        vector = np.zeros(d, dtype=np.float32)
    verdicts = []
    for i in range(k):
        if norms[i] == 0 or g0_norm == 0:
            why = "fltrust: zero update has no direction, trust 0"
        elif ts[i] > 0:
            why = f"fltrust: trust {ts[i]:.3f}, rescaled to the server update's norm"
        else:
            why = "fltrust: cosine with the server update <= 0, trust 0"
        verdicts.append(Verdict(bool(share[i] > 0), float(share[i]), float(ts[i]), why))
    info = {"all_distrusted": total == 0, "server_norm": g0_norm}
    return AggregationResult(vector, tuple(verdicts), info=info)
