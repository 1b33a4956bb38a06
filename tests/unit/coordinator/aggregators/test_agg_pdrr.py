"""PDRR (Lu et al., Sec. 4) on hand-worked inputs and simulated Fang et al. attacks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from coordinator.aggregators import aggregate
from coordinator.aggregators.base import InvalidParameterError
from coordinator.aggregators.pdrr import sign_correlations
from coordinator.errors import ByzantineBoundError

# Five honest updates; squared distances: h1 to every other 4, any two of h2..h5 8.
HONEST = np.array(
    [
        [1, 1, -1, -1],
        [1, 1, -1, 1],
        [1, -1, -1, -1],
        [-1, 1, -1, -1],
        [1, 1, 1, -1],
    ],
    dtype=np.float32,
)
# Two identical crafted updates a = -0.1 * [1, 1, -1, -1] (the honest direction reversed).
# Squared distance a-h1 = 4 * 1.21 = 4.84, a-h2..h5 = 3 * 1.21 + 0.81 = 4.44.
ATTACK = np.array([[-0.1, -0.1, 0.1, 0.1]] * 2, dtype=np.float32)
KRUM_ROUND = np.concatenate([ATTACK, HONEST])


def test_sign_correlations_by_hand() -> None:
    # sign(a) = [-,-,+,+]. h1 is its exact opposite (rho = -1); h2..h5 differ from h1 in one
    # sign: sum of signs +-2, d*sum(s^2) - (sum s)^2 = 16 - 4 = 12, cross = -2,
    # cov = 4 * (-2) - (+-2) * 0 = -8, rho = -8 / sqrt(12 * 16) = -1/sqrt(3)
    rho = sign_correlations(KRUM_ROUND, ATTACK[0])
    third = 1 / math.sqrt(3)
    np.testing.assert_allclose(rho, [1, 1, -1, -third, -third, -third, -third], atol=1e-12)


def test_constant_sign_vectors() -> None:
    updates = np.array([[1, 2, 3], [4, 5, 6], [-1, -1, -1], [1, -1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(sign_correlations(updates, np.ones(3)), [1, 1, 0, 0])


def test_krum_attack_detected_and_removed() -> None:
    # K=7, f=2, 3 neighbours. Krum scores: attackers 0 + 4.44 + 4.44 = 8.88, h1 4+4+4 = 12,
    # h2..h5 4 + 4.44 + 4.44 = 12.88, so Krum picks attacker 0. Both attackers have rho = 1
    # >= q * 1 = 0.5 and are removed (2 <= f). Krum over h1..h5 with f' = 0 and 3 neighbours:
    # h1 12, the others 4 + 8 + 8 = 20 -> h1.
    assert aggregate("krum", KRUM_ROUND, f=2).verdicts[0].kept  # the attack works on Krum
    result = aggregate("pdrr_krum", KRUM_ROUND, f=2)
    assert result.info["pre_selected"] == 0
    assert result.info["flagged"] == [0, 1]
    assert result.info["fallback"] is False
    np.testing.assert_array_equal(result.vector, HONEST[0])
    assert [v.weight for v in result.verdicts] == [0, 0, 1, 0, 0, 0, 0]
    assert [v.kept for v in result.verdicts] == [False, False, True] + [False] * 4
    assert result.verdicts[0].score == 1.0
    assert "flagged and removed" in result.verdicts[1].reason


def test_krum_reaggregate_mean() -> None:
    result = aggregate("pdrr_krum", KRUM_ROUND, f=2, reaggregate="mean")
    np.testing.assert_allclose(result.vector, [0.6, 0.6, -0.6, -0.6], rtol=1e-6)
    assert [v.weight for v in result.verdicts] == pytest.approx([0, 0] + [0.2] * 5)


def test_krum_without_attack_falls_back_or_drops_the_pick() -> None:
    # K=5, f=1, 2 neighbours: h1 scores 8, the others 12 -> h1. rho(h_i, h1) = 1/sqrt(3) for
    # i = 2..5 (one differing sign), all >= 0.5: all five flagged, nothing left -> Krum's pick.
    result = aggregate("pdrr_krum", HONEST, f=1)
    assert result.info["fallback"] is True
    assert result.info["flagged"] == [0, 1, 2, 3, 4]
    assert "all 5 flagged" in result.verdicts[0].reason
    np.testing.assert_array_equal(result.vector, HONEST[0])
    # with q = 0.6 only h1 (rho = 1) is flagged; Krum over h2..h5 (f' = 0, 2 neighbours):
    # every score is 8 + 8 = 16, ties go to the lowest index -> h2
    result = aggregate("pdrr_krum", HONEST, f=1, q=0.6)
    assert result.info["flagged"] == [0]
    np.testing.assert_array_equal(result.vector, HONEST[1])


# Trimmed mean, K=5, beta=1. Client 0 is crafted below every honest value.
#   coord 0: [-5, 1, 2, 3, 4] -> trim c0, c4 -> mean(1,2,3) = 2
#   coord 1: [-6, 4, 3, 2, 1] -> trim c0, c1 -> 2
#   coord 2: [-7, 2, 4, 1, 3] -> trim c0, c2 -> 2
#   coord 3: [-9, 0, 0, 0, 5] -> trim c0, c4 -> 0: zero change direction, not counted
# n^c = [3, 1, 1, 0, 1]; threshold 0.5 * 3 = 1.5 -> only c0. (Counting coord 3 would give
# c4 a count of 2 >= 1.5 and flag it too.)
TRIM_ROUND = np.array(
    [[-5, -6, -7, -9], [1, 4, 2, 0], [2, 3, 4, 0], [3, 2, 1, 0], [4, 1, 3, 5]], dtype=np.float32
)


def test_trimmed_mean_attack_detected() -> None:
    result = aggregate("pdrr_trimmed_mean", TRIM_ROUND, beta=1)
    assert result.info["trimmed"].tolist() == [3, 1, 1, 0, 1]
    assert result.info["flagged"] == [0]
    # re-aggregation: trimmed mean of c1..c4 with beta' = 1 - 1 = 0, i.e. their mean
    assert result.info["reaggregate_beta"] == 0
    np.testing.assert_allclose(result.vector, [2.5, 2.5, 2.5, 1.25], rtol=1e-6)
    assert [v.weight for v in result.verdicts] == pytest.approx([0, 0.25, 0.25, 0.25, 0.25])
    assert [v.score for v in result.verdicts] == [3, 1, 1, 0, 1]


def test_trimmed_mean_without_attack_removes_or_falls_back() -> None:
    # coord 0: [1,2,3,4,5] trims c0, c4; coord 1: [2,1,3,5,4] trims c1, c3.
    # n^c = [1,1,0,1,1], threshold 0.5: four flagged. The paper removes the four and c2 alone
    # remains (beta' = 0).
    updates = np.array([[1, 2], [2, 1], [3, 3], [4, 5], [5, 4]], dtype=np.float32)
    result = aggregate("pdrr_trimmed_mean", updates, beta=1)
    assert result.info["flagged"] == [0, 1, 3, 4]
    assert result.info["fallback"] is False and result.info["over_budget"] is True
    np.testing.assert_allclose(result.vector, [3.0, 3.0])
    assert [v.weight for v in result.verdicts] == [0, 0, 1, 0, 0]
    # with the safeguard, four flagged > beta = 1 -> the trimmed mean itself
    guarded = aggregate("pdrr_trimmed_mean", updates, beta=1, fallback=True)
    plain = aggregate("trimmed_mean", updates, beta=1)
    assert guarded.info["fallback"] is True
    np.testing.assert_allclose(guarded.vector, plain.vector)
    assert [v.weight for v in guarded.verdicts] == pytest.approx([v.weight for v in plain.verdicts])
    # a larger budget lets the safeguard trust the detection again
    trusted = aggregate("pdrr_trimmed_mean", updates, beta=1, fallback=True, max_flagged=4)
    assert trusted.info["fallback"] is False
    assert [v.weight for v in trusted.verdicts] == [0, 0, 1, 0, 0]


# Median, K=5:
#   coord 0: [-5, 1, 2, 3, 4] -> median 2 (c2);  coord 1: [-6, 4, 3, 2, 1] -> 2 (c3)
#   coord 2: [-7, 2, 4, 1, 3] -> 2 (c1);         coord 3: [-8, 3, 1, 4, 2] -> 2 (c4)
# n^r = [0, 1, 1, 1, 1]; threshold (1 - 0.5) * 1 = 0.5 -> c0 flagged.
MEDIAN_ROUND = np.array(
    [[-5, -6, -7, -8], [1, 4, 2, 3], [2, 3, 4, 1], [3, 2, 1, 4], [4, 1, 3, 2]], dtype=np.float32
)


def test_median_attack_detected() -> None:
    assert aggregate("median", MEDIAN_ROUND).vector.tolist() == [2, 2, 2, 2]
    result = aggregate("pdrr_median", MEDIAN_ROUND)
    assert result.info["remained"].tolist() == [0, 1, 1, 1, 1]
    assert result.info["flagged"] == [0]
    # median of c1..c4 (even count): the mean of the middle two of {1,2,3,4} = 2.5 everywhere;
    # the values 2 and 3 are used, two per coordinate, each client twice
    np.testing.assert_allclose(result.vector, [2.5] * 4)
    assert [v.weight for v in result.verdicts] == pytest.approx([0, 0.25, 0.25, 0.25, 0.25])
    mean = aggregate("pdrr_median", MEDIAN_ROUND, reaggregate="mean")
    np.testing.assert_allclose(mean.vector, [2.5] * 4)


def test_median_without_attack_removes_the_clients_never_chosen() -> None:
    # coord 0: [1,2,3], coord 1: [3,2,1]: c1 is always the median, n^r = [0, 2, 0];
    # threshold 1 flags c0 and c2 (2 > (K-1)//2 = 1): removed, the median of c1 alone is c1.
    updates = np.array([[1, 3], [2, 2], [3, 1]], dtype=np.float32)
    result = aggregate("pdrr_median", updates)
    assert result.info["fallback"] is False and result.info["over_budget"] is True
    np.testing.assert_allclose(result.vector, [2, 2])
    assert [v.weight for v in result.verdicts] == [0, 1, 0]
    assert aggregate("pdrr_median", updates, fallback=True).info["fallback"] is True


# More flagged clients than the rule's budget: the paper removes them all and re-aggregates the
# rest; the safeguard (fallback=True) keeps the pre-aggregate. Each test below tells the two
# apart, so it would fail on a rule that kept the pre-aggregate by default.


def test_krum_attackers_beyond_f_are_removed_not_selected() -> None:
    # K=7, f=2 (3 neighbours), three identical crafted updates a and four honest h1..h4.
    # Krum scores: each attacker 0 + 0 + 4.44 (h2) = 4.44, the lowest -> Krum picks attacker 0.
    # rho = 1 for the three attackers, < 0 for the honest: 3 flagged > f = 2.
    updates = np.concatenate([np.repeat(ATTACK[:1], 3, axis=0), HONEST[:4]])
    assert aggregate("krum", updates, f=2).info["selected"] == 0
    result = aggregate("pdrr_krum", updates, f=2)
    assert result.info["flagged"] == [0, 1, 2] and result.info["over_budget"] is True
    assert result.info["fallback"] is False
    # Krum over h1..h4 with f' = 0 and 2 neighbours: h1 scores 4 + 4 = 8, the others 4 + 8 = 12.
    np.testing.assert_array_equal(result.vector, HONEST[0])
    assert [v.kept for v in result.verdicts] == [False] * 3 + [True, False, False, False]
    guarded = aggregate("pdrr_krum", updates, f=2, fallback=True)
    assert guarded.info["fallback"] is True
    np.testing.assert_array_equal(guarded.vector, ATTACK[0])  # the crafted update
    assert "3 flagged > budget 2" in guarded.verdicts[0].reason


def test_trimmed_mean_attackers_beyond_beta_are_removed() -> None:
    rng = np.random.default_rng(5)
    k, c, d = 20, 6, 2000
    updates = _fang_partial_trim(rng, k, c, d)
    result = aggregate("pdrr_trimmed_mean", updates, beta=4)
    assert result.info["flagged"] == list(range(c)) and result.info["over_budget"] is True
    assert result.info["reaggregate_beta"] == 0
    np.testing.assert_allclose(result.vector, updates[c:].mean(axis=0), rtol=1e-5, atol=1e-6)
    guarded = aggregate("pdrr_trimmed_mean", updates, beta=4, fallback=True)
    poisoned = aggregate("trimmed_mean", updates, beta=4).vector
    np.testing.assert_allclose(guarded.vector, poisoned, rtol=1e-6)
    # The pre-aggregate still holds attackers' values: it is farther from the honest mean.
    honest = updates[c:].mean(axis=0)
    assert np.linalg.norm(poisoned - honest) > 10 * np.linalg.norm(result.vector - honest)


def test_median_beyond_the_budget_takes_the_median_of_the_rest() -> None:
    # coord 0: c0=0, c1=2, c2=3, c3=1, c4=10 -> median 2 (c1); coord 1: 0, 3, 2, 1, 10 -> 2 (c2).
    # n^r = [0, 1, 1, 0, 0]; threshold 0.5 flags c0, c3, c4: 3 > (K-1)//2 = 2.
    updates = np.array([[0, 0], [2, 3], [3, 2], [1, 1], [10, 10]], dtype=np.float32)
    result = aggregate("pdrr_median", updates)
    assert result.info["flagged"] == [0, 3, 4] and result.info["fallback"] is False
    np.testing.assert_allclose(result.vector, [2.5, 2.5])  # median of {2, 3}
    guarded = aggregate("pdrr_median", updates, fallback=True)
    np.testing.assert_allclose(guarded.vector, [2.0, 2.0])  # the plain median


def _fang_partial_trim(rng: np.random.Generator, k: int, c: int, d: int) -> np.ndarray:
    """Honest updates and c crafted ones (Fang et al. partial knowledge, as in Sec. 3.2.1)."""
    honest = rng.normal(rng.choice([-0.5, 0.5], size=d), 0.2, (k, d)).astype(np.float32)
    own = honest[:c]
    mu, sigma = own.mean(axis=0), own.std(axis=0)
    s = np.sign(mu)  # estimated change direction
    depth = rng.uniform(3, 4, (c, d))
    updates = honest.copy()
    updates[:c] = mu - s * depth * sigma  # opposite side, beyond the benign range
    return updates


@pytest.mark.parametrize("rule", ["pdrr_trimmed_mean", "pdrr_median"])
def test_fang_attack_on_coordinate_rules_is_removed(rule: str) -> None:
    rng = np.random.default_rng(4)
    k, c, d = 20, 4, 2000
    updates = _fang_partial_trim(rng, k, c, d)
    params = {"beta": c} if rule == "pdrr_trimmed_mean" else {}
    result = aggregate(rule, updates, **params)
    assert result.info["flagged"] == list(range(c))
    honest_mean = updates[c:].mean(axis=0)
    if rule == "pdrr_trimmed_mean":
        np.testing.assert_allclose(result.vector, honest_mean, rtol=1e-5, atol=1e-6)
    else:
        honest_median = aggregate("median", updates[c:]).vector
        np.testing.assert_allclose(result.vector, honest_median, rtol=1e-6)


def test_fang_attack_on_krum_is_removed() -> None:
    rng = np.random.default_rng(8)
    k, c, d = 20, 4, 1000
    honest = rng.normal(0.1, 1.0, (k, d)).astype(np.float32)
    s = np.sign(honest[:c].mean(axis=0))
    crafted = -0.1 * s + 1e-6 * rng.standard_normal((c, d))
    updates = honest.copy()
    updates[:c] = crafted
    assert aggregate("krum", updates, f=c).info["selected"] < c
    result = aggregate("pdrr_krum", updates, f=c)
    assert result.info["flagged"] == list(range(c))
    assert result.info["selected"] >= c


@pytest.mark.parametrize(
    ("rule", "kwargs", "error", "pattern"),
    [
        ("pdrr_krum", {"f": 1, "k": 4}, ByzantineBoundError, r"2f\+3 = 5.*f=1, got K=4"),
        ("pdrr_trimmed_mean", {"beta": 2, "k": 4}, ByzantineBoundError, r"= 5 .*beta=2.*K=4"),
        ("pdrr_krum", {"f": 1, "q": 1.5}, InvalidParameterError, "q=1.5"),
        ("pdrr_median", {"reaggregate": "max"}, InvalidParameterError, "'max'"),
        ("pdrr_median", {"max_flagged": -1}, InvalidParameterError, "max_flagged"),
        ("pdrr_median", {"fallback": "yes"}, InvalidParameterError, "fallback must be True"),
        ("pdrr_trimmed_mean", {"beta": 0.7}, InvalidParameterError, "0.7"),
        ("pdrr_krum", {"f": -1}, InvalidParameterError, "f must be >= 0"),
    ],
)
def test_bounds_and_parameters(
    rule: str, kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    k = int(kwargs.pop("k", 7))
    updates = np.arange(k * 3, dtype=np.float32).reshape(k, 3)
    with pytest.raises(error, match=pattern):
        aggregate(rule, updates, **kwargs)


@pytest.mark.parametrize(
    ("rule", "kwargs"),
    [("pdrr_krum", {"f": 2}), ("pdrr_trimmed_mean", {"beta": 2}), ("pdrr_median", {})],
)
def test_identical_updates_input_unchanged_and_order(rule: str, kwargs: dict[str, int]) -> None:
    row = np.array([0.5, -1.0, 0.0, 2.0], dtype=np.float32)
    same = aggregate(rule, np.tile(row, (7, 1)), **kwargs)
    np.testing.assert_array_equal(same.vector, row)
    updates = _fang_partial_trim(np.random.default_rng(1), 9, 2, 300)
    before = updates.copy()
    first = aggregate(rule, updates, **kwargs)
    np.testing.assert_array_equal(updates, before)
    perm = np.random.default_rng(2).permutation(9)
    shuffled = aggregate(rule, updates[perm], **kwargs)
    np.testing.assert_allclose(shuffled.vector, first.vector, rtol=1e-6)
    assert [v.weight for v in shuffled.verdicts] == pytest.approx(
        [first.verdicts[i].weight for i in perm]
    )


@pytest.mark.parametrize("d", [1, 1311])
def test_single_column_blocks(d: int) -> None:
    # d = 1 and a last block of one column: the transposed block must be copied before sorting.
    # Every coordinate is [-9, 1, 2, 3, 4]: the trimmed mean (beta=1) cuts c0 and c4 everywhere,
    # both flagged and removed -> mean(1, 2, 3) = 2 (beta' = 0); the median is always c2, the
    # four others are flagged and removed -> 2.
    updates = np.tile(np.array([[-9.0], [1.0], [2.0], [3.0], [4.0]], dtype=np.float32), (1, d))
    trimmed = aggregate("pdrr_trimmed_mean", updates, beta=1)
    median = aggregate("pdrr_median", updates)
    np.testing.assert_array_equal(trimmed.vector, np.full(d, 2.0))
    np.testing.assert_array_equal(median.vector, np.full(d, 2.0))
    assert trimmed.info["flagged"] == [0, 4] and trimmed.info["fallback"] is False
    assert median.info["flagged"] == [0, 1, 3, 4] and median.info["fallback"] is False
