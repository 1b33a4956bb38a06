"""siren bench aggregator-devices on a small cell: every rule on every device found, torch
results compared with numpy's, memory and time limits reported as skips with their numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import aggregator_devices as bench
from benchmarks.cli import BENCHMARKS
from coordinator.aggregators.devices import resolve_device


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "abc"], "argument --k: not a number: 'abc'"),
        (["--d", "1.5"], "argument --d: must be a whole number >= 1, got '1.5'"),
        (["--k", "0"], "argument --k: must be a whole number >= 1, got '0'"),
        (["--devices", "gpu"], "--devices: unknown aggregation device 'gpu'"),
    ],
)
def test_bad_sizes_and_devices_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.main([*argv, "--out", str(tmp_path / "devices.md")])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "devices.md").exists()


def test_sizes_take_exponents_and_devices_resolve_once_each() -> None:
    assert bench._size("1e6") == 1_000_000 and bench._size("100") == 100
    auto = resolve_device("auto")  # numpy without a GPU
    assert bench._devices(["numpy", "auto", "numpy"]) == list(dict.fromkeys(["numpy", auto]))
    assert bench._devices(None)[0] == "numpy"
