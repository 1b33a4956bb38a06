"""siren bench aggregator-devices on a small cell: every rule on every device found, torch
results compared with numpy's, memory and time limits reported as skips with their numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import aggregator_devices as bench
from benchmarks.cli import BENCHMARKS


def test_a_small_cell_times_every_rule_and_agrees_with_numpy() -> None:
    devices = bench.available_devices()
    cell = bench.measure_cell(12, 600, bench.RULES, devices, budget=600.0)
    assert not cell.skipped
    for rule in bench.RULES:
        for device in devices:
            timing = cell.timings[(rule, device)]
            assert timing.seconds is not None and timing.seconds > 0, (rule, device)
            if device != "numpy":
                assert timing.same in ("equal", "close"), (rule, device, timing.same)


def test_a_matrix_beyond_memavailable_is_skipped_with_the_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench, "mem_available", lambda: 2 << 30)
    cell = bench.measure_cell(1000, 10_000_000, ["krum"], ["numpy"], budget=1.0)
    assert "40.0 GB float32 matrix" in cell.skipped
    assert "MemAvailable was 2.1 GB" in cell.skipped
    assert not cell.timings


def test_a_rule_projected_beyond_the_budget_is_skipped(tmp_path: Path) -> None:
    cell = bench.measure_cell(8, 20_000, ["residual_reweighting"], ["numpy"], budget=1e-6)
    timing = cell.timings[("residual_reweighting", "numpy")]
    assert timing.seconds is None and timing.projected is not None
    assert "skipped: projected" in timing.note
    out = tmp_path / "devices.md"
    text = bench.write_report([cell], ["numpy"], out, ["--k", "12"], 1e-6, "test machine")
    assert "| 8 | 2e+04 | residual_reweighting | skipped (~" in text
    assert out.read_text() == text
    assert "Machine: test machine" in text


def test_the_cli_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "devices.md"
    assert (
        bench.main(["--k", "8", "--d", "1000", "--rules", "krum", "median", "--out", str(out)]) == 0
    )
    text = out.read_text()
    assert "| 8 | 1e+03 | krum |" in text and "| 8 | 1e+03 | median |" in text
    assert "siren bench aggregator-devices --k 8" in text
    assert BENCHMARKS["aggregator-devices"][0] == "benchmarks.aggregator_devices"
