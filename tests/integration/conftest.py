"""Fixtures for the MQTT integration tests: a private Mosquitto and a small prepared run.

Every test spawns its own Mosquitto on a free loopback port and stops it afterwards. A
*prepared run* is a 3-board, 3-round digits run written by the fleet's own preparation
(:func:`firmware_sim.fleet_spec.prepare_fleet`): keys, allow-list, coordinator config and a worker
spec. The coordinator is configured without TensorFlow (initial model from an npz file, FedAvg,
no test evaluation) so that it starts, and restarts, in about a second.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.broker import BrokerHandle, find_mosquitto, start_mosquitto

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Skip the integration tests on machines without a Mosquitto binary."""
    if find_mosquitto() is not None:
        return
    skip = pytest.mark.skip(reason="needs the mosquitto binary (Debian package 'mosquitto')")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    """A private Mosquitto with persistence, stopped after the test."""
    handle = start_mosquitto(tmp_path / "broker")
    try:
        yield handle
    finally:
        handle.stop()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    logs: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` every 50 ms until it returns a truthy value; fail after ``timeout``
    (with the text of ``logs()``, when given, in the failure message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    detail = f"\n{logs()}" if logs is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")


def log_tails(paths: list[Path], lines: int = 40) -> str:
    """The last ``lines`` lines of each existing file of ``paths``, headed by its name."""
    parts = []
    for path in paths:
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def query(db_path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run a read-only query on the coordinator's database (empty list if it is not there)."""
    if not db_path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0) as db:
            return db.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []


@dataclass
class PreparedRun:
    """Files of a prepared 3-board run and handles to start its processes."""

    workdir: Path
    config: Any
    spec: Any
    coord_toml: Path
    db: Path
    broker: BrokerHandle

    def logs(self) -> str:
        """Tails of the coordinator's, the standalone boards' and the broker's logs."""
        boards = sorted(self.workdir.glob("standalone-*/board.log"))
        return log_tails(
            [self.workdir / "coordinator.log", *boards, self.broker.workdir / "mosquitto.log"]
        )

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        """``siren coordinator run`` as a subprocess (log appended to coordinator.log)."""
        return spawn(
            [
                sys.executable,
                "-m",
                "siren_cli.main",
                "coordinator",
                "run",
                "--config",
                str(self.coord_toml),
            ],
            self.workdir / "coordinator.log",
        )

    def start_board(self, index: int) -> subprocess.Popen[bytes]:
        """``siren client run`` for board ``index`` as a subprocess (state on disk)."""
        from firmware_sim.fleet_spec import board_config_for

        board_dir = self.workdir / f"standalone-{index}"
        board_dir.mkdir(exist_ok=True)
        toml = board_dir / "board.toml"
        if not toml.exists():
            cfg = board_config_for(self.spec, index, board_dir / "state")
            toml.write_text(cfg.to_toml(relative_to=board_dir))
        return spawn(
            [sys.executable, "-m", "siren_cli.main", "client", "run", "--config", str(toml)],
            board_dir / "board.log",
        )

    def start_worker(self, boards: list[int], **profile: Any) -> tuple[Any, threading.Thread]:
        """A :class:`FleetWorker` for ``boards`` on a thread of this process.

        ``profile`` keys (``latency_ms``, ...) override the device profile of those boards;
        ``slow={index: latency_ms}`` sets one board's latency.
        """
        from firmware_sim.worker import FleetWorker

        slow = profile.pop("slow", {})
        profiles = []
        for i, p in enumerate(self.spec.profiles):
            q = {**p, **profile}
            if i in slow:
                q["latency_ms"] = slow[i]
            profiles.append(q)
        spec = replace(self.spec, boards=boards, profiles=profiles)
        worker = FleetWorker(spec)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        worker.stop_event = stop  # type: ignore[attr-defined]
        return worker, thread

    def closed_rounds(self) -> list[int]:
        """Rounds the coordinator committed as closed."""
        return [r[0] for r in query(self.db, "SELECT round FROM rounds WHERE status='closed'")]

    def admitted(self, round_index: int) -> list[str]:
        """Clients with an admitted update in a round."""
        rows = query(
            self.db, "SELECT client FROM updates WHERE round=? ORDER BY client", (round_index,)
        )
        return [r[0] for r in rows]

    def decisions(self) -> dict[str, int]:
        """Admission outcome counts summed over rounds."""
        rows = query(self.db, "SELECT reason, SUM(count) FROM decisions GROUP BY reason")
        return {r[0]: int(r[1]) for r in rows}

    def finished(self) -> bool:
        """Whether the coordinator committed the final model."""
        return query(self.db, "SELECT value FROM meta WHERE key='finished'") == [("1",)]


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` from the repository root with its output appended to ``log``."""
    handle = open(log, "ab")  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=handle,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
        )
    finally:
        handle.close()


def stop_process(proc: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    """Terminate (or SIGKILL) a subprocess and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def digits_config(**overrides: Any) -> Any:
    """The integration tests' run: digits, 3 boards, 3 rounds, FedAvg."""
    from firmware_sim.engine import SimConfig

    values: dict[str, Any] = {"dataset": "digits", "clients": 3, "rounds": 3, "seed": 3}
    values.update(overrides)
    return SimConfig(**values)


@pytest.fixture
def prepared_run(tmp_path: Path, broker: BrokerHandle) -> PreparedRun:
    """A prepared 3-board run on the test broker with a TensorFlow-free coordinator."""
    from coordinator.config import CoordinatorConfig, DataSettings, ModelSettings
    from coordinator.runtime import save_initial_model
    from firmware_sim.fleet_spec import FleetOptions, WorkerSpec, prepare_fleet
    from models.training import TrainConfig, Trainer
    from models.zoo import DEFAULT_MODEL
    from protocol.layout import TensorLayout

    config = digits_config()
    workdir = tmp_path / "run"
    options = FleetOptions(resend_interval=2.0, run_id="itest")
    coord_toml, specs = prepare_fleet(
        config, options, workdir, host=broker.host, port=broker.port, protocol=broker.protocol
    )
    # Same initial model as the boards' trainer (built from the run's seed).
    trainer = Trainer(DEFAULT_MODEL["digits"], (8, 8, 1), 10, TrainConfig(), seed=config.seed)
    initial = workdir / "coordinator" / "initial.npz"
    save_initial_model(initial, trainer.initial_weights, TensorLayout(trainer.layout.as_list()))
    coord = CoordinatorConfig.load(coord_toml)
    coord = replace(
        coord,
        model=ModelSettings(name="digits-mlp", initial=initial),
        data=DataSettings(dataset="digits", root="none", evaluate=False),
    )
    coord_toml.write_text(coord.to_toml(relative_to=coord_toml.parent))
    spec = WorkerSpec.from_json(specs[0].read_text())
    return PreparedRun(workdir, config, spec, coord_toml, Path(coord.db), broker)
