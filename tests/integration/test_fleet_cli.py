"""``siren sim fleet`` as the README runs it: twice in a row, and with the dashboard on a terminal.

Both spawn the real command (a private Mosquitto, the coordinator and a worker process) on a
3-board, 1-round digits fleet.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import REPO, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--dataset", "digits", "--clients", "3", "--rounds", "1"]


def _siren(*argv: str) -> list[str]:
    return [sys.executable, "-m", "siren_cli.main", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run_of(folder: Path) -> str:
    db = sqlite3.connect(folder / "fleet" / "coordinator" / "coordinator.sqlite")
    try:
        return str(db.execute("SELECT value FROM meta WHERE key = 'run'").fetchone()[0])
    finally:
        db.close()


def test_the_same_fleet_command_twice_gives_two_runs_in_two_folders(tmp_path: Path) -> None:
    outputs = []
    for _ in range(2):
        proc = subprocess.run(
            _siren("sim", "fleet", *TINY),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    first, second = (tmp_path / "runs" / "fleet", tmp_path / "runs" / "fleet-2")
    header = outputs[0].splitlines()[0]
    assert "attack sign_flip by 1 of 3 boards" in header
    assert "dataset digits (scikit-learn's bundled 8x8 digits)" in header
    assert "broker mosquitto (auto: " in header or "broker amqtt (auto: " in header
    assert "output: runs/fleet\n" in outputs[0]
    assert "output: runs/fleet-2 (runs/fleet holds an earlier run)\n" in outputs[1]
    assert outputs[1].count("round   1/1") == 1  # nothing of the first run is replayed
    # Two runs, each whole in its own folder: its own run id, database and history.
    assert _run_of(first) != _run_of(second)
    for folder in (first, second):
        history = json.loads((folder / "history.json").read_text())
        assert [r["round"] for r in history["rounds"]] == [1]
        spec = json.loads((folder / "fleet" / "worker-0.json").read_text())
        assert spec["run"] == _run_of(folder)
        assert spec["keys_dir"] == str((folder / "fleet" / "keys").resolve())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_on_a_terminal_the_dashboard_stays_up_after_the_run_until_ctrl_c(tmp_path: Path) -> None:
    port = _free_port()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        _siren("sim", "fleet", *TINY, "--api-port", str(port), "--out", str(tmp_path / "run")),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=_env(),
        start_new_session=True,
    )
    os.close(slave)
    seen: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(
            lambda: f"stays at {url} until Ctrl-C".encode() in b"".join(seen), 300, "the linger"
        )
        time.sleep(1.0)
        assert proc.poll() is None  # the run is over, the command is still serving
        health = httpx.get(url + "api/health", timeout=10).json()
        assert health["finished"] is True and health["round"] == 2
        run = httpx.get(url + "api/run", timeout=10).json()
        assert run["rounds_closed"] == 1
        assert httpx.get(url, timeout=10).status_code == 200
        os.killpg(proc.pid, signal.SIGINT)
        try:
            # Generous: a loaded 2-core machine takes a while to unload TensorFlow at exit.
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            code = None
        text = b"".join(seen).decode(errors="replace")
        assert code == 0, f"exit {code} after Ctrl-C; output:\n{text[-3000:]}"
        assert "Traceback" not in text and "interrupted" not in text
        assert (tmp_path / "run" / "history.json").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
