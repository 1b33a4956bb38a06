"""Errors raised by the ``protocol`` package.

Every way a message can be refused has its own exception class and its own :class:`Reason`
code. The decoder and the admission rules raise only subclasses of :class:`InvalidMessageError`,
so a caller that catches that one class has handled every bad input; the reason code is what the
coordinator counts and logs.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar


class Reason(str, Enum):
    """Outcome code of decoding or admitting a message (the value is what is logged and counted)."""

    ACCEPTED = "accepted"
    #: Buffered asynchronous mode: admitted, trained on one of the last S global versions.
    STALE = "stale"
    DUPLICATE = "duplicate"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_HEADER = "invalid_header"
    UNKNOWN_CLIENT = "unknown_client"
    BAD_SIGNATURE = "bad_signature"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    PAYLOAD_LENGTH = "payload_length"
    PAYLOAD_HASH_MISMATCH = "payload_hash_mismatch"
    NON_FINITE = "non_finite"
    #: A status message's telemetry figure outside its documented domain (docs/protocol.md 4.2).
    BAD_TELEMETRY = "bad_telemetry"
    WRONG_KIND = "wrong_kind"
    TOPIC_MISMATCH = "topic_mismatch"
    WRONG_RUN = "wrong_run"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    WRONG_BASE_MODEL = "wrong_base_model"
    LAYOUT_MISMATCH = "layout_mismatch"
    BAD_SAMPLE_COUNT = "bad_sample_count"
    CLOCK_SKEW = "clock_skew"
    CONFLICTING_UPDATE = "conflicting_update"
    #: The round has a selection (client sampling) that does not name the board.
    NOT_SELECTED = "not_selected"
    #: Buffered asynchronous mode: trained on a global version more than S versions old.
    TOO_STALE = "too_stale"
    #: Buffered asynchronous mode: the board already has an update in the open buffer.
    BUFFERED = "buffered"
    REPLAYED_NONCE = "replayed_nonce"
    #: Counted by the coordinator, not by :class:`protocol.admission.Admission`: a correctly
    #: signed update from a board an operator has banned (admission sees no key for it).
    BANNED = "banned"
    #: Counted by the coordinator on start: an update of the open round stored earlier that the
    #: current admission rules refuse (e.g. written under looser bounds); taken out of the round.
    QUARANTINED = "quarantined"
    #: Counted by the coordinator: a correctly signed update under a key an operator revoked.
    REVOKED = "revoked"

    def __str__(self) -> str:
        return self.value


#: Outcomes that admit the update for aggregation (``stale``: buffered asynchronous mode).
ADMITTED = frozenset({Reason.ACCEPTED, Reason.STALE})


def brief(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about untrusted input.

    ``repr`` escapes control characters (no log injection) and the cut bounds the log line, so
    a peer cannot make the coordinator write a quarter-megabyte header into its logs.
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ProtocolError(Exception):
    """Base class of every error raised by ``protocol``."""


class InvalidMessageError(ProtocolError, ValueError):
    """A message was refused. Subclasses fix :attr:`reason`; the message says what was wrong.

    Attributes
    ----------
    reason : Reason
        The reason code of this failure (one code per subclass).
    client_id : str or None
        The client id *claimed* by the header when the header could be parsed (unauthenticated
        unless the failure happened after signature verification); ``None`` otherwise.
    """

    reason: ClassVar[Reason] = Reason.MALFORMED

    def __init__(self, message: str, *, client_id: str | None = None) -> None:
        super().__init__(message)
        self.client_id = client_id


class MalformedMessageError(InvalidMessageError):
    """The bytes are not a message: bad magic, truncated frame, bad header length or syntax."""

    reason = Reason.MALFORMED


class UnsupportedVersionError(InvalidMessageError):
    """The header declares a schema version this implementation does not speak."""

    reason = Reason.UNSUPPORTED_VERSION


class InvalidHeaderError(InvalidMessageError):
    """The header parses but a field is missing, extra, of the wrong type or out of range."""

    reason = Reason.INVALID_HEADER


class UnknownClientError(InvalidMessageError):
    """No public key is known for the client id named in the header."""

    reason = Reason.UNKNOWN_CLIENT


class BadSignatureError(InvalidMessageError):
    """The Ed25519 signature does not verify against the signer's public key."""

    reason = Reason.BAD_SIGNATURE


class PayloadTooLargeError(InvalidMessageError):
    """The message is larger than the configured size limit."""

    reason = Reason.PAYLOAD_TOO_LARGE


class PayloadLengthError(InvalidMessageError):
    """The payload length is not 4 bytes times the number of values the layout declares."""

    reason = Reason.PAYLOAD_LENGTH


class PayloadHashMismatchError(InvalidMessageError):
    """The SHA-256 of the payload differs from the signed ``payload_sha256``."""

    reason = Reason.PAYLOAD_HASH_MISMATCH


class NonFiniteValuesError(InvalidMessageError):
    """The payload contains NaN or infinite values."""

    reason = Reason.NON_FINITE


class TelemetryValueError(InvalidMessageError):
    """A status message's telemetry figure is outside its documented domain."""

    reason = Reason.BAD_TELEMETRY


class WrongKindError(InvalidMessageError):
    """The message kind is not the one expected here (e.g. a ``global`` where an update belongs)."""

    reason = Reason.WRONG_KIND


class TopicMismatchError(InvalidMessageError):
    """The MQTT topic the message arrived on disagrees with its signed header."""

    reason = Reason.TOPIC_MISMATCH


class WrongRunError(InvalidMessageError):
    """The message belongs to another run."""

    reason = Reason.WRONG_RUN


class StaleRoundError(InvalidMessageError):
    """The message is for a round that is already over (or, on a board, not newer than its own)."""

    reason = Reason.STALE_ROUND


class FutureRoundError(InvalidMessageError):
    """The message is for a round that has not started."""

    reason = Reason.FUTURE_ROUND


class WrongBaseModelError(InvalidMessageError):
    """The update was computed from a model other than the current global model."""

    reason = Reason.WRONG_BASE_MODEL


class LayoutMismatchError(InvalidMessageError):
    """The tensor layout of the payload differs from the expected model layout."""

    reason = Reason.LAYOUT_MISMATCH


class SampleCountError(InvalidMessageError):
    """The declared number of local samples is outside the admitted range."""

    reason = Reason.BAD_SAMPLE_COUNT


class ClockSkewError(InvalidMessageError):
    """The signed timestamp is further from the receiver's clock than the configured maximum."""

    reason = Reason.CLOCK_SKEW


class ConflictingUpdateError(InvalidMessageError):
    """The client already has a different update admitted in this round."""

    reason = Reason.CONFLICTING_UPDATE


class NotSelectedError(InvalidMessageError):
    """The round's global model named the boards drawn to take part, and not this one."""

    reason = Reason.NOT_SELECTED


class TooStaleError(InvalidMessageError):
    """Buffered asynchronous mode: the update was trained on a global version more than the
    staleness bound S versions before the current one."""

    reason = Reason.TOO_STALE


class BufferedError(InvalidMessageError):
    """Buffered asynchronous mode: the board already has a different update in the open
    buffer (one per board until the next global version)."""

    reason = Reason.BUFFERED


class ReplayedNonceError(InvalidMessageError):
    """The nonce was already used by another message in this round."""

    reason = Reason.REPLAYED_NONCE


class LayoutError(ProtocolError, ValueError):
    """A tensor layout (or a vector passed with it) is invalid; raised to the programmer."""


class TopicError(ProtocolError, ValueError):
    """A topic string or an identifier used in a topic is invalid."""


class KeyFileError(ProtocolError):
    """A key file is missing, malformed, or has unsafe permissions."""


class AllowListError(ProtocolError):
    """The allow-list file is malformed, or an entry conflicts with an existing one."""


class SettingsError(ProtocolError, ValueError):
    """Shared settings (e.g. :class:`protocol.mqtt.BrokerSettings`) are invalid.

    Programs subclass those settings to raise their own configuration error instead.
    """


class AdmissionStateError(ProtocolError):
    """Saved admission state cannot be read back (malformed, wrong version)."""
