"""Buffered asynchronous aggregation: staleness weights, the step on a buffer, and SIREN's
reading of a stale board's silence (coordinator.async_rounds, coordinator.siren choice 9)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.async_rounds import AsyncSettings, Buffered, buffered_step
from coordinator.rounds import RuleStrategy
from tests.unit.coordinator.test_siren import ZERO, make, sub, upd


def test_staleness_weights_and_settings() -> None:
    poly = AsyncSettings(staleness_bound=3, buffer_size=2, staleness_weight="poly:0.5")
    assert [poly.weight(t) for t in (0, 1, 3)] == pytest.approx([1.0, 2**-0.5, 0.5])
    assert AsyncSettings(staleness_weight="poly:1").weight(4) == pytest.approx(0.2)
    assert AsyncSettings(staleness_weight="constant").weight(9) == 1.0
    assert poly.admits(3) and not poly.admits(4) and not poly.admits(-1)
    for bad in ("poly:-1", "poly:x", "exp", "constant:2"):
        with pytest.raises(ValueError, match="staleness weight"):
            AsyncSettings(staleness_weight=bad)
    with pytest.raises(ValueError, match="buffer size"):
        AsyncSettings(buffer_size=0)
    with pytest.raises(ValueError, match="staleness bound"):
        AsyncSettings(staleness_bound=-1)


def test_the_step_applies_the_rule_to_staleness_weighted_updates_in_board_order() -> None:
    settings = AsyncSettings(staleness_bound=4, buffer_size=3, staleness_weight="poly:1")
    g = np.array([1.0, 1.0], np.float32)
    # Arrival order 2, 0, 1; board 2 trained on a version three versions old: weight 1/4.
    buffer = [
        Buffered(2, np.array([4.0, 0.0], np.float32), 10, False, base_round=2, staleness=3),
        Buffered(0, np.array([1.0, 1.0], np.float32), 10, False, base_round=5, staleness=0),
        Buffered(1, np.array([0.0, 2.0], np.float32), 20, False, base_round=4, staleness=1),
    ]
    result = buffered_step(RuleStrategy("fedavg"), 5, g, buffer, settings)
    # FedAvg of (1,1), 1/2 (0,2), 1/4 (4,0) with sample weights 10, 20, 10.
    expected = g + (10 * np.array([1, 1]) + 20 * np.array([0, 1]) + 10 * np.array([1, 0])) / 40
    np.testing.assert_allclose(result.new_global, expected, rtol=1e-6)
    assert list(result.verdicts) == [0, 1, 2]
    assert result.record["staleness"] == {"0": 0, "1": 1, "2": 3}
    assert result.record["staleness_weight"] == {"0": 1.0, "1": 0.5, "2": 0.25}


def test_siren_does_not_blame_a_stale_board_for_its_silence() -> None:
    """Case 4 judges the silent boards malicious: a poisoned g_t makes every benign board that
    saw it alarm. A stale update's board never saw g_t; its silence is ignored instead."""
    siren, _ = make()
    subs = [
        sub(0, upd(19), True),
        sub(1, upd(18), True),
        sub(2, upd(1, -10.0), True),  # alarming but divergent: malicious
        sub(3, upd(19), False),  # silent, saw g_t: malicious by its silence
    ]
    stale = type(subs[3])(4, upd(19), 100, False, staleness=2)  # silent, trained on g_{t-2}
    record = siren.step(1, ZERO, [*subs, stale]).record
    assert record["case"] == 4
    assert record["malicious"] == [2, 3] and record["ignored"] == [4]
    assert siren.counts[4] == 0.0 and siren.counts[3] == 1.0
    # The poisoned-global branch of case 3 (similar alarming boards, silent ones much worse).
    siren, _ = make()
    subs = [sub(0, upd(19), True), sub(1, upd(18), True), sub(2, upd(5), False)]
    stale = type(subs[2])(3, upd(5), 100, False, staleness=1)
    record = siren.step(1, ZERO, [*subs, stale]).record
    assert (record["case"], record["branch"]) == (3, "poisoned-global")
    assert record["malicious"] == [2] and record["ignored"] == [3]
