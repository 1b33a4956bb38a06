"""The trimmed mean from sums and tail heaps kept on admission equals the batch rule bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators import aggregate
from coordinator.aggregators.coordinatewise import coordinate_trimmed_mean
from coordinator.streaming import StreamingRound
from coordinator.streaming_rules import StreamedClose
from coordinator.streaming_tails import TailSums


def _tails_of(x: np.ndarray, trim: int, order: list[int] | None = None) -> TailSums:
    tails = TailSums(x.shape[1], x.shape[0])
    tails.reset(trim)
    for i, r in enumerate(order if order is not None else range(x.shape[0])):
        tails.add(r)
        if i % 7 == 6:  # flushes in bursts, as the stream does
            tails.flush(x)
    tails.flush(x)
    return tails


def _check_equal(x: np.ndarray, trim: int, order: list[int] | None = None) -> int:
    """Close from the tails and compare with the batch function; returns the resummed count."""
    tails = _tails_of(x, trim, order)
    rows = list(range(x.shape[0]))
    assert tails.covers(rows, trim)
    vector, used, resummed = tails.close(x, rows)
    want, want_used = coordinate_trimmed_mean(x, trim)
    np.testing.assert_array_equal(vector.view(np.int32), want.view(np.int32))
    np.testing.assert_array_equal(used, want_used)
    return resummed


def test_random_updates_in_random_order() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 400)).astype(np.float32)
    for trim in (1, 6, 29):
        order = rng.permutation(60).tolist()
        assert _check_equal(x, trim, order) == 0


def test_ties_zeros_and_constant_columns() -> None:
    # Few distinct values: ties at both bounds in most coordinates, some all-zero or constant
    # columns; the used counts must leave out exactly the values strictly beyond the bounds.
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, size=(41, 300)).astype(np.float32)
    x[:, :20] = 0.0
    x[:, 20:40] = 1.5
    x[:, 40:60] = -0.0
    assert _check_equal(x, 5) == 0
    assert _check_equal(x, 20) == 0


def test_boosted_attackers_arriving_last_and_rising_values() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 256)).astype(np.float32)
    x[-5:] *= 1000.0
    _check_equal(x, 5)
    # every update larger than all before it: each value enters the high heap
    rising = np.sort(rng.standard_normal((50, 256)).astype(np.float32), axis=0)
    _check_equal(rising, 5)
    _check_equal(rising[::-1].copy(), 5)


def test_rounded_sums_are_certified_or_summed_again() -> None:
    # Magnitudes 30 binary orders apart: float64 sums of these values round, but the rounding
    # is far below the float32 result's last bit, so the mean is certified equal to the batch
    # rule's. One trimmed value 10^9 beside values near 10^-3 makes the possible rounding of
    # both sums wider than many float32 steps of the mean: those coordinates are summed again
    # from the buffer, in client order as the batch rule sums them. Bit-identical either way.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 100)).astype(np.float32)
    x[::3, :10] *= np.float32(2.0**-30)
    x[:, 10:12] = np.float32(2.0**-140)  # subnormals, all equal: exact
    x[:, 12:15] *= np.float32(1e-3)
    x[7, 12:15] = np.float32(1e9)
    assert _check_equal(x, 4) == 3


def test_rows_other_than_those_added_are_not_covered() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 30)).astype(np.float32)
    tails = _tails_of(x, 3)
    assert not tails.covers(list(range(19)), 3)
    assert not tails.covers(list(range(20)), 2)
    for row, value in ((1, np.nan), (4, np.nan), (2, np.inf), (9, -np.inf)):
        bad = x.copy()  # while the heaps fill (rows 0-3) and after
        bad[row, 7] = value
        assert not _tails_of(bad, 3).covers(list(range(20)), 3)


def test_memory_bound() -> None:
    assert TailSums.fits(1000, 100)
    assert not TailSums.fits(1000, 0)
    assert not TailSums.fits(1000, 400)  # heaps larger than the buffer


def test_streamed_close_uses_the_tails_and_falls_back_when_a_row_is_missing() -> None:
    rng = np.random.default_rng(6)
    k, d = 30, 500
    x = rng.standard_normal((k, d)).astype(np.float32)
    stream = StreamingRound(k, d, pairwise=False, trimmed=0.2)
    stream.reset(0)
    for r in rng.permutation(k).tolist():
        stream.add(r, x[r])
    stream.flush()
    close = StreamedClose(stream, range(k))
    got = close.aggregate("trimmed_mean", beta=0.2)
    want = aggregate("trimmed_mean", x, beta=0.2)
    assert close.how == "streamed" and stream.tails is not None
    assert stream.tails.resummed == 0
    np.testing.assert_array_equal(got.vector, want.vector)
    assert [v.weight for v in got.verdicts] == [v.weight for v in want.verdicts]
    # a round closed without one of its rows (a revoked board's update dropped)
    partial = StreamedClose(stream, range(1, k))
    got = partial.aggregate("trimmed_mean", beta=0.2)
    np.testing.assert_array_equal(got.vector, aggregate("trimmed_mean", x[1:], beta=0.2).vector)


@pytest.mark.parametrize("beta", [0.1, 3])
def test_a_new_round_starts_from_nothing(beta: float) -> None:
    rng = np.random.default_rng(7)
    k, d = 25, 64
    stream = StreamingRound(k, d, pairwise=False, trimmed=beta)
    for round_index in range(2):
        stream.reset(round_index)
        x = rng.standard_normal((k, d)).astype(np.float32) * (round_index + 1)
        for r in range(k):
            stream.add(r, x[r])
        assert stream.tails is not None and stream.tails.resummed is None
        got = StreamedClose(stream, range(k)).aggregate("trimmed_mean", beta=beta)
        np.testing.assert_array_equal(got.vector, aggregate("trimmed_mean", x, beta=beta).vector)
        assert stream.tails.resummed == 0  # closed from the sums and heaps


def test_deep_trim_over_many_tiles_and_spans() -> None:
    # trim 100: heaps of 101 values, tiles of about 200 columns, so 1,500 columns take several
    # tiles in several spans on the thread pool.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((230, 1500)).astype(np.float32)
    x[-20:] *= 50.0
    assert _check_equal(x, 100, rng.permutation(230).tolist()) >= 0


def test_a_mean_that_underflows_to_zero_keeps_the_batch_rules_sign() -> None:
    # Values near the least normal float32 in +/- pairs and one subnormal pair: the sums round
    # (the magnitudes span too many binary orders to be exact) and the mean underflows to zero;
    # the certificate must not take -0.0 for the batch rule's +0.0.
    rng = np.random.default_rng(10)
    k, d = 200, 300
    half = (rng.uniform(1, 4, (k // 2, d)) * 2.0**-126).astype(np.float32)
    x = np.concatenate([half, -half])
    x[0, :] = np.float32(2.0**-149)
    x[k // 2, :] = -np.float32(2.0**-149)
    x = np.ascontiguousarray(rng.permuted(x, axis=0))
    _check_equal(x, 20)
    col = np.array([1e-33, -1e-33, 1e-33, -1e-33, 2.0**-149, -(2.0**-149), 0, 0, 0, 0])
    _check_equal(col.astype(np.float32)[:, None], 1)


def test_boosted_values_far_beyond_the_honest_ones_are_summed_again_by_tiles() -> None:
    # Boosted rows widen the rounding bound of every coordinate they reach (they are trimmed
    # away by the batch rule, not by the running total): those coordinates are summed again,
    # a tile at a time, still bit-identical.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((120, 2500)).astype(np.float32)
    x[rng.permutation(120)[:6]] *= np.float32(1e4)
    assert _check_equal(x, 10, rng.permutation(120).tolist()) > 100  # in all three tiles


def test_an_invalid_beta_leaves_the_round_to_the_rule() -> None:
    # The rule refuses beta = 0.7 at close (as the batch engine does); the stream must not
    # refuse to exist over it.
    stream = StreamingRound(20, 8, pairwise=False, trimmed=0.7)
    stream.reset(0, expected=20)
    assert stream.tails is None
