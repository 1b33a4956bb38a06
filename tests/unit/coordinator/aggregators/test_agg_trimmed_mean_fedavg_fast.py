"""Blocked trimmed mean and FedAvg: hand-worked ties and verdicts, fused NaN/inf checks, paths."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from coordinator.aggregators import aggregate, coordinatewise, set_num_threads
from coordinator.aggregators.base import get_num_threads
from coordinator.aggregators.coordinatewise import coordinate_trimmed_mean
from coordinator.errors import InvalidUpdatesError


@pytest.fixture(params=["compiled", "numpy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test on the compiled kernel (skipped without numba) and on the numpy path."""
    if request.param == "compiled":
        if not coordinatewise.trimmed_mean_backend().startswith("numba"):
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(coordinatewise, "compiled_kernel_enabled", False)
    yield request.param


def _columns(*cols: list[float]) -> np.ndarray:
    return np.array(cols, dtype=np.float32).T.copy()


def test_trimmed_mean_ties_by_hand(path: str) -> None:
    x = _columns(
        # sorted 1 2 2 2 9, trim 1 -> kept 2 2 2: mean 2; low = high = 2, the three 2s count
        [1, 2, 2, 2, 9],
        # sorted 1 1 3 7 7 -> kept 1 3 7: mean 11/3; low = 1, high = 7: every value lies
        # in [1, 7], so every client counts (one copy of 1 and one of 7 were trimmed)
        [7, 1, 1, 3, 7],
        # all equal: kept 3 3 3
        [3, 3, 3, 3, 3],
        # outliers far beyond the kept values do not disturb the sum: kept .25 .5 .75
        [-1e30, 0.5, 0.25, 1e30, 0.75],
    )
    vector, used = coordinate_trimmed_mean(x, 1)
    assert vector.dtype == np.float32
    assert vector.tolist() == [2.0, np.float32(11 / 3), 3.0, 0.5]
    # client 0: 1 (out), 7 (in), 3 (in), -1e30 (out) -> 2
    # client 1: 2 (in), 1 (in), 3 (in), 0.5 (in) -> 4
    # client 2: 2, 1, 3, 0.25 -> 4;  client 3: 2, 3, 3, 1e30 (out) -> 3
    # client 4: 9 (out), 7, 3, 0.75 -> 3
    assert used.tolist() == [2, 4, 4, 3, 3]


def test_trimmed_mean_even_k_tie_at_both_boundaries(path: str) -> None:
    # sorted 1 1 3 5 7 7, trim 1 -> kept 1 3 5 7: mean 4. One copy of 1 and one of 7 are
    # trimmed; the copies are identical, so every holder of a 1 or a 7 counts as used.
    x = _columns([5, 1, 1, 3, 7, 7])
    vector, used = coordinate_trimmed_mean(x, 1)
    assert vector.tolist() == [4.0]
    assert used.tolist() == [1, 1, 1, 1, 1, 1]


def test_trimmed_mean_verdicts_by_hand(path: str) -> None:
    # Column 0 is 0 1 2 3 4 (trim 1 keeps clients 1, 2, 3), column 1 is -4 -3 -2 -1 0 (keeps
    # clients 1, 2, 3 again), column 2 is 1 2 3 4 0 (keeps clients 0, 1, 2: values 1 2 3).
    x = np.array(
        [[0, -4, 1], [1, -3, 2], [2, -2, 3], [3, -1, 4], [4, 0, 0]],
        dtype=np.float32,
    )
    result = aggregate("trimmed_mean", x, beta=1)
    assert result.vector.tolist() == [2.0, -2.0, 2.0]
    used = [1, 3, 3, 2, 0]  # coordinates where each client's value was kept; 9 in all
    assert [v.score for v in result.verdicts] == [u / 3 for u in used]
    assert [v.weight for v in result.verdicts] == [u / 9 for u in used]
    assert [v.kept for v in result.verdicts] == [True, True, True, True, False]
    assert result.verdicts[4].reason == "trimmed_mean: value used in 0.0% of coordinates"


def test_trimmed_mean_is_the_rounded_exact_mean(path: str) -> None:
    rng = np.random.default_rng(7)
    for k, trim in [(5, 2), (10, 1), (13, 4), (21, 7), (24, 9), (50, 5)]:
        x = rng.standard_normal((k, 3001)).astype(np.float32)
        x[: k // 3] *= np.float32(100.0)  # large outliers: trimmed values must not leak in
        vector, used = coordinate_trimmed_mean(x, trim)
        exact = np.sort(x.astype(np.float64), axis=0)[trim : k - trim].mean(axis=0)
        np.testing.assert_array_max_ulp(vector, exact.astype(np.float32), maxulp=1)
        assert used.sum() == (k - 2 * trim) * x.shape[1]  # no ties in continuous data


def test_compiled_and_numpy_paths_agree_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    if not coordinatewise.trimmed_mean_backend().startswith("numba"):
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(11)
    # trims 1, 3, 5 and 7 run the networks of 2, 4, 6 and 8 levels; 8 and 12 sort instead
    for k, trim in [(3, 1), (8, 3), (9, 4), (13, 5), (17, 7), (20, 8), (31, 12)]:
        # few distinct values: many ties at the boundaries of the kept range
        x = rng.integers(-3, 4, size=(k, 2500)).astype(np.float32) * np.float32(0.1)
        compiled = coordinate_trimmed_mean(x, trim)
        monkeypatch.setattr(coordinatewise, "compiled_kernel_enabled", False)
        plain = coordinate_trimmed_mean(x, trim)
        monkeypatch.setattr(coordinatewise, "compiled_kernel_enabled", True)
        assert np.array_equal(compiled[0], plain[0])
        assert np.array_equal(compiled[1], plain[1])


@pytest.mark.parametrize(("rule", "params"), [("trimmed_mean", {"beta": 3}), ("fedavg", {})])
def test_results_identical_with_one_and_two_threads(rule: str, params: dict[str, int]) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 50_003)).astype(np.float32)
    weights = rng.integers(1, 100, size=12)
    extra = {"weights": weights} if rule == "fedavg" else {}
    before = get_num_threads()
    try:
        set_num_threads(1)
        one = aggregate(rule, x, **params, **extra)
        set_num_threads(2)
        two = aggregate(rule, x, **params, **extra)
    finally:
        set_num_threads(before)
    assert one.vector.dtype == two.vector.dtype == np.float32
    assert one.vector.tobytes() == two.vector.tobytes()
    assert one.verdicts == two.verdicts


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("rule", "params"), [("trimmed_mean", {"beta": 1}), ("fedavg", {})])
def test_non_finite_values_rejected_in_the_fused_pass(
    path: str, rule: str, params: dict[str, int], value: float
) -> None:
    # The bad value sits far out: the trimmed mean would trim it, FedAvg would average it.
    x = np.ones((5, 20_000), dtype=np.float32)
    x[3, 17_000] = value
    with pytest.raises(InvalidUpdatesError, match=r"clients \[3\]"):
        aggregate(rule, x, **params)


@pytest.mark.parametrize("weights", [[0, 1, 1], [0, 0, 1]])
def test_fedavg_rejects_nan_of_a_zero_weight_client(weights: list[int]) -> None:
    x = np.ones((3, 1000), dtype=np.float32)
    x[0, 10] = np.nan
    with pytest.raises(InvalidUpdatesError, match=r"clients \[0\]"):
        aggregate("fedavg", x, weights=weights)


def test_fedavg_single_weight_is_exactly_that_row() -> None:
    x = np.array([[0.1, -2.5], [7.0, 8.0]], dtype=np.float32)
    assert aggregate("fedavg", x, weights=[0, 5]).vector.tolist() == [7.0, 8.0]


def test_fedavg_huge_finite_values_are_accepted() -> None:
    x = np.full((3, 4), np.finfo(np.float32).max, dtype=np.float32)
    result = aggregate("fedavg", x)  # the float32 sum may overflow; the input is still valid
    assert result.vector.shape == (4,)


@pytest.mark.parametrize(("rule", "params"), [("trimmed_mean", {"beta": 2}), ("fedavg", {})])
def test_input_is_not_mutated(rule: str, params: dict[str, int]) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 9000)).astype(np.float32)
    before = x.copy()
    aggregate(rule, x, **params)
    assert np.array_equal(x, before)


def test_float64_and_strided_input(path: str) -> None:
    x = np.arange(60, dtype=np.float64).reshape(6, 10)
    strided = x[:, ::2]  # not contiguous
    vector = aggregate("trimmed_mean", strided, beta=1).vector
    assert vector.dtype == np.float32
    assert vector.tolist() == [25.0, 27.0, 29.0, 31.0, 33.0]
