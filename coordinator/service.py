"""The coordinator service: the round engine over MQTT.

:class:`CoordinatorService` connects a :class:`coordinator.engine.RoundEngine` to the broker: it
publishes each round's signed global model retained on ``siren/v1/<run>/global``, subscribes to
the boards' update and status topics and hands every message to the engine. Network callbacks
only enqueue: admission, aggregation and evaluation run on the service's own thread, and an
update's MQTT acknowledgement is sent only once the engine committed its outcome (paho
``manual_ack``), so the broker redelivers whatever was not committed. A round that makes no
progress is re-announced. Operator actions from the HTTP API run on the same thread, between
two messages (:meth:`CoordinatorService.call`, :class:`coordinator.controls.ServiceControls`).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.engine import RoundEngine
from models.tf_setup import freeze_startup_objects
from protocol.mqtt import make_mqtt_client, wait_for_broker
from protocol.topics import (
    KIND_STATUS,
    KIND_UPDATE,
    global_topic,
    parse_topic,
    status_subscription,
    update_subscription,
)

logger = logging.getLogger(__name__)

QOS = 1


@dataclass(frozen=True)
class _Inbound:
    kind: str
    topic: str = ""
    payload: bytes = b""
    mid: int = 0
    qos: int = 0
    received_at: float = 0.0
    origin: int = -1  # the admission process that received it (-1: this process)


class CoordinatorService:
    """Runs a :class:`RoundEngine` against the broker.

    Parameters
    ----------
    config : CoordinatorConfig
        Broker settings, resend interval, ``exit_when_done``.
    engine : RoundEngine
        The round logic (already constructed; :meth:`run` starts it).
    """

    def __init__(self, config: CoordinatorConfig, engine: RoundEngine) -> None:
        self.config = config
        self.engine = engine
        self.inbox: queue.Queue[_Inbound] = queue.Queue()
        self.connected = threading.Event()
        self.announcements = 0
        self._client: Any = None
        self._last_info: Any = None
        self._last_progress = 0.0
        self._resend_after = config.resend_interval
        self._commands: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        # Messages taken from the inbox but left for after the open buffer closes (buffered
        # asynchronous mode: a version aggregates exactly B updates).
        self._deferred: collections.deque[_Inbound] = collections.deque()
        self.running = threading.Event()

    def _make_client(self, resumed: bool) -> Any:
        """The paho client. A resumed run reconnects to its broker session (clean start off),
        so updates queued by the broker while the coordinator was down are delivered; a new run
        starts a clean session (nothing left over from an earlier run of the same id) and keeps
        it across reconnects. (MQTT 3.1.1 has no such choice per connection: the session is
        always kept.)"""
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.config.broker
        v5 = s.protocol == 5
        client = make_mqtt_client(
            s,
            s.username or f"coordinator-{self.config.run}",
            manual_ack=True,
            persistent_session=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = lambda c, u: logger.warning(
            "cannot connect to the broker %s:%d; retrying", s.host, s.port
        )
        client.on_message = self._on_message
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry
            client.connect_async(
                s.host,
                s.port,
                keepalive=s.keepalive,
                clean_start=False if resumed else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        else:
            client.connect_async(s.host, s.port, keepalive=s.keepalive)
        return client

    # -- paho callbacks: enqueue only --------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            logger.warning("broker refused the coordinator: %s", reason)
            return
        run = self.config.run
        client.subscribe([(update_subscription(run), QOS), (status_subscription(run), QOS)])
        self.connected.set()
        self.inbox.put(_Inbound("connected"))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self.connected.is_set():
            logger.warning("disconnected from the broker (%s); reconnecting", reason)
        self.connected.clear()
        self.inbox.put(_Inbound("disconnected"))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.inbox.put(
            _Inbound(
                "message",
                message.topic,
                bytes(message.payload),
                int(message.mid),
                int(message.qos),
                time.time(),
            )
        )

    # -- main loop ---------------------------------------------------------------------------

    def _announce(self, *, new_round: bool = False) -> None:
        self._last_info = self._client.publish(
            global_topic(self.config.run), self.engine.global_message, qos=QOS, retain=True
        )
        self.announcements += 1
        self._last_progress = time.monotonic()
        if new_round:
            self._resend_after = self.config.resend_interval

    def _maybe_reannounce(self) -> None:
        """Re-announce the global model of a round that made no progress for a while.

        Boards that already trained answer with their pending update (a duplicate for those
        that got through), so an update lost anywhere -- in a crashed broker, in a coordinator
        killed before its commit -- is sent again. The wait starts at ``resend_interval``, is
        counted from the last admitted update, and doubles after every re-announcement (up to
        8 times), so slow rounds are not flooded with copies of the model.
        """
        interval = self.config.resend_interval
        missing = self.engine.missing()
        if interval <= 0 or not self.connected.is_set() or not missing:
            return
        if time.monotonic() - self._last_progress < self._resend_after:
            return
        logger.info(
            "round %d: no progress for %.0f s, %d board(s) missing; re-announcing the model",
            self.engine.round,
            self._resend_after,
            len(missing),
        )
        self._announce()
        self._resend_after = min(2 * self._resend_after, 8 * interval)

    def run(self, stop: threading.Event | None = None) -> int:
        """Serve rounds until the run is finished (and ``exit_when_done``) or ``stop`` is set."""
        stop = stop or threading.Event()
        engine = self.engine
        resumed = engine.store.initialized
        engine.start()
        freeze_startup_objects()
        s = self.config.broker
        # A finished run started again only announces its final model once more: one probe
        # of the broker, not a wait for it (no process left hanging on a broker that is gone).
        done = engine.finished and self.config.exit_when_done
        if not wait_for_broker(
            s,
            stop,
            lambda m: logger.error("broker %s:%d: %s", s.host, s.port, m),
            attempts=1 if done else None,
        ):
            if done and not stop.is_set():
                logger.warning(
                    "run %s is finished and the broker did not answer: its final model was "
                    "not announced again (the broker keeps the one announced when the run "
                    "finished, unless it lost its retained messages)",
                    self.config.run,
                )
            return 0
        self._client = self._make_client(resumed)
        self._last_progress = time.monotonic()
        self._resend_after = self.config.resend_interval
        self._client.loop_start()
        done_at: float | None = None
        self.running.set()
        try:
            while not stop.is_set():
                try:
                    event = self._deferred.popleft() if self._deferred else None
                    if event is None:
                        event = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    event = None
                if event is not None:
                    self._handle_burst(event)
                if engine.finished:
                    if done_at is None:
                        done_at = time.monotonic()
                    if self.config.exit_when_done and self._flushed(done_at):
                        break
                    continue
                self._run_commands()
                reason = None if engine.paused else engine.close_reason()
                if reason is not None and self.connected.is_set():
                    message = engine.close_round(reason=reason)
                    if message is not None:
                        self._announce(new_round=True)
                        continue
                self._maybe_reannounce()
        finally:
            self.running.clear()
            self._run_commands()
            self.connected.clear()  # a disconnect we asked for is not worth a warning
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
        return 0

    def call(self, action: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``action`` on the service's thread (between two messages) and return its result
        or raise its exception.

        Raises
        ------
        TimeoutError
            If the service is not running or did not get to it within ``timeout`` seconds.
        """
        if not self.running.is_set():
            raise TimeoutError("the coordinator service is not running")
        answer: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._commands.put((action, answer))
        try:
            ok, value = answer.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the coordinator service did not act within {timeout} s") from None
        if not ok:
            raise value
        return value

    def _run_commands(self) -> None:
        while True:
            try:
                action, answer = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                answer.put((True, action()))
            except Exception as exc:
                answer.put((False, exc))

    def _flushed(self, done_at: float) -> bool:
        """The final model was acknowledged by the broker (or 30 s passed)."""
        info = self._last_info
        if info is not None and info.rc == 0 and info.is_published():
            return True
        if (info is None or info.rc != 0) and self.connected.is_set():
            self._announce()  # the last attempt was made while disconnected: publish again
        return time.monotonic() - done_at > 30.0

    def _handle_burst(self, first: _Inbound, limit: int = 256) -> None:
        """Handle ``first`` and the messages queued behind it in one database transaction,
        then acknowledge them: one commit (one fsync) per burst instead of per update."""
        if first.kind != "message":
            self._handle(first)
            return
        burst = [first]
        following: _Inbound | None = None
        while len(burst) < limit:
            try:
                event = self._deferred.popleft() if self._deferred else self.inbox.get_nowait()
            except queue.Empty:
                break
            if event.kind != "message":
                following = event
                break
            burst.append(event)
        full = getattr(self.engine, "closes_when_full", False)
        handled = 0
        with self.engine.store.transaction():
            for event in burst:
                self._handle(event, ack=False)
                handled += 1
                if full and self.engine.close_reason() is not None:
                    break  # the buffer is full: the rest waits for the next version
        # Acknowledge only after the outcome is committed: an uncommitted update is redelivered.
        for event in burst[:handled]:
            self._ack(event)
        if handled < len(burst):
            rest = burst[handled:] + ([following] if following is not None else [])
            self._deferred.extendleft(reversed(rest))
            return
        if following is not None:
            self._handle(following)

    def _handle(self, event: _Inbound, *, ack: bool = True) -> None:
        if event.kind == "connected":
            logger.info("connected to the broker; announcing round %d", self.engine.round)
            self._announce()
            return
        if event.kind != "message":
            return
        try:
            kind = parse_topic(event.topic).kind
        except ValueError:
            kind = KIND_UPDATE
        if kind == KIND_STATUS:
            self.engine.handle_status(
                event.payload, topic=event.topic, received_at=event.received_at
            )
        else:
            decision = self.engine.handle_update(
                event.payload, topic=event.topic, received_at=event.received_at
            )
            if decision.accepted:
                self._last_progress = time.monotonic()
                self._resend_after = self.config.resend_interval
        if ack:
            self._ack(event)

    def _ack(self, event: _Inbound) -> None:
        """Acknowledge a message to the broker (through whichever client received it)."""
        self._client.ack(event.mid, event.qos)
