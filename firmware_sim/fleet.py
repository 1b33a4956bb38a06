"""A simulated fleet over real MQTT: a private broker, the coordinator service, N boards.

``siren sim fleet`` (:func:`run_fleet`) starts

1. a private broker (:mod:`firmware_sim.broker`: Mosquitto on a free loopback port, else the
   embedded amqtt);
2. the coordinator service (``siren coordinator run``) in its own process, configured with the
   run's aggregator or SIREN, the seeded split's root set and the dataset's test split;
3. ``--workers`` worker processes (default 1) that host the boards.

**Multiplexing.** A worker process (:class:`FleetWorker`) hosts many boards: they share one
TensorFlow runtime, one :class:`~models.training.Trainer` and one LiteRT evaluator (built by the
in-process engine's :func:`~firmware_sim.engine.build_fleet`, so data partitions, poisoned
shards and attack assignments are exactly those of ``siren sim run``). Each board still has its
*own* MQTT connection (:class:`~edge_client.client.BoardLink`: own client id, own signed status
and Last Will, own QoS 1 session); one network thread per worker drives all of them
(:class:`~edge_client.netloop.SharedNetworkLoop`, epoll: hundreds of connections, no
``select()`` limit). The network thread only enqueues; all computation happens on the worker's
main thread. Measured on 2 cores: 500 digits boards in one worker, about 4 s per round, most of
it the boards' serial training (about 7 ms each). When a global model arrives,
the worker runs :func:`~edge_client.board.board_step` for its boards one after the other, lets
the adversary tamper with the round (:meth:`~firmware_sim.adversary.Adversary.tamper_round`),
seals every update with its board's key (:class:`~edge_client.client.BoardAgent`) and publishes
each one after its device profile's delay (:mod:`firmware_sim.profiles`).

**Same seed, same result.** Boards train with the engine's per-board, per-round seeds; the
coordinator aggregates the admitted updates in board order; so without dropout the MQTT run
computes the same global models as the in-process engine (``firmware_sim.engine``), and its
test accuracies match. With one worker (the default) a colluding attack sees the whole round as
in the engine; with several workers it sees only its own worker's boards.

The output is the engine's ``history.json`` (same keys per round) plus, per round, ``network``
(bytes of updates and of global-model deliveries, duplicates, rejections) and ``timing`` (wall
time and its breakdown: global delivery, board compute, sealing (encode + sign), collection,
aggregation, evaluation; plus the workers' wall-clock marks ``first_received_at``, ``trained_at``
and ``published_at``, from which ``siren bench fleet`` derives the network share).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import logging
import os
import queue
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from firmware_sim.broker import BrokerAuth, mqtt_password_for

logger = logging.getLogger(__name__)

#: Prefix of simulated board client ids: ``board-000``, ``board-001``, ...
BOARD_PREFIX = "board-"


def client_name(index: int) -> str:
    """The client id of simulated board ``index`` (``board-007``)."""
    return f"{BOARD_PREFIX}{index:03d}"


class FleetError(RuntimeError):
    """A fleet process failed (the message carries the tail of its log)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (written as JSON by the orchestrator).

    Attributes
    ----------
    sim : dict
        The :class:`~firmware_sim.engine.SimConfig` as a dict.
    run : str
        Run id.
    host, port, protocol : str, int, int
        Broker address and MQTT version (5, or 311 for amqtt).
    keys_dir : str
        Directory with one key directory per board (``<keys_dir>/board-007/private.key``).
    coordinator_key : str
        The coordinator's public key file.
    boards : list of int
        Board indices hosted by this worker.
    profiles : list of dict
        One :class:`~firmware_sim.profiles.DeviceProfile` (as a dict) per board of the fleet.
    stats_path : str
        JSON-lines file of per-round worker statistics.
    state_dir : str
        Persist board states under this directory ("" = in memory).
    worker : int
        This worker's number.
    broker_auth : bool
        The broker has accounts (each board's password derives from its key,
        :func:`firmware_sim.broker.mqtt_password_for`); False: anonymous.
    telemetry : bool
        Each board publishes its round's figures in its status (see :class:`FleetWorker`).
    """

    sim: dict[str, Any]
    run: str
    host: str
    port: int
    protocol: int
    keys_dir: str
    coordinator_key: str
    boards: list[int]
    profiles: list[dict[str, Any]]
    stats_path: str
    state_dir: str = ""
    worker: int = 0
    broker_auth: bool = False
    telemetry: bool = True

    def to_json(self) -> str:
        """The spec as JSON text."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Parse :meth:`to_json` output."""
        return cls(**json.loads(text))


def sim_config_from_dict(values: dict[str, Any]) -> Any:
    """Rebuild a :class:`~firmware_sim.engine.SimConfig` from ``asdict`` output."""
    from firmware_sim.engine import SimConfig

    known = set(SimConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in values.items() if k in known}
    if kwargs.get("malicious_ids") is not None:
        kwargs["malicious_ids"] = tuple(kwargs["malicious_ids"])
    return SimConfig(**kwargs)


@dataclass
class _RoundStats:
    round: int
    received_at: float
    boards: int = 0
    dropped: list[int] = field(default_factory=list)
    board_seconds: float = 0.0
    alarm_ms: list[float] = field(default_factory=list)
    train_ms: list[float] = field(default_factory=list)
    alarms: int = 0
    update_bytes: int = 0
    global_bytes: int = 0
    global_deliveries: int = 0
    trained_at: float = 0.0
    seal_seconds: float = 0.0
    published_at: float = 0.0
    pipelined: bool = False
    resends: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "round",
            "round": self.round,
            "received_at": self.received_at,
            "boards": self.boards,
            "dropped": self.dropped,
            "board_seconds": self.board_seconds,
            "alarm_ms_mean": float(np.mean(self.alarm_ms)) if self.alarm_ms else 0.0,
            "train_ms_mean": float(np.mean(self.train_ms)) if self.train_ms else 0.0,
            "alarm_ms_sum": float(np.sum(self.alarm_ms)) if self.alarm_ms else 0.0,
            "train_ms_sum": float(np.sum(self.train_ms)) if self.train_ms else 0.0,
            "alarms": self.alarms,
            "update_bytes": self.update_bytes,
            "global_bytes": self.global_bytes,
            "global_deliveries": self.global_deliveries,
            "trained_at": self.trained_at,
            "seal_seconds": self.seal_seconds,
            "published_at": self.published_at,
            "pipelined": self.pipelined,
            "resends": self.resends,
            "metrics": self.metrics,
        }


class FleetWorker:
    """Many simulated boards in one process: shared trainer, one MQTT connection per board.

    **Telemetry.** With ``spec.telemetry`` every board publishes, just before its update, a
    status with the figures of its round (``docs/protocol.md`` section 4.2), measured, not
    made up: the wall and CPU time of its own alarm and training (the boards compute one
    after the other, so these are its own, apart from what the worker's network thread used
    meanwhile), and what this machine has -- its thermal zones, throttling word and power
    rails read after the board's step, usually none on a desktop. Memory is the worker
    process's peak RSS, shared by all its boards, so the figures say ``process_boards`` = the
    number of boards in the worker rather than give a per-board number nobody measured.

    Parameters
    ----------
    spec : WorkerSpec
        Broker, keys, hosted boards, profiles.
    fleet : firmware_sim.engine.Fleet, optional
        A prebuilt fleet (data, trainer, evaluator, adversary); built from ``spec.sim`` with
        :func:`~firmware_sim.engine.build_fleet` by default.
    """

    def __init__(self, spec: WorkerSpec, fleet: Any = None) -> None:
        from edge_client.alarm import AlarmConfig
        from edge_client.client import BoardAgent, BoardLink, LinkEvent
        from edge_client.netloop import SharedNetworkLoop
        from edge_client.store import BoardStore, DiskBoardStore, MemoryBoardStore
        from edge_client.telemetry import Sensors
        from firmware_sim.engine import build_fleet
        from firmware_sim.profiles import DeviceProfile
        from protocol.keys import load_signing_key, load_verify_key
        from protocol.layout import TensorLayout

        self.spec = spec
        self.config = sim_config_from_dict(spec.sim)
        self.fleet = fleet if fleet is not None else build_fleet(self.config)
        cfg = self.config
        self.layout = TensorLayout(self.fleet.trainer.layout.as_list())
        self.alarm = (
            AlarmConfig.for_profile(cfg.siren_profile, cfg.alarm_threshold, cfg.alarm_rule)
            if cfg.alarm_enabled
            else None
        )
        self.profiles = [DeviceProfile(**p) for p in spec.profiles]
        coordinator_key = load_verify_key(spec.coordinator_key)
        self.inbox: queue.Queue[LinkEvent] = queue.Queue()
        # One network thread drives every board's connection (see edge_client.netloop).
        self.network = SharedNetworkLoop(name=f"fleet-worker-{spec.worker}")
        self.agents: dict[int, BoardAgent] = {}
        self.links: dict[int, BoardLink] = {}
        self.by_name: dict[str, int] = {}
        for index in sorted(spec.boards):
            name = client_name(index)
            key = load_signing_key(Path(spec.keys_dir) / name)
            store: BoardStore = (
                DiskBoardStore(Path(spec.state_dir) / name)
                if spec.state_dir
                else MemoryBoardStore()
            )
            agent = BoardAgent(
                client_id=name,
                run=spec.run,
                index=index,
                signing_key=key,
                coordinator_key=coordinator_key,
                layout=self.layout,
                store=store,
                rounds=cfg.rounds,
                seed=cfg.seed,
            )
            self.agents[index] = agent
            self.links[index] = BoardLink(
                board_broker(spec, name, key),
                run=spec.run,
                client_id=name,
                signing_key=key,
                inbox=self.inbox,
                status=agent.held,
                network=self.network,
            )
            self.by_name[name] = index
        self._seen: dict[bytes, int] = {}
        self._delivered: set[tuple[str, bytes]] = set()
        # (due, sequence, board index, is a status, message)
        self._schedule: list[tuple[float, int, int, bool, bytes]] = []
        self._seq = 0
        self._stats: dict[int, _RoundStats] = {}
        self._latest_round = 0
        self.done = False
        self.sensors = Sensors() if spec.telemetry else None
        self._throttled: int | None = None
        self._warm_up()

    def _warm_up(self) -> None:
        """Trace the trainer's and the evaluator's compiled functions once before round 1, so
        the first board's measured compute time (scaled by its device profile) is not inflated
        by one-off graph tracing. Training state is reset by every later call."""
        fleet = self.fleet
        data = fleet.boards[min(self.agents)]
        start = fleet.trainer.initial_weights
        trainer = fleet.board_trainer
        trainer.train(start, data.x_train[:2], data.y_train[:2], np.random.default_rng(0))
        if fleet.evaluator is not None and len(data.y_test):
            fleet.evaluator.accuracy(start, data.x_test[:1], data.y_test[:1])

    # -- main loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> int:
        """Connect every board and serve until the final global model (or ``stop``)."""
        stop = stop or threading.Event()
        self._write({"kind": "fleet", "worker": self.spec.worker, **self.describe()})
        from models.tf_setup import freeze_startup_objects

        freeze_startup_objects()
        self.network.start()
        for link in self.links.values():
            link.start()
        try:
            while not stop.is_set() and not self.done:
                timeout = 0.1
                if self._schedule:
                    timeout = max(0.0, min(timeout, self._schedule[0][0] - time.monotonic()))
                try:
                    event = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    event = None
                if event is not None and event.kind == "message":
                    self._on_message(event.client_id, event.payload, event.received_at)
                self._publish_due()
            self._publish_due(force=True)
        finally:
            # Announce offline everywhere first, then wait for the acknowledgements, then close.
            links = list(self.links.values())
            for link in links:
                if link.connected.is_set():
                    link.announce(online=False)
            deadline = time.monotonic() + 10.0
            for link in links:
                link.flush(max(0.0, deadline - time.monotonic()))
            for link in links:
                link.close()
            self.network.stop()
            if self.sensors is not None:
                self.sensors.close()
        return 0

    def describe(self) -> dict[str, Any]:
        """The fleet description of the engine's history (data sizes, attack, backend)."""
        f = self.fleet
        return {
            "dataset": f.dataset.name,
            "model": f.trainer.model_name,
            "parameters": f.trainer.layout.size,
            "train_samples_per_client": [b.num_train for b in f.boards],
            "local_test_samples_per_client": [len(b.y_test) for b in f.boards],
            "root_samples": int(f.split.root_idx.size),
            "test_samples": len(f.y_test),
            "alarm_backend": getattr(f.evaluator, "backend", None),
            "train_backend": f.board_trainer.backend,
            **f.adversary.describe(),
        }

    def _write(self, line: dict[str, Any]) -> None:
        from coordinator.store import json_default

        with open(self.spec.stats_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, default=json_default) + "\n")

    def _on_message(self, client: str, payload: bytes, received_at: float) -> None:
        header_len = int.from_bytes(payload[4:8], "little") if len(payload) >= 8 else 0
        key = payload[: 8 + header_len + 64]
        index = self.by_name.get(client)
        if key in self._seen:
            round_index = self._seen[key]
            stats = self._stats.get(round_index)
            if stats is not None:
                stats.global_bytes += len(payload)
                stats.global_deliveries += 1
            if (client, key) in self._delivered and index is not None:
                self._redelivered(index, payload)
            self._delivered.add((client, key))
            return
        agent = next(iter(self.agents.values()))
        message = agent.verify_global(payload)
        if message is None:
            return
        self._seen[key] = message.round
        self._delivered.add((client, key))
        self._on_global(message, len(payload), received_at)

    def _redelivered(self, index: int, payload: bytes) -> None:
        """A board received the same global model again (reconnect or re-announcement)."""
        agent = self.agents[index]
        message = agent.verify_global(payload)
        if message is None:
            return
        plan = agent.plan(message)
        if plan.action == "resend" and agent.record.pending is not None:
            self._enqueue(index, agent.record.pending, time.monotonic())
            stats = self._stats.get(message.round)
            if stats is not None:
                stats.resends += 1

    def _on_global(self, message: Any, nbytes: int, received_at: float) -> None:
        from edge_client.board import board_step

        t = message.round
        cfg = self.config
        fleet = self.fleet
        weights = message.weights
        previous = self._stats.get(t - 1)
        if previous is not None:
            previous.metrics = dict(fleet.adversary.round_metrics(fleet.trainer, weights))
            self._write(previous.to_json())
        if cfg.rounds and t > cfg.rounds:
            for agent in self.agents.values():
                agent.finish(message)
            self.done = True
            return
        if t <= self._latest_round:
            return
        self._latest_round = t
        stats = _RoundStats(t, received_at, global_bytes=nbytes, global_deliveries=1)
        self._stats[t] = stats
        start = time.monotonic()
        updates = []
        states = {}
        compute: dict[int, float] = {}
        figures: dict[int, dict[str, float]] = {}
        if self.sensors is not None:
            self._throttled = self.sensors.throttled()  # once per round, not per board
        # Without round-level tampering every update goes out as soon as its board is done, as
        # on real boards, so the coordinator admits it while the next boards compute.
        pipelined = not fleet.adversary.tampers_rounds
        stats.pipelined = pipelined
        for index, agent in self.agents.items():
            plan = agent.plan(message)
            if plan.action == "resend" and agent.record.pending is not None:
                self._enqueue(index, agent.record.pending, start)
                stats.resends += 1
                continue
            if plan.action != "train":
                continue
            if self.profiles[index].drops(cfg.seed, t, index):
                agent.skip(message)
                stats.dropped.append(index)
                continue
            data = fleet.boards[index]
            if fleet.adversary.is_malicious(index):
                data = fleet.adversary.round_data(index, t, data)
            t0 = time.perf_counter()
            update, new_state = board_step(
                agent.state,
                weights,
                t,
                data,
                fleet.board_trainer,
                agent.rng(t),
                evaluator=fleet.evaluator,
                alarm=self.alarm,
            )
            compute[index] = time.perf_counter() - t0
            figures[index] = self._figures(update)
            stats.alarm_ms.append(1000 * update.alarm_seconds)
            stats.train_ms.append(1000 * update.train_seconds)
            stats.alarms += int(bool(update.alarm))
            if pipelined:
                self._seal(update, new_state, message, start, compute[index], stats, figures[index])
                self._publish_due()
            else:
                updates.append(update)
                states[index] = new_state
        stats.board_seconds = float(sum(compute.values()))
        if not pipelined:
            tamper_rng = np.random.default_rng([cfg.seed, t, 65537])
            updates = fleet.adversary.tamper_round(t, weights, updates, tamper_rng)
            stats.trained_at = time.time()
            for update in updates:
                index = int(update.client_id)
                self._seal(
                    update, states[index], message, start, compute[index], stats, figures.get(index)
                )
        else:
            stats.trained_at = time.time()

    def _figures(self, update: Any) -> dict[str, float]:
        """The telemetry figures of a board's round (see the class docstring); empty when
        telemetry is off."""
        from edge_client.telemetry import round_figures, sample_once

        if self.sensors is None:
            return {}
        return round_figures(
            update,
            seen=sample_once(self.sensors),
            peak_rss_mib=self.sensors.peak_rss_mib(),
            throttled=self._throttled,
            process_boards=len(self.agents),
        )

    def _seal(
        self,
        update: Any,
        state: Any,
        message: Any,
        start: float,
        seconds: float,
        stats: _RoundStats,
        figures: dict[str, float] | None = None,
    ) -> None:
        """Seal a board's update and schedule its publication: due ``seconds`` after ``start``
        (the board's compute time, as if every board ran on its own device) plus its profile's
        delay. The status carrying the round's ``figures`` goes out just before it."""
        from edge_client.client import UpdateTooLargeError

        index = int(update.client_id)
        agent = self.agents[index]
        t0 = time.perf_counter()
        try:
            sealed = agent.seal(update, state, message)
        except UpdateTooLargeError as exc:
            logger.error("%s: %s", agent.client_id, exc)
            agent.skip(message)
            return
        finally:
            stats.seal_seconds += time.perf_counter() - t0
        rng = np.random.default_rng([self.config.seed, message.round, index, 77])
        due = start + seconds + self.profiles[index].publish_delay(seconds, rng)
        if figures:
            link = self.links[index]
            link.figures = (message.round, dict(figures))
            self._enqueue(index, link.status_message(online=True), due, status=True)
        self._enqueue(index, sealed, due)
        stats.boards += 1
        stats.update_bytes += len(sealed)

    def _enqueue(self, index: int, payload: bytes, due: float, *, status: bool = False) -> None:
        self._seq += 1
        heapq.heappush(self._schedule, (due, self._seq, index, status, payload))

    def _publish_due(self, force: bool = False) -> None:
        now = time.monotonic()
        while self._schedule and (force or self._schedule[0][0] <= now):
            _, _, index, status, payload = heapq.heappop(self._schedule)
            if status:
                self.links[index].publish_status(payload)
                continue
            self.links[index].publish_update(payload)
            stats = self._stats.get(self._latest_round)
            if stats is not None:
                stats.published_at = time.time()


# -- orchestration -------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetOptions:
    """How ``siren sim fleet`` runs the fleet (what the run computes is the ``SimConfig``).

    Attributes
    ----------
    workers : int
        Worker processes hosting the boards.
    broker : str
        ``auto`` / ``mosquitto`` / ``amqtt`` (a private broker), or ``HOST:PORT`` of a running
        broker (anonymous, MQTT v5).
    profiles : str
        Device profile mix, e.g. ``"ideal"`` or ``"pi4:0.5,pi5:0.5"``.
    compute_factor, latency_ms, dropout : float, optional
        Override every board's profile.
    round_timeout : float
        Coordinator deadline per round in seconds (0 = wait for every board).
    quorum : float
        Fraction of boards needed to close a round at the deadline.
    resend_interval : float
        Seconds without progress after which the coordinator re-announces a round's model.
    persist_boards : bool
        Keep every board's state on disk (as a physical board does).
    run_id : str, optional
        Run id (default ``fleet-<seed>-<6 random hex digits>``).
    api_port : int, optional
        Serve the coordinator's HTTP API and dashboard on this loopback port (``None``: no
        API). The admin token comes from ``$SIREN_API_TOKEN``, inherited by the coordinator.
    telemetry : bool
        Boards publish their rounds' telemetry figures (:class:`FleetWorker`).
    """

    workers: int = 1
    broker: str = "auto"
    profiles: str = "ideal"
    compute_factor: float | None = None
    latency_ms: float | None = None
    dropout: float | None = None
    round_timeout: float = 0.0
    quorum: float = 0.5
    resend_interval: float = 30.0
    persist_boards: bool = False
    run_id: str | None = None
    api_port: int | None = None
    telemetry: bool = True


def resolve_dataset(name: str) -> str:
    """``auto`` becomes ``fashion-mnist`` when its files are installed, else ``digits``."""
    from models.datasets import resolve_dataset_name

    return resolve_dataset_name(name)


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


def prepare_fleet(
    config: Any,
    options: FleetOptions,
    workdir: Path,
    *,
    host: str,
    port: int,
    protocol: int,
    broker_auth: bool = False,
) -> tuple[Path, list[Path]]:
    """Write keys, the allow-list, the coordinator config and the worker specs into ``workdir``.

    With ``broker_auth`` the coordinator and the boards log in to the broker with passwords
    derived from their keys (:func:`fleet_broker_auth` gives the broker the same accounts).
    Returns the coordinator config path and one worker spec path per worker.
    """
    from coordinator.config import (
        AggregatorSettings,
        ApiSettings,
        CoordinatorConfig,
        DataSettings,
        ModelSettings,
        SimulationSettings,
        TrainingSettings,
    )
    from coordinator.config import BrokerSettings as CoordinatorBroker
    from firmware_sim.profiles import assign_profiles, parse_mix
    from protocol.keys import AllowList, generate_signing_key, save_key_pair

    # A fresh run id per fleet: nothing retained or queued on a shared broker by an earlier
    # run can reach this one.
    run_id = options.run_id or f"fleet-{config.seed}-{secrets.token_hex(3)}"
    workdir.mkdir(parents=True, exist_ok=True)
    keys_dir = workdir / "keys"
    coord_dir = workdir / "coordinator"
    coordinator_key = generate_signing_key()
    save_key_pair(coord_dir / "keys", coordinator_key, overwrite=True)
    allow = AllowList()
    names = [client_name(i) for i in range(config.clients)]
    for name in names:
        key = generate_signing_key()
        save_key_pair(keys_dir / name, key, client_id=name, overwrite=True)
        allow.add(name, key.verify_key)
    allow.save(coord_dir / "allow-list.txt")
    dataset = resolve_dataset(config.dataset)
    malicious: tuple[int, ...] = ()
    if config.attack not in (None, "", "none"):
        from firmware_sim.attacks import select_malicious_ids

        malicious, _ = select_malicious_ids(
            config.clients, config.malicious, config.malicious_ids, config.seed
        )
    coord = CoordinatorConfig(
        run=run_id,
        key_dir=coord_dir / "keys",
        allow_list=coord_dir / "allow-list.txt",
        db=coord_dir / "coordinator.sqlite",
        clients=tuple(names),
        rounds=config.rounds,
        seed=config.seed,
        round_timeout=options.round_timeout,
        quorum=options.quorum,
        resend_interval=options.resend_interval,
        defense_start_round=getattr(config, "defense_start_round", 1),
        broker=CoordinatorBroker(
            host=host,
            port=port,
            protocol=protocol,
            username="coordinator" if broker_auth else None,
            password=mqtt_password_for(bytes(coordinator_key)) if broker_auth else None,
        ),
        model=ModelSettings(name=config.model),
        training=TrainingSettings(
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            learning_rate=config.resolved_lr(),
            optimizer=config.optimizer,
        ),
        aggregator=AggregatorSettings(
            config.aggregator,
            dict(config.aggregator_params),
            guard_factor=getattr(config, "guard_factor", 100.0),
            guard_max_abs=getattr(config, "guard_max_abs", 1e6),
            profile=config.siren_profile,
        ),
        data=DataSettings(
            dataset=dataset,
            root="split",
            evaluate=True,
            clients=config.clients,
            partition=config.partition,
            noniid_p=config.noniid_p,
            dirichlet_alpha=config.dirichlet_alpha,
            root_size=config.root_size,
            local_test_fraction=config.local_test_fraction,
            train_samples=config.train_samples,
            test_samples=config.test_samples,
            split_seed=config.seed,
        ),
        api=ApiSettings(enabled=options.api_port is not None, port=options.api_port or 0),
        # The simulator's ground truth, for the dashboard's counts of bans (never for decisions).
        simulation=SimulationSettings(tuple(client_name(i) for i in malicious)),
    )
    coord_toml = coord_dir / "coord.toml"
    password_file = None
    if broker_auth:
        password_file = "mqtt.password"
        pw = coord_dir / password_file
        pw.write_text(mqtt_password_for(bytes(coordinator_key)) + "\n")
        pw.chmod(0o600)
    coord_toml.write_text(coord.to_toml(relative_to=coord_dir, password_file=password_file))
    (coord_dir / "public.key").write_text(bytes(coordinator_key.verify_key).hex() + "\n")
    profiles = assign_profiles(
        parse_mix(options.profiles),
        config.clients,
        config.seed,
        compute_factor=options.compute_factor,
        latency_ms=options.latency_ms,
        dropout=options.dropout,
    )
    sim = asdict(config)
    sim["dataset"] = dataset
    workers = max(1, min(options.workers, config.clients))
    specs = []
    for w in range(workers):
        spec = WorkerSpec(
            sim=sim,
            run=run_id,
            host=host,
            port=port,
            protocol=protocol,
            keys_dir=str(keys_dir),
            coordinator_key=str(coord_dir / "public.key"),
            boards=list(range(w, config.clients, workers)),
            profiles=[asdict(p) for p in profiles],
            stats_path=str(workdir / f"worker-{w}.jsonl"),
            state_dir=str(workdir / "boards") if options.persist_boards else "",
            worker=w,
            broker_auth=broker_auth,
            telemetry=options.telemetry,
        )
        path = workdir / f"worker-{w}.json"
        path.write_text(spec.to_json())
        specs.append(path)
    return coord_toml, specs


def board_broker(spec: WorkerSpec, name: str, key: Any) -> Any:
    """How board ``name`` of a fleet reaches its broker (with its account when the broker has
    accounts)."""
    from edge_client.config import BrokerSettings

    if not spec.broker_auth:
        return BrokerSettings(host=spec.host, port=spec.port, protocol=spec.protocol)
    return BrokerSettings(
        host=spec.host,
        port=spec.port,
        protocol=spec.protocol,
        username=name,
        password=mqtt_password_for(bytes(key)),
    )


def fleet_broker_auth(workdir: Path, run: str, names: list[str]) -> BrokerAuth:
    """The broker accounts of a prepared fleet: the coordinator's and every board's, with the
    passwords derived from their keys, and the run's ACLs."""
    from protocol.keys import load_signing_key

    passwords = {
        "coordinator": mqtt_password_for(bytes(load_signing_key(workdir / "coordinator" / "keys")))
    }
    for name in names:
        passwords[name] = mqtt_password_for(bytes(load_signing_key(workdir / "keys" / name)))
    return BrokerAuth(run, passwords)


def board_config_for(spec: WorkerSpec, index: int, state_dir: Path) -> Any:
    """A standalone :class:`~edge_client.config.BoardConfig` for board ``index`` of a fleet.

    The board trains on the same shard with the same seeds as inside a worker, so
    ``siren client run`` with this configuration can stand in for one board of the fleet.
    An attacked board's poisoning is not applied (it is the simulator's, not the board's).
    """
    from edge_client.config import (
        AlarmSettings,
        BoardConfig,
        DataSettings,
        TrainingSettings,
    )
    from protocol.keys import load_signing_key

    cfg = sim_config_from_dict(spec.sim)
    name = client_name(index)
    return BoardConfig(
        client_id=name,
        run=spec.run,
        key_dir=Path(spec.keys_dir) / name,
        coordinator_key=Path(spec.coordinator_key),
        state_dir=state_dir,
        index=index,
        rounds=cfg.rounds,
        seed=cfg.seed,
        broker=board_broker(spec, name, load_signing_key(Path(spec.keys_dir) / name)),
        training=TrainingSettings(
            model=cfg.model,
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.resolved_lr(),
            optimizer=cfg.optimizer,
        ),
        alarm=AlarmSettings(
            enabled=cfg.alarm_enabled,
            profile=cfg.siren_profile,
            rule=cfg.alarm_rule,
            threshold=cfg.alarm_threshold,
            backend=cfg.alarm_backend,
        ),
        data=DataSettings(
            source="split",
            dataset=cfg.dataset,
            clients=cfg.clients,
            partition=cfg.partition,
            noniid_p=cfg.noniid_p,
            dirichlet_alpha=cfg.dirichlet_alpha,
            root_size=cfg.root_size,
            local_test_fraction=cfg.local_test_fraction,
            train_samples=cfg.train_samples,
            test_samples=cfg.test_samples,
            split_seed=cfg.seed,
        ),
    )


def read_worker_stats(paths: list[Path]) -> tuple[dict[str, Any], dict[int, list[dict[str, Any]]]]:
    """Parse worker JSON-lines files: the fleet description and per-round lines per round."""
    describe: dict[str, Any] = {}
    rounds: dict[int, list[dict[str, Any]]] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item.get("kind") == "fleet":
                describe = describe or item
            elif item.get("kind") == "round":
                rounds.setdefault(int(item["round"]), []).append(item)
    return describe, rounds


def merge_round(
    record: dict[str, Any], worker_rounds: list[dict[str, Any]], opened_at: float
) -> dict[str, Any]:
    """The history record of one round: the coordinator's record plus the workers' figures."""
    out = dict(record)
    boards = sum(w["boards"] for w in worker_rounds)
    out["board_seconds"] = float(sum(w["board_seconds"] for w in worker_rounds))
    n = max(1, boards)
    out["alarm_ms_mean"] = float(sum(w["alarm_ms_sum"] for w in worker_rounds) / n)
    out["train_ms_mean"] = float(sum(w["train_ms_sum"] for w in worker_rounds) / n)
    out["dropped"] = sorted(i for w in worker_rounds for i in w.get("dropped", []))
    for w in worker_rounds:
        out.update(w.get("metrics", {}))
    net = dict(out.get("network", {}))
    net["update_bytes_sent"] = int(sum(w["update_bytes"] for w in worker_rounds))
    net["global_bytes_delivered"] = int(sum(w["global_bytes"] for w in worker_rounds))
    net["global_deliveries"] = int(sum(w["global_deliveries"] for w in worker_rounds))
    net["resends"] = int(sum(w.get("resends", 0) for w in worker_rounds))
    net["bytes_total"] = net["update_bytes_sent"] + net["global_bytes_delivered"]
    out["network"] = net
    timing = dict(out.get("timing", {}))
    if worker_rounds:
        first = min(w["received_at"] for w in worker_rounds)
        trained = max(w["trained_at"] for w in worker_rounds)
        timing["global_delivery_seconds"] = max(0.0, first - opened_at)
        timing["board_compute_seconds"] = out["board_seconds"]
        timing["train_and_tamper_seconds"] = max(0.0, trained - first)
        timing["seal_seconds"] = float(sum(w.get("seal_seconds", 0.0) for w in worker_rounds))
        timing["published_at"] = max(w.get("published_at", 0.0) for w in worker_rounds)
        timing["trained_at"] = trained
        timing["first_received_at"] = first
        timing["pipelined"] = all(bool(w.get("pipelined")) for w in worker_rounds)
    timing["wall_seconds"] = out.get("seconds", 0.0)
    out["timing"] = timing
    out["boards_reporting"] = boards
    return out


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
        What to run (as ``siren sim run``); ``client_fraction`` must be 1.
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

    if config.client_fraction < 1.0:
        raise FleetError(
            "siren sim fleet runs every board every round: --client-fraction must be 1"
        )
    started = time.perf_counter()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    broker = None
    if ":" in options.broker:
        from protocol.mqtt import BrokerSettings as ProbeSettings
        from protocol.mqtt import broker_problem

        host, _, port_text = options.broker.rpartition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536 or not host:
            raise FleetError(
                f"--broker {options.broker!r}: expected HOST:PORT with a port in 1..65535, or "
                "auto, mosquitto or amqtt"
            )
        port, protocol, kind = int(port_text), MQTT_V5, "external"
        problem = broker_problem(ProbeSettings(host=host, port=port), timeout=5.0)
        if problem is not None:
            raise FleetError(f"--broker {options.broker}: {problem}")
    else:
        # The private broker: Mosquitto gets the accounts and ACLs of a deployment (nobody but
        # the coordinator may replace the retained global model); amqtt stays anonymous.
        from firmware_sim.broker import MQTT_V311, free_port, uses_mosquitto

        mosquitto = uses_mosquitto(options.broker)
        host, port = "127.0.0.1", free_port()
        protocol, kind = (MQTT_V5, "mosquitto") if mosquitto else (MQTT_V311, "amqtt")
    processes: list[_Process] = []
    reader: _DbReader | None = None
    try:
        private_auth = broker is None and kind == "mosquitto"
        coord_toml, spec_paths = prepare_fleet(
            config, options, workdir, host=host, port=port, protocol=protocol,
            broker_auth=private_auth,
        )  # fmt: skip
        if kind != "external":
            run_id = WorkerSpec.from_json(spec_paths[0].read_text()).run
            names = [client_name(i) for i in range(config.clients)]
            auth = fleet_broker_auth(workdir, run_id, names) if private_auth else None
            broker = start_broker(workdir / "broker", prefer=kind, port=port, auth=auth)
        python = sys.executable
        processes.append(
            _spawn(
                "coordinator",
                [python, "-m", "siren_cli.main", "coordinator", "run", "--config", str(coord_toml)],
                workdir / "coordinator.log",
            )
        )
        for w, spec in enumerate(spec_paths):
            processes.append(
                _spawn(
                    f"worker-{w}",
                    [python, "-m", "firmware_sim.fleet", "worker", "--spec", str(spec)],
                    workdir / f"worker-{w}.log",
                )
            )
        reader = _DbReader(workdir / "coordinator" / "coordinator.sqlite")
        stats_paths = [workdir / f"worker-{w}.jsonl" for w in range(len(spec_paths))]
        reported = 0
        pending: dict[int, tuple[float, dict[str, Any]]] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
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
            if all(p.popen.poll() is not None for p in processes):
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
        store = CoordinatorStore(workdir / "coordinator" / "coordinator.sqlite")
        try:
            history = _history(config, options, store, stats_paths, kind, protocol, len(spec_paths))
        finally:
            store.close()
        if progress is not None:
            for number in sorted(pending):
                progress(next(r for r in history["rounds"] if r["round"] == number))
        history["summary"]["wall_seconds"] = time.perf_counter() - started
        return history
    finally:
        if reader is not None:
            reader.close()
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


def _history(
    config: Any,
    options: FleetOptions,
    store: Any,
    stats_paths: list[Path],
    broker_kind: str,
    protocol: int,
    workers: int,
) -> dict[str, Any]:
    from firmware_sim.report import ban_outcome

    describe, worker_rounds = read_worker_stats(stats_paths)
    describe = {k: v for k, v in describe.items() if k not in ("kind", "worker")}
    rows = [r for r in store.round_rows() if r.status == "closed"]
    rounds = [
        merge_round(r.record or {}, worker_rounds.get(r.round, []), r.opened_at) for r in rows
    ]
    if not rounds:
        raise FleetError("the coordinator closed no round")
    final_round = store.current_round
    final = store.global_version(final_round)
    accs = [r["test_accuracy"] for r in rounds if r.get("test_accuracy") is not None]
    totals = [r["network"]["bytes_total"] for r in rounds]
    seconds = [r["seconds"] for r in rounds]
    config_dict = asdict(config)
    config_dict["dataset"] = describe.get("dataset", config.dataset)
    malicious = describe.get("malicious_ids")
    bans = ban_outcome(rounds, malicious if isinstance(malicious, list) else None)
    return {
        "config": config_dict,
        "fleet": {
            **describe,
            "clients": config.clients,
            "transport": {
                "kind": "mqtt",
                "broker": broker_kind,
                "protocol": "5" if protocol == 5 else "3.1.1",
                "workers": workers,
                "connections": config.clients + 1,
                "profiles": options.profiles,
            },
        },
        "rounds": rounds,
        "summary": {
            "final_test_accuracy": rounds[-1].get("test_accuracy"),
            "final_test_loss": rounds[-1].get("test_loss"),
            "best_test_accuracy": max(accs) if accs else None,
            "round_seconds_mean": float(np.mean(seconds)),
            "bytes_per_round_mean": float(np.mean(totals)),
            "rejections": {
                k: v
                for k, v in store.decision_counts().items()
                if k not in ("accepted", "duplicate")
            },
            "malicious_ids": malicious if isinstance(malicious, list) else None,
            "bans": bans,
        },
        "strategy_state": rows[-1].strategy_state,
        "final_global": final.weights,
    }


# -- command line --------------------------------------------------------------------------


def add_fleet_options(p: argparse.ArgumentParser) -> None:
    """Options of ``siren sim fleet`` beyond the run options of ``siren sim run``."""
    g = p.add_argument_group("fleet transport")
    g.add_argument(
        "--workers", type=int, default=1, help="worker processes hosting the boards (default: 1)"
    )
    g.add_argument(
        "--broker",
        default="auto",
        help="auto (private Mosquitto, else amqtt), mosquitto, amqtt, or HOST:PORT of a "
        "running anonymous broker (default: auto)",
    )
    g.add_argument(
        "--profile",
        default="ideal",
        help="device profile mix, e.g. pi4 or pi4:0.5,pi5:0.3,jetson:0.2; profiles: ideal, "
        "desktop, jetson, pi5, pi4, flaky (default: ideal)",
    )
    g.add_argument("--compute-factor", type=float, default=None, help="override compute factor")
    g.add_argument("--latency-ms", type=float, default=None, help="override network latency")
    g.add_argument(
        "--dropout", type=float, default=None, help="override per-round dropout probability"
    )
    g.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        help="close a round after this many seconds with a quorum (default: 0 = wait for "
        "every board; 30 when boards can drop out)",
    )
    g.add_argument(
        "--quorum",
        type=float,
        default=0.5,
        help="fraction of boards needed to close at the deadline (default: 0.5)",
    )
    g.add_argument("--persist-boards", action="store_true", help="keep each board's state on disk")
    g.add_argument(
        "--no-telemetry",
        dest="telemetry",
        action="store_false",
        help="boards send no telemetry figures in their status (default: each round's CPU and "
        "wall times, the worker's shared peak RSS and this machine's sensors, if any)",
    )
    g.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    g.add_argument(
        "--api-port",
        type=int,
        default=None,
        help="serve the coordinator's HTTP API and live dashboard on this loopback port "
        "(0 = a free port; admin token from $SIREN_API_TOKEN; default: no API)",
    )


def _api_port(requested: int | None) -> int | None:
    """The dashboard port: ``None`` stays off, 0 becomes a free loopback port (known here, so
    the URL can be printed before the coordinator starts)."""
    from siren_cli.errors import CommandError

    if requested is None:
        return None
    if not 0 <= requested <= 65535:
        raise CommandError(f"--api-port must be in 0..65535, got {requested}")
    if requested:
        return requested
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fleet_command(args: argparse.Namespace) -> int:
    """Handler of ``siren sim fleet``."""
    from firmware_sim.broker import BrokerError
    from firmware_sim.cli import config_from_args, format_round, validate_names
    from firmware_sim.profiles import parse_mix
    from firmware_sim.report import format_ban_outcome, plot_accuracy, write_history
    from siren_cli.errors import CommandError

    config = config_from_args(args)
    validate_names(config)
    try:
        parse_mix(args.profile)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if args.workers < 1:
        raise CommandError(f"--workers must be >= 1, got {args.workers}")
    dropout_possible = (args.dropout or 0) > 0 or "flaky" in args.profile
    timeout = args.round_timeout
    if timeout is None:
        timeout = 30.0 if dropout_possible else 0.0
    options = FleetOptions(
        workers=args.workers,
        broker=args.broker,
        profiles=args.profile,
        compute_factor=args.compute_factor,
        latency_ms=args.latency_ms,
        dropout=args.dropout,
        round_timeout=timeout,
        quorum=args.quorum,
        persist_boards=args.persist_boards,
        api_port=_api_port(args.api_port),
        telemetry=args.telemetry,
    )
    out = Path(args.out)
    if options.api_port is not None:
        print(f"coordinator dashboard: http://127.0.0.1:{options.api_port}/", flush=True)
    print(
        f"siren sim fleet: {config.clients} boards on {options.workers} worker(s), "
        f"{config.rounds} rounds, aggregator {config.aggregator}, "
        f"attack {config.attack or 'none'}, dataset {config.dataset}, broker {options.broker}",
        flush=True,
    )

    def show(record: dict[str, Any]) -> None:
        net = record.get("network", {})
        line = format_round(record, config.rounds)
        line += f"  {net.get('bytes_total', 0) / 1e6:.2f} MB"
        rejected = sum(net.get("rejected", {}).values())
        if rejected:
            line += f"  rejected {rejected}"
        if record.get("dropped"):
            line += f"  dropped {len(record['dropped'])}"
        print(line, flush=True)

    def terminate(signum: int, frame: Any) -> None:
        # Unwind through run_fleet's cleanup: its processes and broker are stopped too.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        history = run_fleet(config, options, out / "fleet", progress=show, timeout=args.timeout)
    except (FleetError, BrokerError) as exc:
        raise CommandError(str(exc)) from exc
    path = write_history(history, out)
    label = f"{config.aggregator}" + (f" / {config.attack}" if config.attack else "") + " (MQTT)"
    plot_accuracy({label: history}, out / "accuracy.png", title=history["fleet"]["dataset"])
    s = history["summary"]
    print(
        f"final test accuracy {100 * s['final_test_accuracy']:.2f}% "
        f"(best {100 * s['best_test_accuracy']:.2f}%); mean round {s['round_seconds_mean']:.2f}s, "
        f"{s['bytes_per_round_mean'] / 1e6:.2f} MB per round; "
        f"wall {s['wall_seconds']:.0f}s; wrote {path} and {out / 'accuracy.png'}"
    )
    if history["fleet"].get("malicious_ids"):
        print(f"malicious boards: {history['fleet']['malicious_ids']}")
    bans = format_ban_outcome(s.get("bans"))
    if bans is not None:
        print(bans)
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process: ``python -m firmware_sim.fleet worker --spec FILE``."""
    parser = argparse.ArgumentParser(prog="python -m firmware_sim.fleet")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="host the boards of one worker spec")
    w.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    from siren_cli.logs import configure_logging

    configure_logging()
    spec = WorkerSpec.from_json(args.spec.read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return FleetWorker(spec).run(stop)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(worker_main())
