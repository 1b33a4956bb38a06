"""The lean board's checks of the arm64 end-to-end run (no emulation needed to test them)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks import board_aarch64_litert as lean

BOARDS = ("board-000", "board-001")


def _facts(**change):
    facts = {
        "tensorflow_import": "fails (ModuleNotFoundError: No module named 'tensorflow')",
        "train_backend": {"board-000": "litert", "board-001": "litert", "board-002": "litert"},
        "sizes": {"venv_bytes": 151 * 2**20},
        "peak_rss_kib": {"board-000": 120 * 1024, "board-001": 130 * 1024},
    }
    facts.update(change)
    return facts


def test_training_backend_is_read_from_the_board_log():
    log = "board-000: local training runs in litert (/opt/siren/board-000/model-litert.zip, ...)"
    assert lean.training_backend(log) == "litert"
    assert lean.training_backend("board-000: SIREN alarm runs in litert") == "keras"


def test_a_lean_run_passes_and_each_limit_is_checked():
    assert lean.problems(_facts(), BOARDS) == []
    found = lean.problems(
        _facts(
            tensorflow_import="imports",
            sizes={"venv_bytes": 1600 * 2**20},
            peak_rss_kib={"board-000": 300 * 1024},
            train_backend={"board-000": "litert", "board-001": "keras"},
        ),
        BOARDS,
    )
    assert any("import tensorflow" in p for p in found)
    assert any("venv 1600 MiB, limit 200 MiB" in p for p in found)
    assert any("board-000: peak RSS 300 MiB" in p for p in found)
    assert any("board-001: peak RSS 0 MiB" in p for p in found)  # never measured: a failure
    assert any("board-001: training ran in keras" in p for p in found)


def test_section_reports_every_check():
    text = "\n".join(lean.section(_facts(), BOARDS))
    assert "151.0 MiB | < 200 MiB | ok" in text
    assert "board-001 peak RSS" in text and "130 MiB | < 250 MiB | ok" in text
    assert "FAIL" not in text


def test_bench_alarm_uses_the_bundle_artifact_in_board_mode(tmp_path):
    bundle = tmp_path / "board-000"
    bundle.mkdir()
    (bundle / "board.toml").write_text('[training]\nbackend = "litert"\nartifact = "model.zip"\n')
    argv = lean.bench_alarm_argv(bundle, "/tmp/out.md", "emulated")
    assert argv[:5] == ["/opt/siren/venv/bin/siren", "bench", "alarm", "--backends", "litert"]
    assert argv[argv.index("--artifact") + 1] == "/opt/siren/board-000/model.zip"
    assert argv[argv.index("--data") + 1] == "/opt/siren/board-000/data.npz"
    (bundle / "board.toml").write_text('[training]\nbackend = "keras"\n')
    with pytest.raises(RuntimeError, match="not a litert bundle"):
        lean.bench_alarm_argv(bundle, "/tmp/out.md", "emulated")


def test_tensorflow_import_reports_the_error_line():
    failed = SimpleNamespace(
        returncode=1, stderr="Traceback ...\nModuleNotFoundError: No module named 'tensorflow'\n"
    )
    ar = SimpleNamespace(run_in_root=lambda *a, **k: failed)
    assert lean.tensorflow_import(ar, None) == (
        "fails (ModuleNotFoundError: No module named 'tensorflow')"
    )
    ar = SimpleNamespace(run_in_root=lambda *a, **k: SimpleNamespace(returncode=0, stderr=""))
    assert lean.tensorflow_import(ar, None) == "imports"
