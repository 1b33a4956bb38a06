"""Bucket counts and labels kept on admission (coordinator.streaming_buckets): the median and
the trimmed mean closed from them (coordinator.streaming_bucket_close) equal the batch rules on
random and adversarial rounds.

Compared bit for bit: the trimmed mean's float32 bits and every row's usage count; the median's
values with ``==`` (a zero median may carry either sign).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from coordinator import streaming_bucket_close, streaming_buckets
from coordinator.aggregators import aggregate
from coordinator.aggregators.coordinatewise import coordinate_median, coordinate_trimmed_mean
from coordinator.streaming import StreamingRound
from coordinator.streaming_bucket_close import GATHER_LIMIT, bucket_median, bucket_trimmed_mean
from coordinator.streaming_buckets import MIN_ROWS, SAMPLE_ROWS, BucketCounts
from coordinator.streaming_rules import StreamedClose

D = 700  # two tiles, the second one partial


def _counted(
    x: np.ndarray, rows: list[int], burst: int = 7, expected: int | None = None
) -> BucketCounts:
    b = BucketCounts(x.shape[1], expected=expected)
    for n, r in enumerate(rows):
        b.add(r)
        if n % burst == burst - 1:
            b.flush(x)
    b.flush(x)
    assert b.covers(rows)
    return b


def _check(
    x: np.ndarray,
    rows: list[int] | None = None,
    trims: tuple[int, ...] = (),
    expected: int | None = None,
) -> int:
    """Both rules from the buckets against the batch functions; returns the tiles that took the
    counting selection."""
    rows = list(range(x.shape[0])) if rows is None else rows
    b = _counted(x, rows, expected=expected)
    sub = x[rows]
    got, used = bucket_median(x, rows, b)
    fallbacks = b.fallback_tiles
    want, want_used = coordinate_median(sub)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(used, want_used)
    k = len(rows)
    for trim in trims or (1, k // 10, (k - 1) // 2):
        got_t, used_t = bucket_trimmed_mean(x, rows, b, trim)
        fallbacks += b.fallback_tiles
        want_t, want_used_t = coordinate_trimmed_mean(sub, trim)
        np.testing.assert_array_equal(got_t.view(np.int32), want_t.view(np.int32))
        np.testing.assert_array_equal(used_t, want_used_t)
    return fallbacks


def _random(k: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, k]).standard_normal((k, D)).astype(np.float32)


@pytest.mark.parametrize("k", [MIN_ROWS, MIN_ROWS + 1, 301])
def test_random_rounds_equal_the_batch_rules(k: int) -> None:
    assert _check(_random(k, 1)) == 0


def _random_round(k: int) -> np.ndarray:
    return _random(k, 11)


def _ties(k: int) -> np.ndarray:
    x = np.random.default_rng(2).integers(-3, 4, (k, D)).astype(np.float32)
    x[x == 0] = -0.0  # zeros of both signs
    x[::5] = np.abs(x[::5])
    return x


def _identical(k: int) -> np.ndarray:
    return np.tile(_random(1, 3)[0], (k, 1))


def _duplicated(k: int) -> np.ndarray:
    x = _random(k, 4)
    x[100:180] = x[7]  # Sybils sending the sample's row 7
    x[200:240] = x[250]  # and a row outside the sample
    return x


def _extreme(k: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    big = np.finfo(np.float32).max
    tiny = np.finfo(np.float32).smallest_subnormal
    choices = np.array([-big, big, -tiny, tiny, 0.0, -0.0, 1e-38, -1e38, 3.0], dtype=np.float32)
    x = _random(k, 5)
    pick = rng.random((k, D)) < 0.3
    x[pick] = rng.choice(choices, size=int(pick.sum()))
    return x


def _crowded(k: int) -> np.ndarray:
    """Past the sample, every value lies strictly between two boundaries (one open bucket): the
    counting selection inside that bucket closes these tiles."""
    x = _random(k, 6)
    x[: SAMPLE_ROWS // 2] -= 10.0
    x[SAMPLE_ROWS // 2 : SAMPLE_ROWS] += 10.0
    x[SAMPLE_ROWS:] = 0.25 + np.random.default_rng(6).integers(0, 40, (k - SAMPLE_ROWS, D)) * 1e-7
    return x.astype(np.float32)


@pytest.mark.parametrize(
    ("make", "crowded"),
    [
        (_ties, False),
        (_identical, False),
        (_duplicated, False),
        (_extreme, False),
        (_crowded, True),
    ],
)
@pytest.mark.parametrize("k", [MIN_ROWS + 8, MIN_ROWS + 9])
def test_adversarial_rounds_equal_the_batch_rules(
    make: Callable[[int], np.ndarray], crowded: bool, k: int
) -> None:
    if crowded:  # more values in every column's open bucket than the gather takes
        k += GATHER_LIMIT + SAMPLE_ROWS - MIN_ROWS + 8
    fallbacks = _check(make(k))
    assert (fallbacks > 0) == crowded


def test_sample_sizes_and_kept_ranks() -> None:
    assert [streaming_buckets.sample_rows(n) for n in (252, 380, 381, 764, 765, 10**4)] == [
        63,
        63,
        127,
        127,
        255,
        255,
    ]
    assert streaming_buckets.sample_picks(63).tolist() == list(range(63))
    for m in (127, 255):
        picks = streaming_buckets.sample_picks(m)
        assert picks.size == streaming_buckets.MAX_PICKS
        assert picks[0] == 0 and picks[-1] == m - 1 and np.all(np.diff(picks) > 0)


@pytest.mark.parametrize("make", [_random_round, _ties, _duplicated, _extreme, _identical])
@pytest.mark.parametrize(("k", "sample"), [(400, 127), (800, 255)])
def test_larger_samples_equal_the_batch_rules(
    make: Callable[[int], np.ndarray], k: int, sample: int
) -> None:
    """Rounds of 381 updates or more sample 127 or 255 rows and keep 64 of their keys: the
    results still equal the batch rules bit for bit."""
    x = make(k)
    assert _counted(x, list(range(k)), expected=k).sample == sample
    assert _check(x, expected=k) == 0


def test_a_few_crowded_columns_are_gathered_without_the_counting_selection() -> None:
    k = MIN_ROWS + GATHER_LIMIT + 8
    x = _random(k, 10)
    x[:, :5] = _crowded(k)[:, :5]  # five columns' wanted bucket holds most of the values
    assert _check(x) == 0


def test_boosted_attackers_outside_the_sample_do_not_share_the_honest_tails_bucket() -> None:
    """Attackers that arrive after the sample, far outside its range: the tail boundaries put
    them in buckets of their own, so the trimmed mean's low rank (the least honest value) is
    gathered from a few honest values instead of a bucket holding every attacker."""
    k, attackers = 400, 40
    x = _random(k, 11)
    x[k - attackers :] = -50.0 + 0.01 * _random(attackers, 12)  # boosted, nearly equal
    b = _counted(x, list(range(k)))
    assert b.counts is not None
    ranks = np.array([attackers, k - 1 - attackers], dtype=np.int64)
    w = 256
    lo = np.empty((2, w), dtype=np.int32)
    hi = np.empty((2, w), dtype=np.int32)
    below = np.empty((2, w), dtype=np.int64)
    size = np.empty((2, w), dtype=np.int64)
    bucket = np.empty((2, w), dtype=np.int32)
    streaming_buckets._locate(b.bounds, b.counts, 0, w, ranks, k, lo, hi, below, size, bucket)
    assert (below[0] == attackers).all()  # every attacker lies in lower buckets
    assert size[0].max() < attackers
    _check(x, trims=(attackers,))


def test_sampled_round_counts_only_its_rows() -> None:
    x = _random(400, 7)
    rows = sorted(np.random.default_rng(7).choice(400, size=MIN_ROWS + 3, replace=False).tolist())
    assert _check(x, rows, trims=(5,)) == 0


def _stream(k: int, capacity: int | None = None) -> tuple[StreamingRound, np.ndarray]:
    x = _random(k, 8)
    stream = StreamingRound(capacity or k, D, pairwise=False, coordinatewise=True)
    stream.reset(1)
    for i in np.random.default_rng(8).permutation(k):
        stream.add(int(i), x[i])
        if i % 5 == 0:
            stream.flush()
    return stream, x


@pytest.mark.parametrize("k", [MIN_ROWS - 1, MIN_ROWS])
def test_the_close_uses_the_buckets_from_min_rows(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("bucket_median", "bucket_trimmed_mean"):
        real = getattr(streaming_bucket_close, name)

        def spy(*args: object, _real: Callable[..., object] = real, _n: str = name) -> object:
            calls.append(_n)
            return _real(*args)

        monkeypatch.setattr(f"coordinator.streaming_rules.{name}", spy)
    stream, x = _stream(k, capacity=MIN_ROWS + 5)
    rows = list(range(k))
    for rule, params in (("median", {}), ("trimmed_mean", {"beta": 0.1})):
        close = StreamedClose(stream, rows)
        got = close.aggregate(rule, **params)
        want = aggregate(rule, x, **params)
        np.testing.assert_array_equal(got.vector, want.vector)
        assert [v.weight for v in got.verdicts] == [v.weight for v in want.verdicts]
        assert close.how == "streamed"
    assert calls == ([] if k < MIN_ROWS else ["bucket_median", "bucket_trimmed_mean"])


def test_a_round_smaller_than_its_sample_closes_from_buckets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round expected to bring 800 updates (255 sampled rows) that closes with 253: the
    boundaries are taken from the sample 253 rows allow, and the close still uses buckets."""
    calls: list[str] = []
    real = streaming_bucket_close.bucket_median

    def spy(*args: object) -> object:
        calls.append("bucket_median")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("coordinator.streaming_rules.bucket_median", spy)
    stream, x = _stream(MIN_ROWS + 1, capacity=800)
    assert stream.buckets is not None and not stream.buckets.ready
    close = StreamedClose(stream, list(range(MIN_ROWS + 1)))
    got = close.aggregate("median")
    np.testing.assert_array_equal(got.vector, aggregate("median", x).vector)
    assert calls == ["bucket_median"] and stream.buckets.sample == 63


def test_small_rounds_and_capacities_keep_no_buckets() -> None:
    assert StreamingRound(MIN_ROWS - 1, 8, coordinatewise=True).buckets is None
    assert StreamingRound(MIN_ROWS, 8, coordinatewise=False).buckets is None
    stream = StreamingRound(MIN_ROWS, 8, coordinatewise=True)
    stream.reset(1, expected=MIN_ROWS - 1)  # a sampled round too small for them
    assert stream.buckets is None
    stream.reset(2, expected=MIN_ROWS)
    assert stream.buckets is not None and not stream.buckets.ready


def test_a_new_round_recounts_from_its_own_sample() -> None:
    stream, _ = _stream(MIN_ROWS + 2)
    buckets = stream.buckets
    assert buckets is not None
    stream.flush()
    assert buckets.covers(list(range(MIN_ROWS + 2)))
    stream.reset(2)
    y = _random(MIN_ROWS, 9)
    for i in range(MIN_ROWS):
        stream.add(i, y[i])
    stream.flush()
    assert buckets.counts is not None and int(buckets.counts.sum()) == MIN_ROWS * D
    got, _ = bucket_median(stream.buffer, list(range(MIN_ROWS)), buckets)
    np.testing.assert_array_equal(got, coordinate_median(y)[0])


@pytest.mark.parametrize("spread", [3, 40, 100_000])
def test_pick_gives_both_ranks_and_leaves_its_values(spread: int) -> None:
    """The compress-based quickselect against a sort, on sizes around the 16-lane groups and
    runs of equal keys; the values it reads are left as they were."""
    rng = np.random.default_rng(spread)
    work = np.empty((4, 300 + 16), dtype=np.int32)
    for n in [1, 2, 15, 16, 17, 31, 32, 33, 64, 150, 300]:
        for _ in range(20):
            buf = np.zeros(n + 16, dtype=np.int32)
            buf[:n] = rng.integers(-spread, spread, size=n)
            kept = buf.copy()
            r = int(rng.integers(0, n))
            want_next = r + 1 < n and bool(rng.integers(0, 2))
            first, second = streaming_bucket_close._pick(buf[:n], r, want_next, work)
            want = np.sort(kept[:n])
            assert first == want[r]
            if want_next:
                assert second == want[r + 1]
            assert np.array_equal(buf, kept)


@pytest.mark.parametrize("vector_compress", [True, False])
def test_split_packs_both_sides_in_order(
    vector_compress: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both code paths of the 16-lane split (a compress into a register and a plain store with
    LLVM 19 or later, ``llvm.masked.compressstore`` otherwise) pack each side in order."""
    from numba import njit

    from coordinator import streaming_simd

    monkeypatch.setattr(streaming_simd, "_VECTOR_COMPRESS", vector_compress)

    @njit
    def split(src: np.ndarray, size: int, p: int, left: np.ndarray, right: np.ndarray) -> int:
        return streaming_bucket_close._split(src, size, np.int32(p), left, right)

    rng = np.random.default_rng(7)
    for size in [1, 5, 16, 17, 40]:
        src = np.zeros(size + 16, dtype=np.int32)
        src[:size] = rng.integers(-50, 50, size=size)
        left = np.zeros(size + 16, dtype=np.int32)
        right = np.zeros(size + 16, dtype=np.int32)
        nl = split(src, size, 3, left, right)
        vals = src[:size]
        assert nl == int((vals < 3).sum())
        assert np.array_equal(left[:nl], vals[vals < 3])
        assert np.array_equal(right[: size - nl], vals[vals >= 3])


def test_locate_finds_each_ranks_bucket_from_bucket_major_counts() -> None:
    """The vectorised scan of the counts (stored bucket-major per block) against a cumulative
    sum per column, on a tile whose last block is partial."""
    rng = np.random.default_rng(3)
    m = SAMPLE_ROWS
    bw = streaming_buckets.BOUNDS_BLOCK
    k, w = 600, bw + 100
    bounds = np.sort(rng.integers(-1000, 1000, size=(2, m, bw)).astype(np.int32), axis=1)
    counts = np.zeros((2, 2 * m + 1, bw), dtype=np.uint16)
    for j in range(w):
        buckets = rng.integers(0, 2 * m + 1, size=k)
        buckets[: k // 3] = rng.integers(0, 3)  # a crowded bucket at the low end
        counts[j // bw, :, j % bw] = np.bincount(buckets, minlength=2 * m + 1)
    ranks = np.array([60, 539], dtype=np.int64)
    lo = np.empty((2, w), dtype=np.int32)
    hi = np.empty((2, w), dtype=np.int32)
    below = np.empty((2, w), dtype=np.int64)
    size = np.empty((2, w), dtype=np.int64)
    bucket = np.empty((2, w), dtype=np.int32)
    streaming_buckets._locate(bounds, counts, 0, w, ranks, k, lo, hi, below, size, bucket)
    for j in range(w):
        col = counts[j // bw, :, j % bw].astype(np.int64)
        cum = np.cumsum(col)
        keys = bounds[j // bw, :, j % bw].astype(np.int64)
        for q, r in enumerate(ranks):
            u = int(np.searchsorted(cum, r, side="right"))
            assert below[q, j] == cum[u] - col[u] and size[q, j] == col[u] and bucket[q, j] == u
            t = u // 2
            if u % 2:
                assert lo[q, j] == hi[q, j] == keys[t]
            else:
                assert lo[q, j] == (keys[t - 1] + 1 if t > 0 else -(2**31))
                assert hi[q, j] == (keys[t] - 1 if t < m else 2**31 - 1)
