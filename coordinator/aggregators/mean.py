"""FedAvg: the sample-weighted mean of the client updates.

McMahan et al. 2017. The server weighs each update by the number of samples the client declares,
so the aggregate trusts those numbers: a client that lies about its data set size shifts the
mean in proportion (the *weight attack* of the Byzantine survey, §V). That is the point of
keeping this rule exactly as it is: it is the undefended baseline.

Implementation: one pass over the matrix, in column blocks on the shared thread pool of
:mod:`coordinator.aggregators.base`; each block is one float32 BLAS matrix-vector product (BLAS
held to one thread), and the same pass rejects NaN/inf input (the rule is registered with
``checks_finite=True``, so :func:`~coordinator.aggregators.base.aggregate` does not scan the
matrix a second time). The rule is memory-bound: its time is that of reading the matrix once.
"""

from __future__ import annotations

import numpy as np

from coordinator.aggregators.base import (
    BLOCK_BYTES,
    AggregationContext,
    AggregationResult,
    Verdict,
    block_width,
    map_column_blocks,
    register,
    reject_non_finite,
    single_threaded_blas,
)


def checked_weighted_mean(updates: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Return ``sum_i share_i * updates[i]`` as float32, rejecting NaN/inf input on the way.

    Parameters
    ----------
    updates : np.ndarray
        ``(K, d)`` float32 matrix (not yet scanned for NaN/inf).
    share : np.ndarray
        ``(K,)`` non-negative coefficients, not all zero (cast to float32).

    Returns
    -------
    np.ndarray
        ``(d,)`` float32. Each column block of the matrix is one float32 ``sgemv`` (the
        accumulation order is BLAS's, the same for every thread count since the blocks are fixed
        by ``K`` alone); relative error at most about ``K * 2**-24`` of ``sum_i c_i |x_i|`` per
        coordinate. With a single non-zero coefficient the result is that row times the
        coefficient (exactly the row when it is 1).

    Raises
    ------
    InvalidUpdatesError
        Some value is NaN or infinite (the message names the clients).

    Notes
    -----
    A non-finite value in a row with a non-zero coefficient makes the product non-finite
    (``nan * c`` and ``inf * c`` are not finite for finite ``c != 0``), so checking the ``(w,)``
    output of each block covers those rows; rows whose float32 coefficient is zero are checked
    directly. A non-finite output of finite input (float32 overflow of the sum) is kept, as the
    full scan that follows a non-finite output finds nothing to reject.

    Complexity: O(K d) time in one pass over the matrix, O(d) extra memory.
    """
    x = np.asarray(updates)
    k, d = x.shape
    coef = np.asarray(share, dtype=np.float64).astype(np.float32)
    nonzero = np.flatnonzero(coef)
    zero_rows = np.flatnonzero(coef == 0)
    single = int(nonzero[0]) if nonzero.size == 1 else -1
    out = np.empty(d, dtype=np.float32)

    def one_block(cols: slice) -> bool:
        block = x[:, cols]
        y = block[single] * coef[single] if single >= 0 else coef @ block
        out[cols] = y
        if not np.isfinite(y).all():
            return False
        return zero_rows.size == 0 or bool(np.isfinite(block[zero_rows]).all())

    with single_threaded_blas():
        clean = map_column_blocks(one_block, d, block_width(k, target_bytes=2 * BLOCK_BYTES))
    if not all(clean):
        reject_non_finite(x)
    return out


@register("fedavg", checks_finite=True)
def fedavg(updates: np.ndarray, ctx: AggregationContext) -> AggregationResult:
    """FedAvg: sample-weighted mean sum_i n_i x_i / sum_i n_i (trusts the declared sample counts).

    McMahan et al. 2017; Byzantine survey §V (weight attack). With no sample counts every client
    weighs the same. Preconditions: none beyond valid input (non-negative counts, not all zero;
    NaN/inf values are rejected in the same pass that computes the mean).
    Verdicts: weight = ``n_i / sum n``; clients declaring zero samples are not kept.

    Complexity: O(K d) time (one float32 BLAS pass over column blocks, see
    :func:`checked_weighted_mean`), O(d) extra memory.
    """
    share = ctx.weights / ctx.weights.sum()
    vector = checked_weighted_mean(updates, share)
    verdicts = tuple(
        Verdict(
            kept=bool(s > 0),
            weight=float(s),
            score=None,
            reason=f"fedavg: {s:.1%} of the declared samples",
        )
        for s in share.tolist()
    )
    return AggregationResult(vector, verdicts)
