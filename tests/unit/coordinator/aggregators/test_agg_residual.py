"""Repeated median and residual-based reweighting (Fu et al.) on hand-worked inputs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy.stats import siegelslopes

from coordinator.aggregators import aggregate
from coordinator.aggregators.base import InvalidParameterError
from coordinator.aggregators.residual import residual_confidences
from coordinator.errors import ByzantineBoundError

# One parameter, four clients. Sorted values y = [0, 2, 3, 9] at ranks x = 1..4; the client
# holding 9 is client 0. Worked by hand from Eqs. (1)-(2):
#   slopes s12=2, s13=1.5, s14=3, s23=1, s24=3.5, s34=6
#   inner medians m = [med(2,1.5,3), med(2,1,3.5), med(1.5,1,6), med(3,3.5,6)] = [2, 2, 1.5, 3.5]
#   beta1 = med(2, 2, 1.5, 3.5) = 2
#   pair intercepts (x_j y_i - x_i y_j)/(x_j - x_i): i=1: -2,-1.5,-3 -> -2; i=2: -2,0,-5 -> -2;
#   i=3: -1.5,0,-15 -> -1.5; i=4: -3,-5,-15 -> -5;  beta0 = med(-2,-2,-1.5,-5) = -2
#   line at x = 1..4: 0, 2, 4, 6; residuals 0, 0, -1, 3
COLUMN = [9.0, 0.0, 3.0, 2.0]


def test_repeated_median_hand_column() -> None:
    result = aggregate("repeated_median", np.array(COLUMN, dtype=np.float32)[:, None])
    # line at the centre rank 2.5: -2 + 2 * 2.5 = 3 (the plain median would be 2.5)
    assert result.vector.shape == (1,)
    assert result.vector[0] == pytest.approx(3.0, abs=1e-6)
    # mean absolute residual per client (client 0 holds 9 -> |3|, client 2 holds 3 -> |-1|)
    assert [v.score for v in result.verdicts] == pytest.approx([3.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert all(v.kept and v.weight == pytest.approx(0.25) for v in result.verdicts)


def test_repeated_median_three_points() -> None:
    # y = [0, 1, 5]: slopes 1, 2.5, 4; m = [1.75, 2.5, 3.25]; beta1 = 2.5
    # y_i - x_i m_i = [-1.75, -4, -4.75]; beta0 = -4; value at x = 2: -4 + 5 = 1
    updates = np.array([[5.0], [0.0], [1.0]], dtype=np.float32)
    assert aggregate("repeated_median", updates).vector[0] == pytest.approx(1.0, abs=1e-6)


def test_repeated_median_matches_scipy_siegel_line() -> None:
    rng = np.random.default_rng(3)
    for k in (3, 4, 7, 12):
        updates = rng.standard_normal((k, 40)).astype(np.float32)
        updates[:, :5] = np.round(updates[:, :5])  # ties
        got = aggregate("repeated_median", updates).vector
        x = np.arange(1, k + 1, dtype=np.float64)
        want = []
        for n in range(updates.shape[1]):
            fit = siegelslopes(np.sort(updates[:, n]).astype(np.float64), x, method="separate")
            want.append(fit.intercept + fit.slope * (k + 1) / 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_repeated_median_survives_float32_slope_overflow() -> None:
    # y = [-3e38, -1e38, 1e38, 3e38]: differences such as 4e38 overflow float32, the exact line
    # has slope 2e38 and intercept -5e38, so the centre value is -5e38 + 2e38 * 2.5 = 0.
    updates = np.array([[3e38], [-1e38], [-3e38], [1e38]], dtype=np.float32)
    result = aggregate("repeated_median", updates)
    assert np.isfinite(result.vector).all()
    assert abs(float(result.vector[0])) < 1e32


def _hand_weights_column_a() -> tuple[float, float]:
    """Confidence of the rank-4 point of COLUMN (Eqs. 3-6) and the std of the confidences."""
    tau = 1.48 * 0.5 * (1 + 5 / 3)  # median |r| of [0, 0, 1, 3] is 0.5
    z = 2.0 * math.sqrt(2 / 4)
    a3 = (1 / tau) / math.sqrt(1 - 9 / 30)  # leverage "origin": h = x^2 / (1+4+9+16)
    assert a3 < z  # rank 3 stays inside the band, confidence 1
    a4 = (3 / tau) / math.sqrt(1 - 16 / 30)
    w4 = z / a4
    w = [1.0, 1.0, 1.0, w4]
    mean = sum(w) / 4
    sigma = math.sqrt(sum((v - mean) ** 2 for v in w) / 4)
    return w4, sigma


def test_residual_reweighting_single_parameter() -> None:
    w4, _ = _hand_weights_column_a()
    result = aggregate("residual_reweighting", np.array(COLUMN, dtype=np.float32)[:, None])
    total = 3 + w4
    expected_share = [w4 / total, 1 / total, 1 / total, 1 / total]
    assert [v.weight for v in result.verdicts] == pytest.approx(expected_share, rel=1e-6)
    assert result.vector[0] == pytest.approx((9 * w4 + 0 + 3 + 2) / total, rel=1e-6)
    assert [v.score for v in result.verdicts] == pytest.approx([w4, 1, 1, 1], rel=1e-6)
    assert result.info["replaced"].tolist() == [0, 0, 0, 0]


def test_residual_reweighting_two_parameters_with_correction() -> None:
    # Parameter B: clients hold [1, 0, 5, 2] -> sorted [0, 1, 2, 5]; slopes 1, 1, 5/3, 1, 2, 3;
    # m = [1, 1, 1, 2]; beta1 = 1; y - x m = [-1, -1, -1, -3]; beta0 = -1; line 0, 1, 2, 3;
    # residuals [0, 0, 0, 2]: median |r| = 0 so tau = 0; the off-line point (client 2) gets
    # confidence 0 (limit of Eq. 6), is replaced by the line value 3, and sigma_B = std(1,1,1,0).
    w4, sigma_a = _hand_weights_column_a()
    sigma_b = math.sqrt(3) / 4
    updates = np.array([[9, 1], [0, 0], [3, 5], [2, 2]], dtype=np.float32)
    result = aggregate("residual_reweighting", updates)
    raw = [w4 * sigma_a + sigma_b, sigma_a + sigma_b, sigma_a, sigma_a + sigma_b]
    share = [r / sum(raw) for r in raw]
    assert [v.weight for v in result.verdicts] == pytest.approx(share, rel=1e-6)
    expected_a = 9 * share[0] + 0 * share[1] + 3 * share[2] + 2 * share[3]
    expected_b = 1 * share[0] + 0 * share[1] + 3 * share[2] + 2 * share[3]  # 5 -> 3
    np.testing.assert_allclose(result.vector, [expected_a, expected_b], rtol=1e-6)
    assert result.info["replaced"].tolist() == [0, 0, 1, 0]
    assert "1 of 2 parameters replaced" in result.verdicts[2].reason


def test_residual_reweighting_delta_zeroes_a_client() -> None:
    # delta above w4 = 0.635...: the rank-4 point is replaced and loses all confidence
    w4, _ = _hand_weights_column_a()
    assert w4 < 0.7
    result = aggregate(
        "residual_reweighting", np.array(COLUMN, dtype=np.float32)[:, None], delta=0.7
    )
    assert not result.verdicts[0].kept and result.verdicts[0].weight == 0.0
    assert result.vector[0] == pytest.approx((0 + 3 + 2) / 3, rel=1e-6)
    assert result.info["replaced"].tolist() == [1, 0, 0, 0]


def test_residual_reweighting_intercept_leverage() -> None:
    # hat matrix with an intercept column: h = 1/4 + (x - 2.5)^2 / 5
    tau = 1.48 * 0.5 * (1 + 5 / 3)
    z = 2.0 * math.sqrt(2 / 4)
    assert (1 / tau) / math.sqrt(1 - (0.25 + 0.25 / 5)) < z
    w4 = z / ((3 / tau) / math.sqrt(1 - (0.25 + 2.25 / 5)))
    result = aggregate(
        "residual_reweighting", np.array(COLUMN, dtype=np.float32)[:, None], leverage="intercept"
    )
    assert result.vector[0] == pytest.approx((9 * w4 + 5) / (3 + w4), rel=1e-6)


def _authors_column() -> tuple[list[float], list[float]]:
    """COLUMN under the authors' variant, by hand: (confidences by client, line by client).

    Sorted y = [0, 2, 3, 9] at ranks 1..4, slope 2 (Eq. 1). Intercept through the medians:
    median(y) = 2.5 at the centre rank 2.5, beta0 = 2.5 - 2 * 2.5 = -2.5; line -0.5, 1.5, 3.5,
    5.5; residuals 0.5, 0.5, -0.5, 3.5. Scale: the median of |r| without the smallest,
    med(0.5, 0.5, 3.5) = 0.5. Leverage with an intercept: h = 1/4 + (x - 2.5)^2 / 5.
    """
    tau = 1.4826 * (1 + 5 / 3) * 0.5 + 1e-7
    z = 2.0 * math.sqrt(2 / 4)
    h = [0.25 + (x - 2.5) ** 2 / 5 for x in (1, 2, 3, 4)]
    resid = [0.5, 0.5, 0.5, 3.5]
    conf = [min(1.0, z / (r / (tau * math.sqrt(1 - hx)))) for r, hx in zip(resid, h)]
    assert conf[:3] == [1.0, 1.0, 1.0] and 0.4 < conf[3] < 0.5
    # clients hold [9, 0, 3, 2]: ranks 4, 1, 3, 2
    return [conf[3], conf[0], conf[2], conf[1]], [5.5, -0.5, 3.5, 1.5]


def test_authors_variant_squares_max_normalised_weights_of_its_own_line() -> None:
    conf, _ = _authors_column()
    result = aggregate(
        "residual_reweighting", np.array(COLUMN, dtype=np.float32)[:, None], variant="authors"
    )
    weights = [(c / max(conf)) ** 2 for c in conf]
    share = [w / sum(weights) for w in weights]
    assert [v.weight for v in result.verdicts] == pytest.approx(share, rel=1e-6)
    assert result.vector[0] == pytest.approx(sum(w * y for w, y in zip(share, COLUMN)), rel=1e-6)
    assert result.info["delta"] == 0.1 and result.info["square_weights"] is True
    # The squaring alone, on the paper's line: w4 -> w4^2.
    w4, _ = _hand_weights_column_a()
    squared = aggregate(
        "residual_reweighting", np.array(COLUMN, dtype=np.float32)[:, None], square_weights=True
    )
    total = w4**2 + 3
    assert [v.weight for v in squared.verdicts] == pytest.approx(
        [w4**2 / total, 1 / total, 1 / total, 1 / total], rel=1e-6
    )


def test_authors_variant_replaces_values_below_delta_but_keeps_their_confidence() -> None:
    conf, line = _authors_column()
    column = np.array(COLUMN, dtype=np.float32)[:, None]
    result = aggregate("residual_reweighting", column, variant="authors", delta=0.5)
    weights = [(c / max(conf)) ** 2 for c in conf]
    share = [w / sum(weights) for w in weights]
    # Client 0 (confidence ~0.44 < 0.5): its 9 becomes the line's 5.5, its weight stays.
    assert result.verdicts[0].kept and result.verdicts[0].weight == pytest.approx(share[0])
    values = [line[0], *COLUMN[1:]]
    assert result.vector[0] == pytest.approx(sum(w * y for w, y in zip(share, values)), rel=1e-6)
    assert result.info["replaced"].tolist() == [1, 0, 0, 0]
    # The paper's Eq. (8) zeroes that confidence instead.
    paper = aggregate("residual_reweighting", column, delta=0.7)
    assert paper.verdicts[0].weight == 0.0


def test_authors_variant_separates_poisoned_clients_more() -> None:
    rng = np.random.default_rng(7)
    k, d, bad = 12, 400, 3
    updates = rng.normal(0.3, 0.1, (k, d)).astype(np.float32)
    updates[:bad] = rng.normal(0.0, 10.0, (bad, d))
    ratios = {}
    for variant in ("paper", "authors"):
        weights = np.array(
            [v.weight for v in aggregate("residual_reweighting", updates, variant=variant).verdicts]
        )
        ratios[variant] = weights[:bad].max() / weights[bad:].min()
    # Squaring the normalised weights roughly squares the ratio (0.05 here -> about 0.003).
    assert ratios["authors"] < 0.1 * ratios["paper"]


def test_identical_updates_return_that_update() -> None:
    row = np.array([0.5, -1.25, 3.0, 0.0], dtype=np.float32)
    updates = np.tile(row, (6, 1))
    for name, params in (
        ("repeated_median", {}),
        ("residual_reweighting", {}),
        ("residual_reweighting", {"variant": "authors"}),
    ):
        result = aggregate(name, updates, **params)
        np.testing.assert_allclose(result.vector, row, rtol=1e-6, atol=1e-7)
        assert all(v.weight == pytest.approx(1 / 6) for v in result.verdicts)
    assert aggregate("residual_reweighting", updates).info["uniform_fallback"] is True


@pytest.mark.parametrize("name", ["repeated_median", "residual_reweighting"])
def test_bound_needs_three_clients(name: str) -> None:
    with pytest.raises(ByzantineBoundError, match=r"K >= 3.*K=2"):
        aggregate(name, np.ones((2, 5), dtype=np.float32))


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"lam": 0.0}, "lam=0.0"),
        ({"delta": 1.0}, "delta=1.0"),
        ({"delta": -0.1}, "delta=-0.1"),
        ({"gamma": -1.0}, "gamma=-1.0"),
        ({"leverage": "hat"}, "'hat'"),
        ({"variant": "released"}, "'released'"),
        ({"square_weights": "yes"}, "square_weights must be True or False"),
    ],
)
def test_parameter_errors(params: dict[str, Any], pattern: str) -> None:
    with pytest.raises(InvalidParameterError, match=pattern):
        aggregate("residual_reweighting", np.ones((4, 3), dtype=np.float32), **params)


def test_poisoned_clients_are_down_weighted() -> None:
    rng = np.random.default_rng(7)
    k, d, bad = 12, 400, 3
    honest = rng.normal(0.3, 0.1, (k, d)).astype(np.float32)
    updates = honest.copy()
    updates[:bad] = rng.normal(0.0, 10.0, (bad, d))  # large-noise clients
    result = aggregate("residual_reweighting", updates)
    weights = np.array([v.weight for v in result.verdicts])
    assert weights[:bad].max() < 0.25 * weights[bad:].min()
    honest_mean = honest[bad:].mean(axis=0)
    assert np.linalg.norm(result.vector - honest_mean) < 0.1 * np.linalg.norm(
        updates.mean(axis=0) - honest_mean
    )
    assert (result.info["replaced"][:bad] > result.info["replaced"][bad:].max()).all()


def test_input_unchanged_order_and_determinism() -> None:
    rng = np.random.default_rng(11)
    updates = rng.standard_normal((9, 3000)).astype(np.float32)  # several column blocks
    before = updates.copy()
    first = aggregate("residual_reweighting", updates)
    second = aggregate("residual_reweighting", updates)
    np.testing.assert_array_equal(updates, before)
    np.testing.assert_array_equal(first.vector, second.vector)
    perm = rng.permutation(9)
    shuffled = aggregate("residual_reweighting", updates[perm])
    np.testing.assert_allclose(shuffled.vector, first.vector, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        [v.weight for v in shuffled.verdicts],
        [first.verdicts[i].weight for i in perm],
        rtol=1e-9,
    )


def test_confidences_show_the_hand_worked_decision() -> None:
    # The two-parameter case above, per parameter: client 2's value 5 of parameter B is the
    # one replaced, with confidence 0; parameter A's rank-4 client (0) has confidence w4.
    w4, _ = _hand_weights_column_a()
    updates = np.array([[9, 1], [0, 0], [3, 5], [2, 2]], dtype=np.float32)
    conf, replaced = residual_confidences(updates)
    np.testing.assert_allclose(conf, [[w4, 1], [1, 1], [1, 0], [1, 1]], rtol=1e-6)
    assert replaced.tolist() == [[False, False], [False, False], [False, True], [False, False]]


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_confidences_agree_with_the_rule(variant: str) -> None:
    rng = np.random.default_rng(7)
    updates = rng.normal(size=(12, 700)).astype(np.float32)
    updates[:3] *= 6.0  # three loud clients, so that some values are replaced
    result = aggregate("residual_reweighting", updates, variant=variant, delta=0.2)
    conf, replaced = residual_confidences(updates, variant=variant, delta=0.2)
    assert replaced.sum(axis=1).tolist() == result.info["replaced"].tolist()
    assert replaced[:3].sum() > replaced[3:].sum() > 0
    np.testing.assert_allclose(conf.mean(axis=1), [v.score for v in result.verdicts], rtol=1e-9)
    raw = (conf * conf.std(axis=0)).sum(axis=1)
    np.testing.assert_allclose(raw, result.info["raw_weight"], rtol=1e-6)


def test_confidences_refuse_a_vector() -> None:
    with pytest.raises(InvalidParameterError, match=r"\(K, d\) matrix"):
        residual_confidences(np.ones(5, dtype=np.float32))
