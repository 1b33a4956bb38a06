"""Hostile messages for the soak benchmark (:mod:`benchmarks.soak`), each with the reason code
the coordinator must count it under.

Pure functions, no I/O: given the state of the round under attack (:class:`RoundContext`) and a
seed, :func:`round_batch` returns the same messages byte for byte every time. Two families:

* **fuzz** -- what anybody on the broker can send without a board key: random bytes, byte flips
  in the frame, header, signature and payload of valid messages, truncations and extensions,
  wrong header lengths, non-canonical or invalid headers re-signed with a key nobody knows,
  forgeries naming real boards, replays of other boards' admitted updates, of statuses and of
  global models, messages on other boards' topics, oversized messages;
* **stolen_key** -- what a compromised board can send, correctly signed with its real key:
  every numeric header field at its extremes (``samples`` 0, 1, ``max_samples``,
  ``max_samples`` + 1, 2^53 - 1; ``round`` 0, previous, next, 2^53 - 1; ``timestamp_ms`` 0 and
  2^53 - 1), payloads at the extremes of float32 (10^15, the largest finite value and its
  negative, alternating signs, the smallest denormal, zeros) and non-finite ones, duplicate and
  conflicting updates, wrong base model, layout, kind, run and topic, status messages with
  extreme fields, and telemetry figures at float32's extremes, outside their domain, non-finite,
  unnamed, or for a round not yet open. The first message of the family is the board's one
  update of the round that the coordinator admits; which extreme it carries rotates over the
  rounds.

Every message names the reason it is expected to get (:class:`Sent`): by construction where
the mutation decides it (a flipped signature byte is ``bad_signature`` whatever else the
message holds), else from the one field the variant changes. How the coordinator dispatches a
message follows its topic (:func:`channel_of`): ``siren/v1/<run>/status/<client>`` goes to
status handling, any other topic of its subscriptions to update admission (rules 1-20 of
docs/protocol.md section 8, after the whole-message duplicate check); status messages are
checked as in section 8.8.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from nacl.signing import SigningKey

from protocol.envelope import (
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_HEADER_INT,
    PREFIX_BYTES,
    SIGNATURE_BYTES,
    encode_global,
    encode_status,
    encode_update,
)
from protocol.errors import Reason
from protocol.layout import TensorLayout
from protocol.topics import KIND_STATUS, TOPIC_PREFIX, parse_topic, status_topic, update_topic

#: Size limit of a status message on the coordinator (``coordinator.status.STATUS_MAX_BYTES``).
STATUS_MAX_BYTES = 64 * 1024

#: Family names.
FUZZ = "fuzz"
STOLEN_KEY = "stolen_key"

#: Channels: how the coordinator handles a topic.
UPDATE = "update"
STATUS = "status"

FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The smallest positive float32 (a denormal).
FLOAT32_DENORMAL = float(np.finfo(np.float32).smallest_subnormal)

#: A fixed clock for the messages built here (deterministic bytes): 2023-11-14T22:13:20Z.
BASE_TIME_MS = 1_700_000_000_000

_HEX = "0123456789abcdef"

T = TypeVar("T")


def channel_of(topic: str) -> str:
    """Which coordinator handler a message on ``topic`` reaches: ``"status"`` for a well-formed
    status topic, ``"update"`` for anything else (the coordinator sends every topic that does
    not parse as a status topic, e.g. ``siren/v1/<run>/status/`` with an empty client level,
    to update admission, whose topic rule then refuses it)."""
    try:
        kind = parse_topic(topic).kind
    except ValueError:
        return UPDATE
    return STATUS if kind == KIND_STATUS else UPDATE


@dataclass(frozen=True)
class Sent:
    """One message of the soak and the outcome the coordinator must count.

    Attributes
    ----------
    generator : str
        What made it (``signature_flip``, ``samples=2^53-1``, ...).
    family : str
        ``fuzz`` (no board key) or ``stolen_key`` (signed with the compromised board's key).
    topic : str
        Where it is published.
    payload : bytes
        The MQTT payload.
    expected : Reason
        The reason code the coordinator must count it under.
    """

    generator: str
    family: str
    topic: str
    payload: bytes
    expected: Reason

    @property
    def channel(self) -> str:
        """``"update"`` or ``"status"`` (see :func:`channel_of`)."""
        return channel_of(self.topic)


@dataclass
class RoundContext:
    """What the attacker knows about the round under attack.

    Attributes
    ----------
    run : str
        Run id.
    round : int
        The open round ``t`` (its global model has been published).
    base_sha256 : str
        Model hash of ``g_t``.
    previous_sha256 : str or None
        Model hash of ``g_{t-1}`` (``None`` in round 1).
    layout : TensorLayout
        The model's layout.
    compromised : str
        Client id of the board whose key was stolen.
    key : SigningKey
        That board's private key.
    honest : tuple of str
        The other boards' client ids.
    size_limit : int
        The coordinator's size limit for an update message.
    max_samples : int
        The largest admitted sample count.
    status_limit : int
        The coordinator's size limit for a status message.
    own_admitted : list of bytes
        The compromised board's admitted updates of earlier rounds.
    sniffed_updates : list of (str, bytes)
        Other boards' admitted updates seen on the broker (topic, message).
    sniffed_statuses : list of (str, bytes)
        Other boards' valid status messages seen on the broker (topic, message).
    globals_seen : list of bytes
        Global messages seen on the broker.
    """

    run: str
    round: int
    base_sha256: str
    previous_sha256: str | None
    layout: TensorLayout
    compromised: str
    key: SigningKey
    honest: tuple[str, ...]
    size_limit: int
    max_samples: int
    status_limit: int = STATUS_MAX_BYTES
    own_admitted: list[bytes] = field(default_factory=list)
    sniffed_updates: list[tuple[str, bytes]] = field(default_factory=list)
    sniffed_statuses: list[tuple[str, bytes]] = field(default_factory=list)
    globals_seen: list[bytes] = field(default_factory=list)

    def limit(self, topic: str) -> int:
        """The size limit of the handler ``topic`` reaches."""
        return self.status_limit if channel_of(topic) == STATUS else self.size_limit


# -- frames ----------------------------------------------------------------------------------


def split_frame(data: bytes) -> tuple[bytes, bytes, bytes]:
    """``(header, signature, payload)`` of a well-formed message."""
    h = int.from_bytes(data[4:PREFIX_BYTES], "little")
    end = PREFIX_BYTES + h
    return data[PREFIX_BYTES:end], data[end : end + SIGNATURE_BYTES], data[end + SIGNATURE_BYTES :]


def join_frame(header: bytes, signature: bytes, payload: bytes) -> bytes:
    """Magic, the header's length, header, signature and payload."""
    return MAGIC + len(header).to_bytes(4, "little") + header + signature + payload


def sign_frame(header: bytes, key: SigningKey, payload: bytes) -> bytes:
    """A message with ``header`` taken as is (canonical or not) and signed with ``key``."""
    signed = MAGIC + len(header).to_bytes(4, "little") + header
    return signed + key.sign(signed).signature + payload


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


# -- building blocks -------------------------------------------------------------------------


class _Maker:
    """Messages of one round, with randomness (nonces, keys, values) from one generator."""

    def __init__(self, ctx: RoundContext, rng: np.random.Generator) -> None:
        self.ctx = ctx
        self.rng = rng
        self.clock = BASE_TIME_MS + 1000 * ctx.round

    def nonce(self) -> bytes:
        return self.rng.bytes(16)

    def stranger(self) -> SigningKey:
        """A key no board has."""
        return SigningKey(self.rng.bytes(32))

    def small(self, size: int | None = None) -> np.ndarray:
        """An honest-looking delta."""
        n = self.ctx.layout.size if size is None else size
        return self.rng.normal(0.0, 0.01, n).astype(np.float32)

    def update(
        self,
        *,
        client: str | None = None,
        key: SigningKey | None = None,
        run: str | None = None,
        round: int | None = None,
        base: str | None = None,
        samples: int = 100,
        delta: np.ndarray | None = None,
        layout: TensorLayout | None = None,
        timestamp: int | None = None,
        alarm: bool = False,
    ) -> bytes:
        ctx = self.ctx
        lay = ctx.layout if layout is None else layout
        return encode_update(
            run=ctx.run if run is None else run,
            round=ctx.round if round is None else round,
            client=ctx.compromised if client is None else client,
            signing_key=ctx.key if key is None else key,
            delta=self.small(lay.size) if delta is None else delta,
            layout=lay,
            base_sha256=ctx.base_sha256 if base is None else base,
            samples=samples,
            alarm=alarm,
            nonce=self.nonce(),
            timestamp_ms=self.clock if timestamp is None else timestamp,
            check_finite=False,
        )

    def status(
        self,
        *,
        client: str | None = None,
        key: SigningKey | None = None,
        run: str | None = None,
        online: bool = True,
        round: int = 0,
        timestamp: int | None = None,
        telemetry: dict[str, float] | None = None,
    ) -> bytes:
        ctx = self.ctx
        return encode_status(
            run=ctx.run if run is None else run,
            client=ctx.compromised if client is None else client,
            signing_key=ctx.key if key is None else key,
            online=online,
            round=round,
            model_sha256=ctx.base_sha256,
            telemetry=telemetry,
            nonce=self.nonce(),
            timestamp_ms=self.clock if timestamp is None else timestamp,
        )

    def raw_status(self, figures: dict[str, float], round: int) -> bytes:
        """A status of the compromised board carrying ``figures`` as given (the encoder, which
        refuses figures outside their domain, is bypassed), signed with its key."""
        ctx = self.ctx
        names = sorted(figures)
        payload = np.array([figures[n] for n in names], dtype="<f4").tobytes()
        header = {
            "alarm": False,
            "base_sha256": ctx.base_sha256,
            "client": ctx.compromised,
            "kind": "status",
            "layout": [[n, []] for n in names],
            "nonce": self.nonce().hex(),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "round": round,
            "run": ctx.run,
            "samples": 0,
            "status": "online",
            "timestamp_ms": self.clock,
            "v": 1,
        }
        return sign_frame(_canonical(header), ctx.key, payload)

    def pick(self, items: Sequence[T]) -> T:
        return items[int(self.rng.integers(len(items)))]

    def intruder(self) -> str:
        """A client id that is on no allow-list."""
        return f"intruder-{int(self.rng.integers(1 << 20)):05x}"

    def any_topic(self) -> str:
        """A topic of the coordinator's subscriptions: this run's update or status level with
        a board's id, a stranger's, an empty level or an invalid identifier."""
        ctx = self.ctx
        kind = "update" if self.rng.random() < 0.7 else "status"
        client = self.pick([ctx.compromised, *ctx.honest, self.intruder(), "", "-bad"])
        return f"{TOPIC_PREFIX}/{ctx.run}/{kind}/{client}"

    def template(self, *, with_payload: bool = False) -> bytes:
        """A correctly signed message of a known board: a fresh update of the compromised board
        (never sent as is), or an admitted update or status seen earlier."""
        ctx = self.ctx
        choices: list[bytes] = [self.update()]
        choices += [m for _, m in ctx.sniffed_updates] + list(ctx.own_admitted)
        if not with_payload:
            choices += [m for _, m in ctx.sniffed_statuses] + [self.status()]
        return self.pick(choices)


def _decode_failure(mk: _Maker, generator: str, payload: bytes, reason: Reason) -> Sent:
    """A message refused while decoding, on any topic (above the handler's size limit it is
    ``payload_too_large`` instead)."""
    topic = mk.any_topic()
    expected = Reason.PAYLOAD_TOO_LARGE if len(payload) > mk.ctx.limit(topic) else reason
    return Sent(generator, FUZZ, topic, payload, expected)


def _value_span(header: bytes, key: str) -> tuple[int, int]:
    marker = b'"' + key.encode() + b'":"'
    start = header.index(marker) + len(marker)
    return start, header.index(b'"', start)


# -- fuzz generators -------------------------------------------------------------------------

Generator = Callable[[_Maker, list[Sent]], Sent]


def _random_bytes(mk: _Maker, batch: list[Sent]) -> Sent:
    n = int(mk.rng.integers(0, 80)) if mk.rng.random() < 0.4 else int(mk.rng.integers(80, 5000))
    data = bytearray(mk.rng.bytes(n))
    if data[:4] == MAGIC:
        data[0] ^= 0xFF
    return _decode_failure(mk, "random_bytes", bytes(data), Reason.MALFORMED)


def _random_frame(mk: _Maker, batch: list[Sent]) -> Sent:
    h = int(mk.rng.integers(1, 2000))
    header = bytearray(mk.rng.bytes(h))
    header[int(mk.rng.integers(h))] |= 0x80  # never ASCII, so never JSON
    tail = mk.rng.bytes(SIGNATURE_BYTES + int(mk.rng.integers(0, 200)))
    data = MAGIC + h.to_bytes(4, "little") + bytes(header) + tail
    return _decode_failure(mk, "random_frame", data, Reason.MALFORMED)


def _magic(mk: _Maker, batch: list[Sent]) -> Sent:
    data = bytearray(mk.template())
    data[int(mk.rng.integers(4))] ^= int(mk.rng.integers(1, 256))
    return _decode_failure(mk, "magic_flip", bytes(data), Reason.MALFORMED)


def _length_field(mk: _Maker, batch: list[Sent]) -> Sent:
    data = mk.template()
    h = int.from_bytes(data[4:8], "little")
    choices = [
        0,
        int(mk.rng.integers(1, h)),
        h + int(mk.rng.integers(1, 65)),
        len(data) - SIGNATURE_BYTES - PREFIX_BYTES + int(mk.rng.integers(1, 1000)),
        MAX_HEADER_BYTES + 1,
        0xFFFFFFFF,
    ]
    new = mk.pick(choices)
    out = data[:4] + new.to_bytes(4, "little") + data[8:]
    return _decode_failure(mk, "length_field", out, Reason.MALFORMED)


def _truncate_frame(mk: _Maker, batch: list[Sent]) -> Sent:
    data = mk.template()
    h = int.from_bytes(data[4:8], "little")
    cut = int(mk.rng.integers(0, PREFIX_BYTES + h + SIGNATURE_BYTES))
    return _decode_failure(mk, "truncate_frame", data[:cut], Reason.MALFORMED)


def _truncate_payload(mk: _Maker, batch: list[Sent]) -> Sent:
    data = mk.template(with_payload=True)
    h = int.from_bytes(data[4:8], "little")
    cut = int(mk.rng.integers(PREFIX_BYTES + h + SIGNATURE_BYTES, len(data)))
    return _decode_failure(mk, "truncate_payload", data[:cut], Reason.PAYLOAD_LENGTH)


def _extend(mk: _Maker, batch: list[Sent]) -> Sent:
    data = mk.template() + mk.rng.bytes(int(mk.rng.integers(1, 65)))
    return _decode_failure(mk, "extend", data, Reason.PAYLOAD_LENGTH)


def _header_non_ascii(mk: _Maker, batch: list[Sent]) -> Sent:
    header, sig, payload = split_frame(mk.template())
    changed = bytearray(header)
    changed[int(mk.rng.integers(len(header)))] = int(mk.rng.integers(0x80, 0x100))
    return _decode_failure(
        mk, "header_non_ascii", join_frame(bytes(changed), sig, payload), Reason.MALFORMED
    )


def _header_whitespace(mk: _Maker, batch: list[Sent]) -> Sent:
    header, sig, payload = split_frame(mk.template())
    # Outside strings (header strings hold no quote, so a quote count tells where we are),
    # right after a structural character: still JSON, no longer canonical.
    spots, inside = [], False
    for i, byte in enumerate(header):
        if byte == 0x22:
            inside = not inside
        elif not inside and byte in b",:{[":
            spots.append(i + 1)
    at = mk.pick(spots)
    space = mk.pick([b" ", b"\n", b"\t", b"\r", b"  "])
    changed = header[:at] + space + header[at:]
    return _decode_failure(
        mk, "header_whitespace", join_frame(changed, sig, payload), Reason.MALFORMED
    )


def _hex_position(mk: _Maker, header: bytes) -> int:
    key = mk.pick(["nonce", "payload_sha256", "base_sha256"])
    start, end = _value_span(header, key)
    return int(mk.rng.integers(start, end))


def _header_hex_swap(mk: _Maker, batch: list[Sent]) -> Sent:
    header, sig, payload = split_frame(mk.template())
    at = _hex_position(mk, header)
    old = chr(header[at])
    new = mk.pick([c for c in _HEX if c != old])
    changed = header[:at] + new.encode() + header[at + 1 :]
    # Still a valid header, but not the signed one.
    return _decode_failure(
        mk, "header_hex_swap", join_frame(changed, sig, payload), Reason.BAD_SIGNATURE
    )


def _header_hex_case(mk: _Maker, batch: list[Sent]) -> Sent:
    header, sig, payload = split_frame(mk.template())
    at = _hex_position(mk, header)
    new = mk.pick("ABCDEFGXYZgz")
    changed = header[:at] + new.encode() + header[at + 1 :]
    return _decode_failure(
        mk, "header_hex_case", join_frame(changed, sig, payload), Reason.INVALID_HEADER
    )


def _version(mk: _Maker, batch: list[Sent]) -> Sent:
    header, sig, payload = split_frame(mk.template())
    assert header.endswith(b'"v":1}')
    v = mk.pick([0, 4, 3, 9, 10, 255, 65536, MAX_HEADER_INT])  # 1 and 2 are valid versions
    changed = header[: -len(b"1}")] + str(v).encode() + b"}"
    return _decode_failure(
        mk, "version", join_frame(changed, sig, payload), Reason.UNSUPPORTED_VERSION
    )


def _signature_flip(mk: _Maker, batch: list[Sent]) -> Sent:
    header, sig, payload = split_frame(mk.template())
    changed = bytearray(sig)
    changed[int(mk.rng.integers(SIGNATURE_BYTES))] ^= int(mk.rng.integers(1, 256))
    return _decode_failure(
        mk, "signature_flip", join_frame(header, bytes(changed), payload), Reason.BAD_SIGNATURE
    )


def _payload_flip(mk: _Maker, batch: list[Sent]) -> Sent:
    header, sig, payload = split_frame(mk.template(with_payload=True))
    changed = bytearray(payload)
    changed[int(mk.rng.integers(len(payload)))] ^= int(mk.rng.integers(1, 256))
    return _decode_failure(
        mk,
        "payload_flip",
        join_frame(header, sig, bytes(changed)),
        Reason.PAYLOAD_HASH_MISMATCH,
    )


def _unknown_client(mk: _Maker, batch: list[Sent]) -> Sent:
    client = mk.intruder() if mk.rng.random() < 0.9 else "coordinator"
    key = mk.stranger()
    data = (
        mk.update(client=client, key=key)
        if mk.rng.random() < 0.8
        else mk.status(client=client, key=key)
    )
    return _decode_failure(mk, "unknown_client", data, Reason.UNKNOWN_CLIENT)


def _impersonation(mk: _Maker, batch: list[Sent]) -> Sent:
    ctx = mk.ctx
    client = mk.pick([ctx.compromised, *ctx.honest])
    key = mk.stranger()
    data = (
        mk.update(client=client, key=key)
        if mk.rng.random() < 0.8
        else mk.status(client=client, key=key)
    )
    return _decode_failure(mk, "impersonation", data, Reason.BAD_SIGNATURE)


def _header_object(mk: _Maker) -> tuple[dict[str, object], bytes]:
    ctx = mk.ctx
    client = mk.pick([*ctx.honest, mk.intruder()])
    header, _, payload = split_frame(mk.update(client=client, key=mk.stranger()))
    return json.loads(header), payload


def _noncanonical(obj: dict[str, object], variant: str) -> bytes:
    """The header of ``obj`` spelled by ``variant`` (see :data:`NONCANONICAL`)."""
    text = _canonical(obj).decode()
    client = str(obj["client"])
    if variant == "indented":
        return json.dumps(obj, sort_keys=True, indent=1).encode()
    if variant == "unsorted":
        return json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":")).encode()
    if variant == "spaced":
        return json.dumps(obj, sort_keys=True).encode()
    if variant == "escaped":
        escaped = f"\\u{ord(client[0]):04x}{client[1:]}"
        return text.replace(f'"client":"{client}"', f'"client":"{escaped}"').encode()
    if variant == "escaped_slash":
        run = str(obj["run"])
        return text.replace(f'"run":"{run}"', f'"run":"\\/{run}"').encode()
    if variant == "duplicate_key":
        return text[:-1].encode() + b',"v":1}'
    if variant == "leading_zero":
        return text.replace(f'"round":{obj["round"]}', f'"round":0{obj["round"]}').encode()
    if variant == "exponent":
        return text.replace(f'"round":{obj["round"]}', f'"round":{obj["round"]}e0').encode()
    if variant == "nan":
        return text.replace('"samples":', '"samples":NaN,"x":').encode()
    if variant == "trailing_space":
        return text.encode() + b" "
    if variant == "utf8":
        return text.replace(f'"client":"{client}', f'"client":"\u00e9{client}').encode("utf-8")
    if variant == "control_char":
        return text.replace(f'"client":"{client}', f'"client":"\x01{client}').encode()
    if variant == "deep_nesting":
        return b"[" * 100_000 + b"]" * 100_000
    if variant == "huge_header":
        return text[:-1].encode() + b"," + b" " * (MAX_HEADER_BYTES - len(text)) + b"}"
    changed: object = dict(obj)
    assert isinstance(changed, dict)
    if variant == "float_round":
        changed["round"] = float(obj["round"])  # type: ignore[arg-type]
    elif variant == "bool_as_int":
        changed["alarm"] = 0
    elif variant == "int_as_bool":
        changed["samples"] = True
    elif variant == "extra_key":
        changed["zzz"] = 1
    elif variant == "missing_key":
        del changed["nonce"]
    elif variant == "negative_round":
        changed["round"] = -1
    elif variant == "round_2^53":
        changed["round"] = 2**53
    elif variant == "long_int":
        changed["samples"] = 10**400
    elif variant == "version_string":
        changed["v"] = "1"
    elif variant == "unknown_kind":
        changed["kind"] = "poison"
    elif variant == "status_with_samples":
        changed.update(
            kind="status",
            status="online",
            layout=[],
            samples=5,
            payload_sha256=hashlib.sha256(b"").hexdigest(),
        )
    elif variant == "not_an_object":
        changed = [1, 2, 3]
    elif variant == "layout_bad_shape":
        changed["layout"] = [["w", [-1]]]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return _canonical(changed)


#: Non-canonical or invalid headers, re-signed with a key nobody knows, and the reason each
#: gets: the canonical-form check (``malformed``) and the field checks (``invalid_header``)
#: come before the key lookup.
NONCANONICAL: dict[str, Reason] = {
    "indented": Reason.MALFORMED,
    "unsorted": Reason.MALFORMED,
    "spaced": Reason.MALFORMED,
    "escaped": Reason.MALFORMED,
    "escaped_slash": Reason.MALFORMED,
    "duplicate_key": Reason.MALFORMED,
    "leading_zero": Reason.MALFORMED,
    "exponent": Reason.MALFORMED,
    "nan": Reason.MALFORMED,
    "trailing_space": Reason.MALFORMED,
    "utf8": Reason.MALFORMED,
    "control_char": Reason.MALFORMED,
    "deep_nesting": Reason.MALFORMED,
    "huge_header": Reason.MALFORMED,
    "float_round": Reason.INVALID_HEADER,
    "bool_as_int": Reason.INVALID_HEADER,
    "int_as_bool": Reason.INVALID_HEADER,
    "extra_key": Reason.INVALID_HEADER,
    "missing_key": Reason.INVALID_HEADER,
    "negative_round": Reason.INVALID_HEADER,
    "round_2^53": Reason.INVALID_HEADER,
    "long_int": Reason.INVALID_HEADER,
    "version_string": Reason.INVALID_HEADER,
    "unknown_kind": Reason.INVALID_HEADER,
    "status_with_samples": Reason.INVALID_HEADER,
    "not_an_object": Reason.INVALID_HEADER,
    "layout_bad_shape": Reason.INVALID_HEADER,
}


def _noncanonical_resigned(mk: _Maker, batch: list[Sent]) -> Sent:
    variant = mk.pick(list(NONCANONICAL))
    obj, payload = _header_object(mk)
    header = _noncanonical(obj, variant)
    if variant == "status_with_samples":
        payload = b""
    data = sign_frame(header, mk.stranger(), payload)
    return _decode_failure(mk, f"noncanonical:{variant}", data, NONCANONICAL[variant])


def _oversized(mk: _Maker, batch: list[Sent]) -> Sent:
    size = mk.ctx.size_limit + int(mk.rng.integers(1, 2000))
    # A valid message with a huge tail, or a frame of random bytes.
    head = mk.template() if mk.rng.random() < 0.5 else MAGIC + mk.rng.bytes(64)
    data = head + bytes(size - len(head))
    return _decode_failure(mk, "oversized", data, Reason.PAYLOAD_TOO_LARGE)


def _replay_update(mk: _Maker, batch: list[Sent]) -> Sent:
    """An admitted update again, byte for byte, on an update topic: ``duplicate`` (the
    coordinator's whole-message check comes before admission); on a status topic it is an
    update where a status belongs: ``wrong_kind``."""
    ctx = mk.ctx
    pool = list(ctx.sniffed_updates) + [
        (update_topic(ctx.run, ctx.compromised), m) for m in ctx.own_admitted
    ]
    if not pool:
        return _signature_flip(mk, batch)
    topic, data = pool[int(mk.rng.integers(len(pool)))]
    roll = mk.rng.random()
    if roll < 0.6:
        return Sent("replay_update", FUZZ, topic, data, Reason.DUPLICATE)
    if roll < 0.8:
        other = update_topic(ctx.run, mk.pick([ctx.compromised, *ctx.honest]))
        return Sent("replay_update_other_topic", FUZZ, other, data, Reason.DUPLICATE)
    client = parse_topic(topic).client
    assert client is not None
    return Sent(
        "replay_update_on_status", FUZZ, status_topic(ctx.run, client), data, Reason.WRONG_KIND
    )


def _replay_status(mk: _Maker, batch: list[Sent]) -> Sent:
    """A board's status again: accepted on its own status topic (statuses carry no freshness
    rule), ``topic_mismatch`` on another board's, ``wrong_kind`` on an update topic."""
    ctx = mk.ctx
    if not ctx.sniffed_statuses:
        return _signature_flip(mk, batch)
    topic, data = ctx.sniffed_statuses[int(mk.rng.integers(len(ctx.sniffed_statuses)))]
    client = parse_topic(topic).client
    roll = mk.rng.random()
    if roll < 0.5:
        return Sent("replay_status", FUZZ, topic, data, Reason.ACCEPTED)
    if roll < 0.75:
        others = [c for c in (ctx.compromised, *ctx.honest) if c != client]
        other = status_topic(ctx.run, mk.pick(others))
        return Sent("replay_status_other_topic", FUZZ, other, data, Reason.TOPIC_MISMATCH)
    assert client is not None
    return Sent(
        "replay_status_on_update", FUZZ, update_topic(ctx.run, client), data, Reason.WRONG_KIND
    )


def _replay_global(mk: _Maker, batch: list[Sent]) -> Sent:
    """A global model on a board topic: signed by ``coordinator``, a client on no allow-list."""
    if not mk.ctx.globals_seen:
        return _unknown_client(mk, batch)
    data = mk.pick(mk.ctx.globals_seen)
    return _decode_failure(mk, "replay_global", data, Reason.UNKNOWN_CLIENT)


def _replay_refused(mk: _Maker, batch: list[Sent]) -> Sent:
    """A message refused earlier in this round, again: refused again for the same reason."""
    earlier = [s for s in batch if s.family == FUZZ and s.expected is not Reason.ACCEPTED]
    if not earlier:
        return _random_bytes(mk, batch)
    s = earlier[int(mk.rng.integers(len(earlier)))]
    return Sent("replay_refused", FUZZ, s.topic, s.payload, s.expected)


#: Fuzz generators and their relative frequency.
FUZZ_GENERATORS: dict[str, tuple[float, Generator]] = {
    "random_bytes": (6.0, _random_bytes),
    "random_frame": (4.0, _random_frame),
    "magic_flip": (3.0, _magic),
    "length_field": (6.0, _length_field),
    "truncate_frame": (6.0, _truncate_frame),
    "truncate_payload": (6.0, _truncate_payload),
    "extend": (6.0, _extend),
    "header_non_ascii": (6.0, _header_non_ascii),
    "header_whitespace": (6.0, _header_whitespace),
    "header_hex_swap": (8.0, _header_hex_swap),
    "header_hex_case": (5.0, _header_hex_case),
    "version": (3.0, _version),
    "signature_flip": (9.0, _signature_flip),
    "payload_flip": (9.0, _payload_flip),
    "unknown_client": (4.0, _unknown_client),
    "impersonation": (5.0, _impersonation),
    "noncanonical_resigned": (8.0, _noncanonical_resigned),
    "replay_update": (4.0, _replay_update),
    "replay_status": (2.0, _replay_status),
    "replay_global": (1.0, _replay_global),
    "replay_refused": (3.0, _replay_refused),
    "oversized": (0.5, _oversized),
}


# -- stolen key ------------------------------------------------------------------------------

#: Payloads a board with a stolen key may sign (all but the last three are finite).
PAYLOADS: dict[str, Callable[[int], np.ndarray]] = {
    "1e15": lambda n: np.full(n, 1e15, np.float32),
    "float32_max": lambda n: np.full(n, FLOAT32_MAX, np.float32),
    "-float32_max": lambda n: np.full(n, -FLOAT32_MAX, np.float32),
    "alternating_max": lambda n: np.where(np.arange(n) % 2 == 0, FLOAT32_MAX, -FLOAT32_MAX).astype(
        np.float32
    ),
    "denormal": lambda n: np.full(n, FLOAT32_DENORMAL, np.float32),
    "zeros": lambda n: np.zeros(n, np.float32),
    "nan": lambda n: np.full(n, np.nan, np.float32),
    "inf": lambda n: np.full(n, np.inf, np.float32),
    "-inf": lambda n: np.where(np.arange(n) == n - 1, -np.inf, 0.0).astype(np.float32),
}

#: The compromised board's admitted update, round after round: (payload, samples, timestamp).
ACCEPTED_PLAN: tuple[tuple[str, str, str], ...] = (
    ("1e15", "max_samples", "now"),
    ("float32_max", "1", "0"),
    ("-float32_max", "max_samples", "2^53-1"),
    ("denormal", "1", "now"),
    ("alternating_max", "max_samples", "0"),
    ("zeros", "max_samples", "2^53-1"),
    ("1e15", "1", "2^53-1"),
    ("float32_max", "max_samples", "now"),
)


def stolen_key_messages(ctx: RoundContext, rng: np.random.Generator) -> list[Sent]:
    """The compromised board's messages of one round; the first is the one admitted.

    Parameters
    ----------
    ctx : RoundContext
        The round under attack.
    rng : numpy.random.Generator
        Source of nonces and values.

    Returns
    -------
    list of Sent
        About 55 messages, all signed with the board's real key.
    """
    mk = _Maker(ctx, rng)
    t, a, run = ctx.round, ctx.compromised, ctx.run
    topic = update_topic(run, a)
    out: list[Sent] = []

    def add(name: str, data: bytes, reason: Reason, where: str = topic) -> None:
        out.append(Sent(name, STOLEN_KEY, where, data, reason))

    n = ctx.layout.size
    samples = {"1": 1, "max_samples": ctx.max_samples}
    stamps = {"now": mk.clock, "0": 0, "2^53-1": MAX_HEADER_INT}
    kind, count, stamp = ACCEPTED_PLAN[(t - 1) % len(ACCEPTED_PLAN)]
    first = mk.update(delta=PAYLOADS[kind](n), samples=samples[count], timestamp=stamps[stamp])
    add(f"admitted:{kind},samples={count},timestamp={stamp}", first, Reason.ACCEPTED)
    add("duplicate", first, Reason.DUPLICATE)
    add("duplicate", first, Reason.DUPLICATE)
    if ctx.own_admitted:
        add("replay_own_previous_round", ctx.own_admitted[-1], Reason.DUPLICATE)
    bad, conflict = Reason.BAD_SAMPLE_COUNT, Reason.CONFLICTING_UPDATE
    for label, value, reason in (
        ("0", 0, bad),
        ("1", 1, conflict),
        ("max_samples", ctx.max_samples, conflict),
        ("max_samples+1", ctx.max_samples + 1, bad),
        ("2^53-1", MAX_HEADER_INT, bad),
    ):
        add(f"samples={label}", mk.update(samples=value), reason)
    rounds = [("0", 0, Reason.STALE_ROUND)]
    if t >= 2:
        rounds.append(("previous", t - 1, Reason.STALE_ROUND))
    rounds += [
        ("current", t, conflict),
        ("next", t + 1, Reason.FUTURE_ROUND),
        ("2^53-1", MAX_HEADER_INT, Reason.FUTURE_ROUND),
    ]
    for label, value, reason in rounds:
        add(f"round={label}", mk.update(round=value), reason)
    for label, value in (("0", 0), ("2^53-1", MAX_HEADER_INT)):
        add(f"timestamp={label}", mk.update(timestamp=value), conflict)
    for name, make in PAYLOADS.items():
        finite = name not in ("nan", "inf", "-inf")
        reason = conflict if finite else Reason.NON_FINITE
        add(f"payload={name}", mk.update(delta=make(n)), reason)
    add(
        "payload=1e15,samples=max_samples",
        mk.update(delta=PAYLOADS["1e15"](n), samples=ctx.max_samples),
        conflict,
    )
    add("alarm=true", mk.update(alarm=True), conflict)
    add("base=random", mk.update(base=rng.bytes(32).hex()), Reason.WRONG_BASE_MODEL)
    if ctx.previous_sha256 not in (None, ctx.base_sha256):  # a round may keep the model
        add("base=previous", mk.update(base=ctx.previous_sha256), Reason.WRONG_BASE_MODEL)
    flat = TensorLayout.flat(n)
    add("layout=flat", mk.update(layout=flat), Reason.LAYOUT_MISMATCH)
    add("layout=smaller", mk.update(layout=TensorLayout.flat(3)), Reason.LAYOUT_MISMATCH)
    add("kind=status", mk.status(), Reason.WRONG_KIND)
    glob = encode_global(
        run=run,
        round=t,
        signing_key=ctx.key,
        weights=mk.small(),
        layout=ctx.layout,
        previous_sha256=ctx.base_sha256,
        client=a,
        nonce=mk.nonce(),
        timestamp_ms=mk.clock,
    )
    add("kind=global", glob, Reason.WRONG_KIND)
    valid = mk.update()
    for label, where in (
        ("another_board", update_topic(run, ctx.honest[0])),
        ("empty_level", f"{TOPIC_PREFIX}/{run}/update/"),
        ("invalid_id", f"{TOPIC_PREFIX}/{run}/update/-{a}"),
        ("empty_status_level", f"{TOPIC_PREFIX}/{run}/status/"),
    ):
        add(f"topic={label}", valid, Reason.TOPIC_MISMATCH, where)
    add("run=other", mk.update(run="other-run"), Reason.TOPIC_MISMATCH)
    add(
        "run=other,round=2^53-1",
        mk.update(run="other-run", round=MAX_HEADER_INT),
        Reason.TOPIC_MISMATCH,
    )
    # Status messages of the compromised board: nothing depends on them but the dashboard.
    own_status = status_topic(run, a)
    add(
        "status:round=2^53-1,timestamp=0",
        mk.status(round=MAX_HEADER_INT, timestamp=0),
        Reason.ACCEPTED,
        own_status,
    )
    add(
        "status:offline,timestamp=2^53-1",
        mk.status(online=False, timestamp=MAX_HEADER_INT),
        Reason.ACCEPTED,
        own_status,
    )
    add(
        "status:another_board",
        mk.status(),
        Reason.TOPIC_MISMATCH,
        status_topic(run, ctx.honest[0]),
    )
    add("status:run=other", mk.status(run="other-run"), Reason.TOPIC_MISMATCH, own_status)
    add("status:kind=update", mk.update(), Reason.WRONG_KIND, own_status)
    add(
        "status:empty_level",
        mk.status(),
        Reason.WRONG_KIND,
        f"{TOPIC_PREFIX}/{run}/status/",
    )
    add(
        "status:oversized",
        mk.status() + bytes(ctx.status_limit),
        Reason.PAYLOAD_TOO_LARGE,
        own_status,
    )
    add("status:payload", mk.status() + b"\x00" * 4, Reason.PAYLOAD_LENGTH, own_status)
    # Telemetry figures (docs/protocol.md 4.2): each stored row is bounded to one per round.
    honest = {"train_s": 1.5, "train_cpu_s": 2.0, "rss_peak_mib": 650.0, "soc_temp_c": 55.0}
    top = float(np.finfo(np.float32).max)
    extremes = {
        "rss_peak_mib": top,
        "train_s": top,
        "power_mw": top,
        "power_mw.VDD_IN": 0.0,
        "soc_temp_c": -273.15,
        "temp_c.cpu-thermal": top,
        "throttled_flags": float(2**24 - 1),
        "process_boards": float(2**24),
    }
    add("status:figures", mk.status(round=t, telemetry=honest), Reason.ACCEPTED, own_status)
    add("status:figures=extremes", mk.status(round=t, telemetry=extremes), Reason.ACCEPTED,
        own_status)  # fmt: skip
    add("status:figures,round=next", mk.status(round=t + 1, telemetry=honest),
        Reason.FUTURE_ROUND, own_status)  # fmt: skip
    add("status:figures,round=2^53-1", mk.status(round=MAX_HEADER_INT, telemetry=honest),
        Reason.FUTURE_ROUND, own_status)  # fmt: skip
    for label, figures in (
        ("temperature_below_absolute_zero", {"soc_temp_c": -300.0}),
        ("negative_time", {"train_s": -1.0}),
        ("fractional_throttled", {"throttled_flags": 0.5}),
        ("throttled_2^24", {"throttled_flags": float(2**24)}),
        ("no_boards", {"process_boards": 0.0}),
    ):
        add(f"status:figures={label}", mk.raw_status(figures, t), Reason.BAD_TELEMETRY,
            own_status)  # fmt: skip
    add("status:figures=nan", mk.raw_status({"power_mw": float("nan")}, t), Reason.NON_FINITE,
        own_status)  # fmt: skip
    add("status:figures=-inf", mk.raw_status({"soc_temp_c": float("-inf")}, t),
        Reason.NON_FINITE, own_status)  # fmt: skip
    add("status:figures=unknown_name", mk.raw_status({"voltage_mv": 5000.0}, t),
        Reason.INVALID_HEADER, own_status)  # fmt: skip
    add("status:figures,round=0", mk.raw_status(honest, 0), Reason.INVALID_HEADER, own_status)
    return out


# -- a round's batch -------------------------------------------------------------------------


def fuzz_messages(
    ctx: RoundContext, rng: np.random.Generator, count: int, batch: list[Sent] | None = None
) -> list[Sent]:
    """``count`` fuzz messages drawn from :data:`FUZZ_GENERATORS` by their weights.

    Parameters
    ----------
    ctx : RoundContext
        The round under attack.
    rng : numpy.random.Generator
        The only source of randomness.
    count : int
        How many.
    batch : list of Sent, optional
        Messages already sent this round (``replay_refused`` repeats them).
    """
    names = list(FUZZ_GENERATORS)
    weights = np.array([FUZZ_GENERATORS[n][0] for n in names])
    weights = weights / weights.sum()
    mk = _Maker(ctx, rng)
    sent = list(batch or [])
    out: list[Sent] = []
    for _ in range(count):
        name = names[int(rng.choice(len(names), p=weights))]
        message = FUZZ_GENERATORS[name][1](mk, sent)
        sent.append(message)
        out.append(message)
    return out


def round_batch(ctx: RoundContext, seed: int, fuzz_count: int) -> list[Sent]:
    """Everything sent in one round: the compromised board's admitted update first, then its
    other messages and ``fuzz_count`` fuzz messages, interleaved.

    The result depends only on ``ctx`` and ``seed`` (and is the same byte for byte for the
    same arguments).

    Parameters
    ----------
    ctx : RoundContext
        The round under attack.
    seed : int
        Seed of the soak; the round number is mixed in.
    fuzz_count : int
        Number of fuzz messages.
    """
    stolen = stolen_key_messages(ctx, np.random.default_rng([seed, ctx.round, 1]))
    fuzz = fuzz_messages(ctx, np.random.default_rng([seed, ctx.round, 2]), fuzz_count)
    order = np.random.default_rng([seed, ctx.round, 3])
    rest: list[Sent] = list(fuzz)
    for message in stolen[1:]:
        rest.insert(int(order.integers(len(rest) + 1)), message)
    # A replay of a refused message must come after the original only to read naturally; the
    # reason does not depend on the order (refusals change no state).
    return [stolen[0], *rest]
