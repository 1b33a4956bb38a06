"""siren bench round-close on a small cell: every rule measured both ways, results compared,
the report written with its tables and the targets section only for the K=1000, d=1e6 cell."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.cli import BENCHMARKS
from benchmarks.round_close import RULES, _mqtt_size, main, measure_cell, write_report


def test_a_small_cell_measures_every_rule_and_agrees_with_the_batch_rules() -> None:
    cell = measure_cell(40, 3000, RULES)
    assert set(cell["rules"]) == set(RULES)
    for rule, r in cell["rules"].items():
        assert r["same"] in ("equal", "close"), rule
        assert r["batch"] > 0 and r["streaming"] > 0
    assert cell["read_pass"] > 0 and cell["admit_per_update"] > 0


def test_report_tables_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "rc.md"
    assert main(["--k", "30", "--d", "2000", "--skip-mqtt", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 30 | 2e+03 | krum |" in text and "median / read pass" in text
    assert "Targets at K=1000" not in text  # only reported for that cell
    fake = {
        "k": 1000,
        "d": 1_000_000,
        "admit_per_update": 0.1,
        "read_pass": 0.2,
        "rules": {
            "krum": {"batch": 50.0, "streaming": 0.05, "same": "equal", "how": "streamed"},
            "median": {"batch": 9.0, "streaming": 0.9, "same": "equal", "how": "streamed"},
        },
    }
    text = write_report([fake], [], tmp_path / "t.md")
    assert "- krum: close 0.050 s (< 1 s: met)" in text
    assert "median: 0.900 s = 4.5x the read pass of 0.200 s (<= 3x: NOT met)" in text
    assert BENCHMARKS["round-close"][0] == "benchmarks.round_close"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mqtt", "100"], "argument --mqtt: expected KxD such as 1000x100000, got '100'"),
        (["--mqtt", "10x0"], "argument --mqtt: expected KxD such as 1000x100000, got '10x0'"),
        (["--shards", "-1"], "--shards must be >= 0, got -1"),
        (["--k", "0"], "--k and --d must be >= 1"),
    ],
)
def test_bad_sizes_are_one_line_errors_before_any_measurement(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--out", str(tmp_path / "rc.md")])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "rc.md").exists()


def test_mqtt_sizes_parse_as_boards_by_parameters() -> None:
    assert _mqtt_size("1000x100000") == (1000, 100_000)
    assert _mqtt_size("200X1000000") == (200, 1_000_000)
