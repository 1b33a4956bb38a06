"""Buffered asynchronous mode in process, and device profiles on the simulated clock.

Digits, a handful of boards of the ``mixed`` fleet (Pi Zero 2-class boards 8x slower than the
Pi 4-class ones, Jetson-class ones, dropouts), FedAvg. ``nominal_compute`` makes the simulated
board times, and so the order of the updates, the same on every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from firmware_sim.engine import SimConfig, run_simulation

FLEET: dict[str, Any] = dict(
    dataset="digits", clients=8, seed=2, profile="mixed", nominal_compute=1e-4
)


def test_buffered_async_is_reproducible_and_buffers_b_distinct_admissible_updates(
    digits: Any,
) -> None:
    config = SimConfig(mode="async", rounds=8, buffer_size=4, staleness_bound=2, **FLEET)
    history = run_simulation(config, dataset=digits)
    again = run_simulation(config, dataset=digits)
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 9))
    assert [r["test_accuracy"] for r in rounds] == [r["test_accuracy"] for r in again["rounds"]]
    np.testing.assert_array_equal(history["final_global"], again["final_global"])
    profiles = config.device_profiles()
    times = [r["sim_time"] for r in rounds]
    assert times == sorted(times) and history["summary"]["sim_seconds"] == times[-1]
    staleness: list[int] = []
    for r in rounds:
        assert r["mode"] == "async" and len(r["selected"]) == len(set(r["selected"])) == 4
        assert set(r["staleness"]) == {str(c) for c in r["selected"]}
        staleness += r["staleness"].values()
        counts = r["admission"]
        fresh = sum(1 for t in r["staleness"].values() if t == 0)
        assert counts.get("accepted", 0) == fresh and counts.get("stale", 0) == 4 - fresh
        for cid, board in r["boards"].items():
            assert board["base_round"] == r["round"] - r["staleness"][cid]
    assert max(staleness) <= 2 and max(staleness) > 0, "slow boards deliver stale updates"
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"] + 0.2
    # The slowest class (Pi Zero 2, 48x compute) takes part less often than the fastest.
    taken = [c for r in rounds for c in r["selected"]]
    per_class = {
        name: np.mean([taken.count(i) for i, p in enumerate(profiles) if p.name == name])
        for name in {p.name for p in profiles}
    }
    assert per_class["pizero2"] < per_class["jetson"], per_class


def test_without_staleness_only_fresh_updates_are_buffered(digits: Any) -> None:
    config = SimConfig(mode="async", rounds=4, buffer_size=3, staleness_bound=0, **FLEET)
    rounds = run_simulation(config, dataset=digits)["rounds"]
    assert all(set(r["staleness"].values()) == {0} for r in rounds)
    refused = sum(r["admission"].get("too_stale", 0) for r in rounds)
    assert refused > 0, "updates of boards slower than a version are refused as too stale"


def test_sync_rounds_drop_boards_and_last_as_long_as_their_slowest_reporting_board(
    digits: Any,
) -> None:
    config = SimConfig(rounds=4, **{**FLEET, "dropout": 0.3})
    history = run_simulation(config, dataset=digits)
    profiles = config.device_profiles()
    dropped: list[int] = []
    for r in history["rounds"]:
        drops = [c for c in range(8) if profiles[c].drops(config.seed, r["round"], c)]
        assert r.get("dropped", []) == drops and r["selected"] == sorted(set(range(8)) - set(drops))
        dropped += drops
        slowest = max(b["sim_seconds"] for b in r["boards"].values())
        assert r["sim_seconds"] == pytest.approx(slowest + r["server_seconds"])
    assert dropped, "a dropout of 0.3 drops some board in four rounds of eight"
    # 8x: a Pi Zero 2-class board's compute factor is 8 times a Pi 4-class board's.
    assert {p.name: p.compute_factor for p in profiles}["pizero2"] == 48.0


def test_async_settings_are_checked_with_the_run() -> None:
    with pytest.raises(ValueError, match="draws no boards"):
        SimConfig(mode="async", client_fraction=0.5)
    with pytest.raises(ValueError, match="more than the 4 boards"):
        SimConfig(mode="async", clients=4, buffer_size=5)
    with pytest.raises(ValueError, match="staleness weight"):
        SimConfig(mode="async", clients=10, staleness_weight="linear")
    with pytest.raises(ValueError, match="--mode"):
        SimConfig(mode="semi")
    with pytest.raises(ValueError, match="unknown device profile"):
        SimConfig(profile="pi3")


def test_the_latest_pool_runs_the_rule_on_every_boards_newest_admissible_update(
    digits: Any,
) -> None:
    config = SimConfig(
        mode="async", rounds=6, buffer_size=3, staleness_bound=3, async_pool="latest", **FLEET
    )
    rounds = run_simulation(config, dataset=digits)["rounds"]
    for r in rounds:
        pool = {int(c) for c in r["staleness"]}
        assert set(r["selected"]) <= pool and len(r["selected"]) == 3
        assert max(r["staleness"].values()) <= 3
        assert set(r["decision"]["staleness"]) == {str(c) for c in pool}
    assert max(len(r["staleness"]) for r in rounds) > 3, "boards outside the buffer take part"
