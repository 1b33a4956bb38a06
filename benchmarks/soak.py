"""Fuzz and soak a live fleet (``siren bench soak``): thousands of hostile messages against the
real coordinator while honest boards keep the rounds going.

The benchmark starts, on loopback only,

1. a private Mosquitto on a free port (:func:`firmware_sim.broker.start_mosquitto`);
2. the coordinator service as ``siren coordinator run`` in its own process, configured as the
   integration tests' coordinator: the digits MLP's initial model from an npz file, the chosen
   rule (FedAvg by default, the rule a single huge update hurts most) behind the global-model
   guard, optionally test-set evaluation;
3. ``--boards`` honest simulated boards (:class:`firmware_sim.worker.FleetWorker` on a thread of
   this process). One more board is expected by the coordinator: the *compromised* board, whose
   key the attacker holds and which it plays itself;
4. the attacker: one MQTT client that watches the global topic and the boards' traffic and,
   every round, publishes the round's batch of :mod:`benchmarks.soak_messages`: the compromised
   board's admitted update (a different extreme each round), about 55 other messages signed
   with its key, and ``--messages / --rounds`` fuzz messages.

**Deterministic outcomes.** The honest boards' updates of round t leave only after the
coordinator has counted the whole batch of round t (the worker holds them until the round is
released), so every message of the batch meets the round it was made for, and the compromised
board's one admitted update is committed before its duplicates and conflicting updates are
sent. The coordinator's counts must then equal the soak's expectations reason by reason; the
honest boards only add ``accepted`` updates (one per board and round, read from the database),
status messages and QoS 1 redeliveries counted as ``duplicate``.

**Checks.** The coordinator process never exits before the end and exits with status 0; every
global model (stored in the database, and received on the global topic) is finite; every
message sent is counted under its expected reason code; the run finishes its rounds.

Every message sent is written, with its expected reason, to ``messages.jsonl`` in the working
directory; the report goes to ``benchmarks/results/soak.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import help_description
from benchmarks.soak_messages import (
    FUZZ,
    STATUS,
    STOLEN_KEY,
    UPDATE,
    RoundContext,
    Sent,
    round_batch,
)
from firmware_sim.options import parse_key_values
from protocol.errors import Reason
from siren_cli.errors import CommandError

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

#: The documented reason codes (protocol.errors.Reason).
KNOWN_REASONS = {r.value for r in Reason}


class SoakError(RuntimeError):
    """The soak could not run (a process would not start, the fleet stalled)."""


@dataclass(frozen=True)
class SoakSettings:
    """What to run.

    Attributes
    ----------
    boards : int
        Honest boards (the compromised board comes on top).
    rounds : int
        Rounds of the run.
    messages : int
        Fuzz messages in total, spread evenly over the rounds.
    seed : int
        Seed of the run and of every generated message.
    aggregator : str
        The coordinator's rule.
    aggregator_params : mapping
        Its parameters (e.g. ``{"f": 1}`` for Krum).
    evaluate : bool
        Evaluate every global model on the digits test split (loads TensorFlow in the
        coordinator).
    round_timeout : float
        Seconds to wait for any one step (a global model, the coordinator's counting).
    """

    boards: int = 5
    rounds: int = 8
    messages: int = 10_400
    seed: int = 0
    aggregator: str = "fedavg"
    aggregator_params: Mapping[str, Any] = field(default_factory=dict)
    evaluate: bool = True
    round_timeout: float = 180.0


SMOKE = SoakSettings(boards=2, rounds=2, messages=300, evaluate=False, round_timeout=120.0)


# -- the attacker's view of the broker ---------------------------------------------------------


@dataclass
class _Global:
    round: int
    sha256: str
    message: bytes
    finite: bool
    max_abs: float


class Attacker:
    """One MQTT client: publishes the soak's messages, watches globals, sniffs board traffic.

    Parameters
    ----------
    host, port : str, int
        The broker.
    run : str
        Run id.
    coordinator_key : VerifyKey
        Verifies the global models.
    board_keys : mapping of str to VerifyKey
        Every board's public key (the allow-list is public knowledge).
    compromised : str
        The board the attacker plays (its own traffic is not sniffed).
    """

    def __init__(
        self,
        host: str,
        port: int,
        run: str,
        coordinator_key: Any,
        board_keys: Mapping[str, Any],
        compromised: str,
    ) -> None:
        from protocol.mqtt import BrokerSettings, make_mqtt_client

        self.run = run
        self.coordinator_key = coordinator_key
        self.board_keys = dict(board_keys)
        self.compromised = compromised
        self.globals: dict[int, _Global] = {}
        self.global_conflicts: list[str] = []
        self.updates: list[tuple[str, bytes]] = []
        self.statuses: list[tuple[str, bytes]] = []
        self.connects = 0
        self.unacked = 0
        self._lock = threading.Condition()
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        client = make_mqtt_client(BrokerSettings(host=host, port=port), f"soak-attacker-{run}")
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_message = lambda c, u, m: self._inbox.put((m.topic, bytes(m.payload)))
        self._client = client
        self._ready = threading.Event()
        client.connect_async(host, port, keepalive=30)
        client.loop_start()
        if not self._ready.wait(20):
            raise SoakError(f"the attacker could not connect to the broker {host}:{port}")
        self._reader = threading.Thread(target=self._read, name="soak-sniffer", daemon=True)
        self._stop = threading.Event()
        self._reader.start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        from paho.mqtt.subscribeoptions import SubscribeOptions

        from protocol.topics import global_topic, status_subscription, update_subscription

        if reason.is_failure:
            return
        self.connects += 1
        mine = SubscribeOptions(qos=1, noLocal=True)  # not the attacker's own messages
        client.subscribe(
            [
                (global_topic(self.run), SubscribeOptions(qos=1)),
                (update_subscription(self.run), mine),
                (status_subscription(self.run), mine),
            ]
        )
        self._ready.set()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._sniff(topic, payload)

    def _sniff(self, topic: str, payload: bytes) -> None:
        from protocol.envelope import Kind, decode_message
        from protocol.errors import InvalidMessageError
        from protocol.topics import parse_topic

        try:
            where = parse_topic(topic)
        except ValueError:
            return
        if where.kind == "global":
            try:
                message = decode_message(payload, self.coordinator_key)
            except InvalidMessageError as exc:
                with self._lock:
                    self.global_conflicts.append(f"an invalid global model: {exc}")
                return
            weights = message.weights
            assert weights is not None
            finite = bool(np.isfinite(weights).all())
            glob = _Global(
                message.round,
                message.header.payload_sha256,
                payload,
                finite,
                float(np.max(np.abs(weights))) if finite else float("inf"),
            )
            with self._lock:
                seen = self.globals.get(message.round)
                if seen is None:
                    self.globals[message.round] = glob
                elif seen.message != payload:
                    self.global_conflicts.append(f"two global models for round {message.round}")
                self._lock.notify_all()
            return
        if where.client == self.compromised:
            return
        try:
            message = decode_message(payload, self.board_keys)
        except InvalidMessageError:
            return
        if message.client != where.client or message.run != self.run:
            return
        with self._lock:
            if where.kind == "update" and message.kind is Kind.UPDATE:
                self.updates.append((topic, payload))
            elif where.kind == "status" and message.kind is Kind.STATUS:
                self.statuses.append((topic, payload))
                del self.statuses[:-20]

    def wait_global(self, round_index: int, timeout: float, alive: Any) -> _Global:
        """The global model that starts ``round_index``, once it arrived.

        Raises
        ------
        SoakError
            If it does not arrive within ``timeout`` seconds (``alive()`` is polled and may
            raise).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while round_index not in self.globals:
                alive()
                if time.monotonic() > deadline:
                    raise SoakError(
                        f"no global model for round {round_index} within {timeout:.0f} s"
                    )
                self._lock.wait(0.2)
            return self.globals[round_index]

    def publish(self, messages: Sequence[Sent], timeout: float) -> None:
        """Publish every message with QoS 1 (not retained) and wait for the broker's PUBACKs."""
        infos = [self._client.publish(m.topic, m.payload, qos=1) for m in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self.unacked += sum(1 for info in infos if not info.is_published())

    def close(self) -> None:
        """Disconnect and stop the threads."""
        self._stop.set()
        self._client.disconnect()
        self._client.loop_stop()
        self._reader.join(5)


# -- the coordinator's database (read-only) ----------------------------------------------------


class CoordinatorDb:
    """Read-only queries on the coordinator's SQLite database (WAL: never blocks it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``sql``; an empty list while the database or the table does not exist."""
        if not self.path.exists():
            return []
        try:
            with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.Error:
            return []

    def update_counts(self) -> dict[str, int]:
        """Admission outcomes of update-topic messages, summed over rounds."""
        rows = self.query("SELECT reason, SUM(count) FROM decisions GROUP BY reason")
        return {str(r[0]): int(r[1]) for r in rows}

    def has_status_counts(self) -> bool:
        """Whether the coordinator counts status-topic messages (a ``status_decisions`` table)."""
        return bool(self.query("SELECT name FROM sqlite_master WHERE name = 'status_decisions'"))

    def status_counts(self) -> dict[str, int]:
        """Outcomes of status-topic messages, summed over rounds."""
        rows = self.query("SELECT reason, SUM(count) FROM status_decisions GROUP BY reason")
        return {str(r[0]): int(r[1]) for r in rows}

    def admitted(self) -> list[tuple[int, str, str, int]]:
        """Admitted updates: (round, client, whole-message SHA-256, samples)."""
        rows = self.query("SELECT round, client, digest, samples FROM updates ORDER BY round")
        return [(int(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]


# -- the honest boards ---------------------------------------------------------------------------


def _gated_worker(spec: Any) -> Any:
    """A :class:`~firmware_sim.worker.FleetWorker` whose updates of round t are held back until
    :meth:`release` (t) is called (updates of released rounds leave at once)."""
    from firmware_sim.worker import FleetWorker

    class GatedWorker(FleetWorker):
        released = 0

        def release(self, round_index: int) -> None:
            self.released = max(self.released, round_index)

        def _publish_due(self, force: bool = False) -> None:
            if self._latest_round > self.released and not force:
                return
            super()._publish_due(force)

    return GatedWorker(spec)


# -- the run -----------------------------------------------------------------------------------


@dataclass
class RoundLog:
    """What happened in one round."""

    round: int
    fuzz: int = 0
    stolen: int = 0
    admitted: str = ""
    seconds_to_count: float = 0.0
    caught_up: bool = True


@dataclass
class SoakOutcome:
    """Everything the report needs."""

    settings: SoakSettings
    run: str
    compromised: str
    expected: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_generator: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    sent_bytes: int = 0
    rounds: list[RoundLog] = field(default_factory=list)
    crash: str | None = None
    exit_code: int | None = None
    stalls: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    db: dict[str, Any] = field(default_factory=dict)
    mqtt_globals: list[dict[str, Any]] = field(default_factory=list)
    global_conflicts: list[str] = field(default_factory=list)
    attacker_connects: int = 0
    attacker_unacked: int = 0
    worker_done: bool = False
    log_errors: list[str] = field(default_factory=list)


class _CrashedError(Exception):
    pass


def run_soak(settings: SoakSettings, workdir: Path, progress: Any = print) -> SoakOutcome:
    """Run the soak in ``workdir`` and return what was sent and observed.

    Parameters
    ----------
    settings : SoakSettings
        Fleet size, rounds, message count, seed, rule.
    workdir : Path
        Broker, keys, configurations, logs, the coordinator's database, ``messages.jsonl``.
    progress : callable
        Called with one line of text per step.

    Raises
    ------
    SoakError
        If the fleet cannot be started.
    """
    from coordinator.config import CoordinatorConfig, ModelSettings
    from coordinator.runtime import save_initial_model
    from firmware_sim.broker import start_mosquitto
    from firmware_sim.engine import SimConfig
    from firmware_sim.fleet_spec import FleetOptions, WorkerSpec, client_name, prepare_fleet
    from protocol.admission import AdmissionPolicy
    from protocol.keys import AllowList, load_signing_key, load_verify_key
    from protocol.layout import TensorLayout

    started = time.monotonic()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    clients = settings.boards + 1
    run_id = f"soak-{settings.seed}"
    compromised = client_name(clients - 1)
    outcome = SoakOutcome(settings, run_id, compromised)
    broker = start_mosquitto(workdir / "broker")
    coordinator: subprocess.Popen[bytes] | None = None
    worker: Any = None
    thread: threading.Thread | None = None
    stop = threading.Event()
    attacker: Attacker | None = None
    coordinator_key: Any = None
    try:
        config = SimConfig(
            dataset="digits",
            clients=clients,
            rounds=settings.rounds,
            seed=settings.seed,
            aggregator=settings.aggregator,
            aggregator_params=dict(settings.aggregator_params),
        )
        options = FleetOptions(resend_interval=60.0, run_id=run_id)
        coord_toml, specs = prepare_fleet(
            config, options, workdir, host=broker.host, port=broker.port, protocol=broker.protocol
        )
        spec = replace(
            WorkerSpec.from_json(specs[0].read_text()), boards=list(range(settings.boards))
        )
        progress(f"building {settings.boards} honest boards ...")
        worker = _gated_worker(spec)
        layout = TensorLayout(worker.fleet.trainer.layout.as_list())
        initial = workdir / "coordinator" / "initial.npz"
        save_initial_model(initial, worker.fleet.trainer.initial_weights, layout)
        coord = CoordinatorConfig.load(coord_toml)
        coord = replace(
            coord,
            model=ModelSettings(name="digits-mlp", initial=initial),
            data=replace(coord.data, root="none", evaluate=settings.evaluate),
        )
        coord_toml.write_text(coord.to_toml(relative_to=coord_toml.parent))
        allow = AllowList.load(coord.allow_list)
        key = load_signing_key(workdir / "keys" / compromised)
        coordinator_key = load_verify_key(workdir / "coordinator" / "public.key")
        policy = AdmissionPolicy(
            layout, max_message_bytes=coord.max_message_bytes, max_samples=coord.max_samples
        )
        db = CoordinatorDb(Path(coord.db))
        progress(f"starting the coordinator ({_rule(settings)}) and the attacker ...")
        log = open(workdir / "coordinator.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            coordinator = subprocess.Popen(
                [
                    *(sys.executable, "-m", "siren_cli.main", "coordinator", "run"),
                    *("--config", str(coord_toml)),
                ],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        proc = coordinator

        def alive() -> None:
            code = proc.poll()
            if code is not None:
                raise _CrashedError(f"the coordinator exited with status {code} before the end")

        attacker = Attacker(
            broker.host, broker.port, run_id, coordinator_key, dict(allow), compromised
        )
        thread = threading.Thread(
            target=worker.run, args=(stop,), name="honest-boards", daemon=True
        )
        thread.start()
        honest = tuple(client_name(i) for i in range(settings.boards))
        own: list[bytes] = []
        previous: str | None = None
        per_round = [settings.messages // settings.rounds] * settings.rounds
        per_round[-1] += settings.messages - sum(per_round)
        record = open(workdir / "messages.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        try:
            for t in range(1, settings.rounds + 1):
                glob = attacker.wait_global(t, settings.round_timeout, alive)
                admitted = db.admitted()
                digests = {d for _, _, d, _ in admitted}
                sniffed = [
                    (tp, m)
                    for tp, m in list(attacker.updates)
                    if hashlib.sha256(m).hexdigest() in digests
                ]
                ctx = RoundContext(
                    run=run_id,
                    round=t,
                    base_sha256=glob.sha256,
                    previous_sha256=previous,
                    layout=layout,
                    compromised=compromised,
                    key=key,
                    honest=honest,
                    size_limit=policy.size_limit,
                    max_samples=policy.sample_limit,
                    own_admitted=list(own),
                    sniffed_updates=sniffed[-50:],
                    sniffed_statuses=list(attacker.statuses),
                    globals_seen=[g.message for g in attacker.globals.values()],
                )
                batch = round_batch(ctx, settings.seed, per_round[t - 1])
                for i, s in enumerate(batch):
                    outcome.expected[(s.channel, s.expected.value)] += 1
                    name = s.generator.split(":")[0] if s.family == FUZZ else s.generator
                    outcome.by_generator[(s.family, name, s.expected.value)] += 1
                    outcome.sent_bytes += len(s.payload)
                    record.write(
                        json.dumps(
                            {
                                "round": t,
                                "index": i,
                                "family": s.family,
                                "generator": s.generator,
                                "topic": s.topic,
                                "channel": s.channel,
                                "bytes": len(s.payload),
                                "sha256": hashlib.sha256(s.payload).hexdigest(),
                                "expected": s.expected.value,
                            }
                        )
                        + "\n"
                    )
                entry = RoundLog(
                    t,
                    fuzz=sum(1 for s in batch if s.family == FUZZ),
                    stolen=sum(1 for s in batch if s.family == STOLEN_KEY),
                    admitted=batch[0].generator.split(":", 1)[1],
                )
                outcome.rounds.append(entry)
                t0 = time.monotonic()
                attacker.publish(batch[:1], settings.round_timeout)
                _wait(
                    lambda t=t: any(r == t and c == compromised for r, c, _, _ in db.admitted()),
                    settings.round_timeout,
                    alive,
                    f"round {t}: the compromised board's admitted update to be stored",
                    outcome,
                )
                attacker.publish(batch[1:], settings.round_timeout)
                settled = _Settled(outcome.expected, db, compromised)
                _wait(
                    settled,
                    settings.round_timeout + len(batch) / 20,
                    alive,
                    f"round {t}: the coordinator to count the {len(batch)} messages",
                    outcome,
                )
                entry.caught_up = settled.exact
                entry.seconds_to_count = time.monotonic() - t0
                own.append(batch[0].payload)
                previous = glob.sha256
                progress(
                    f"round {t}: {len(batch)} messages counted in {entry.seconds_to_count:.1f} s "
                    f"(admitted: {entry.admitted})"
                )
                worker.release(t)
            attacker.wait_global(settings.rounds + 1, settings.round_timeout, alive)
        finally:
            record.close()
        try:
            outcome.exit_code = coordinator.wait(60)
        except subprocess.TimeoutExpired:
            outcome.stalls.append("the coordinator did not exit within 60 s of the final model")
        thread.join(60)
        outcome.worker_done = bool(worker.done)
    except _CrashedError as exc:
        outcome.crash = str(exc)
        assert coordinator is not None
        outcome.exit_code = coordinator.returncode
    except SoakError as exc:
        outcome.stalls.append(str(exc))
    finally:
        stop.set()
        if thread is not None:
            thread.join(30)
        if attacker is not None:
            outcome.attacker_connects = attacker.connects
            outcome.attacker_unacked = attacker.unacked
            outcome.global_conflicts = list(attacker.global_conflicts)
            outcome.mqtt_globals = [
                {"round": g.round, "sha256": g.sha256, "finite": g.finite, "max_abs": g.max_abs}
                for g in sorted(attacker.globals.values(), key=lambda g: g.round)
            ]
            attacker.close()
        if coordinator is not None and coordinator.poll() is None:
            coordinator.terminate()
            try:
                coordinator.wait(20)
            except subprocess.TimeoutExpired:
                coordinator.kill()
                coordinator.wait()
        broker.stop()
    outcome.wall_seconds = time.monotonic() - started
    outcome.db = read_database(workdir / "coordinator" / "coordinator.sqlite", coordinator_key)
    log_path = workdir / "coordinator.log"
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    outcome.log_errors = [
        line for line in text.splitlines() if " ERROR " in line or "Traceback" in line
    ][:20]
    return outcome


def _wait(predicate: Any, timeout: float, alive: Any, what: str, outcome: SoakOutcome) -> bool:
    """Poll ``predicate`` every 0.2 s; on timeout record a stall and return False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        if predicate():
            return True
        time.sleep(0.2)
    outcome.stalls.append(f"timed out after {timeout:.0f} s waiting for {what}")
    return False


class _Settled:
    """Whether the coordinator is done with what was sent: it counted at least the expected
    number of every reason (honest boards add only ``accepted`` updates, statuses and
    ``duplicate`` redeliveries) -- or, when some count disagrees, it counted as many messages
    in all as were sent and its counts have not moved for :attr:`QUIET` seconds (the final
    check then reports the disagreement)."""

    QUIET = 5.0

    def __init__(self, expected: Counter[tuple[str, str]], db: CoordinatorDb, compromised: str):
        self.expected = expected
        self.db = db
        self.compromised = compromised
        self.status_counted = db.has_status_counts()
        self.exact = False
        self._last: tuple[int, float] = (-1, 0.0)

    def __call__(self) -> bool:
        updates = self.db.update_counts()
        statuses = self.db.status_counts() if self.status_counted else {}
        self.exact = True
        for (channel, reason), n in self.expected.items():
            if channel == UPDATE:
                if reason != Reason.ACCEPTED.value and updates.get(reason, 0) < n:
                    self.exact = False
            elif self.status_counted and statuses.get(reason, 0) < n:
                self.exact = False
        if self.exact:
            return True
        total = sum(updates.values()) + sum(statuses.values())
        honest = sum(1 for _, c, _, _ in self.db.admitted() if c != self.compromised)
        target = honest + sum(
            n for (ch, _), n in self.expected.items() if ch == UPDATE or self.status_counted
        )
        now = time.monotonic()
        if total != self._last[0]:
            self._last = (total, now)
            return False
        return total >= target and now - self._last[1] >= self.QUIET


def read_database(path: Path, coordinator_key: Any) -> dict[str, Any]:
    """Counts, admitted updates, rounds and every stored global model (decoded and checked).

    Parameters
    ----------
    path : Path
        The coordinator's database.
    coordinator_key : VerifyKey
        Verifies every stored global message.
    """
    from protocol.envelope import decode_message
    from protocol.errors import InvalidMessageError

    db = CoordinatorDb(path)
    models = []
    previous: np.ndarray | None = None
    for rnd, blob, message, sha in db.query(
        "SELECT round, weights, message, sha256 FROM models ORDER BY round"
    ):
        weights = np.frombuffer(blob, dtype="<f4")
        step = None
        if previous is not None and previous.shape == weights.shape:
            step = float(np.linalg.norm(weights.astype(np.float64) - previous))
        previous = weights.astype(np.float64)
        problem = None
        try:
            decoded = decode_message(bytes(message), coordinator_key)
            assert decoded.weights is not None
            if not np.array_equal(decoded.weights, weights) or decoded.header.payload_sha256 != sha:
                problem = "the signed message differs from the stored weights"
        except InvalidMessageError as exc:
            problem = f"the stored message does not verify: {exc}"
        finite = bool(np.isfinite(weights).all())
        models.append(
            {
                "round": int(rnd),
                "finite": finite,
                "max_abs": float(np.max(np.abs(weights))) if finite else float("inf"),
                "step": step,
                "problem": problem,
            }
        )
    rounds = []
    for rnd, status, record in db.query("SELECT round, status, record FROM rounds ORDER BY round"):
        rec = json.loads(record) if record else {}
        decision = rec.get("decision") or {}
        rounds.append(
            {
                "round": int(rnd),
                "status": str(status),
                "test_accuracy": rec.get("test_accuracy"),
                "guard": decision.get("guard"),
                "failure": rec.get("failure"),
                "selected": rec.get("selected"),
            }
        )
    finished = db.query("SELECT value FROM meta WHERE key = 'finished'") == [("1",)]
    return {
        "update_counts": db.update_counts(),
        "status_counted": db.has_status_counts(),
        "status_counts": db.status_counts() if db.has_status_counts() else {},
        "admitted": db.admitted(),
        "models": models,
        "rounds": rounds,
        "finished": finished,
    }


# -- checks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountRow:
    """One line of the counts table."""

    channel: str
    reason: str
    soak: int
    honest: int
    counted: int
    ok: bool
    note: str = ""


def count_rows(outcome: SoakOutcome) -> list[CountRow]:
    """Reason by reason: what the soak sent, what the honest boards added, what the coordinator
    counted, and whether they agree (exactly, except ``duplicate`` and honest statuses, which
    the honest boards' redeliveries and announcements may raise)."""
    db = outcome.db
    honest_admitted = sum(1 for _, c, _, _ in db["admitted"] if c != outcome.compromised)
    rows: list[CountRow] = []
    channels: list[tuple[str, Mapping[str, int]]] = [(UPDATE, db["update_counts"])]
    channels.append((STATUS, db["status_counts"]))
    for channel, counted in channels:
        reasons = {r for ch, r in outcome.expected if ch == channel} | set(counted)
        for reason in sorted(reasons):
            soak = outcome.expected.get((channel, reason), 0)
            got = counted.get(reason, 0)
            if channel == STATUS and not db["status_counted"]:
                rows.append(CountRow(channel, reason, soak, 0, 0, False, "not counted at all"))
                continue
            if reason not in KNOWN_REASONS:
                rows.append(CountRow(channel, reason, soak, 0, got, False, "undocumented reason"))
                continue
            if channel == UPDATE and reason == Reason.ACCEPTED.value:
                honest = honest_admitted
                ok = got == soak + honest
            elif reason == Reason.DUPLICATE.value or (
                channel == STATUS and reason == Reason.ACCEPTED.value
            ):
                honest = max(0, got - soak)
                ok = got >= soak
            else:
                honest = 0
                ok = got == soak
            note = "" if ok else f"expected {soak + honest}, counted {got}"
            rows.append(CountRow(channel, reason, soak, honest, got, ok, note))
    return rows


def checks(outcome: SoakOutcome) -> list[tuple[str, bool, str]]:
    """The soak's checks: (name, passed, detail)."""
    s = outcome.settings
    db = outcome.db
    out: list[tuple[str, bool, str]] = []
    crash_ok = outcome.crash is None and outcome.exit_code == 0
    out.append(
        (
            "0 coordinator crashes",
            crash_ok,
            outcome.crash
            or f"alive throughout, exit status {outcome.exit_code}"
            + (f"; {len(outcome.log_errors)} ERROR line(s) in its log" * bool(outcome.log_errors)),
        )
    )
    stored = db["models"]
    bad = [m["round"] for m in stored if not m["finite"] or m["problem"]]
    bad_mqtt = [g["round"] for g in outcome.mqtt_globals if not g["finite"]]
    largest = max((m["max_abs"] for m in stored), default=0.0)
    out.append(
        (
            "0 non-finite global models",
            not bad and not bad_mqtt and not outcome.global_conflicts and bool(stored),
            f"{len(stored)} stored and {len(outcome.mqtt_globals)} received on the global topic, "
            f"all finite and verified, largest absolute weight {largest:.3g}"
            if not bad and not bad_mqtt and not outcome.global_conflicts
            else f"non-finite or inconsistent: stored {bad}, received {bad_mqtt}, "
            f"{outcome.global_conflicts}",
        )
    )
    rows = count_rows(outcome)
    wrong = [r for r in rows if not r.ok]
    sent = sum(outcome.expected.values())
    out.append(
        (
            "every message counted under its documented reason",
            not wrong and outcome.attacker_unacked == 0,
            f"{sent} messages, {len(rows)} (channel, reason) pairs agree"
            if not wrong
            else "; ".join(f"{r.channel}/{r.reason}: {r.note}" for r in wrong),
        )
    )
    closed = [r["round"] for r in db["rounds"] if r["status"] == "closed"]
    complete = (
        db["finished"]
        and closed == list(range(1, s.rounds + 1))
        and outcome.worker_done
        and not outcome.stalls
    )
    out.append(
        (
            "the run completes",
            bool(complete),
            f"{len(closed)} of {s.rounds} rounds closed, final model published, boards done"
            if complete
            else f"closed {closed}, finished {db['finished']}, boards done {outcome.worker_done}, "
            f"stalls: {outcome.stalls}",
        )
    )
    return out


# -- report ------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import nacl
    import paho.mqtt

    from firmware_sim.broker import find_mosquitto

    mosquitto = "not found"
    exe = find_mosquitto()
    if exe is not None:
        text = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10).stdout
        mosquitto = text.splitlines()[0].replace("mosquitto version ", "") if text else "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "paho-mqtt": paho.mqtt.__version__,
        "pynacl": nacl.__version__,
        "mosquitto": mosquitto,
        "commit": commit or "unknown",
    }


def format_counts(rows: Iterable[CountRow]) -> str:
    """The counts table (Markdown)."""
    lines = [
        "| channel | reason | sent by the soak | added by honest boards | counted by the "
        "coordinator | agrees |",
        "|---|---|---:|---:|---:|---|",
    ]
    total_soak = total_honest = total_counted = 0
    for r in rows:
        lines.append(
            f"| {r.channel} | `{r.reason}` | {r.soak} | {r.honest} | {r.counted} | "
            f"{'yes' if r.ok else 'NO: ' + r.note} |"
        )
        total_soak += r.soak
        total_honest += r.honest
        total_counted += r.counted
    lines.append(f"| all | | {total_soak} | {total_honest} | {total_counted} | |")
    return "\n".join(lines)


def format_checks(results: Iterable[tuple[str, bool, str]]) -> str:
    """The checks table (Markdown)."""
    lines = ["| check | outcome | detail |", "|---|---|---|"]
    for name, ok, detail in results:
        lines.append(f"| {name} | {'**pass**' if ok else '**FAIL**'} | {detail} |")
    return "\n".join(lines)


def format_generators(outcome: SoakOutcome) -> str:
    """Messages per family and generator with their expected reasons (Markdown)."""
    grouped: dict[tuple[str, str], Counter[str]] = {}
    for (family, name, reason), n in outcome.by_generator.items():
        grouped.setdefault((family, name), Counter())[reason] += n
    lines = ["| family | generator | messages | expected reasons |", "|---|---|---:|---|"]
    for (family, name), reasons in sorted(grouped.items()):
        text = ", ".join(f"`{r}` {n}" for r, n in reasons.most_common())
        lines.append(f"| {family} | `{name}` | {sum(reasons.values())} | {text} |")
    return "\n".join(lines)


def format_rounds(outcome: SoakOutcome) -> str:
    """Per round: messages, the compromised board's admitted update, guard, accuracy."""
    db_rounds = {r["round"]: r for r in outcome.db["rounds"]}
    models = {m["round"]: m for m in outcome.db["models"]}
    lines = [
        "| round | fuzz | stolen key | compromised board's admitted update | counted after | "
        "global-model guard | step norm of g_t+1 - g_t | largest abs weight of g_t+1 | "
        "test accuracy |",
        "|---:|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in outcome.rounds:
        rec = db_rounds.get(r.round, {})
        guard = rec.get("guard")
        if guard:
            guard_text = f"{guard.get('action')} (excluded {guard.get('excluded', [])})"
        else:
            guard_text = "not triggered"
        if rec.get("failure"):
            guard_text += f"; failure: {rec['failure']}"
        acc = rec.get("test_accuracy")
        acc_text = "" if acc is None else f"{100 * acc:.1f}%"
        nxt = models.get(r.round + 1)
        largest = "" if nxt is None else f"{nxt['max_abs']:.3g}"
        step = "" if nxt is None or nxt["step"] is None else f"{nxt['step']:.3g}"
        lines.append(
            f"| {r.round} | {r.fuzz} | {r.stolen} | {r.admitted} | {r.seconds_to_count:.1f} s | "
            f"{guard_text} | {step} | {largest} | {acc_text} |"
        )
    return "\n".join(lines)


def write_report(outcome: SoakOutcome, command: str, loads: tuple[str, str], out: Path) -> None:
    """Write the Markdown report."""
    s = outcome.settings
    versions = _versions()
    results = checks(outcome)
    rows = count_rows(outcome)
    sent = sum(outcome.expected.values())
    stolen = sum(n for (f, _, _), n in outcome.by_generator.items() if f == STOLEN_KEY)
    fuzz = sum(n for (f, _, _), n in outcome.by_generator.items() if f == FUZZ)
    verdict = "all checks pass" if all(ok for _, ok, _ in results) else "SOME CHECKS FAIL"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = [
        "# Soak: hostile messages against a live fleet",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; load average (1, 5, 15 min) "
        f"{loads[0]} at the start and {loads[1]} at the end (shared with other jobs).  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".  ",
        f"Fleet: private Mosquitto on loopback (MQTT 5, QoS 1); `siren coordinator run` with "
        f"`{_rule(s)}` behind the global-model guard, digits MLP, test-set evaluation "
        f"{'on' if s.evaluate else 'off'}; {s.boards} honest simulated boards and one "
        f"compromised board ({outcome.compromised}) played by the attacker; {s.rounds} rounds; "
        f"seed {s.seed}.  ",
        f"Wall time: **{outcome.wall_seconds:.0f} s** for {sent} messages "
        f"({fuzz} fuzz, {stolen} signed with the stolen key; "
        f"{outcome.sent_bytes / 1e6:.1f} MB).",
        "",
        f"## Checks: {verdict}",
        "",
        format_checks(results),
        "",
        "## Counts per reason",
        "",
        "The coordinator counts update-topic messages in its `decisions` table and status-topic "
        "messages in `status_decisions` (docs/protocol.md sections 8 and 8.8). Honest boards "
        "add one admitted update per board and round, their status announcements, and QoS 1 "
        "redeliveries counted as `duplicate`; every other count must equal what the soak sent.",
        "",
        format_counts(rows),
        "",
        "## Rounds",
        "",
        "Each round the compromised board's first update is admitted (its payload, sample "
        "count and timestamp at extremes, see the plan in `benchmarks/soak_messages.py`); then "
        "the rest of the batch is sent and counted before the honest boards' updates are "
        "released.",
        "",
        format_rounds(outcome),
        "",
        "## Messages",
        "",
        format_generators(outcome),
        "",
    ]
    text += ["## Reading the numbers", "", *_notes(outcome), ""]
    if outcome.stalls or outcome.log_errors:
        text += ["## Problems seen", ""]
        text += [f"- stall: {x}" for x in outcome.stalls]
        text += [f"- coordinator log: `{x.strip()[:200]}`" for x in outcome.log_errors]
        text.append("")
    out.write_text("\n".join(text))


def _rule(s: SoakSettings) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(s.aggregator_params.items()))
    return f"{s.aggregator}({params})" if params else s.aggregator


def _notes(outcome: SoakOutcome) -> list[str]:
    """What the tables mean, with the run's own examples."""
    notes = [
        "- Reason codes no message here can reach: `wrong_run` (the coordinator subscribes to "
        "its own run's topics only and checks the topic, rule 12, before the run, rule 13, so "
        "a message of another run is `topic_mismatch`), `replayed_nonce` (it takes a second "
        "board key: a second update of the same board is `conflicting_update` first), "
        "`clock_skew` (off by default), `banned` and `quarantined` (an operator's ban, a "
        "restart).",
        "- A byte-identical copy of an admitted update is `duplicate` on any update topic and "
        "in any later round: the coordinator recognises the whole message before admission "
        "runs (docs/protocol.md section 8.1).",
        "- Status messages carry no freshness rule (section 8.8): another board's earlier "
        "status, replayed on its own topic, and the compromised board's statuses with `round` "
        "= 2^53 - 1 and `timestamp_ms` = 0 or 2^53 - 1 are `accepted`; they only set what the "
        "dashboard shows.",
        "- Of the compromised board's updates, only the first of each round is aggregated; "
        "the others are refused by the first rule they break, `conflicting_update` when they "
        "break none of the earlier ones.",
    ]
    db_rounds = {r["round"]: r for r in outcome.db.get("rounds", [])}
    models = {m["round"]: m for m in outcome.db.get("models", [])}
    guarded = [r for r, rec in db_rounds.items() if rec.get("guard")]
    if guarded:
        notes.append(
            f"- The global-model guard left the compromised board's outsized update out in "
            f"round(s) {', '.join(map(str, sorted(guarded)))}; every global model stayed "
            "finite and small."
        )
    if outcome.settings.aggregator == "fedavg":
        heavy = [
            r
            for r in outcome.rounds
            if "samples=max_samples" in r.admitted and not db_rounds.get(r.round, {}).get("guard")
        ]
        steps = {r.round: (models.get(r.round + 1) or {}).get("step") for r in outcome.rounds}
        for r in heavy:
            step = steps.get(r.round)
            others = [v for k, v in steps.items() if v is not None and k != r.round]
            if step is None or not others:
                continue
            notes.append(
                f"- FedAvg weighs updates by their reported sample count: in round {r.round} "
                f"the compromised board's update ({r.admitted.split(',')[0]}) came with "
                "`samples` = max_samples (10^9, the admission bound), took nearly all the "
                f"weight and, being small, passed the guard: the model moved by {step:.3g} "
                f"(median of the other rounds {float(np.median(others)):.3g}). This is the "
                "weight attack; rules that ignore sample counts are not exposed to it."
            )
    return notes


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak, print the tables, write the report; exit status 1 if a check fails."""
    p = argparse.ArgumentParser(prog="siren bench soak", description=help_description(__doc__))
    d = SoakSettings()
    p.add_argument("--boards", type=int, default=None, help=f"honest boards (default: {d.boards})")
    p.add_argument("--rounds", type=int, default=None, help=f"rounds (default: {d.rounds})")
    p.add_argument(
        "--messages", type=int, default=None, help=f"fuzz messages in total (default: {d.messages})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default: {d.seed})")
    p.add_argument(
        "--aggregator", default=d.aggregator, help=f"coordinator rule (default: {d.aggregator})"
    )
    p.add_argument(
        "--agg-param",
        action="append",
        metavar="KEY=VALUE",
        help="coordinator rule parameter, repeatable (e.g. --agg-param f=1 with krum)",
    )
    p.add_argument("--no-evaluate", action="store_true", help="no test-set evaluation")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"a quick run: {SMOKE.boards} honest boards, {SMOKE.rounds} rounds, "
        f"{SMOKE.messages} fuzz messages, no evaluation; no report file unless --out is given",
    )
    p.add_argument("--workdir", default=None, help="fleet files (default: a temporary directory)")
    p.add_argument("--out", default=None, help="Markdown report (default: results/soak.md)")
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else d
    try:
        params = parse_key_values(args.agg_param, "--agg-param")
    except CommandError as exc:
        p.error(str(exc))
    settings = replace(
        base,
        boards=args.boards if args.boards is not None else base.boards,
        rounds=args.rounds if args.rounds is not None else base.rounds,
        messages=args.messages if args.messages is not None else base.messages,
        seed=args.seed,
        aggregator=args.aggregator,
        aggregator_params=params,
        evaluate=base.evaluate and not args.no_evaluate,
    )
    if settings.boards < 1 or settings.rounds < 1 or settings.messages < 0:
        p.error("--boards and --rounds must be >= 1 and --messages >= 0")
    command = "siren bench soak " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = _load()
    # SIGTERM unwinds like Ctrl-C, so the broker and the coordinator are stopped on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="siren-soak-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        outcome = run_soak(settings, workdir, progress=lambda line: print(line, flush=True))
        out = Path(args.out) if args.out else None if args.smoke else RESULTS / "soak.md"
        if out is not None:
            write_report(outcome, command.strip(), (load_start, _load()), out)
    signal.signal(signal.SIGTERM, previous)
    results = checks(outcome)
    print(format_counts(count_rows(outcome)))
    print()
    print(format_checks(results))
    print(f"wall time {outcome.wall_seconds:.0f} s" + (f"; wrote {out}" if out else ""))
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
