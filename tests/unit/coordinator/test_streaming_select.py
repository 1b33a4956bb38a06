"""Coordinate-wise median and trimmed mean by counting (coordinator.streaming_select) equal the
sort-based batch functions bit for bit, on inputs built to trip a counting selection: ties,
duplicated rows, huge magnitudes, values of both signs around zero, tiny K, heavy tails."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators.coordinatewise import coordinate_median, coordinate_trimmed_mean
from coordinator.streaming_select import median_of_columns, trimmed_mean_of_columns

RNG = np.random.default_rng(3)


def _matrix(kind: str, k: int, d: int) -> np.ndarray:
    x = RNG.standard_normal((k, d), dtype=np.float32)
    if kind == "huge":
        x[: k // 3] *= np.float32(1e30)
    elif kind == "duplicates":
        x[k // 4 : 3 * k // 4] = x[0]
    elif kind == "ties":
        x = RNG.integers(-3, 4, (k, d)).astype(np.float32)
    elif kind == "lognormal":
        x = np.exp(4 * x).astype(np.float32) * np.sign(RNG.standard_normal((k, d))).astype(
            np.float32
        )
    elif kind == "tiny":
        x *= np.float32(1e-38)  # subnormal and normal values side by side
    elif kind == "constant-columns":
        x[:, ::3] = 0.25
    return x


KINDS = ["normal", "huge", "duplicates", "ties", "lognormal", "tiny", "constant-columns"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 5, 64, 124, 125, 301])
def test_median_equals_the_sorting_median(kind: str, k: int) -> None:
    x = _matrix(kind, k, 1100)
    got, used = median_of_columns(x)
    want, want_used = coordinate_median(x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(used, want_used)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("k", "trim"), [(3, 1), (9, 4), (64, 6), (125, 12), (301, 100)])
def test_trimmed_mean_equals_the_sorting_trimmed_mean(kind: str, k: int, trim: int) -> None:
    x = _matrix(kind, k, 1100)
    got, used = trimmed_mean_of_columns(x, trim)
    want, want_used = coordinate_trimmed_mean(x, trim)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(used, want_used)


def test_wide_matrix_spanning_many_tiles_and_tasks() -> None:
    x = RNG.standard_normal((200, 40_000), dtype=np.float32)
    x[:, 123] = np.arange(200, dtype=np.float32)[::-1]
    np.testing.assert_array_equal(median_of_columns(x)[0], coordinate_median(x)[0])
    np.testing.assert_array_equal(
        trimmed_mean_of_columns(x, 20)[0], coordinate_trimmed_mean(x, 20)[0]
    )


def test_trim_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="2\\*trim < K=4"):
        trimmed_mean_of_columns(np.zeros((4, 3), np.float32), 2)
    np.testing.assert_array_equal(
        trimmed_mean_of_columns(np.ones((4, 3), np.float32), 0)[0], np.ones(3, np.float32)
    )
