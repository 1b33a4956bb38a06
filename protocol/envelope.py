"""Signed message envelope: canonical header, detached Ed25519 signature, float32 payload.

Wire format (all integers little-endian; ``docs/protocol.md`` is the normative description)::

    offset      size  field
    0           4     magic "SIRN"
    4           4     H = header length in bytes (uint32, 1 <= H <= 262144)
    8           H     header: canonical JSON object, ASCII (see Header)
    8+H         64    Ed25519 signature of bytes [0, 8+H) -- magic, length and header
    72+H        P     payload: P = 4 * layout.size bytes of little-endian float32

Only the header is signed; it carries the payload's SHA-256, so verifying a message costs one
signature check on a few hundred bytes plus one SHA-256 pass over the payload.

:func:`encode_message` and :func:`decode_message` are pure functions of their arguments (given a
nonce and timestamp). Decoding validates everything -- framing, canonical form, every field,
the signature, payload length, payload hash, finiteness -- before it returns, and raises one
:class:`~protocol.errors.InvalidMessageError` subclass per failure reason.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.exceptions import BadSignatureError as _NaclBadSignatureError
from nacl.signing import SigningKey, VerifyKey

from protocol.errors import (
    BadSignatureError,
    InvalidHeaderError,
    InvalidMessageError,
    LayoutError,
    LayoutMismatchError,
    MalformedMessageError,
    PayloadHashMismatchError,
    PayloadLengthError,
    PayloadTooLargeError,
    StaleRoundError,
    UnknownClientError,
    UnsupportedVersionError,
    WrongKindError,
    WrongRunError,
    brief,
)
from protocol.layout import TensorLayout, payload_to_vector, vector_to_payload
from protocol.telemetry import check_status_layout, check_values, pack, unpack
from protocol.topics import is_valid_id

#: First four bytes of every message.
MAGIC = b"SIRN"
#: Header schema version of every message without a selection (the ``v`` field).
SCHEMA_VERSION = 1
#: Header schema version of a global model that names the boards drawn for its round: the
#: version 1 keys plus :data:`SELECTION_FIELD` (``docs/protocol.md`` section 4.3).
SELECTION_VERSION = 2
#: Schema versions this implementation reads.
SUPPORTED_VERSIONS = (SCHEMA_VERSION, SELECTION_VERSION)
#: The key version 2 adds: the client ids drawn for the round a global model starts.
SELECTION_FIELD = "selected"
#: Length of the fixed prefix (magic + header length).
PREFIX_BYTES = 8
#: Length of an Ed25519 signature.
SIGNATURE_BYTES = 64
#: Largest accepted header.
MAX_HEADER_BYTES = 256 * 1024
#: Default upper bound on a whole message accepted by :func:`decode_message` (64 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Number of random bytes in a nonce (written as 32 hex digits).
NONCE_BYTES = 16
#: Largest integer in a header field (exactly representable as an IEEE double).
MAX_HEADER_INT = 2**53 - 1
#: Hash placeholder meaning "no model" (e.g. the base of the first global model).
ZERO_SHA256 = "0" * 64
#: SHA-256 of the empty payload.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: Conventional client id of the coordinator in the headers it signs.
COORDINATOR_ID = "coordinator"
#: Values of the ``status`` field of a status message.
STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_NONCE = re.compile(f"[0-9a-f]{{{2 * NONCE_BYTES}}}")
_FRAME_LENGTH = struct.Struct("<I")

#: Where public keys come from when verifying: one pinned key (e.g. the coordinator's key on a
#: board), a mapping from client id to key (e.g. an ``AllowList``), or a lookup function.
KeySource = VerifyKey | Mapping[str, VerifyKey] | Callable[[str], VerifyKey | None]


class Kind(str, Enum):
    """Message kind, the header's ``kind`` field."""

    UPDATE = "update"
    GLOBAL = "global"
    STATUS = "status"

    def __str__(self) -> str:
        return self.value


HEADER_FIELDS: tuple[str, ...] = (
    "alarm",
    "base_sha256",
    "client",
    "kind",
    "layout",
    "nonce",
    "payload_sha256",
    "round",
    "run",
    "samples",
    "status",
    "timestamp_ms",
    "v",
)
"""The keys of a version 1 header, in canonical (sorted) order; it has exactly these."""

HEADER_FIELDS_V2: tuple[str, ...] = tuple(sorted((*HEADER_FIELDS, SELECTION_FIELD)))
"""The keys of a version 2 header (a global model with a selection), in canonical order."""


def _uint(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_HEADER_INT:
        raise InvalidHeaderError(
            f"header field {name!r} must be an integer in [0, 2^53-1], got {brief(value)}"
        )
    return value


@dataclass(frozen=True)
class Header:
    """The signed header of a message.

    Attributes
    ----------
    kind : Kind
        ``update`` (board -> coordinator), ``global`` (coordinator -> boards) or ``status``.
    run : str
        Run identifier (``[A-Za-z0-9_.-]``, 1-64 characters).
    round : int
        Round number: the round an update was trained for, or the round a global model starts.
    client : str
        Signer's identifier: the board's client id, or :data:`COORDINATOR_ID` for globals.
    payload_sha256 : str
        Lower-case hex SHA-256 of the payload bytes.
    base_sha256 : str
        Update: model hash of the global model it was computed from. Global: model hash of the
        previously published global model (:data:`ZERO_SHA256` for the first). Status: hash of
        the global model the board holds (:data:`ZERO_SHA256` if none).
    samples : int
        Update: number of local training samples. Global: samples aggregated. Status: 0.
    alarm : bool
        SIREN client alarm bit of an update; ``False`` for other kinds.
    nonce : str
        32 lower-case hex digits, random per message.
    timestamp_ms : int
        Signer's clock, Unix milliseconds. Informative: admission ignores it unless a maximum
        clock skew is configured.
    status : str
        ``"online"`` / ``"offline"`` for status messages, ``""`` otherwise.
    layout : TensorLayout
        Layout of the payload. Status: empty, or the board's telemetry figures (scalars named
        from the table of :mod:`protocol.telemetry`; then ``round >= 1``).
    version : int
        Schema version: :data:`SCHEMA_VERSION`, or :data:`SELECTION_VERSION` exactly when
        ``selected`` is given.
    selected : tuple of str or None
        Only in a version 2 global message: the client ids drawn to take part in the round it
        starts, sorted by code point, each once, at least one (``docs/protocol.md`` 4.3). A
        board not named sits the round out. ``None`` (version 1): every board takes part.

    Raises
    ------
    InvalidHeaderError
        If a field is out of range or inconsistent with the kind.
    """

    kind: Kind
    run: str
    round: int
    client: str
    payload_sha256: str
    base_sha256: str
    samples: int
    alarm: bool
    nonce: str
    timestamp_ms: int
    status: str
    layout: TensorLayout
    version: int = SCHEMA_VERSION
    selected: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersionError(
                f"header schema version {brief(self.version)} is not supported "
                f"(expected one of {list(SUPPORTED_VERSIONS)})"
            )
        try:
            kind = Kind(self.kind) if isinstance(self.kind, str) else None
        except ValueError:
            kind = None
        if kind is None:
            raise InvalidHeaderError(
                f"header field 'kind' must be one of {[k.value for k in Kind]}, "
                f"got {brief(self.kind)}"
            )
        object.__setattr__(self, "kind", kind)
        for name in ("run", "client"):
            value = getattr(self, name)
            if not is_valid_id(value):
                raise InvalidHeaderError(
                    f"header field {name!r} must be 1-64 characters from [A-Za-z0-9_.-] "
                    f"starting with a letter or digit, got {brief(value)}"
                )
        _uint(self.round, "round")
        _uint(self.samples, "samples")
        _uint(self.timestamp_ms, "timestamp_ms")
        for name in ("payload_sha256", "base_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
                raise InvalidHeaderError(
                    f"header field {name!r} must be 64 lower-case hex digits, got {brief(value)}"
                )
        if not isinstance(self.nonce, str) or _HEX_NONCE.fullmatch(self.nonce) is None:
            raise InvalidHeaderError(
                f"header field 'nonce' must be {2 * NONCE_BYTES} lower-case hex digits, "
                f"got {brief(self.nonce)}"
            )
        if type(self.alarm) is not bool:
            raise InvalidHeaderError(
                f"header field 'alarm' must be a boolean, got {brief(self.alarm)}"
            )
        if not isinstance(self.layout, TensorLayout):
            raise InvalidHeaderError("header field 'layout' must be a TensorLayout")
        if not isinstance(self.status, str):
            raise InvalidHeaderError(
                f"header field 'status' must be a string, got {brief(self.status)}"
            )
        self._check_kind_rules()

    def _check_kind_rules(self) -> None:
        if self.kind is Kind.STATUS:
            if self.status not in (STATUS_ONLINE, STATUS_OFFLINE):
                raise InvalidHeaderError(
                    f"a status message needs status 'online' or 'offline', got {brief(self.status)}"
                )
            check_status_layout(self.layout)
            if self.layout.size and self.round == 0:
                raise InvalidHeaderError(
                    "a status message with telemetry figures describes a round: round must be >= 1"
                )
            if self.alarm or self.samples != 0:
                raise InvalidHeaderError("a status message must have alarm false and samples 0")
            return
        if self.status != "":
            raise InvalidHeaderError(
                f"status must be '' for a {self.kind.value} message, got {brief(self.status)}"
            )
        if self.layout.size == 0:
            raise InvalidHeaderError(
                f"a {self.kind.value} message must carry at least one value (layout is empty)"
            )
        if self.kind is Kind.GLOBAL and self.alarm:
            raise InvalidHeaderError("a global message must have alarm false")
        self._check_selection()

    def _check_selection(self) -> None:
        """Version 2 is a global message with a selection; version 1 has none."""
        selected = self.selected
        if self.version == SCHEMA_VERSION:
            if selected is not None:
                raise InvalidHeaderError(
                    f"a version {SCHEMA_VERSION} header has no {SELECTION_FIELD!r} key "
                    f"(a selection makes it version {SELECTION_VERSION})"
                )
            return
        if self.kind is not Kind.GLOBAL:
            raise InvalidHeaderError(
                f"only a global message has a version {SELECTION_VERSION} header, not a "
                f"{self.kind.value} message"
            )
        if not isinstance(selected, tuple) or not selected:
            raise InvalidHeaderError(
                f"header field {SELECTION_FIELD!r} must be a non-empty array of client ids, "
                f"got {brief(selected)}"
            )
        for client in selected:
            if not is_valid_id(client):
                raise InvalidHeaderError(
                    f"header field {SELECTION_FIELD!r} holds an invalid client id {brief(client)}"
                )
        if any(a >= b for a, b in itertools.pairwise(selected)):
            raise InvalidHeaderError(
                f"header field {SELECTION_FIELD!r} must be sorted by code point with each "
                "client id once"
            )

    def selects(self, client: str) -> bool:
        """Whether ``client`` takes part in the round this header's global model starts: every
        board without a selection (version 1), else the boards named in it."""
        return self.selected is None or client in self.selected

    def to_json_value(self) -> dict[str, Any]:
        """The header as a JSON object (keys of :data:`HEADER_FIELDS`, or
        :data:`HEADER_FIELDS_V2` for a selection)."""
        value: dict[str, Any] = {
            "alarm": self.alarm,
            "base_sha256": self.base_sha256,
            "client": self.client,
            "kind": self.kind.value,
            "layout": self.layout.to_json_value(),
            "nonce": self.nonce,
            "payload_sha256": self.payload_sha256,
            "round": self.round,
            "run": self.run,
            "samples": self.samples,
            "status": self.status,
            "timestamp_ms": self.timestamp_ms,
            "v": self.version,
        }
        if self.selected is not None:
            value[SELECTION_FIELD] = list(self.selected)
        return value

    def canonical_bytes(self) -> bytes:
        """Canonical encoding: JSON with sorted keys, no whitespace, ASCII only.

        Every string in a valid header is plain printable ASCII without ``"`` or ``\\`` and
        every number is a non-negative integer, so the text has a single possible spelling.
        """
        return _canonical_json(self.to_json_value())

    @classmethod
    def from_json_value(cls, obj: Any) -> Header:
        """Validate a parsed JSON object and build the header.

        Raises
        ------
        UnsupportedVersionError
            If ``v`` is an integer other than those of :data:`SUPPORTED_VERSIONS`.
        InvalidHeaderError
            For a non-object, missing or extra keys, or any invalid field.
        """
        if not isinstance(obj, dict):
            raise InvalidHeaderError(f"header must be a JSON object, got {type(obj).__name__}")
        version = obj.get("v")
        if type(version) is not int:
            raise InvalidHeaderError(f"header field 'v' must be an integer, got {brief(version)}")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersionError(
                f"header schema version {version} is not supported "
                f"(expected one of {list(SUPPORTED_VERSIONS)})"
            )
        keys = set(obj)
        fields = set(HEADER_FIELDS if version == SCHEMA_VERSION else HEADER_FIELDS_V2)
        if keys != fields:
            missing = sorted(fields - keys)
            extra = sorted(keys - fields)
            raise InvalidHeaderError(
                f"header keys wrong for version {version}: missing {missing}, unexpected {extra}"
            )
        selected = obj.get(SELECTION_FIELD)
        if selected is not None:
            if not isinstance(selected, list) or not all(isinstance(c, str) for c in selected):
                raise InvalidHeaderError(
                    f"header field {SELECTION_FIELD!r} must be an array of strings, "
                    f"got {brief(selected)}"
                )
            selected = tuple(selected)
        try:
            layout = TensorLayout.from_json_value(obj["layout"])
        except LayoutError as exc:
            raise InvalidHeaderError(f"header field 'layout' is invalid: {exc}") from None
        return cls(
            kind=obj["kind"],
            run=obj["run"],
            round=obj["round"],
            client=obj["client"],
            payload_sha256=obj["payload_sha256"],
            base_sha256=obj["base_sha256"],
            samples=obj["samples"],
            alarm=obj["alarm"],
            nonce=obj["nonce"],
            timestamp_ms=obj["timestamp_ms"],
            status=obj["status"],
            layout=layout,
            version=version,
            selected=selected,
        )


def _canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


@dataclass(frozen=True, eq=False)
class Message:
    """A decoded, fully verified message.

    Attributes
    ----------
    header : Header
        The verified header.
    header_bytes : bytes
        The header exactly as signed.
    signature : bytes
        The 64-byte Ed25519 signature.
    weights : ndarray of float32 or None
        The payload as a flat writable vector (``None`` for messages without tensors). For an
        update it is the delta ``local - global``; for a global message, the model weights; for
        a status, its telemetry figures (see :attr:`telemetry`).
    """

    header: Header
    header_bytes: bytes
    signature: bytes
    weights: np.ndarray | None

    def __repr__(self) -> str:
        h = self.header
        return (
            f"Message(kind={h.kind.value!r}, run={h.run!r}, round={h.round}, client={h.client!r}, "
            f"values={h.layout.size}, samples={h.samples}, alarm={h.alarm}, "
            f"id={self.message_id[:16]})"
        )

    @property
    def kind(self) -> Kind:
        """Message kind."""
        return self.header.kind

    @property
    def run(self) -> str:
        """Run identifier."""
        return self.header.run

    @property
    def round(self) -> int:
        """Round number."""
        return self.header.round

    @property
    def client(self) -> str:
        """Signer's client id."""
        return self.header.client

    @property
    def selected(self) -> tuple[str, ...] | None:
        """A global model's selection: the boards drawn for its round (``None``: every board)."""
        return self.header.selected

    @property
    def layout(self) -> TensorLayout:
        """Payload layout."""
        return self.header.layout

    @property
    def telemetry(self) -> dict[str, float]:
        """A status message's telemetry figures, ``{name: value}``; empty for other kinds and
        for statuses without figures."""
        if self.header.kind is not Kind.STATUS:
            return {}
        return unpack(self.header.layout, self.weights)

    @property
    def message_id(self) -> str:
        """Hex SHA-256 of the header bytes: identifies the signed content (payload included).

        Two messages have the same id exactly when their headers are byte-identical, which,
        since the header holds the payload hash and a nonce, means the same content was resent.
        """
        return hashlib.sha256(self.header_bytes).hexdigest()


def new_nonce() -> bytes:
    """Return :data:`NONCE_BYTES` random bytes from the operating system's CSPRNG."""
    return os.urandom(NONCE_BYTES)


def now_ms() -> int:
    """Current Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


def encode_message(
    kind: Kind | str,
    *,
    run: str,
    round: int,
    client: str,
    signing_key: SigningKey,
    weights: npt.ArrayLike | None = None,
    layout: TensorLayout | None = None,
    base_sha256: str = ZERO_SHA256,
    samples: int = 0,
    alarm: bool = False,
    status: str = "",
    nonce: bytes | None = None,
    timestamp_ms: int | None = None,
    check_finite: bool = True,
    selected: Sequence[str] | None = None,
) -> bytes:
    """Build and sign a message.

    Parameters
    ----------
    kind : Kind or str
        ``"update"``, ``"global"`` or ``"status"``.
    run, round, client : str, int, str
        Header fields (see :class:`Header`).
    signing_key : nacl.signing.SigningKey
        The signer's Ed25519 private key.
    weights : array_like of float, shape (layout.size,), optional
        Flat payload vector; required with ``layout`` for updates and globals; for a status,
        its telemetry figures (or absent).
    layout : TensorLayout, optional
        Layout of ``weights``.
    base_sha256, samples, alarm, status : str, int, bool, str
        Header fields (see :class:`Header`).
    nonce : bytes, optional
        :data:`NONCE_BYTES` bytes; random when omitted.
    timestamp_ms : int, optional
        Signing time; the current clock when omitted.
    check_finite : bool
        Refuse NaN/infinite weights (default). Only fault-injection code passes ``False``.
    selected : sequence of str, optional
        Global messages only: the client ids drawn for the round (sorted and written in a
        version 2 header); ``None``: a version 1 header.

    Returns
    -------
    bytes
        The message. With ``nonce`` and ``timestamp_ms`` given the result is a pure function of
        the arguments (Ed25519 signatures are deterministic). Cost: one SHA-256 pass over the
        payload plus one signature over the header.

    Raises
    ------
    InvalidHeaderError
        If a header field is invalid for the kind.
    LayoutError
        If ``weights`` does not match ``layout`` or holds non-finite values.
    """
    if (weights is None) != (layout is None or layout.size == 0):
        raise LayoutError("weights and a non-empty layout must be given together")
    if layout is None:
        layout = TensorLayout([])
    payload = (
        b"" if weights is None else vector_to_payload(weights, layout, check_finite=check_finite)
    )
    if nonce is None:
        nonce = new_nonce()
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise InvalidHeaderError(f"nonce must be {NONCE_BYTES} bytes")
    header = Header(
        kind=kind,  # type: ignore[arg-type]  # validated and converted by Header
        run=run,
        round=round,
        client=client,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        base_sha256=base_sha256,
        samples=samples,
        alarm=alarm,
        nonce=bytes(nonce).hex(),
        timestamp_ms=now_ms() if timestamp_ms is None else timestamp_ms,
        status=status,
        layout=layout,
        version=SCHEMA_VERSION if selected is None else SELECTION_VERSION,
        selected=None if selected is None else tuple(sorted(set(selected))),
    )
    return sign_header(header, signing_key) + payload


def sign_header(header: Header, signing_key: SigningKey) -> bytes:
    """Return the signed prefix of a message: magic, header length, header, signature.

    The signature covers the first ``8 + H`` bytes (magic, length and header). Appending the
    payload whose hash the header names completes the message.
    """
    header_bytes = header.canonical_bytes()
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise InvalidHeaderError(
            f"header is {len(header_bytes)} bytes, more than the maximum {MAX_HEADER_BYTES}"
        )
    signed = MAGIC + _FRAME_LENGTH.pack(len(header_bytes)) + header_bytes
    return signed + signing_key.sign(signed).signature


def encode_update(
    *,
    run: str,
    round: int,
    client: str,
    signing_key: SigningKey,
    delta: npt.ArrayLike,
    layout: TensorLayout,
    base_sha256: str,
    samples: int,
    alarm: bool,
    nonce: bytes | None = None,
    timestamp_ms: int | None = None,
    check_finite: bool = True,
) -> bytes:
    """Encode a board's update ``delta = local - global`` (see :func:`encode_message`).

    ``base_sha256`` is the model hash of the global model the board trained from, i.e. the
    ``payload_sha256`` of the global message it received (or ``weights_sha256(global)``).
    """
    return encode_message(
        Kind.UPDATE,
        run=run,
        round=round,
        client=client,
        signing_key=signing_key,
        weights=delta,
        layout=layout,
        base_sha256=base_sha256,
        samples=samples,
        alarm=alarm,
        nonce=nonce,
        timestamp_ms=timestamp_ms,
        check_finite=check_finite,
    )


def encode_global(
    *,
    run: str,
    round: int,
    signing_key: SigningKey,
    weights: npt.ArrayLike,
    layout: TensorLayout,
    previous_sha256: str = ZERO_SHA256,
    samples: int = 0,
    client: str = COORDINATOR_ID,
    nonce: bytes | None = None,
    timestamp_ms: int | None = None,
    selected: Sequence[str] | None = None,
) -> bytes:
    """Encode the coordinator's global model that starts ``round`` (see :func:`encode_message`).

    ``previous_sha256`` is the model hash of the previously published global model.
    ``selected``: the client ids drawn to take part in ``round`` (client sampling), written in
    a version 2 header; ``None`` (every board takes part) keeps the version 1 header.
    """
    return encode_message(
        Kind.GLOBAL,
        run=run,
        round=round,
        client=client,
        signing_key=signing_key,
        weights=weights,
        layout=layout,
        base_sha256=previous_sha256,
        samples=samples,
        nonce=nonce,
        timestamp_ms=timestamp_ms,
        selected=selected,
    )


def encode_status(
    *,
    run: str,
    client: str,
    signing_key: SigningKey,
    online: bool,
    round: int = 0,
    model_sha256: str = ZERO_SHA256,
    telemetry: Mapping[str, float] | None = None,
    nonce: bytes | None = None,
    timestamp_ms: int | None = None,
) -> bytes:
    """Encode a board's ``online``/``offline`` status (see :func:`encode_message`).

    ``round`` and ``model_sha256`` describe the global model the board currently holds.
    ``telemetry`` maps figure names of :mod:`protocol.telemetry` to values (the figures of
    round ``round``, which must then be at least 1); they travel as float32 scalars sorted by
    name. Without figures (``None`` or empty) the message has no payload.

    Raises
    ------
    InvalidHeaderError
        For a name that is not a telemetry figure, or figures with ``round`` 0.
    TelemetryValueError
        For a value outside its figure's domain (after rounding to float32).
    """
    weights = layout = None
    if telemetry:
        layout, weights = pack(telemetry)
    return encode_message(
        Kind.STATUS,
        run=run,
        round=round,
        client=client,
        signing_key=signing_key,
        weights=weights,
        layout=layout,
        base_sha256=model_sha256,
        status=STATUS_ONLINE if online else STATUS_OFFLINE,
        nonce=nonce,
        timestamp_ms=timestamp_ms,
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {brief(key)}")
        out[key] = value
    return out


def _parse_header_bytes(header_bytes: bytes) -> Header:
    try:
        text = header_bytes.decode("ascii")
        obj = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
        )
        canonical = _canonical_json(obj)
    except (ValueError, RecursionError, TypeError) as exc:
        # UnicodeDecodeError and json.JSONDecodeError are ValueErrors; so is an integer with
        # too many digits. Deep nesting raises RecursionError.
        raise MalformedMessageError(f"header is not valid ASCII JSON: {str(exc)[:120]}") from None
    if canonical != header_bytes:
        raise MalformedMessageError(
            "header is not in canonical form (sorted keys, no whitespace, ASCII)"
        )
    return Header.from_json_value(obj)


def header_of(data: bytes) -> Header:
    """The header of a message the caller produced or verified before (e.g. a stored global
    model), read without checking the signature or the payload.

    Raises
    ------
    InvalidMessageError
        If the framing or the header is invalid.
    """
    if len(data) < PREFIX_BYTES + 1 or data[:4] != MAGIC:
        raise MalformedMessageError("not a message: no SIRN frame")
    (header_length,) = _FRAME_LENGTH.unpack_from(data, 4)
    if not 1 <= header_length <= MAX_HEADER_BYTES or len(data) < PREFIX_BYTES + header_length:
        raise MalformedMessageError(f"header length {header_length} does not fit the message")
    return _parse_header_bytes(data[PREFIX_BYTES : PREFIX_BYTES + header_length])


def _lookup_key(keys: KeySource, client: str) -> VerifyKey | None:
    if isinstance(keys, VerifyKey):
        return keys
    if isinstance(keys, Mapping):
        return keys.get(client)
    return keys(client)


def decode_message(
    data: bytes | bytearray | memoryview,
    keys: KeySource,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Message:
    """Parse, verify and decode a message.

    Checks, in order: total size, framing, header canonical form and fields, signer key, the
    signature over bytes ``[0, 8+H)``, payload length, payload SHA-256, finite values (and, for
    a status, every telemetry figure within its domain).

    Parameters
    ----------
    data : bytes-like
        The received message.
    keys : KeySource
        A pinned :class:`nacl.signing.VerifyKey` (used whatever the header's client), a mapping
        from client id to key, or a function returning the key of a client id or ``None``.
    max_message_bytes : int
        Messages longer than this are refused before anything else is read.

    Returns
    -------
    Message
        Returned only if every check passed. Cost: O(payload) for one SHA-256 pass, one finite
        check and one copy, plus one Ed25519 verification of the header.

    Raises
    ------
    InvalidMessageError
        A subclass naming the first failed check: :class:`PayloadTooLargeError`,
        :class:`MalformedMessageError`, :class:`UnsupportedVersionError`,
        :class:`InvalidHeaderError`, :class:`UnknownClientError`, :class:`BadSignatureError`,
        :class:`PayloadLengthError`, :class:`PayloadHashMismatchError`,
        :class:`NonFiniteValuesError` or :class:`TelemetryValueError`. Nothing else is raised
        for any input.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise MalformedMessageError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_message_bytes:
        raise PayloadTooLargeError(
            f"message is {len(data)} bytes, more than the limit of {max_message_bytes}"
        )
    if len(data) < PREFIX_BYTES + 1 + SIGNATURE_BYTES:
        raise MalformedMessageError(f"message is only {len(data)} bytes: truncated")
    if data[:4] != MAGIC:
        raise MalformedMessageError(f"message does not start with {MAGIC!r}")
    (header_length,) = _FRAME_LENGTH.unpack_from(data, 4)
    if not 1 <= header_length <= MAX_HEADER_BYTES:
        raise MalformedMessageError(
            f"header length {header_length} is outside [1, {MAX_HEADER_BYTES}]"
        )
    signed_end = PREFIX_BYTES + header_length
    payload_start = signed_end + SIGNATURE_BYTES
    if len(data) < payload_start:
        raise MalformedMessageError(
            f"message is {len(data)} bytes, shorter than its header and signature "
            f"({payload_start} bytes): truncated"
        )
    header_bytes = data[PREFIX_BYTES:signed_end]
    header = _parse_header_bytes(header_bytes)
    try:
        verify_key = _lookup_key(keys, header.client)
        if verify_key is None:
            raise UnknownClientError(f"no public key is known for client {header.client!r}")
        signature = data[signed_end:payload_start]
        try:
            verify_key.verify(data[:signed_end], signature)
        except _NaclBadSignatureError:
            raise BadSignatureError(
                f"signature of the {header.kind.value} message from {header.client!r} "
                "does not verify"
            ) from None
        payload = memoryview(data)[payload_start:]
        if len(payload) != header.layout.nbytes:
            raise PayloadLengthError(
                f"payload is {len(payload)} bytes, the signed layout needs "
                f"{header.layout.nbytes} ({header.layout.size} float32 values)"
            )
        if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
            raise PayloadHashMismatchError(
                "payload SHA-256 differs from the signed payload_sha256: the payload was altered"
            )
        weights = payload_to_vector(payload, header.layout) if header.layout.size > 0 else None
        if weights is not None and header.kind is Kind.STATUS:
            check_values(header.layout, weights)
    except InvalidMessageError as exc:
        exc.client_id = header.client
        raise
    return Message(header=header, header_bytes=header_bytes, signature=signature, weights=weights)


def check_global(
    data: bytes | bytearray | memoryview,
    coordinator_key: VerifyKey,
    *,
    run: str,
    last_round: int | None = None,
    expected_layout: TensorLayout | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Message:
    """Board-side acceptance of a global model: verify with the pinned coordinator key.

    A board calls this on every message of the global topic and keeps its current model when
    it raises.

    Parameters
    ----------
    data : bytes-like
        The received message.
    coordinator_key : nacl.signing.VerifyKey
        The coordinator's public key pinned at provisioning.
    run : str
        The run the board belongs to.
    last_round : int, optional
        Round of the global model the board already holds; only strictly newer rounds are
        accepted (a redelivered retained message raises :class:`StaleRoundError`).
    expected_layout : TensorLayout, optional
        The board's model layout; a different one raises :class:`LayoutMismatchError`.
    max_message_bytes : int
        Size limit passed to :func:`decode_message`.

    Returns
    -------
    Message
        The verified global model (``message.weights``, ``message.round``).

    Raises
    ------
    InvalidMessageError
        Any :func:`decode_message` error, or :class:`WrongKindError`, :class:`WrongRunError`,
        :class:`StaleRoundError`, :class:`LayoutMismatchError`.
    """
    message = decode_message(data, coordinator_key, max_message_bytes=max_message_bytes)
    client = message.client
    if message.kind is not Kind.GLOBAL:
        raise WrongKindError(
            f"expected a global message, got kind {message.kind.value!r}", client_id=client
        )
    if message.run != run:
        raise WrongRunError(
            f"global model is for run {message.run!r}, this board is in run {run!r}",
            client_id=client,
        )
    if last_round is not None and message.round <= last_round:
        raise StaleRoundError(
            f"global model is for round {message.round}, not newer than the held round "
            f"{last_round}",
            client_id=client,
        )
    if expected_layout is not None and message.layout != expected_layout:
        raise LayoutMismatchError(
            f"global model layout (fingerprint {message.layout.fingerprint[:16]}) differs from "
            f"the board's model layout (fingerprint {expected_layout.fingerprint[:16]})",
            client_id=client,
        )
    return message
