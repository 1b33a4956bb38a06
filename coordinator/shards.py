"""Sharded admission: update messages verified and decoded by several processes.

Where one process cannot keep up with the boards' updates (receiving multi-megabyte messages,
hashing them, checking signatures and finite values, decoding), ``[admission] shards = N``
starts ``N`` *admission processes*. Each connects to the broker with an MQTT v5 **shared
subscription** ``$share/<group>/siren/v1/<run>/update/+`` (Mosquitto 2, EMQX and HiveMQ
deliver each message of a shared subscription to one member of the group) and runs the
stateless part of admission on what it receives:

* :func:`protocol.envelope.decode_message`: size, framing, header, the board's key, the
  signature, the payload's length and SHA-256, finite values; plus the SHA-256 of the whole
  message (what a resent copy is recognised by);
* a verified update's values go into one of the process's slots of shared memory, and the
  leader (the coordinator's process) gets a small record: the signed prefix (header and
  signature), the message digest and size, the slot;
* anything that fails, or is not an update, is passed to the leader as raw bytes, to be
  decided and counted exactly as without shards.

The leader keeps every *stateful* rule — current run, round and base model, one update per
board per round, nonces, bans and revoked keys — in its one :class:`~protocol.admission.
Admission`: :class:`ShardAdmission` re-checks the prefix's signature against the board's key
of the moment (a key revoked or a board banned after the shard verified is caught), takes the
values from the slot, and applies rules 5-14 like for any message. Two copies of an update
delivered to two shards are therefore one admission and one ``duplicate``; two different
updates of a board, one admission and one ``conflicting_update``. The leader commits the
outcome, then tells the shard to acknowledge the message to the broker and to reuse the slot:
an update is acknowledged only once committed, as without shards.

Shards keep MQTT sessions (fixed client ids, session expiry), so messages a shard had not
acknowledged when the coordinator stopped are delivered to it again after a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
from nacl.exceptions import BadSignatureError as _NaclBadSignatureError
from nacl.signing import VerifyKey

from protocol.admission import Admission
from protocol.envelope import PREFIX_BYTES, SIGNATURE_BYTES, Header, Kind, Message, decode_message
from protocol.errors import BadSignatureError, InvalidMessageError, UnknownClientError

logger = logging.getLogger(__name__)

#: Slots of shared memory per shard (updates verified and waiting for the leader).
SLOTS = 16


class VerifiedPayload(bytes):
    """An update verified by a shard, as the leader's engine sees it: the message's signed
    prefix (magic, length, header, signature) as bytes, plus the shard's findings. Its
    ``len()`` is the whole message's size (what the engine counts and limits)."""

    digest: str
    size: int
    values: np.ndarray
    shard_key: bytes

    def __len__(self) -> int:
        return self.size

    @property
    def prefix_length(self) -> int:
        """Bytes actually held: the signed prefix."""
        return bytes.__len__(self)

    @classmethod
    def make(
        cls, prefix: bytes, digest: str, size: int, values: np.ndarray, shard_key: bytes
    ) -> VerifiedPayload:
        """A payload carrying ``prefix`` and what the shard found."""
        out = cls(prefix)
        out.digest = digest
        out.size = size
        out.values = values
        out.shard_key = shard_key
        return out


def _lookup(keys: Any, client: str) -> VerifyKey | None:
    if isinstance(keys, VerifyKey):
        return keys
    if hasattr(keys, "get"):
        return keys.get(client)  # type: ignore[no-any-return]
    return keys(client)  # type: ignore[no-any-return]


def prefix_message(data: VerifiedPayload, keys: Any) -> Message:
    """The :class:`Message` of a shard-verified update, its signature checked again against
    the board's current key in ``keys``.

    Raises
    ------
    InvalidMessageError
        ``unknown_client`` when the board has no key now (banned, revoked, removed),
        ``bad_signature`` when its current key did not sign the header.
    """
    header_length = data.prefix_length - PREFIX_BYTES - SIGNATURE_BYTES
    header_bytes = bytes(data[PREFIX_BYTES : PREFIX_BYTES + header_length])
    header = Header.from_json_value(json.loads(header_bytes))
    key = _lookup(keys, header.client)
    if key is None:
        raise UnknownClientError(
            f"no public key is known for client {header.client!r}", client_id=header.client
        )
    signature = bytes(data[PREFIX_BYTES + header_length :])
    try:
        key.verify(bytes(data[: PREFIX_BYTES + header_length]), signature)
    except _NaclBadSignatureError:
        raise BadSignatureError(
            f"signature of the update from {header.client!r} does not verify",
            client_id=header.client,
        ) from None
    return Message(
        header=header, header_bytes=header_bytes, signature=signature, weights=data.values
    )


class ShardAdmission(Admission):
    """:class:`~protocol.admission.Admission` that also takes updates verified by a shard
    (:class:`VerifiedPayload`); every other message is decoded here as usual."""

    def _decode(self, data: bytes | bytearray | memoryview, limit: int) -> Message:
        if isinstance(data, VerifiedPayload):
            return prefix_message(data, self.keys)
        return super()._decode(data, limit)


@dataclass(frozen=True)
class ShardSpec:
    """What an admission process needs (picklable)."""

    index: int
    run: str
    group: str
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    ca_file: str | None
    keepalive: int
    session_expiry: int
    keys: dict[str, bytes]
    size_limit: int
    d: int
    memory: str


def shard_main(spec: ShardSpec, conn: Connection) -> None:
    """An admission process: receive from the shared subscription, verify, decode into a slot,
    report to the leader, acknowledge when told (module docstring)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from protocol.mqtt import BrokerSettings, make_mqtt_client
    from protocol.topics import update_subscription

    keys = {c: VerifyKey(k) for c, k in spec.keys.items()}
    memory = shared_memory.SharedMemory(name=spec.memory)
    slots = np.ndarray((SLOTS, spec.d), dtype=np.float32, buffer=memory.buf)
    free = list(range(SLOTS))
    inbox: queue.Queue[Any] = queue.Queue()
    settings = BrokerSettings(
        host=spec.host,
        port=spec.port,
        username=spec.username,
        password=spec.password,
        tls=spec.tls,
        ca_file=None if spec.ca_file is None else Path(spec.ca_file),
        keepalive=spec.keepalive,
    )
    name = f"coordinator-{spec.run}-shard-{spec.index}"
    client = make_mqtt_client(settings, name, manual_ack=True)
    subscription = f"$share/{spec.group}/{update_subscription(spec.run)}"
    sending = threading.Lock()

    def send(report: tuple[Any, ...]) -> None:
        with sending:
            conn.send(report)

    client.on_connect = lambda c, u, f, rc, p: c.subscribe(subscription, qos=1)
    client.on_subscribe = lambda c, u, mid, codes, p: send(("ready",))
    client.on_message = lambda c, u, m: inbox.put(
        (m.topic, bytes(m.payload), int(m.mid), int(m.qos), time.time())
    )
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = spec.session_expiry
    client.connect_async(
        spec.host, spec.port, keepalive=spec.keepalive, clean_start=False, properties=props
    )
    client.loop_start()
    stop = False

    def leader_messages(block: bool) -> None:
        nonlocal stop
        while conn.poll(None if block else 0):
            order = conn.recv()
            if order[0] == "stop":
                stop = True
                return
            if order[0] == "free":
                free.append(order[1])
            else:
                client.ack(order[1], order[2])
            block = False

    try:
        while not stop:
            leader_messages(block=False)
            try:
                topic, payload, mid, qos, at = inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                message = decode_message(payload, keys, max_message_bytes=spec.size_limit)
                if message.kind is not Kind.UPDATE or message.weights is None:
                    raise InvalidMessageError("not an update")
            except InvalidMessageError:
                send(("raw", mid, qos, topic, at, payload))
                continue
            while not free and not stop:
                leader_messages(block=True)
            if stop:
                break
            slot = free.pop()
            np.copyto(slots[slot], message.weights)
            cut = PREFIX_BYTES + len(message.header_bytes) + SIGNATURE_BYTES
            send(
                (
                    "verified",
                    mid,
                    qos,
                    topic,
                    at,
                    bytes(payload[:cut]),
                    hashlib.sha256(payload).hexdigest(),
                    len(payload),
                    slot,
                    bytes(keys[message.client]),
                )
            )
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        client.disconnect()
        client.loop_stop()
        del slots
        memory.close()


class ShardPool:
    """The leader's side: start the admission processes, turn their reports into inbox events,
    route acknowledgements back.

    Parameters
    ----------
    config : CoordinatorConfig
        Broker settings, run, ``[admission]``.
    keys : mapping of str to VerifyKey
        The run's boards and their keys (the shards verify against these; the leader checks
        again against the keys of the moment).
    size_limit : int
        The admission size limit of a message.
    d : int
        Values per update.
    deliver : callable
        ``deliver(topic, payload, mid, qos, received_at, shard)`` puts one message into the
        service's inbox (``payload`` raw bytes or a :class:`VerifiedPayload`).
    """

    def __init__(
        self, config: Any, keys: dict[str, VerifyKey], size_limit: int, d: int, deliver: Any
    ) -> None:
        self.config = config
        self.count = config.admission.shards
        self.d = d
        self.deliver = deliver
        self.received = [0] * self.count
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._memories: list[shared_memory.SharedMemory] = []
        self._views: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._subscribed: set[int] = set()
        self.ready = threading.Event()
        b = config.broker
        self._specs = []
        for i in range(self.count):
            mem = shared_memory.SharedMemory(create=True, size=max(1, SLOTS * d * 4))
            self._memories.append(mem)
            self._views.append(np.ndarray((SLOTS, d), dtype=np.float32, buffer=mem.buf))
            self._specs.append(
                ShardSpec(
                    index=i,
                    run=config.run,
                    group=config.admission.group(config.run),
                    host=b.host,
                    port=b.port,
                    username=b.username,
                    password=b.password,
                    tls=b.tls,
                    ca_file=None if b.ca_file is None else str(b.ca_file),
                    keepalive=b.keepalive,
                    session_expiry=getattr(b, "session_expiry", 3600),
                    keys={c: bytes(k) for c, k in keys.items()},
                    size_limit=size_limit,
                    d=d,
                    memory=mem.name,
                )
            )

    def start(self) -> None:
        """Spawn the processes and the thread reading their reports."""
        ctx = multiprocessing.get_context("spawn")
        for spec in self._specs:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=shard_main, args=(spec, there), daemon=True)
            proc.start()
            self._conns.append(here)
            self._procs.append(proc)
        self._reader = threading.Thread(target=self._read, name="shard-reports", daemon=True)
        self._reader.start()
        logger.info("%d admission process(es) on $share/%s/...", self.count, self._specs[0].group)

    def _read(self) -> None:
        origin = {id(c): i for i, c in enumerate(self._conns)}
        while not self._stop.is_set():
            for conn in wait(self._conns, timeout=0.2):
                assert isinstance(conn, Connection)
                try:
                    report = conn.recv()
                except (EOFError, OSError):
                    continue
                i = origin[id(conn)]
                if report[0] == "ready":
                    self._subscribed.add(i)
                    if len(self._subscribed) == self.count:
                        self.ready.set()
                    continue
                self.received[i] += 1
                if report[0] == "raw":
                    _, mid, qos, topic, at, payload = report
                    self.deliver(topic, payload, mid, qos, at, i)
                else:
                    _, mid, qos, topic, at, prefix, digest, size, slot, key = report
                    values = np.array(self._views[i][slot], copy=True)
                    self._send(i, ("free", slot))
                    payload = VerifiedPayload.make(prefix, digest, size, values, key)
                    self.deliver(topic, payload, mid, qos, at, i)

    def _send(self, shard: int, order: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self._conns[shard].send(order)
            except (OSError, BrokenPipeError):
                logger.warning("admission process %d is gone; its messages come back", shard)

    def ack(self, shard: int, mid: int, qos: int) -> None:
        """Have admission process ``shard`` acknowledge message ``mid`` to the broker."""
        self._send(shard, ("ack", mid, qos))

    def stop(self) -> None:
        """Stop the processes and free the shared memory."""
        self._stop.set()
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop",))
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        if self._reader is not None:
            self._reader.join(2)
        self._views.clear()
        for mem in self._memories:
            mem.close()
            mem.unlink()

    def describe(self) -> dict[str, Any]:
        """Messages received per admission process and the shared subscription's group."""
        return {"group": self._specs[0].group, "received": list(self.received)}
