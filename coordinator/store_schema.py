"""The layout of the coordinator's database: its tables, and the rows read from them.

:data:`SCHEMA_SQL` creates every table that is missing (so a database written by an older
version gains the newer tables when a coordinator opens it); :data:`SCHEMA_VERSION` is stored in
``meta.schema`` and checked on every open. :class:`GlobalVersion`, :class:`StoredUpdate`,
:class:`TelemetryRow` and :class:`RoundRow` are what :class:`coordinator.store.CoordinatorStore`
reads back.

Tables
------
``meta(key, value)``
    run id, layout fingerprint, config, current round, finished flag.
``models(round, sha256, previous_sha256, samples, weights, message, created_at)``
    every global model version; ``round`` is the round it starts (``rounds + 1`` is final).
``rounds(round, opened_at, closed_at, base_sha256, status, record, strategy_state)``
    ``status`` is ``open`` or ``closed``; ``record`` the JSON round record.
``updates(round, client, client_index, message_id, digest, nonce, samples, alarm, nbytes,
received_at, delta)``
    admitted updates; ``delta`` (float32 bytes) is kept until the round closes.
``decisions(round, reason, count)``
    admission outcome counts per round (accepted, duplicate and every rejection reason).
``rejections(id, round, client, reason, detail, at)``
    the first :data:`MAX_LOGGED_PER_REASON` rejections per round and reason, with details.
``statuses(client, status, round, at)``
    last announced board status.
``status_decisions(round, reason, count)``
    outcome counts of messages on the status topics per round (``accepted`` and every refusal
    reason; docs/protocol.md section 8.8), apart from the updates' ``decisions``.
``telemetry(client, round, figures, at)``
    the telemetry figures a board's status carried for a round (``figures``: JSON object of
    name to value, docs/protocol.md section 4.2); one row per board and round, the latest
    status with figures for that round wins. Added after the first release: like every table
    it is created when missing, so older databases gain it when a coordinator opens them, and
    the readers treat a database without it as one without figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Version of the database schema (``meta.schema``).
SCHEMA_VERSION = 1
#: Rejections logged with their detail per (round, reason); later ones are only counted.
MAX_LOGGED_PER_REASON = 200

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    round INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    previous_sha256 TEXT NOT NULL,
    samples INTEGER NOT NULL,
    weights BLOB NOT NULL,
    message BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    opened_at REAL NOT NULL,
    closed_at REAL,
    base_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    record TEXT,
    strategy_state TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    client_index INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    nonce TEXT NOT NULL,
    samples INTEGER NOT NULL,
    alarm INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    delta BLOB,
    PRIMARY KEY (round, client)
);
CREATE INDEX IF NOT EXISTS updates_digest ON updates (digest);
CREATE TABLE IF NOT EXISTS update_bases (
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    base_round INTEGER NOT NULL,
    PRIMARY KEY (round, client)
);
CREATE TABLE IF NOT EXISTS decisions (
    round INTEGER NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (round, reason)
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    client TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    record BLOB NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS statuses (
    client TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    round INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS status_decisions (
    round INTEGER NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (round, reason)
);
CREATE TABLE IF NOT EXISTS telemetry (
    client TEXT NOT NULL,
    round INTEGER NOT NULL,
    figures TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (client, round)
);
"""


@dataclass(frozen=True)
class GlobalVersion:
    """One global model version.

    Attributes
    ----------
    round : int
        The round this model starts.
    weights : ndarray of float32
        The flat model.
    sha256 : str
        Model hash (``payload_sha256`` of its message).
    previous_sha256 : str
        Hash of the version before it.
    message : bytes
        The signed global message, published retained as is.
    samples : int
        Samples aggregated into it.
    """

    round: int
    weights: np.ndarray
    sha256: str
    previous_sha256: str
    message: bytes
    samples: int = 0


@dataclass(frozen=True)
class StoredUpdate:
    """An admitted update as stored (``delta`` is ``None`` once its round closed).

    ``base_round``: the global version it was trained on, when older than ``round`` (a
    ``stale`` update of buffered asynchronous mode, table ``update_bases``); ``None`` means
    ``round`` itself.
    """

    round: int
    client: str
    client_index: int
    message_id: str
    digest: str
    nonce: str
    samples: int
    alarm: bool
    nbytes: int
    received_at: float
    delta: np.ndarray | None
    base_round: int | None = None

    @property
    def trained_on(self) -> int:
        """The global version the update was trained on."""
        return self.round if self.base_round is None else self.base_round


@dataclass(frozen=True)
class TelemetryRow:
    """The telemetry figures one board reported for one round (docs/protocol.md 4.2).

    Attributes
    ----------
    client : str
        The board.
    round : int
        The round the figures describe.
    figures : dict of str to float
        What the board measured; a sensor it does not have is a name it did not send.
    at : float
        When the status carrying them was received (Unix seconds).
    """

    client: str
    round: int
    figures: dict[str, float]
    at: float


def parse_figures(text: str) -> dict[str, float]:
    """Stored figures back as ``{name: float}`` (anything not a finite number left out)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    out: dict[str, float] = {}
    for name, number in value.items():
        numeric = isinstance(number, (int, float)) and not isinstance(number, bool)
        if numeric and math.isfinite(number):
            out[str(name)] = float(number)
    return out


@dataclass(frozen=True)
class RoundRow:
    """One row of the ``rounds`` table."""

    round: int
    opened_at: float
    closed_at: float | None
    base_sha256: str
    status: str
    record: dict[str, Any] | None
    strategy_state: dict[str, Any] | None


def to_json(value: Any) -> str:
    """Canonical JSON of a stored value (sorted keys; NumPy values and sets converted)."""
    return json.dumps(value, sort_keys=True, default=json_default, allow_nan=True)


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars and arrays, sets and tuples."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")
