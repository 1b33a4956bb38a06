"""A board's end of run and new start: a finished board exits at once (without loading
TensorFlow) with status 0, a stale state from another run is refused with the way out, and
``siren client reset`` archives the state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nacl.signing import SigningKey

from edge_client.config import BoardConfig
from edge_client.store import BoardRecord, DiskBoardStore
from protocol.keys import save_key_pair, save_verify_key
from siren_cli.main import main


def _board(tmp_path: Path, run: str = "demo") -> Path:
    save_key_pair(tmp_path / "keys", SigningKey(b"b" * 32), overwrite=True)
    save_verify_key(tmp_path / "coordinator.pub", SigningKey(b"c" * 32).verify_key)
    config = BoardConfig(
        client_id="board-000", run=run, key_dir=tmp_path / "keys",
        coordinator_key=tmp_path / "coordinator.pub", state_dir=tmp_path / "state",
    )  # fmt: skip
    path = tmp_path / "board.toml"
    path.write_text(config.to_toml(relative_to=tmp_path))
    return path


def _run_board(toml: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from siren_cli.main import main; rc = main(['client', 'run', '--config', "
        f"{str(toml)!r}]); print('tensorflow loaded:', 'tensorflow' in sys.modules); "
        "sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_a_finished_board_exits_zero_without_loading_tensorflow(tmp_path: Path) -> None:
    toml = _board(tmp_path)
    DiskBoardStore(tmp_path / "state").save(
        BoardRecord("demo", "board-000", 0, last_round=3, global_round=4, finished=True)
    )
    done = _run_board(toml)
    assert done.returncode == 0, done.stderr
    assert "run 'demo' is finished" in done.stdout and "round 4" in done.stdout
    assert "tensorflow loaded: False" in done.stdout


def test_a_state_of_another_run_is_refused_with_the_way_out(tmp_path: Path) -> None:
    toml = _board(tmp_path, run="new-run")
    DiskBoardStore(tmp_path / "state").save(BoardRecord("old-run", "board-000", 0))
    done = _run_board(toml)
    assert done.returncode == 2
    assert "holds the state of run 'old-run'" in done.stderr
    assert "siren client reset" in done.stderr


def test_reset_archives_the_state_and_leaves_an_empty_folder(tmp_path: Path, capsys) -> None:
    toml = _board(tmp_path, run="new-run")
    DiskBoardStore(tmp_path / "state").save(BoardRecord("old-run", "board-000", 0))
    assert main(["client", "reset", "--config", str(toml)]) == 0
    archives = sorted(tmp_path.glob("state.*"))
    assert len(archives) == 1 and (archives[0] / "board-state.npz").exists()
    assert (tmp_path / "state").is_dir() and not any((tmp_path / "state").iterdir())
    assert "starts afresh" in capsys.readouterr().out
    assert main(["client", "reset", "--config", str(toml)]) == 0
    assert "nothing to reset" in capsys.readouterr().out


def test_a_board_says_which_alarm_backend_it_uses(tmp_path: Path, caplog) -> None:
    import logging

    from edge_client.client import build_runtime
    from edge_client.config import AlarmSettings, DataSettings

    toml = _board(tmp_path)
    config = BoardConfig.load(toml)
    from dataclasses import replace

    config = replace(
        config,
        alarm=AlarmSettings(enabled=True),
        data=DataSettings(source="split", dataset="digits", clients=4),
    )
    with caplog.at_level(logging.INFO, logger="edge_client"):
        build_runtime(config)
    assert "board-000: SIREN alarm runs in litert" in caplog.text
