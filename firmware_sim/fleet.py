"""A simulated fleet over real MQTT: a private broker, the coordinator service, N boards.

:func:`run_fleet` (what ``siren sim fleet`` runs) prepares the fleet's files
(:func:`firmware_sim.fleet_spec.prepare_fleet`) and starts

1. a private broker (:mod:`firmware_sim.broker`: Mosquitto on a free loopback port, else the
   embedded amqtt), or uses a running one;
2. the coordinator service (``siren coordinator run``) in its own process, configured with the
   run's aggregator or SIREN, the seeded split's root set and the dataset's test split;
3. ``--workers`` worker processes (default 1) that host the boards
   (:mod:`firmware_sim.worker`: many boards per process, one MQTT connection each); with
   ``--ray ADDRESS`` the workers run as Ray actors on the nodes of a Ray cluster instead
   (:mod:`firmware_sim.ray_fleet`), their statistics and logs shipped back into this folder, and
   the broker listens where those nodes reach it.

It follows the coordinator's database while the run goes on, reports each round as soon as the
coordinator closed it and every worker reported it, and returns the run's history
(:mod:`firmware_sim.fleet_history`). Whatever happens, it stops every process and the broker
it started.

**Same seed, same result.** Boards train with the engine's per-board, per-round seeds; the
coordinator aggregates the admitted updates in board order and, with client sampling
(``--client-fraction``, ``--clients-per-round``), draws each round's boards with the engine's
own function (:mod:`coordinator.selection`); so without dropout the MQTT run computes the same
global models as the in-process engine (``firmware_sim.engine``), and its test accuracies
match. With one worker (the default) a colluding attack sees the whole round as
in the engine; with several workers it sees only its own worker's boards.

The output is the engine's ``history.json`` (same keys per round) plus, per round, ``network``
(bytes of updates and of global-model deliveries, duplicates, rejections) and ``timing`` (wall
time and its breakdown: global delivery, board compute, sealing (encode + sign), collection,
aggregation, evaluation; plus the workers' wall-clock marks ``first_received_at``, ``trained_at``
and ``published_at``, from which ``siren bench fleet`` derives the network share).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_sim.errors import FleetError
from firmware_sim.fleet_history import fleet_history, merge_round, read_worker_stats
from firmware_sim.fleet_spec import (
    FleetOptions,
    WorkerSpec,
    client_name,
    fleet_broker_auth,
    prepare_fleet,
)

logger = logging.getLogger(__name__)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


def _spawn(name: str, argv: list[str], log: Path) -> _Process:
    handle = open(log, "ab")  # noqa: SIM115 - owned by the child
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=handle,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
        )
    finally:
        handle.close()
    return _Process(name, popen, log)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class _DbReader:
    """Read-only view of the coordinator's database while it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None and self.path.exists():
            with contextlib.suppress(sqlite3.Error):
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
        return self._db

    def closed_rounds(self, after: int) -> list[tuple[int, float, dict[str, Any]]]:
        db = self._conn()
        if db is None:
            return []
        try:
            rows = db.execute(
                "SELECT round, opened_at, record FROM rounds WHERE status = 'closed' AND "
                "round > ? ORDER BY round",
                (after,),
            ).fetchall()
        except sqlite3.Error:
            return []
        return [(int(r[0]), float(r[1]), json.loads(r[2])) for r in rows]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def run_fleet(
    config: Any,
    options: FleetOptions,
    workdir: Path,
    progress: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run the whole fleet; return the history (the engine's keys plus network figures).

    Parameters
    ----------
    config : SimConfig
        What to run (as ``siren sim run``). With client sampling the coordinator draws each
        round's boards with the engine's function and names them in the global model; the
        others sit the round out.
    options : FleetOptions
        Transport, workers, profiles, deadlines.
    workdir : Path
        Keys, configurations, logs, the coordinator database and the broker's files.
    progress : callable, optional
        Called with each round's merged record as soon as the round closes.
    timeout : float, optional
        Give up (and stop every process) after this many seconds.

    Raises
    ------
    FleetError
        If a process fails or the timeout passes.
    """
    from coordinator.store import CoordinatorStore
    from firmware_sim.broker import MQTT_V5, start_broker

    started = time.perf_counter()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    broker = None
    processes: list[_Process] = []
    reader: _DbReader | None = None
    cluster: Any = None
    ray_workers: Any = None
    if options.ray is not None:
        from firmware_sim.ray_fleet import connect_cluster

        cpus = math.ceil(options.workers * options.ray_worker_cpus)
        cluster = connect_cluster(options.ray, local_cpus=max(os.cpu_count() or 1, cpus))
    try:
        if ":" in options.broker:
            from protocol.mqtt import BrokerSettings as ProbeSettings
            from protocol.mqtt import broker_problem

            host, _, port_text = options.broker.rpartition(":")
            if not port_text.isdigit() or not 0 < int(port_text) < 65536 or not host:
                raise FleetError(
                    f"--broker {options.broker!r}: expected HOST:PORT with a port in 1..65535, "
                    "or auto, mosquitto or amqtt"
                )
            port, protocol, kind = int(port_text), MQTT_V5, "external"
            problem = broker_problem(ProbeSettings(host=host, port=port), timeout=5.0)
            if problem is not None:
                raise FleetError(f"--broker {options.broker}: {problem}")
        else:
            # The private broker: Mosquitto gets the accounts and ACLs of a deployment (nobody
            # but the coordinator may replace the retained global model); amqtt stays anonymous.
            from firmware_sim.broker import MQTT_V311, free_port, uses_mosquitto

            mosquitto = uses_mosquitto(options.broker)
            host = options.broker_host or "127.0.0.1"
            if cluster is not None:
                from firmware_sim.ray_fleet import broker_host_for

                host = broker_host_for(cluster, options.broker_host)
            if not mosquitto and host not in ("127.0.0.1", "localhost"):
                raise FleetError(
                    f"the embedded amqtt broker is anonymous and stays on loopback, not {host}: "
                    "install mosquitto (it gets accounts and ACLs) or give --broker HOST:PORT"
                )
            port = free_port(host)
            protocol, kind = (MQTT_V5, "mosquitto") if mosquitto else (MQTT_V311, "amqtt")
        if cluster is not None:
            from firmware_sim.ray_fleet import check_reachable

            check_reachable(cluster, host)
        private_auth = broker is None and kind == "mosquitto"
        coord_toml, spec_paths = prepare_fleet(
            config, options, workdir, host=host, port=port, protocol=protocol,
            broker_auth=private_auth,
        )  # fmt: skip
        if kind != "external":
            run_id = WorkerSpec.from_json(spec_paths[0].read_text()).run
            names = [client_name(i) for i in range(config.clients)]
            auth = fleet_broker_auth(workdir, run_id, names) if private_auth else None
            broker = start_broker(workdir / "broker", prefer=kind, port=port, auth=auth, host=host)
        python = sys.executable
        processes.append(
            _spawn(
                "coordinator",
                [python, "-m", "siren_cli.main", "coordinator", "run", "--config", str(coord_toml)],
                workdir / "coordinator.log",
            )
        )
        if cluster is not None:
            from firmware_sim.ray_fleet import RayWorkers

            ray_workers = RayWorkers(cluster, spec_paths, options.ray_worker_cpus)
            ray_workers.start()
        else:
            for w, spec in enumerate(spec_paths):
                processes.append(
                    _spawn(
                        f"worker-{w}",
                        [python, "-m", "firmware_sim.worker", "--spec", str(spec)],
                        workdir / f"worker-{w}.log",
                    )
                )
        reader = _DbReader(workdir / "coordinator" / "coordinator.sqlite")
        stats_paths = [workdir / f"worker-{w}.jsonl" for w in range(len(spec_paths))]
        reported = 0
        pending: dict[int, tuple[float, dict[str, Any]]] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Ray's workers: their statistics come back into stats_paths first.
            workers_done = ray_workers.poll() if ray_workers is not None else True
            for number, opened_at, record in reader.closed_rounds(reported):
                pending[number] = (opened_at, record)
                reported = number
            if pending and progress is not None:
                _, worker_rounds = read_worker_stats(stats_paths)
                for number in sorted(pending):
                    done = worker_rounds.get(number, [])
                    if len(done) < len(spec_paths):
                        break
                    opened_at, record = pending.pop(number)
                    progress(merge_round(record, done, opened_at))
            if workers_done and all(p.popen.poll() is not None for p in processes):
                break
            for proc in processes:
                code = proc.popen.poll()
                if code not in (None, 0):
                    raise FleetError(f"{proc.name} exited with status {code}:\n{_tail(proc.log)}")
            if deadline is not None and time.monotonic() > deadline:
                raise FleetError(f"the fleet did not finish within {timeout:.0f} s")
            time.sleep(0.2)
        for proc in processes:
            if proc.popen.returncode != 0:
                raise FleetError(
                    f"{proc.name} exited with status {proc.popen.returncode}:\n{_tail(proc.log)}"
                )
        if ray_workers is not None:
            ray_workers.save_logs(workdir)
        store = CoordinatorStore(workdir / "coordinator" / "coordinator.sqlite")
        try:
            history = fleet_history(
                config, options, store, stats_paths, kind, protocol, len(spec_paths)
            )
        finally:
            store.close()
        if ray_workers is not None:
            history["fleet"]["transport"]["ray"] = ray_workers.describe()
        if progress is not None:
            for number in sorted(pending):
                progress(next(r for r in history["rounds"] if r["round"] == number))
        history["summary"]["wall_seconds"] = time.perf_counter() - started
        return history
    finally:
        if reader is not None:
            reader.close()
        if ray_workers is not None:
            ray_workers.close()
        if cluster is not None:
            cluster.close()
        for proc in processes:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in processes:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if broker is not None:
            broker.stop()
