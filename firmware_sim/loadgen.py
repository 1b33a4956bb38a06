"""A load generator: boards' updates, signed in advance, published over MQTT as fast as possible.

No training: each simulated board's update is a synthetic vector (a shared direction plus
noise, or a boosted flipped one for the attackers), signed with the board's real Ed25519 key
into a real protocol message before the clock starts. :func:`publish` then pushes them through
``connections`` MQTT clients at QoS 1 and returns when the broker acknowledged every one, so the
coordinator's admission rate, not the boards', is what a benchmark measures.

Keys come from a seed (:func:`board_keys`), so a coordinator built in another process trusts
the same boards. Used by ``siren bench round-close`` and the sharded-admission tests.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from protocol.envelope import Message, check_global, encode_update
from protocol.layout import TensorLayout
from protocol.mqtt import BrokerSettings, make_mqtt_client
from protocol.topics import global_topic, update_topic


def board_keys(count: int, seed: int = 0) -> dict[str, SigningKey]:
    """``count`` boards ``board-00000``... with Ed25519 keys derived from ``seed``."""
    return {
        f"board-{i:05d}": SigningKey(hashlib.sha256(f"loadgen:{seed}:{i}".encode()).digest())
        for i in range(count)
    }


def synthetic_updates(
    count: int, d: int, *, attackers: int = 0, seed: int = 0
) -> Iterable[tuple[int, np.ndarray]]:
    """``(index, update)`` pairs: a shared direction plus noise for honest boards; the last
    ``attackers`` boards send the flipped direction boosted 10 times. One vector at a time."""
    rng = np.random.default_rng([seed, 1])
    direction = rng.standard_normal(d).astype(np.float32)
    for i in range(count):
        noise = np.random.default_rng([seed, 2, i]).standard_normal(d).astype(np.float32)
        if i >= count - attackers:
            yield i, (-10.0 * direction + 0.1 * noise).astype(np.float32)
        else:
            yield i, (direction + noise).astype(np.float32)


def presign_updates(
    *,
    run: str,
    round_index: int,
    base_sha256: str,
    signers: Mapping[str, SigningKey],
    layout: TensorLayout,
    attackers: int = 0,
    seed: int = 0,
    samples: int = 100,
) -> list[tuple[str, bytes]]:
    """One signed update message per board, with its update topic, in board order."""
    names = list(signers)
    out = []
    for i, delta in synthetic_updates(len(names), layout.size, attackers=attackers, seed=seed):
        client = names[i]
        payload = encode_update(
            run=run,
            round=round_index,
            client=client,
            signing_key=signers[client],
            delta=delta,
            layout=layout,
            base_sha256=base_sha256,
            samples=samples,
            alarm=False,
        )
        out.append((update_topic(run, client), payload))
    return out


def read_global(
    settings: BrokerSettings, run: str, coordinator_key: VerifyKey, timeout: float = 30.0
) -> Message:
    """The retained global model of ``run``, verified against the coordinator's key.

    Raises
    ------
    TimeoutError
        If no valid global model arrives within ``timeout`` seconds.
    """
    got: list[Message] = []
    ready = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        try:
            got.append(check_global(bytes(message.payload), coordinator_key, run=run))
        except Exception:  # not (yet) a valid model of this run: keep waiting
            return
        ready.set()

    client = make_mqtt_client(settings, f"loadgen-reader-{time.monotonic_ns()}")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(global_topic(run), qos=1)
    client.on_message = on_message
    client.connect(settings.host, settings.port)
    client.loop_start()
    try:
        if not ready.wait(timeout):
            raise TimeoutError(f"no global model of run {run!r} within {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1]


@dataclass(frozen=True)
class PublishReport:
    """What :func:`publish` did.

    Attributes
    ----------
    messages, bytes : int
        Messages and payload bytes acknowledged by the broker.
    started, seconds : float
        Wall-clock start (``time.time()``) and duration until the last acknowledgement.
    """

    messages: int
    bytes: int
    started: float
    seconds: float


def publish(
    settings: BrokerSettings,
    messages: Sequence[tuple[str, bytes]],
    *,
    connections: int = 4,
    qos: int = 1,
    timeout: float = 600.0,
) -> PublishReport:
    """Publish ``(topic, payload)`` messages through ``connections`` clients (messages dealt
    round-robin) and wait for every acknowledgement.

    Raises
    ------
    TimeoutError
        If the broker did not acknowledge everything within ``timeout`` seconds.
    """
    n = max(1, min(connections, len(messages)))
    clients = []
    for c in range(n):
        client = make_mqtt_client(settings, f"loadgen-{c}-{time.monotonic_ns()}")
        client.max_inflight_messages_set(64)
        client.connect(settings.host, settings.port)
        client.loop_start()
        clients.append(client)
    try:
        started = time.time()
        t0 = time.perf_counter()
        infos = [clients[i % n].publish(t, p, qos=qos) for i, (t, p) in enumerate(messages)]
        deadline = time.monotonic() + timeout
        for info in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the broker did not acknowledge every update in time")
            info.wait_for_publish(left)
        seconds = time.perf_counter() - t0
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()
    return PublishReport(len(messages), sum(len(p) for _, p in messages), started, seconds)
