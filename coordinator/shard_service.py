"""The coordinator service and engines with sharded admission (:mod:`coordinator.shards`).

:class:`ShardedService` starts the admission processes, subscribes its own MQTT client to the
boards' status topic only (the update topic belongs to the shared subscription), turns the
processes' reports into inbox events, and routes each acknowledgement, after the engine's
commit, back to the process that received the message. The engines
(:func:`sharded_engine_class`) admit a :class:`~coordinator.shards.VerifiedPayload` through
:class:`~coordinator.shards.ShardAdmission`; everything else about a round is unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from coordinator.engine import RoundEngine
from coordinator.service import CoordinatorService, _Inbound
from coordinator.shards import ShardAdmission, ShardPool, VerifiedPayload
from coordinator.streaming_engine import StreamingRoundEngine
from protocol.topics import status_subscription, update_subscription

logger = logging.getLogger(__name__)

QOS = 1
#: Seconds to wait for every admission process to subscribe before announcing rounds anyway.
SUBSCRIBE_WAIT = 60.0


class ShardedEngineMixin:
    """What an engine needs to admit updates verified by admission processes."""

    admission: Any
    key_view: Any
    policy: Any
    keys: dict[str, Any]
    admin_banned: set[str]
    revoked: dict[str, Any]

    def _load(self) -> bytes:
        message: bytes = super()._load()  # type: ignore[misc]
        if self.admission is not None and not isinstance(self.admission, ShardAdmission):
            self.admission = ShardAdmission.from_state_dict(
                self.admission.state_dict(), keys=self.key_view, policy=self.policy
            )
        return message

    def _digest(self, payload: bytes) -> str:
        if isinstance(payload, VerifiedPayload):
            return payload.digest
        return str(super()._digest(payload))  # type: ignore[misc]

    def _signed_by_banned(self, payload: bytes, client: str | None) -> bool:
        if not isinstance(payload, VerifiedPayload):
            return bool(super()._signed_by_banned(payload, client))  # type: ignore[misc]
        if client is None or client not in self.keys:
            return False
        if client not in self.admin_banned and client not in self.revoked:
            return False
        return bytes(self.keys[client]) == payload.shard_key


class ShardedStreamingEngine(ShardedEngineMixin, StreamingRoundEngine):
    """:class:`~coordinator.streaming_engine.StreamingRoundEngine` fed by admission processes."""


class ShardedRoundEngine(ShardedEngineMixin, RoundEngine):
    """:class:`~coordinator.engine.RoundEngine` fed by admission processes."""


def engine_class(streaming: bool, shards: int) -> type[RoundEngine]:
    """The engine for ``[admission]``'s ``streaming`` and ``shards``."""
    if shards > 0:
        return ShardedStreamingEngine if streaming else ShardedRoundEngine
    return StreamingRoundEngine if streaming else RoundEngine


def sharded_engine_class(streaming: bool) -> type[RoundEngine]:
    """The engine to use with admission processes."""
    return engine_class(streaming, 1)


def service_class(shards: int) -> type[CoordinatorService]:
    """The service for ``[admission] shards``."""
    return ShardedService if shards > 0 else CoordinatorService


class ShardedService(CoordinatorService):
    """:class:`~coordinator.service.CoordinatorService` with admission processes (module
    docstring). The engine must be one of :func:`engine_class`'s sharded engines."""

    pool: ShardPool | None = None

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            logger.warning("broker refused the coordinator: %s", reason)
            return
        run = self.config.run
        # Updates come through the shared subscription; a session kept from a run without
        # shards may still hold the plain one.
        client.unsubscribe(update_subscription(run))
        client.subscribe([(status_subscription(run), QOS)])
        self.connected.set()
        self.inbox.put(_Inbound("connected"))

    def _deliver(
        self, topic: str, payload: bytes, mid: int, qos: int, at: float, shard: int
    ) -> None:
        self.inbox.put(_Inbound("message", topic, payload, mid, qos, at, shard))

    def run(self, stop: threading.Event | None = None) -> int:
        """Start the admission processes, serve (:meth:`CoordinatorService.run`), stop them."""
        engine = self.engine
        pool = ShardPool(
            self.config,
            dict(engine.keys),
            engine.policy.size_limit,
            engine.runtime.layout.size,
            self._deliver,
        )
        self.pool = pool
        stop = stop or threading.Event()
        pool.start()
        try:
            # Announce rounds only once every process is subscribed: an update published to a
            # shared subscription without members is dropped by the broker. A stop request
            # (Ctrl-C, SIGTERM) ends the wait at once.
            deadline = time.monotonic() + SUBSCRIBE_WAIT
            while not pool.ready.wait(0.1) and not stop.is_set():
                if time.monotonic() >= deadline:
                    logger.warning(
                        "not every admission process subscribed within %.0f s (is the broker "
                        "reachable?); serving anyway",
                        SUBSCRIBE_WAIT,
                    )
                    break
            return super().run(stop)
        finally:
            pool.stop()
            logger.info("admission processes received %s message(s)", pool.received)

    def _ack(self, event: _Inbound) -> None:
        if event.origin >= 0 and self.pool is not None:
            self.pool.ack(event.origin, event.mid, event.qos)
        else:
            super()._ack(event)
