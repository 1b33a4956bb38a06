"""FedAvg, geometric median and FLTrust on hand-worked inputs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from coordinator.aggregators import aggregate
from coordinator.aggregators.base import InvalidParameterError
from coordinator.aggregators.geomed import weiszfeld_coefficients
from coordinator.errors import ByzantineBoundError, InvalidUpdatesError, UnknownAggregatorError


def test_fedavg_weights_by_sample_counts() -> None:
    x = np.array([[0.0, 4.0], [4.0, 0.0]], dtype=np.float32)
    # (1*[0,4] + 3*[4,0]) / 4 = [3, 1]
    result = aggregate("fedavg", x, weights=[1, 3])
    assert result.vector == pytest.approx([3.0, 1.0], rel=1e-6)
    assert [v.weight for v in result.verdicts] == [0.25, 0.75]
    assert all(v.score is None for v in result.verdicts)


def test_fedavg_without_counts_is_the_plain_mean() -> None:
    x = np.array([[0.0], [1.0], [5.0]], dtype=np.float32)
    assert aggregate("fedavg", x).vector == pytest.approx([2.0], rel=1e-6)


def test_fedavg_zero_count_client_is_not_kept() -> None:
    x = np.array([[0.0, 4.0], [4.0, 0.0]], dtype=np.float32)
    result = aggregate("fedavg", x, weights=[0, 2])
    assert result.vector.tolist() == [4.0, 0.0]
    assert [v.kept for v in result.verdicts] == [False, True]


def test_fedavg_weight_attack_moves_the_mean() -> None:
    # The rule trusts declared counts: one client claiming 98 of 100 samples dominates.
    x = np.array([[0.0], [0.0], [10.0]], dtype=np.float32)
    assert aggregate("fedavg", x, weights=[1, 1, 98]).vector[0] == pytest.approx(9.8, rel=1e-6)


def test_geometric_median_of_points_on_a_line_is_their_median() -> None:
    # In one dimension the geometric median is the ordinary median: 10.
    x = np.array([[0.0], [0.2], [10.0], [11.0], [12.0]], dtype=np.float32)
    result = aggregate("geometric_median", x, tol=1e-10)
    assert result.vector[0] == pytest.approx(10.0, abs=1e-3)
    assert result.info["converged"] is True
    assert result.info["iterations"] >= 1
    # The middle client carries most of the weight.
    weights = [v.weight for v in result.verdicts]
    assert max(weights) == weights[2]
    assert sum(weights) == pytest.approx(1.0)
    assert result.verdicts[0].score == pytest.approx(10.0, abs=1e-3)


def test_geometric_median_of_equilateral_triangle_is_its_centre() -> None:
    x = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)]], dtype=np.float32)
    result = aggregate("geometric_median", x, tol=1e-9)
    assert result.vector == pytest.approx([1.0, 1.0 / math.sqrt(3.0)], abs=1e-6)


@pytest.mark.parametrize("huge", [1e15, float(np.finfo(np.float32).max)])
def test_geometric_median_ignores_one_huge_update(huge: float) -> None:
    # Five honest updates near 0.05 and one whose every value is huge (a magnitude attack): the
    # geometric median stays among the honest ones, within their spread of their own median.
    rng = np.random.default_rng(0)
    x = (0.05 + 0.01 * rng.normal(size=(6, 2000))).astype(np.float32)
    honest = aggregate("geometric_median", np.delete(x, 3, axis=0)).vector
    x[3] = huge
    result = aggregate("geometric_median", x)
    assert np.isfinite(result.vector).all()
    spread = float(np.linalg.norm(x[0] - honest))
    assert float(np.linalg.norm(result.vector - honest)) < 0.5 * spread
    assert result.verdicts[3].weight < 1e-15
    assert result.info["converged"] is True


def test_geometric_median_of_a_majority_point() -> None:
    # Three clients at the origin outweigh one far away: the geometric median is the origin.
    x = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10.0, 10.0]], dtype=np.float32)
    result = aggregate("geometric_median", x)
    assert np.abs(result.vector).max() < 1e-4


def test_geometric_median_weighted_uses_sample_counts() -> None:
    # Minimise 3|z| + |z - 10|: z = 0. Unweighted, any z in [0, 10] is optimal.
    x = np.array([[0.0], [10.0]], dtype=np.float32)
    result = aggregate("geometric_median", x, weighted=True, weights=[3, 1])
    assert abs(result.vector[0]) < 1e-3


def test_geometric_median_stops_at_max_iter() -> None:
    # Started from the coordinate-wise median (1, 0), the triangle's centre takes many steps.
    x = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)]], dtype=np.float32)
    result = aggregate("geometric_median", x, tol=1e-15, max_iter=2)
    assert result.info["iterations"] == 2
    assert result.info["converged"] is False


@pytest.mark.parametrize(
    "params", [{"tol": 0.0}, {"nu": -1.0}, {"max_iter": 0}, {"tol": "x"}, {"nu": True}]
)
def test_geometric_median_rejects_bad_parameters(params: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameterError):
        aggregate("geometric_median", np.zeros((3, 2), np.float32), **params)


def test_geometric_median_optional_f_bound() -> None:
    with pytest.raises(ByzantineBoundError, match=r"K >= 2f\+1 = 5 clients for f=2, got K=3"):
        aggregate("geometric_median", np.zeros((3, 2), np.float32), f=2)


def test_weiszfeld_identical_points_stop_immediately() -> None:
    gram = np.full((3, 3), 4.0)
    coef, dist, steps, converged = weiszfeld_coefficients(gram, np.full(3, 1 / 3))
    assert converged and steps == 0
    assert dist.tolist() == [0.0, 0.0, 0.0]
    assert coef == pytest.approx([1 / 3] * 3)


# FLTrust worked example: server update g0 = [1, 0] (norm 1).
#   client 0 [0,0]: no direction, trust 0     client 1 [1,0]: cos 1
#   client 2 [0,1]: cos 0 -> trust 0          client 3 [1,1] and 4 [100,100]: cos 1/sqrt(2)
# Rescaled to norm 1: [1,0], [1,1]/sqrt(2) twice. Aggregate:
#   (1*[1,0] + 2 * (1/sqrt2) * [1,1]/sqrt2) / (1 + sqrt2) = [2, 1] / (1 + sqrt2)
FLT = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [100, 100]], dtype=np.float32)
G0 = np.array([1.0, 0.0], dtype=np.float32)


def test_fltrust_by_hand() -> None:
    result = aggregate("fltrust", FLT, server_update=G0)
    s = 1.0 + math.sqrt(2.0)
    assert result.vector == pytest.approx([2.0 / s, 1.0 / s], rel=1e-6)
    h = 1.0 / math.sqrt(2.0)
    assert [v.score for v in result.verdicts] == pytest.approx([0.0, 1.0, 0.0, h, h])
    assert [v.weight for v in result.verdicts] == pytest.approx([0, 1 / s, 0, h / s, h / s])
    assert [v.kept for v in result.verdicts] == [False, True, False, True, True]
    assert "no direction" in result.verdicts[0].reason
    assert result.info["all_distrusted"] is False


def test_fltrust_rescaling_removes_the_magnitude_of_a_boosted_update() -> None:
    # Client 1 is 1000x larger but points the same way: after rescaling both count the same.
    x = np.array([[2.0, 0.0], [2000.0, 0.0]], dtype=np.float32)
    result = aggregate("fltrust", x, server_update=np.array([3.0, 0.0], np.float32))
    assert result.vector == pytest.approx([3.0, 0.0], rel=1e-6)


def test_fltrust_all_distrusted_gives_zero() -> None:
    x = np.array([[-1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    result = aggregate("fltrust", x, server_update=G0)
    assert result.vector.tolist() == [0.0, 0.0]
    assert result.info["all_distrusted"] is True
    assert not any(v.kept for v in result.verdicts)


def test_fltrust_requires_a_server_update() -> None:
    with pytest.raises(UnknownAggregatorError, match="server_update"):
        aggregate("fltrust", FLT)


@pytest.mark.parametrize(
    "server", [np.zeros(3, np.float32), np.zeros((1, 2), np.float32), np.array([np.nan, 0.0])]
)
def test_fltrust_rejects_a_malformed_server_update(server: np.ndarray) -> None:
    with pytest.raises(InvalidUpdatesError, match="server_update"):
        aggregate("fltrust", FLT, server_update=server)
