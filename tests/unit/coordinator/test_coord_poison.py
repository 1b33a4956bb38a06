"""A legitimate but compromised board must never stop the coordinator.

The engine runs on a real SQLite store with real Ed25519 keys (the fixtures of
``test_coord_engine``). Each test is one thing such a board can send: a sample count at the
header's limit, a store that already holds one, huge finite values, float32's largest value.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from coordinator.rounds import RuleStrategy
from protocol.envelope import MAX_HEADER_INT, check_global
from protocol.errors import Reason
from tests.unit.coordinator.test_coord_engine import COORD, INITIAL, _engine, _update

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _finish_round(engine, updates):
    for client, delta, samples in updates:
        assert engine.handle_update(_update(engine, client, delta, samples)).accepted
    message = engine.close_round()
    assert message is not None
    return check_global(message, COORD.verify_key, run="demo")


def test_a_sample_count_at_the_header_limit_is_refused_at_admission(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    engine.start()
    pill = engine.handle_update(_update(engine, "b0", [1, 1, 1, 1], MAX_HEADER_INT))
    assert pill.reason is Reason.BAD_SAMPLE_COUNT
    assert "1000000000" in pill.detail
    new = _finish_round(engine, [("b0", [4, 0, 0, 0], 1), ("b1", [0, 4, 0, 0], 1),
                                 ("b2", [0, 0, 4, 0], 2)])  # fmt: skip
    np.testing.assert_allclose(new.weights, INITIAL + np.array([1, 1, 2, 0]))


def test_sample_totals_beyond_the_header_limit_saturate(tmp_path: Path) -> None:
    # An operator who allows the protocol's largest count: three such boards sum past 2^53.
    engine = _engine(tmp_path, max_samples=MAX_HEADER_INT)
    engine.start()
    big = MAX_HEADER_INT
    new = _finish_round(engine, [("b0", [1, 1, 1, 1], big), ("b1", [1, 1, 1, 1], big),
                                 ("b2", [1, 1, 1, 1], big)])  # fmt: skip
    assert new.header.samples == MAX_HEADER_INT
    np.testing.assert_allclose(new.weights, INITIAL + 1)
    assert engine.round == 2


def test_restart_quarantines_a_stored_update_that_breaks_todays_bounds(tmp_path: Path) -> None:
    # A store written under looser rules holds the poison pill: every close of its round would
    # weigh it. Restarted with today's bounds, the coordinator takes it out and carries on.
    loose = _engine(tmp_path, max_samples=MAX_HEADER_INT)
    loose.start()
    pill = _update(loose, "b0", [100, 100, 100, 100], MAX_HEADER_INT)
    assert loose.handle_update(pill).accepted
    loose.store.close()
    engine = _engine(tmp_path)
    engine.start()
    assert engine.missing() == ["b0", "b1", "b2"]
    assert engine.store.decision_counts(1) == {"accepted": 0, "quarantined": 1}
    assert [r["reason"] for r in engine.store.rejections(1)] == ["quarantined"]
    # The resent pill is refused by admission now; honest updates close the round.
    assert engine.handle_update(pill).reason is Reason.BAD_SAMPLE_COUNT
    new = _finish_round(engine, [("b0", [4, 0, 0, 0], 1), ("b1", [0, 4, 0, 0], 1),
                                 ("b2", [0, 0, 4, 0], 2)])  # fmt: skip
    np.testing.assert_allclose(new.weights, INITIAL + np.array([1, 1, 2, 0]))


def test_one_huge_finite_update_is_left_out_by_the_guard(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    engine.start()
    new = _finish_round(engine, [("b0", [1e15] * 4, 1), ("b1", [0, 4, 0, 0], 1),
                                 ("b2", [0, 0, 4, 0], 1)])  # fmt: skip
    np.testing.assert_allclose(new.weights, INITIAL + np.array([0, 2, 2, 0]))
    record = engine.store.round_row(1).record
    assert record["decision"]["guard"]["action"] == "reaggregated"
    assert record["decision"]["guard"]["excluded"] == [0]
    assert record["verdicts"]["0"]["kept"] is False


def test_float32_max_values_never_make_the_global_model_non_finite(tmp_path: Path) -> None:
    # Two of three boards at float32's largest value: the median norm is huge, but no weight
    # may exceed the absolute bound, so the guard leaves both out and the honest update alone
    # moves the model. The run goes on, and the boards' next updates are admitted (before the
    # guard the global model overflowed and every later update was rejected as non_finite).
    engine = _engine(tmp_path, rounds=3)
    engine.start()
    new = _finish_round(engine, [("b0", [FLOAT32_MAX] * 4, 1), ("b1", [FLOAT32_MAX] * 4, 1),
                                 ("b2", [0, 0, 4, 0], 1)])  # fmt: skip
    np.testing.assert_allclose(new.weights, INITIAL + np.array([0, 0, 4, 0]))
    record = engine.store.round_row(1).record
    assert record["decision"]["guard"]["action"] == "reaggregated"
    assert record["decision"]["guard"]["excluded"] == [0, 1]
    assert "absolute bound" in record["decision"]["guard"]["problem"]
    second = _finish_round(engine, [("b0", [1, 1, 1, 1], 1), ("b1", [1, 1, 1, 1], 1),
                                    ("b2", [1, 1, 1, 1], 1)])  # fmt: skip
    np.testing.assert_allclose(second.weights, new.weights + 1)


class _Broken(RuleStrategy):
    """A strategy with a defect that only shows on some input."""

    def step(self, round_index, global_weights, submissions):
        if round_index == 1:
            raise RuntimeError("defect")
        return super().step(round_index, global_weights, submissions)


def test_a_failing_strategy_closes_the_round_with_the_previous_model(tmp_path: Path) -> None:
    engine = _engine(tmp_path, rounds=3)
    engine.runtime = replace(engine.runtime, strategy=_Broken("fedavg"))
    engine.start()
    new = _finish_round(engine, [("b0", [1, 1, 1, 1], 1), ("b1", [1, 1, 1, 1], 1),
                                 ("b2", [1, 1, 1, 1], 1)])  # fmt: skip
    np.testing.assert_array_equal(new.weights, INITIAL)
    assert engine.store.round_row(1).record["failure"] == "RuntimeError: defect"
    second = _finish_round(engine, [("b0", [1, 1, 1, 1], 1), ("b1", [1, 1, 1, 1], 1),
                                    ("b2", [1, 1, 1, 1], 1)])  # fmt: skip
    np.testing.assert_allclose(second.weights, INITIAL + 1)
