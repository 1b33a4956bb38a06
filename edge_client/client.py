"""The board program over MQTT: receive the signed global model, run the board step, publish.

Three layers, so that one real board and a simulated fleet of hundreds share the same code:

* :class:`BoardLink` -- one board's MQTT connection (paho-mqtt 2, callback API version 2,
  MQTT v5, QoS 1). It subscribes to the retained global model, announces the board on its
  retained status topic with a signed Last Will of ``offline``, reconnects with exponential
  back-off, and only *enqueues* what arrives: nothing is computed on paho's network thread.
* :class:`BoardAgent` -- one board's protocol logic without I/O: verify a global model with the
  pinned coordinator key, decide what to do (train, resend the pending update, ignore, finish),
  seal a :class:`~edge_client.board.BoardUpdate` into a signed message under the size limit,
  and persist the state (:mod:`edge_client.store`) *before* the message is published.
* :class:`BoardClient` -- the standalone program ``siren client run``: one agent, one link, and
  a loop on the main thread that calls :func:`edge_client.board.board_step`.

Recovery rules. A board republishes its pending update, byte for byte, whenever it sees the
global model of the round it already trained for (after a reconnect the broker redelivers the
retained global; the coordinator also re-announces a stalled round). The coordinator recognises
the identical message as a duplicate, so nothing is trained or counted twice.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from edge_client.board import BoardData, BoardState, BoardUpdate, board_step
from edge_client.config import BoardConfig, BrokerSettings, ConfigError
from edge_client.errors import BoardStateError, EdgeClientError
from edge_client.netloop import SharedNetworkLoop
from edge_client.store import STATE_FILE, BoardRecord, BoardStore, DiskBoardStore
from edge_client.telemetry import Sensors, round_figures, sampled
from models.settings import SplitSettings
from models.tf_setup import freeze_startup_objects
from protocol.admission import AdmissionPolicy
from protocol.envelope import Message, check_global, encode_status, encode_update
from protocol.errors import InvalidMessageError
from protocol.layout import TensorLayout
from protocol.mqtt import make_mqtt_client, wait_for_broker
from protocol.topics import global_topic, status_topic, update_topic

logger = logging.getLogger(__name__)

#: QoS of every message of the protocol.
QOS = 1
#: Connection refusals that mean the broker no longer accepts this board's credentials (MQTT v5
#: reason strings, as paho names them).
REFUSED_CREDENTIALS = frozenset({"Not authorized", "Bad user name or password"})


class UpdateTooLargeError(EdgeClientError):
    """A sealed update exceeds the message size limit; it is not published."""


@dataclass(frozen=True)
class LinkEvent:
    """Something that happened on a board's connection (put on the owner's queue).

    Attributes
    ----------
    kind : str
        ``"message"``, ``"connected"`` or ``"disconnected"``.
    client_id : str
        The board whose link it is.
    topic : str
        Topic of a message.
    payload : bytes
        Message bytes.
    received_at : float
        ``time.time()`` at arrival.
    """

    kind: str
    client_id: str
    topic: str = ""
    payload: bytes = b""
    received_at: float = field(default_factory=time.time)


class BoardLink:
    """One board's MQTT connection: subscription, status announcements, Last Will, publishing.

    Parameters
    ----------
    settings : BrokerSettings
        Broker address, credentials, TLS.
    run, client_id : str
        Topic levels; ``client_id`` is also the MQTT client id.
    signing_key : SigningKey
        Signs the board's status messages.
    inbox : queue.Queue
        Receives a :class:`LinkEvent` for every connection change and received message.
    status : callable, optional
        Returns ``(round, model_sha256)`` of the global model held, for the status message.
    network : SharedNetworkLoop, optional
        Drive the connection from this shared loop (many boards per process) instead of a
        paho network thread of its own.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        run: str,
        client_id: str,
        signing_key: SigningKey,
        inbox: queue.Queue[LinkEvent],
        status: Callable[[], tuple[int, str]] | None = None,
        network: SharedNetworkLoop | None = None,
    ) -> None:
        self.settings = settings
        self.network = network
        self.run = run
        self.client_id = client_id
        self.signing_key = signing_key
        self.inbox = inbox
        self.status = status or (lambda: (0, "0" * 64))
        self.figures: tuple[int, dict[str, float]] | None = None
        self.connected = threading.Event()
        self.bytes_in = 0
        self.bytes_out = 0
        self.connects = 0
        self._lock = threading.Lock()
        self._unacked: set[int] = set()
        self._acked: set[int] = set()
        self._client = make_mqtt_client(settings, client_id)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = lambda c, u: logger.warning(
            "%s: cannot connect to the broker %s:%d; retrying",
            client_id,
            settings.host,
            settings.port,
        )
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.will_set(
            status_topic(run, client_id), self._status_bytes(False), qos=QOS, retain=True
        )

    def _status_bytes(self, online: bool) -> bytes:
        return self.status_message(online)

    def status_message(self, online: bool = True) -> bytes:
        """The board's signed status now: the round and model it holds and, when it holds the
        round of :attr:`figures`, that round's telemetry figures."""
        round_held, sha = self.status()
        figures = self.figures
        telemetry = figures[1] if figures is not None and figures[0] == round_held else None
        fields: dict[str, Any] = {
            "run": self.run,
            "client": self.client_id,
            "signing_key": self.signing_key,
            "online": online,
            "round": max(0, round_held),
            "model_sha256": sha or "0" * 64,
        }
        try:
            return encode_status(**fields, telemetry=telemetry)
        except InvalidMessageError as exc:  # a figure outside the protocol's domain
            logger.warning("%s: status sent without telemetry: %s", self.client_id, exc)
            return encode_status(**fields)

    # -- paho callbacks: network thread, enqueue only ---------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            hint = ""
            if str(reason) in REFUSED_CREDENTIALS:
                hint = (
                    " (this board's credentials were revoked or replaced: install the bundle "
                    "the operator made for it; retrying)"
                )
            logger.warning("%s: broker refused the connection: %s%s", self.client_id, reason, hint)
            return
        self.connects += 1
        client.subscribe(global_topic(self.run), qos=QOS)
        client.publish(
            status_topic(self.run, self.client_id), self._status_bytes(True), qos=QOS, retain=True
        )
        self.connected.set()
        self.inbox.put(LinkEvent("connected", self.client_id))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if any(getattr(r, "is_failure", False) for r in reasons):
            logger.warning(
                "%s: the broker refused the subscription to the global model (%s): this board "
                "has no rights on the broker (revoked, or missing from its ACL): ask the "
                "operator",
                self.client_id,
                ", ".join(str(r) for r in reasons),
            )

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self.connected.is_set() and getattr(reason, "is_failure", False):
            logger.warning("%s: disconnected from the broker (%s)", self.client_id, reason)
        self.connected.clear()
        self.inbox.put(LinkEvent("disconnected", self.client_id))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            logger.warning(
                "%s: the broker refused a message of this board (%s): it has no rights on the "
                "broker any more (revoked?): ask the operator",
                self.client_id,
                reason,
            )
        with self._lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._acked.add(mid)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        payload = bytes(message.payload)
        with self._lock:
            self.bytes_in += len(payload)
        self.inbox.put(LinkEvent("message", self.client_id, message.topic, payload))

    # -- called from the owner's thread ------------------------------------------------------

    def start(self) -> None:
        """Connect asynchronously; reconnects with back-off by itself.

        Without a shared loop the connection gets paho's own network thread; with one, the
        shared loop's thread drives it.
        """
        s = self.settings
        if self.network is not None:
            self.network.add(
                self._client,
                s.host,
                s.port,
                keepalive=s.keepalive,
                reconnect_min=s.reconnect_min,
                reconnect_max=s.reconnect_max,
            )
            return
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive)
        self._client.loop_start()

    def _on_network(self, action: Callable[[], None]) -> None:
        if self.network is not None:
            self.network.call_soon(action)
        else:
            action()

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        # Never call paho with our lock held: paho delivers an acknowledgement to _on_publish
        # (which takes our lock) while holding its own outgoing-message lock, which publish()
        # needs too -- holding ours across publish() deadlocks both threads as soon as an
        # acknowledgement arrives during a publish (e.g. a small status followed at once by an
        # update). _track copes with the acknowledgement arriving before it.
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        with self._lock:
            self._track(info.mid)

    def publish_update(self, payload: bytes) -> None:
        """Publish a signed update (QoS 1); paho resends it after a reconnect until acknowledged."""
        with self._lock:
            self.bytes_out += len(payload)
        topic = update_topic(self.run, self.client_id)
        self._on_network(lambda: self._publish(topic, payload))

    def report(self, round_index: int, figures: dict[str, float]) -> None:
        """Publish the retained ``online`` status carrying the telemetry figures of a round.

        The figures go with every later status of the board while it holds that round's model
        (a reconnect's ``online``, the ``offline`` on a clean stop), so the retained status
        topic keeps the latest figures; a status for another round carries none.
        """
        self.figures = (round_index, dict(figures))
        self.announce(online=True)

    def publish_status(self, payload: bytes) -> None:
        """Publish a signed status message (retained, QoS 1) on the board's status topic."""
        topic = status_topic(self.run, self.client_id)
        self._on_network(lambda: self._publish(topic, payload, retain=True))

    def announce(self, online: bool = True) -> None:
        """Publish the retained ``online`` (or ``offline``) status again."""
        topic = status_topic(self.run, self.client_id)
        payload = self._status_bytes(online)
        self._on_network(lambda: self._publish(topic, payload, retain=True))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every outgoing message was acknowledged; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._unacked:
                    return True
            time.sleep(0.02)
        return False

    def _track(self, mid: int) -> None:
        # Called with the lock held. The acknowledgement may have arrived before we got here.
        if mid in self._acked:
            self._acked.discard(mid)
        else:
            self._unacked.add(mid)

    def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop driving the connection."""
        if self.network is not None:
            client = self._client

            def disconnect() -> None:
                client.disconnect()
                client.loop_write()

            with contextlib.suppress(TimeoutError, OSError):
                self.network.call(disconnect, timeout=5.0)
            self.network.remove(client)
            return
        self._client.disconnect()
        self._client.loop_stop()

    def stop(self, *, offline: bool = True, timeout: float = 5.0) -> None:
        """Announce ``offline`` (retained), flush, disconnect cleanly and stop the thread."""
        if offline and self.connected.is_set():
            self.announce(online=False)
        self.flush(timeout)
        self.close()


@dataclass(frozen=True)
class Plan:
    """What a board does with a verified global model: ``action`` is ``"train"``, ``"resend"``,
    ``"sit_out"`` (the round's selection does not name the board), ``"ignore"`` or
    ``"finish"``; ``reason`` says why."""

    action: str
    reason: str = ""


class BoardAgent:
    """One board's protocol logic: verify, plan, seal and persist; no network and no training.

    Parameters
    ----------
    client_id, run : str
        Identity in the protocol.
    index : int
        Position in the fleet; seeds the board's per-round randomness
        (``default_rng([seed, round, index])``, as in the in-process engine).
    signing_key : SigningKey
        The board's private key.
    coordinator_key : VerifyKey
        The coordinator's public key pinned at provisioning.
    layout : TensorLayout
        The model's tensor layout.
    store : BoardStore
        Where the state persists.
    rounds : int
        The run's length: a global model for a later round is the final model (0: unbounded).
    seed : int
        Run seed.
    max_message_bytes : int, optional
        Largest update message published; default: the coordinator's default admission limit.

    Raises
    ------
    BoardStateError
        If the stored state belongs to another run or board.
    """

    def __init__(
        self,
        *,
        client_id: str,
        run: str,
        index: int,
        signing_key: SigningKey,
        coordinator_key: VerifyKey,
        layout: TensorLayout,
        store: BoardStore,
        rounds: int = 0,
        seed: int = 0,
        max_message_bytes: int | None = None,
    ) -> None:
        self.client_id = client_id
        self.run = run
        self.index = index
        self.signing_key = signing_key
        self.coordinator_key = coordinator_key
        self.layout = layout
        self.store = store
        self.rounds = rounds
        self.seed = seed
        self.max_message_bytes = max_message_bytes or AdmissionPolicy(layout).size_limit
        loaded = store.load()
        if loaded is not None and (loaded.run != run or loaded.client_id != client_id):
            raise BoardStateError(
                f"stored state belongs to run {loaded.run!r} board {loaded.client_id!r}, "
                f"not run {run!r} board {client_id!r}"
            )
        self.record = loaded or BoardRecord(run=run, client_id=client_id, index=index)
        if loaded is not None:
            logger.info(
                "%s: resumed state: last round %d, global round %d, pending update %s",
                client_id,
                loaded.last_round,
                loaded.global_round,
                "yes" if loaded.pending else "no",
            )

    @property
    def state(self) -> BoardState:
        """The :class:`BoardState` handed to :func:`~edge_client.board.board_step`."""
        return BoardState(self.index, self.record.previous_local, self.record.last_round)

    @property
    def finished(self) -> bool:
        """The final global model of the run was received."""
        return self.record.finished

    def held(self) -> tuple[int, str]:
        """``(round, model hash)`` of the newest global model held (for status messages)."""
        return self.record.global_round, self.record.global_sha256

    def verify_global(self, payload: bytes) -> Message | None:
        """Verify a message of the global topic with the pinned coordinator key.

        Returns ``None`` (and logs the reason) for anything that is not a valid global model of
        this run with this model's layout; the board then keeps what it has.
        """
        try:
            return check_global(
                payload,
                self.coordinator_key,
                run=self.run,
                expected_layout=self.layout,
                max_message_bytes=max(
                    self.max_message_bytes, AdmissionPolicy(self.layout).size_limit
                ),
            )
        except InvalidMessageError as exc:
            logger.warning("%s: refused a global message: %s: %s", self.client_id, exc.reason, exc)
            return None

    def plan(self, message: Message) -> Plan:
        """Decide what a verified global model means for this board.

        * a round after ``rounds`` -> ``finish`` (it is the run's final model);
        * older than the newest held -> ``ignore``;
        * the round already trained for -> ``resend`` the pending update (or ``ignore``);
        * a newer round whose selection (client sampling, ``docs/protocol.md`` 4.3) does not
          name this board -> ``sit_out``: no training, no update; the board keeps its own
          latest local model, which its next alarm compares with (SIREN under sampling);
        * a newer round -> ``train``.
        """
        t = message.round
        if self.rounds and t > self.rounds:
            return Plan("finish", f"global model of round {t} ends the {self.rounds}-round run")
        if t < self.record.global_round:
            return Plan("ignore", f"round {t} is older than the held round")
        if t <= self.record.last_round:
            if t == self.record.last_round and self.record.pending is not None:
                return Plan("resend", f"round {t} already trained; resending its update")
            return Plan("ignore", f"round {t} already done")
        if not message.header.selects(self.client_id):
            return Plan("sit_out", f"round {t}: not among the boards drawn for it")
        return Plan("train", f"new round {t}")

    def rng(self, round_index: int) -> np.random.Generator:
        """The board's randomness for a round (same seeding as the in-process engine)."""
        return np.random.default_rng([self.seed, round_index, self.index])

    def seal(self, update: BoardUpdate, new_state: BoardState, message: Message) -> bytes:
        """Sign ``update`` as the board's message for ``message.round`` and persist the state.

        The state (new local model, round, the signed bytes) is saved before the caller
        publishes, so a board killed afterwards republishes the very same message.

        Raises
        ------
        UpdateTooLargeError
            If the message exceeds ``max_message_bytes`` (nothing is saved or sent).
        """
        payload = encode_update(
            run=self.run,
            round=message.round,
            client=self.client_id,
            signing_key=self.signing_key,
            delta=update.delta,
            layout=self.layout,
            base_sha256=message.header.payload_sha256,
            samples=int(update.num_samples),
            alarm=bool(update.alarm),
            check_finite=False,
        )
        if len(payload) > self.max_message_bytes:
            raise UpdateTooLargeError(
                f"update for round {message.round} is {len(payload)} bytes, more than the "
                f"limit of {self.max_message_bytes}; not published"
            )
        self.record = self.record.evolve(
            last_round=message.round,
            previous_local=new_state.previous_local,
            global_round=message.round,
            global_sha256=message.header.payload_sha256,
            pending=payload,
        )
        self.store.save(self.record)
        return payload

    def skip(self, message: Message) -> None:
        """Record that the global model of a round was received but no update is sent."""
        self.record = self.record.evolve(
            global_round=max(self.record.global_round, message.round),
            global_sha256=message.header.payload_sha256,
        )
        self.store.save(self.record)

    def finish(self, message: Message) -> None:
        """Record the run's final global model."""
        self.record = self.record.evolve(
            global_round=message.round,
            global_sha256=message.header.payload_sha256,
            pending=None,
            finished=True,
        )
        self.store.save(self.record)


@dataclass
class BoardRuntime:
    """What a board computes with: its data, the trainer, the alarm evaluator and settings."""

    data: BoardData
    trainer: Any
    layout: TensorLayout
    evaluator: Any = None
    alarm: Any = None


def finished_run(config: BoardConfig) -> str | None:
    """A one-line notice when the board's stored state says its run is over, else None.

    Reads only the state file (no TensorFlow), so a finished board exits in a second instead of
    loading its runtime first.

    Raises
    ------
    BoardStateError
        If the state belongs to another run or board (the message says how to start afresh).
    """
    record = DiskBoardStore(config.state_dir).load()
    if record is None:
        return None
    if record.run != config.run or record.client_id != config.client_id:
        raise BoardStateError(
            f"{config.state_dir} holds the state of run {record.run!r} board "
            f"{record.client_id!r}, not run {config.run!r} board {config.client_id!r}; to join "
            f"this run as a new board, archive it: siren client reset --config <board.toml>"
        )
    if not record.finished:
        return None
    return (
        f"{config.client_id}: run {config.run!r} is finished (final global model of round "
        f"{record.global_round} held); nothing to do. To take part in a new run: "
        "siren client reset --config <board.toml> with the new run's settings"
    )


def archive_state(config: BoardConfig) -> Path | None:
    """Move the board's state folder aside to ``<state_dir>.<UTC time>`` and create an empty
    one (same permissions); return the archive's path, or None when there was no state."""
    state = Path(config.state_dir)
    if not (state / STATE_FILE).exists():
        state.mkdir(parents=True, mode=0o700, exist_ok=True)
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = state.with_name(f"{state.name}.{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = state.with_name(f"{state.name}.{stamp}.{n}")
    state.rename(target)
    state.mkdir(mode=0o700)
    return target


def load_board_data(config: BoardConfig) -> BoardData:
    """The board's private data per ``[data]``: an npz file, or shard ``index`` of the seeded
    federated split (the same split the simulator and the coordinator's root set use)."""
    data = config.data
    if data.source == "npz":
        assert data.path is not None
        try:
            with np.load(data.path, allow_pickle=False) as arrays:
                return BoardData(
                    np.asarray(arrays["x_train"], dtype=np.float32),
                    np.asarray(arrays["y_train"], dtype=np.int64),
                    np.asarray(arrays["x_test"], dtype=np.float32),
                    np.asarray(arrays["y_test"], dtype=np.int64),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"cannot read board data {data.path}: {exc}") from None
    if not 0 <= config.index < data.clients:
        raise ConfigError(f"board.index {config.index} is outside 0..{data.clients - 1}")
    return split_shards(data, only=config.index)[0]


def split_shards(split: SplitSettings, *, only: int | None = None) -> list[BoardData]:
    """The boards' data of the seeded federated split ``split`` (the same split the simulator
    and the coordinator's root set use), in board order; ``only``: just that board's."""
    from models.datasets import load_dataset
    from models.partition import make_federated_split

    ds = load_dataset(split.dataset)
    if split.train_samples is not None or split.test_samples is not None:
        ds = ds.subset(split.train_samples, split.test_samples)
    federated = make_federated_split(
        ds.y_train,
        split.clients,
        split.partition,
        p=split.noniid_p,
        alpha=split.dirichlet_alpha,
        classes=split.classes_per_board,
        root_size=split.root_size,
        local_test_fraction=split.local_test_fraction,
        seed=split.split_seed,
    )
    shards = federated.shards if only is None else [federated.shards[only]]
    return [
        BoardData(
            ds.x_train[shard.train_idx],
            ds.y_train[shard.train_idx],
            ds.x_train[shard.test_idx],
            ds.y_train[shard.test_idx],
        )
        for shard in shards
    ]


def build_runtime(config: BoardConfig, data: BoardData | None = None) -> BoardRuntime:
    """Load data, build the trainer and, with the alarm on, the LiteRT evaluator.

    ``[training] backend = "keras"`` builds a TensorFlow trainer; ``"litert"`` loads the
    model's LiteRT training artifact and never imports TensorFlow (the alarm then runs in
    LiteRT too, from the same artifact).
    """
    from models.zoo import DEFAULT_MODEL

    board_data = data if data is not None else load_board_data(config)
    model = config.training.model or DEFAULT_MODEL.get(config.data.dataset)
    if model is None:
        raise ConfigError(
            f"training.model is needed for data {config.data.source!r} / "
            f"{config.data.dataset!r} (e.g. siren-cnn, digits-mlp)"
        )
    if config.training.backend == "litert":
        return _litert_runtime(config, board_data, model)
    from edge_client.alarm import AlarmConfig
    from models.tf_setup import seed_everything
    from models.training import Trainer

    seed_everything(config.seed)
    train_cfg = _train_config(config, model)
    trainer = Trainer(
        model,
        tuple(board_data.x_train.shape[1:]),
        config.training.num_classes,
        train_cfg,
        seed=config.seed,
    )
    logger.info("%s: local training runs in keras (TensorFlow)", config.client_id)
    evaluator = None
    alarm = None
    if config.alarm.enabled:
        from models.litert import make_evaluator

        evaluator = make_evaluator(trainer.model, prefer=config.alarm.backend)
        alarm = AlarmConfig.for_profile(
            config.alarm.profile, config.alarm.threshold, config.alarm.rule
        )
        if evaluator.backend != config.alarm.backend:
            logger.warning(
                "%s: alarm backend %s asked for but unavailable (no ai-edge-litert or "
                "tflite-runtime installed): the alarm runs in %s",
                config.client_id,
                config.alarm.backend,
                evaluator.backend,
            )
        else:
            logger.info(
                "%s: SIREN alarm runs in %s (%s)",
                config.client_id,
                evaluator.backend,
                type(evaluator).__name__,
            )
    else:
        logger.info("%s: SIREN alarm off ([alarm] enabled = false)", config.client_id)
    layout = TensorLayout(trainer.layout.as_list())
    return BoardRuntime(board_data, trainer, layout, evaluator, alarm)


def _train_config(config: BoardConfig, model: str) -> Any:
    from models.training import TrainConfig

    return TrainConfig(
        epochs=config.training.epochs,
        batch_size=config.training.batch_size,
        learning_rate=config.training.resolved_lr(model),
        optimizer=config.training.optimizer,
    )


def _litert_runtime(config: BoardConfig, board_data: BoardData, model: str) -> BoardRuntime:
    """The ``litert`` backend: trainer and alarm from the training artifact, no TensorFlow."""
    from edge_client.alarm import AlarmConfig
    from models.errors import ModelsError
    from models.litert_artifact import TrainingArtifact
    from models.litert_trainer import LiteRTTrainer, artifact_evaluator

    assert config.training.artifact is not None  # TrainingSettings checks it
    try:
        artifact = TrainingArtifact.load(config.training.artifact)
        trainer = LiteRTTrainer(artifact, _train_config(config, model), model_name=model)
    except ModelsError as exc:  # unreadable artifact, another model, no LiteRT runtime
        raise ConfigError(str(exc)) from None
    shape = tuple(board_data.x_train.shape[1:])
    if shape != artifact.input_shape or config.training.num_classes != artifact.num_classes:
        raise ConfigError(
            f"the LiteRT training artifact takes {artifact.input_shape} images and "
            f"{artifact.num_classes} classes; the board's data has {shape} images and "
            f"training.num_classes is {config.training.num_classes}"
        )
    logger.info(
        "%s: local training runs in litert (%s, %s; no TensorFlow)",
        config.client_id,
        config.training.artifact,
        artifact.built_with or "unknown converter",
    )
    evaluator = None
    alarm = None
    if config.alarm.enabled:
        evaluator = artifact_evaluator(artifact)
        alarm = AlarmConfig.for_profile(
            config.alarm.profile, config.alarm.threshold, config.alarm.rule
        )
        if config.alarm.backend != "litert":
            logger.warning(
                "%s: alarm backend %s asked for, but a litert board has no TensorFlow: the "
                "alarm runs in litert",
                config.client_id,
                config.alarm.backend,
            )
        logger.info(
            "%s: SIREN alarm runs in litert (%s)", config.client_id, type(evaluator).__name__
        )
    else:
        logger.info("%s: SIREN alarm off ([alarm] enabled = false)", config.client_id)
    layout = TensorLayout(artifact.layout.as_list())
    return BoardRuntime(board_data, trainer, layout, evaluator, alarm)


class BoardClient:
    """The standalone board program (``siren client run``): one agent, one link, one loop.

    Parameters
    ----------
    config : BoardConfig
        The board's settings.
    runtime : BoardRuntime, optional
        Data, trainer and evaluator; built from ``config`` by default (imports TensorFlow
        with the keras training backend, never with litert).
    sensors : Sensors, optional
        Where the round's telemetry comes from (default: this machine's sysfs, ``vcgencmd``,
        ``tegrastats``; :mod:`edge_client.telemetry`).
    """

    def __init__(
        self,
        config: BoardConfig,
        runtime: BoardRuntime | None = None,
        sensors: Sensors | None = None,
    ) -> None:
        from protocol.keys import load_signing_key, load_verify_key

        self.config = config
        self.runtime = runtime or build_runtime(config)
        self.signing_key = load_signing_key(config.key_dir)
        self.coordinator_key = load_verify_key(config.coordinator_key)
        store: BoardStore = DiskBoardStore(config.state_dir)
        self.agent = BoardAgent(
            client_id=config.client_id,
            run=config.run,
            index=config.index,
            signing_key=self.signing_key,
            coordinator_key=self.coordinator_key,
            layout=self.runtime.layout,
            store=store,
            rounds=config.rounds,
            seed=config.seed,
            max_message_bytes=config.max_message_bytes,
        )
        self.inbox: queue.Queue[LinkEvent] = queue.Queue()
        self.link = BoardLink(
            config.broker,
            run=config.run,
            client_id=config.client_id,
            signing_key=self.signing_key,
            inbox=self.inbox,
            status=self.agent.held,
        )
        self.rounds_trained = 0
        self.sensors = sensors if sensors is not None else Sensors()

    def run(self, stop: threading.Event | None = None) -> int:
        """Serve until the run's final global model arrives or ``stop`` is set; return 0."""
        stop = stop or threading.Event()
        if self.agent.finished:
            logger.info("%s: the run is already finished", self.config.client_id)
            return 0
        present = self.sensors.describe()
        logger.info(
            "%s: telemetry: %s",
            self.config.client_id,
            "; ".join(f"{what}: {value}" for what, value in present.items()),
        )
        freeze_startup_objects()
        s = self.config.broker
        cid = self.config.client_id
        if not wait_for_broker(
            s, stop, lambda m: logger.error("%s: broker %s:%d: %s", cid, s.host, s.port, m)
        ):
            return 0
        self.link.start()
        topic = global_topic(self.config.run)
        try:
            while not stop.is_set() and not self.agent.finished:
                try:
                    event = self.inbox.get(timeout=0.25)
                except queue.Empty:
                    continue
                if event.kind != "message" or event.topic != topic:
                    continue
                newest = event
                # Several globals queued (e.g. after a long training): only the newest counts.
                while True:
                    try:
                        more = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    if more.kind == "message" and more.topic == topic:
                        newest = more
                self.handle_global(newest.payload)
        finally:
            self.link.stop(offline=True)
            self.sensors.close()
        return 0

    def handle_global(self, payload: bytes) -> Plan | None:
        """Verify, plan and act on one global message (train and publish, resend, finish)."""
        message = self.agent.verify_global(payload)
        if message is None:
            return None
        plan = self.agent.plan(message)
        cid = self.config.client_id
        if plan.action == "finish":
            self.agent.finish(message)
            logger.info("%s: final global model received (round %d)", cid, message.round)
        elif plan.action == "sit_out":
            self.agent.skip(message)
            logger.info("%s: %s; sitting it out", cid, plan.reason)
        elif plan.action == "resend":
            assert self.agent.record.pending is not None
            logger.info("%s: %s", cid, plan.reason)
            self.link.publish_update(self.agent.record.pending)
        elif plan.action == "train":
            rt = self.runtime
            assert message.weights is not None
            with sampled(self.sensors) as seen:
                update, new_state = board_step(
                    self.agent.state,
                    message.weights,
                    message.round,
                    rt.data,
                    rt.trainer,
                    self.agent.rng(message.round),
                    evaluator=rt.evaluator,
                    alarm=rt.alarm,
                )
            try:
                sealed = self.agent.seal(update, new_state, message)
            except UpdateTooLargeError as exc:
                logger.error("%s: %s", cid, exc)
                self.agent.skip(message)
                return plan
            figures = round_figures(
                update,
                seen=seen,
                peak_rss_mib=self.sensors.peak_rss_mib(),
                throttled=self.sensors.throttled(),
            )
            # The figures go out just before the update, on the same connection, so the
            # coordinator has them before the update can close the round (and end the run).
            self.link.report(message.round, figures)
            self.link.publish_update(sealed)
            self.rounds_trained += 1
            logger.info(
                "%s: round %d trained in %.2fs (alarm %s), update of %d bytes published",
                cid,
                message.round,
                update.train_seconds,
                update.alarm,
                len(sealed),
            )
            logger.debug("%s: round %d telemetry %s", cid, message.round, figures)
        return plan
