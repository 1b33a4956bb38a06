"""Wire format shared by boards and the coordinator: envelope, topics, signing, tensor codec.

A message is a canonical JSON header signed with Ed25519, followed by a raw little-endian
float32 payload; ``docs/protocol.md`` specifies it byte by byte. The public API:

- :func:`encode_message` / :func:`encode_update` / :func:`encode_global` / :func:`encode_status`
  build signed messages; :func:`decode_message` verifies and decodes any message;
  :func:`check_global` is the board-side acceptance of a global model.
- :class:`Admission` applies the coordinator's admission rules to received updates.
- :class:`TensorLayout` describes how the flat vector splits into named tensors.
- :mod:`protocol.keys` manages key files and the allow-list; :mod:`protocol.topics` names topics.
- :mod:`protocol.telemetry` is the table of telemetry figures a status message may carry.
"""

from protocol.admission import Admission, AdmissionDecision, AdmissionPolicy
from protocol.envelope import (
    COORDINATOR_ID,
    DEFAULT_MAX_MESSAGE_BYTES,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    ZERO_SHA256,
    Header,
    KeySource,
    Kind,
    Message,
    check_global,
    decode_message,
    encode_global,
    encode_message,
    encode_status,
    encode_update,
)
from protocol.errors import InvalidMessageError, ProtocolError, Reason
from protocol.keys import (
    AllowList,
    generate_signing_key,
    key_fingerprint,
    load_signing_key,
    load_verify_key,
    save_key_pair,
)
from protocol.layout import TensorLayout, weights_sha256
from protocol.topics import global_topic, parse_topic, status_topic, update_topic

__all__ = [
    "COORDINATOR_ID",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "ZERO_SHA256",
    "Admission",
    "AdmissionDecision",
    "AdmissionPolicy",
    "AllowList",
    "Header",
    "InvalidMessageError",
    "KeySource",
    "Kind",
    "Message",
    "ProtocolError",
    "Reason",
    "TensorLayout",
    "check_global",
    "decode_message",
    "encode_global",
    "encode_message",
    "encode_status",
    "encode_update",
    "generate_signing_key",
    "global_topic",
    "key_fingerprint",
    "load_signing_key",
    "load_verify_key",
    "parse_topic",
    "save_key_pair",
    "status_topic",
    "update_topic",
    "weights_sha256",
]
