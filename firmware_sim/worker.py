"""A worker process of a simulated fleet: many boards, one TensorFlow runtime, one MQTT
connection per board.

``siren sim fleet`` starts one or more workers (``python -m firmware_sim.worker --spec FILE``,
the spec written by :func:`firmware_sim.fleet_spec.prepare_fleet`). A worker
(:class:`FleetWorker`) hosts many boards: they share one TensorFlow runtime, one
:class:`~models.training.Trainer` and one LiteRT evaluator (built by the in-process engine's
:func:`~firmware_sim.engine.build_fleet`, so data partitions, poisoned shards and attack
assignments are exactly those of ``siren sim run``). Each board still has its *own* MQTT
connection (:class:`~edge_client.client.BoardLink`: own client id, own signed status and Last
Will, own QoS 1 session); one network thread per worker drives all of them
(:class:`~edge_client.netloop.SharedNetworkLoop`, epoll: hundreds of connections, no
``select()`` limit). The network thread only enqueues; all computation happens on the worker's
main thread. Measured on 2 cores: 500 digits boards in one worker, about 4 s per round, most of
it the boards' serial training (about 7 ms each). When a global model arrives, the worker
runs :func:`~edge_client.board.board_step` for its boards one after the other, lets the
adversary tamper with the round (:meth:`~firmware_sim.adversary.Adversary.tamper_round`), seals
every update with its board's key (:class:`~edge_client.client.BoardAgent`) and publishes each
one after its device profile's delay (:mod:`firmware_sim.profiles`). It writes its per-round
figures as JSON lines (:mod:`firmware_sim.fleet_history` reads them).
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from firmware_sim.fleet_spec import WorkerSpec, board_broker, client_name, sim_config_from_dict

logger = logging.getLogger(__name__)


@dataclass
class _RoundStats:
    round: int
    received_at: float
    boards: int = 0
    dropped: list[int] = field(default_factory=list)
    sat_out: list[int] = field(default_factory=list)
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
    start_lag: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "round",
            "round": self.round,
            "received_at": self.received_at,
            "boards": self.boards,
            "dropped": self.dropped,
            "sat_out": self.sat_out,
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
            "start_lag_max": max(self.start_lag, default=0.0),
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
        # Buffered asynchronous mode: the newest global model, and when each busy board's
        # update is due (a board trains on the newest model as soon as it is free).
        self.asynchronous = self.config.mode == "async"
        self._newest: Any = None
        self._busy: dict[int, float] = {}
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
        if index in self._busy:
            return  # its update for that model is still on its (simulated) way
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
        if self.asynchronous:
            self._newest = message
            stats.pipelined = True
            # Every free board received the model when it arrived: its device starts then.
            arrived = time.monotonic() - max(0.0, time.time() - received_at)
            for index in self.agents:
                if index not in self._busy:
                    self._train_async(index, arrived)
            stats.trained_at = time.time()
            return
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
            if plan.action == "sit_out":
                agent.skip(message)
                stats.sat_out.append(index)
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
                epochs=fleet.adversary.round_epochs(index, t),
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

    def _train_async(self, index: int, start: float) -> None:
        """Buffered asynchronous mode: board ``index`` is free since ``start`` (monotonic);
        it trains on the newest global model unless it already did (then it waits for the next
        one). Its update is published ``compute + profile delay`` after ``start``, as on its own
        device (the worker computing its boards one after the other delays nothing as long as
        it keeps up), and it stays busy until then. An attack tampers with this update alone."""
        from edge_client.board import board_step

        message = self._newest
        if message is None:
            return
        agent, cfg, fleet = self.agents[index], self.config, self.fleet
        t = message.round
        plan = agent.plan(message)
        if plan.action != "train":
            return
        stats = self._stats[t]
        if self.profiles[index].drops(cfg.seed, t, index):
            agent.skip(message)
            stats.dropped.append(index)
            return
        data = fleet.boards[index]
        if fleet.adversary.is_malicious(index):
            data = fleet.adversary.round_data(index, t, data)
        # How late the worker starts the board's training (its other boards were computing):
        # a simulated device is only as fast as its profile while this stays small.
        stats.start_lag.append(max(0.0, time.monotonic() - start))
        t0 = time.perf_counter()
        update, state = board_step(
            agent.state,
            message.weights,
            t,
            data,
            fleet.board_trainer,
            agent.rng(t),
            evaluator=fleet.evaluator,
            alarm=self.alarm,
            epochs=fleet.adversary.round_epochs(index, t),
        )
        seconds = time.perf_counter() - t0
        rng = np.random.default_rng([cfg.seed, t, index, 65537])
        update = fleet.adversary.tamper_round(t, message.weights, [update], rng)[0]
        stats.board_seconds += seconds
        stats.alarm_ms.append(1000 * update.alarm_seconds)
        stats.train_ms.append(1000 * update.train_seconds)
        stats.alarms += int(bool(update.alarm))
        self._seal(update, state, message, start, seconds, stats, self._figures(update))
        if agent.record.last_round == t:  # sealed and scheduled (not refused as too large)
            self._busy[index] = start + self._device_seconds(index, t, update, seconds)

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

    def _device_seconds(self, index: int, t: int, update: Any, seconds: float) -> float:
        """Seconds from a board receiving round ``t``'s model to its update reaching the
        broker, as on its own device: its profile's ``compute_factor × compute + latency``,
        where *compute* is the ``seconds`` measured here, or, with ``nominal_compute`` set,
        that many seconds per training sample and epoch, as the in-process engine counts it
        (so both order an asynchronous run's updates alike while the worker keeps up)."""
        from firmware_sim.profiles import compute_seconds

        cfg = self.config
        if getattr(cfg, "nominal_compute", None) is not None:
            n = self.fleet.boards[index].num_train
            return self.profiles[index].board_seconds(
                compute_seconds(cfg, update, n), cfg.seed, t, index
            )
        rng = np.random.default_rng([cfg.seed, t, index, 77])
        return seconds + self.profiles[index].publish_delay(seconds, rng)

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
        due = start + self._device_seconds(index, message.round, update, seconds)
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
            due, _, index, status, payload = heapq.heappop(self._schedule)
            if status:
                self.links[index].publish_status(payload)
                continue
            self.links[index].publish_update(payload)
            stats = self._stats.get(self._latest_round)
            if stats is not None:
                stats.published_at = time.time()
            if self.asynchronous and index in self._busy and not force:
                del self._busy[index]
                self._train_async(index, due)  # free again since due: on to the newest model


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process: ``python -m firmware_sim.worker --spec FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m firmware_sim.worker", description="host the boards of one worker spec"
    )
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    from siren_cli.logs import configure_logging

    configure_logging()
    spec = WorkerSpec.from_json(args.spec.read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return FleetWorker(spec).run(stop)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(worker_main())
