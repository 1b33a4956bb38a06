"""The global-model guard (coordinator.rounds.guarded_step) over every registered rule and SIREN.

One board of seven sends an update whose every value is huge (1e15, or float32's largest value);
whatever the rule does with it, the step the guard lets through is finite and within the honest
updates' scale. Rules that already ignore the huge update pass untouched (no ``guard`` entry).
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators import REGISTRY
from coordinator.errors import ByzantineBoundError
from coordinator.rounds import (
    RuleStrategy,
    Submission,
    global_problem,
    guarded_step,
    make_strategy,
)
from tests.unit.coordinator.aggregators.test_agg_properties import PARAMS

K, F, D = 7, 1, 400
RNG = np.random.default_rng(3)
MU = RNG.choice([-1.0, 1.0], size=D)
HONEST = (MU + 0.05 * RNG.normal(size=(K, D))).astype(np.float32)
SERVER = (MU + 0.05 * RNG.normal(size=D)).astype(np.float32)
G0 = np.zeros(D, dtype=np.float32)
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Rules known to pass a huge update on when unguarded (docs/protocol.md, magnitude attacks).
#: PDRR-Krum as published removes every update that correlates with Krum's pick, which here
#: leaves the huge one.
PASS_IT_ON = {"fedavg", "foolsgold", "dspo_score", "dspo_vote", "pdrr_krum"}


class Oracle:
    """Root set stand-in: FLTrust's server update, and SIREN's accuracy (sign agreement)."""

    def accuracy(self, weights: np.ndarray) -> float:
        return float(np.mean(np.sign(weights) == MU))

    def server_update(self, global_weights: np.ndarray, round_index: int) -> np.ndarray:
        return SERVER


def submissions(huge: float) -> list[Submission]:
    rows = HONEST.copy()
    rows[0] = huge
    return [Submission(i, rows[i], 100, False) for i in range(K)]


@pytest.mark.parametrize("huge", [1e15, FLOAT32_MAX])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_no_rule_emits_a_non_finite_or_absurd_global_model(name: str, huge: float) -> None:
    params = {k: v for k, v in PARAMS[name](K, F, SERVER).items() if k != "server_update"}
    strategy = RuleStrategy(name, params, oracle=Oracle())
    result = guarded_step(strategy, 1, G0, submissions(huge))
    step = np.asarray(result.new_global, dtype=np.float64) - G0
    assert np.isfinite(step).all()
    honest_mean = HONEST[1:].mean(axis=0)
    # Within the honest updates' own scale of their mean (each is 0.05 sqrt(D) from it).
    assert np.linalg.norm(step - honest_mean) < 0.5 * np.sqrt(D)
    guard = result.record.get("guard")
    if name in PASS_IT_ON:
        assert guard is not None and guard["action"] == "reaggregated"
        assert guard["excluded"] == [0] and result.verdicts[0]["kept"] is False
    else:
        assert guard is None


def test_siren_with_a_huge_update_stays_finite() -> None:
    strategy = make_strategy("siren", {}, oracle=Oracle(), num_clients=K, num_rounds=10)
    result = guarded_step(strategy, 1, G0, submissions(FLOAT32_MAX))
    assert np.isfinite(result.new_global).all()
    assert np.abs(result.new_global).max() < 10


def test_a_round_of_only_huge_updates_keeps_the_previous_model() -> None:
    rows = [Submission(i, np.full(D, 1e15, np.float32), 1, False) for i in range(3)]
    result = guarded_step(RuleStrategy("fedavg"), 1, G0, rows)
    np.testing.assert_array_equal(result.new_global, G0)
    assert result.record["guard"]["action"] == "kept_previous_global"
    assert not any(v["kept"] for v in result.verdicts.values())


def test_a_stateful_rule_is_rewound_before_the_guard_reaggregates() -> None:
    # FoolsGold keeps a history of every client's updates; the discarded first attempt must not
    # leave the huge update in it.
    strategy = RuleStrategy("foolsgold")
    guarded = guarded_step(strategy, 1, G0, submissions(1e15))
    assert guarded.record["guard"]["action"] == "reaggregated"
    reference = RuleStrategy("foolsgold")
    reference.step(1, G0, submissions(1e15)[1:])
    np.testing.assert_array_equal(strategy.state_dict()["arrays"]["history"]["data"],
                                  reference.state_dict()["arrays"]["history"]["data"])  # fmt: skip


def test_refusals_pass_through_the_guard() -> None:
    with pytest.raises(ByzantineBoundError):
        guarded_step(RuleStrategy("krum", {"f": 3}), 1, G0, submissions(1.0))


def test_global_problem_names_each_kind_of_absurd_model() -> None:
    ones = np.ones(4, np.float32)
    assert global_problem(G0[:4], ones, bound=10.0) is None
    assert "non-finite" in global_problem(G0[:4], np.array([1, np.inf, 0, 0]), bound=10.0)
    assert "exceeds the bound" in global_problem(G0[:4], 100 * ones, bound=10.0)
    assert "absolute bound" in global_problem(G0[:4], 2e6 * ones, bound=np.inf)
    # An initial model already beyond the absolute bound is not refused for staying there.
    assert global_problem(2e6 * ones, 2e6 * ones, bound=np.inf) is None
    assert "shape" in global_problem(G0[:4], ones[:3], bound=10.0)
