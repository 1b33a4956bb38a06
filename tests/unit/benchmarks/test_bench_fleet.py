"""The fleet benchmark's round breakdown, averaging and table, on hand-made round records."""

from __future__ import annotations

import pytest

from benchmarks import fleet as bench
from firmware_sim.fleet_history import merge_round


def _record(round_index: int = 2) -> dict:
    """A round opened at t=100.0 and closed at t=102.0 (wall 2.0 s), 4 boards reporting.

    Worker: g_t first received at 100.1, trained at 101.3 (window 1.2 s, of which 1.0 s board
    compute, alarm 4 x 50 ms = 0.2 s), sealing 0.1 s. Coordinator: last update at 101.6
    (collect 1.6 s), close started at 101.7 (wait 1.7 s), aggregation 0.1 s, evaluation 0.05 s.
    """
    return {
        "round": round_index,
        "board_seconds": 1.0,
        "alarm_ms_mean": 50.0,
        "boards_reporting": 4,
        "timing": {
            "wall_seconds": 2.0,
            "global_delivery_seconds": 0.1,
            "first_received_at": 100.1,
            "train_and_tamper_seconds": 1.2,
            "trained_at": 101.3,
            "seal_seconds": 0.1,
            "collect_seconds": 1.6,
            "wait_seconds": 1.7,
            "aggregate_seconds": 0.1,
            "evaluate_seconds": 0.05,
        },
        "alarms": {"0": True, "1": False, "2": False, "3": False},
        "network": {"update_bytes_sent": 4000, "global_bytes_delivered": 8000, "rejected": {}},
    }


def test_breakdown_splits_the_round_into_consecutive_intervals() -> None:
    b = bench.round_breakdown(_record())
    # broadcast: delivery 0.1 + verification (window 1.2 - compute 1.0) + close tail
    # (2.0 - 1.7 - 0.1 - 0.05 = 0.15) = 0.45
    assert b.broadcast == pytest.approx(0.45)
    assert (b.alarm, b.train) == (pytest.approx(0.2), pytest.approx(0.8))
    assert b.compute == pytest.approx(1.0)
    assert b.encode_sign == pytest.approx(0.1)
    # last arrival 101.6 - trained 101.3 - sealing 0.1
    assert b.network == pytest.approx(0.2)
    assert b.admission == pytest.approx(0.1)  # wait 1.7 - collect 1.6
    assert (b.aggregation, b.evaluation) == (0.1, 0.05)
    assert b.residual == pytest.approx(0.0, abs=1e-9)
    assert b.overhead_fraction == pytest.approx(0.5)  # (2.0 - 1.0) / 2.0
    # (0.45 + 0.1 + 0.2 + 0.1) / 2.0
    assert b.transport_fraction == pytest.approx(0.425)


def test_pipelined_rounds_count_sealing_inside_the_compute_window() -> None:
    rec = _record()
    # Each update was sealed and published right after its board: the window 100.1..101.4
    # (1.3 s) holds 1.0 s of compute, 0.1 s of sealing and 0.2 s of verification/hand-off.
    rec["timing"].update(pipelined=True, trained_at=101.4, train_and_tamper_seconds=1.3)
    b = bench.round_breakdown(rec)
    # broadcast: delivery 0.1 + (1.3 - 1.0 - 0.1) + close tail 0.15 = 0.45
    assert b.broadcast == pytest.approx(0.45)
    assert b.encode_sign == pytest.approx(0.1)
    # last arrival 101.6 - last board done 101.4 (sealing is already inside the window)
    assert b.network == pytest.approx(0.2)
    assert b.residual == pytest.approx(0.0, abs=1e-9)


def test_clipped_intervals_show_up_as_residual() -> None:
    rec = _record()
    rec["timing"]["trained_at"] = 101.55  # sealing would end 0.05 s after the last arrival
    b = bench.round_breakdown(rec)
    assert b.network == 0.0  # 101.6 - 101.55 - 0.1 < 0 is clipped
    # the other parts are unchanged (sum 1.8 s), so 2.0 - 1.8 s is left unexplained
    assert b.residual == pytest.approx(0.2)


def test_mean_breakdown_and_steady_rounds() -> None:
    one = bench.Breakdown(1.0, 0.1, 0.1, 0.5, 0.1, 0.1, 0.0, 0.1, 0.0)
    two = bench.Breakdown(3.0, 0.3, 0.1, 1.5, 0.3, 0.3, 0.2, 0.3, 0.1)
    mean = bench.mean_breakdown([one, two])
    assert mean.wall == 2.0 and mean.train == pytest.approx(1.0)
    assert mean.admission == pytest.approx(0.1)
    with pytest.raises(ValueError):
        bench.mean_breakdown([])
    rounds = [{"round": 1}, {"round": 2}, {"round": 3}]
    assert [r["round"] for r in bench.steady_rounds(rounds)] == [2, 3]
    assert bench.steady_rounds(rounds[:1]) == rounds[:1]


def test_summary_ratio_and_table_row() -> None:
    fleet_history = {
        "rounds": [_record(1), _record(2), _record(3)],
        "summary": {"wall_seconds": 30.0, "final_test_accuracy": 0.9},
    }
    engine_history = {
        "rounds": [
            {"round": 1, "seconds": 9.0, "board_seconds": 8.0},
            {"round": 2, "seconds": 0.5, "board_seconds": 0.4},
            {"round": 3, "seconds": 1.5, "board_seconds": 1.2},
        ],
        "summary": {"final_test_accuracy": 0.91},
    }
    row = bench.summarize(4, fleet_history, engine_history)
    assert row["engine_round_seconds"] == pytest.approx(1.0)  # rounds 2 and 3 only
    assert row["ratio"] == pytest.approx(2.0)  # 2.0 s / 1.0 s
    assert row["alarms"] == 3 and row["update_bytes_per_round"] == 4000.0
    table = bench.format_table([row])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].count("---") == 13
    assert lines[2].startswith("| 4 | 2.00 s | 450 ms | 1000 ms (200 ms / 800 ms) | 100 ms |")
    assert lines[2].endswith("| 50.0% | 42.5% | 1.00 s | 2.00x |")


def test_merge_round_reports_sealing_time_and_worker_marks() -> None:
    line = {
        "kind": "round", "round": 2, "received_at": 100.5, "boards": 2, "dropped": [],
        "board_seconds": 0.5, "alarm_ms_sum": 20.0, "train_ms_sum": 80.0, "alarms": 0,
        "update_bytes": 10, "global_bytes": 10, "global_deliveries": 2, "trained_at": 101.0,
        "seal_seconds": 0.25, "published_at": 101.3, "resends": 0, "metrics": {},
    }  # fmt: skip
    other = dict(line, received_at=100.4, trained_at=101.2, seal_seconds=0.5, published_at=101.1)
    timing = merge_round({"seconds": 2.0}, [line, other], opened_at=100.0)["timing"]
    assert timing["seal_seconds"] == pytest.approx(0.75)
    assert timing["first_received_at"] == 100.4
    assert timing["trained_at"] == 101.2 and timing["published_at"] == 101.3
