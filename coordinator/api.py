"""The coordinator's HTTP API and live dashboard (FastAPI), served on a loopback port.

:func:`create_app` builds the application from the coordinator's settings, its SQLite store and
an optional :class:`CoordinatorControls` (the running service, for the admin actions);
:func:`start_api_server` serves it with uvicorn on a background thread.

Endpoints (the OpenAPI schema is at ``/api/openapi.json``; ``docs/api.md`` describes them):

* read-only, no token: ``GET /api/health``, ``/api/run``, ``/api/rounds``,
  ``/api/rounds/{round}``, ``/api/clients``, ``/api/clients/{client_id}``, ``/api/model``,
  ``/api/model/download`` (the signed global message, byte for byte, so a board can verify it
  with the pinned coordinator key) and ``GET /metrics`` (Prometheus text format);
* admin, ``Authorization: Bearer <api_token>``: ``POST /api/admin/pause``,
  ``/api/admin/resume``, ``/api/admin/clients/{client_id}/ban``,
  ``/api/admin/clients/{client_id}/unban`` and ``/api/admin/keys``. Without the right token
  they answer 401; with no token configured admin actions are disabled (401 as well). Tokens
  are compared in constant time (on their SHA-256 digests) and never logged or returned;
* ``GET /`` -- the dashboard (static files of ``coordinator/dashboard``, no external resource).

**Reading the store.** The service writes the database through its own connection on its own
thread (a ``sqlite3`` connection belongs to one thread). The app opens a second, read-only
connection to the same file (``mode=ro``: the API cannot write the database) and reads each
request in one transaction, so a response is a consistent snapshot even while a round closes
(the database is in WAL mode: readers never block the coordinator). Closed rounds never change,
so their parsed records are cached and a poll reads only the rounds closed since the last one.

**User input never causes a 5xx.** Path and query values are bounded in the schema (rounds are
``1 ≤ n ≤ 2^53 − 1``, client ids follow the protocol's identifier rule, bodies forbid unknown
fields), so malformed input gets 422; an unknown client or a round that does not exist gets 404
with a message naming what exists. Only the coordinator's own state can give a 5xx: 503 while
the run is not yet started or the database is unreadable, and 503 when the service did not carry
out an admin action in time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from fastapi import Depends, FastAPI, HTTPException, Request, Response, Security
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.signing import VerifyKey
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from coordinator.config import CoordinatorConfig
from coordinator.store import SCHEMA_VERSION, CoordinatorStore, StoreError, TelemetryRow
from protocol.errors import KeyFileError, Reason
from protocol.keys import key_fingerprint, load_verify_key, parse_verify_key, verify_key_hex
from protocol.telemetry import FIGURES, throttled_conditions

logger = logging.getLogger(__name__)

#: Largest round number accepted in a path or query (the protocol's integer range).
MAX_ROUND = 2**53 - 1
#: The protocol's identifier rule (run and client ids), as a schema pattern.
CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
#: Host names the app answers to (DNS-rebinding protection for a loopback service).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Where the dashboard's static files live.
DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
#: Upper bounds (seconds) of the round-duration histogram of ``/metrics``.
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Rejections listed per client in ``/api/clients/{client_id}`` (most recent first).
RECENT_REJECTIONS = 20

_PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Telemetry figure -> (metric, scale to the metric's unit, help text) of ``/metrics``.
TELEMETRY_METRICS: dict[str, tuple[str, float, str]] = {
    "rss_peak_mib": (
        "siren_board_peak_rss_bytes",
        2.0**20,
        "Peak resident set size of the board's process.",
    ),
    "process_boards": (
        "siren_board_process_boards",
        1.0,
        "Boards sharing the process whose memory and CPU figures are reported.",
    ),
    "alarm_s": ("siren_board_alarm_seconds", 1.0, "Wall time of the SIREN alarm."),
    "alarm_cpu_s": ("siren_board_alarm_cpu_seconds", 1.0, "CPU time of the SIREN alarm."),
    "train_s": ("siren_board_train_seconds", 1.0, "Wall time of local training."),
    "train_cpu_s": ("siren_board_train_cpu_seconds", 1.0, "CPU time of local training."),
    "soc_temp_c": (
        "siren_board_soc_temperature_celsius",
        1.0,
        "Highest SoC temperature during the round.",
    ),
    "throttled_flags": (
        "siren_board_throttled_flags",
        1.0,
        "Raspberry Pi get_throttled word after the round.",
    ),
    "power_mw": ("siren_board_power_watts", 1e-3, "Mean board input power during the round."),
}
#: Telemetry family -> (metric, label, scale, help text) of ``/metrics``.
TELEMETRY_FAMILY_METRICS: dict[str, tuple[str, str, float, str]] = {
    "temp_c": (
        "siren_board_zone_temperature_celsius",
        "zone",
        1.0,
        "Highest temperature of one thermal zone during the round.",
    ),
    "power_mw": (
        "siren_board_rail_power_watts",
        "rail",
        1e-3,
        "Mean power of one power-monitor rail during the round.",
    ),
}


# -- the service's side --------------------------------------------------------------------


@runtime_checkable
class CoordinatorControls(Protocol):
    """What the running coordinator service offers the admin endpoints.

    The API calls these from its own threads; an implementation applies the action on the
    service's thread (or under a lock) and returns once it took effect.

    Every action returns whether it changed anything (``False``: already in that state). They
    raise ``LookupError`` for a client the run does not know (answered 404), ``ValueError``
    for an action refused in the current state, with the reason as message (answered 409), and
    ``TimeoutError`` when the service could not act in time (answered 503).
    """

    def is_paused(self) -> bool:
        """Whether closing rounds is paused."""
        ...

    def admin_banned(self) -> frozenset[str]:
        """Clients banned by an operator (their updates are refused)."""
        ...

    def pause(self) -> bool:
        """Stop closing rounds (updates are still admitted); ``True`` if it was running."""
        ...

    def resume(self) -> bool:
        """Close rounds again; ``True`` if it was paused."""
        ...

    def ban(self, client_id: str) -> bool:
        """Refuse the client's updates from now on; ``True`` if it was not banned."""
        ...

    def unban(self, client_id: str) -> bool:
        """Accept the client's updates again; ``True`` if it was banned."""
        ...

    def register_key(self, client_id: str, public_key: VerifyKey) -> bool:
        """Register (or rotate) a board's public key in the allow-list (a board whose key was
        revoked is re-admitted with the new key); ``True`` if it changed."""
        ...

    def revoke(self, client_id: str) -> bool:
        """Revoke the board's key now (it leaves the allow-list); ``True`` if it changed."""
        ...

    def revoked(self) -> frozenset[str]:
        """Boards whose key is revoked."""
        ...


# -- response and request models -----------------------------------------------------------


class ErrorBody(BaseModel):
    """An error answer: what was wrong."""

    detail: str


class Health(BaseModel):
    """Liveness: whether the run started, and where it is."""

    status: Literal["ok", "starting"]
    run: str
    round: int | None = Field(description="The open round (rounds + 1 once finished)")
    finished: bool
    paused: bool
    time: float = Field(description="Server time, Unix seconds")


class OpenRound(BaseModel):
    """The round being collected."""

    round: int
    opened_at: float
    age_seconds: float
    deadline: float | None = Field(description="When it may close with a quorum (Unix s)")
    admitted: list[str]
    alarms: list[str] = Field(description="Admitted boards that raised the SIREN alarm")
    missing: list[str] = Field(description="Expected boards without an admitted update")


class RunInfo(BaseModel):
    """The run, its settings and its progress."""

    run: str
    aggregator: str
    aggregator_params: dict[str, Any]
    dataset: str
    model: str | None
    rounds_planned: int
    rounds_closed: int
    current_round: int
    finished: bool
    paused: bool
    boards: list[str] = Field(description="Expected boards in index order")
    defense_start_round: int
    round_timeout: float
    quorum: float
    started_at: float | None
    open_round: OpenRound | None
    global_model_sha256: str | None
    admission: dict[str, int] = Field(description="Admission outcomes summed over the run")
    admin_enabled: bool = Field(description="Admin actions are available (token and service)")
    siren_profile: str | None = Field(
        description="SIREN profile of the server (authors or paper-text); null for other rules"
    )
    banned: list[str] = Field(description="Boards SIREN bans after the last closed round")
    known_malicious: list[str] | None = Field(
        description="Boards a simulator made malicious (its [simulation] table); null when the "
        "coordinator cannot know, as in any real deployment"
    )
    honest_banned: list[str] | None = Field(
        description="Banned boards that are not malicious; null without known_malicious"
    )
    attackers_missed: list[str] | None = Field(
        description="Malicious boards not banned; null without known_malicious"
    )


class RoundSummary(BaseModel):
    """One round of the history."""

    round: int
    status: Literal["open", "closed"]
    opened_at: float
    closed_at: float | None
    seconds: float | None = Field(description="Wall time from opening to closing")
    test_accuracy: float | None
    test_loss: float | None
    close_reason: str | None
    defense_active: bool | None
    rule: str | None = Field(description="Aggregation rule that decided the round")
    decision_case: int | None = Field(description="SIREN case (0, 1, 3 or 4); null otherwise")
    decision_branch: str | None
    rollback: bool | None
    reported: list[str] = Field(description="Boards with an admitted update")
    alarms: list[str]
    kept: list[str] = Field(description="Reported boards the aggregate used")
    rejected: list[str] = Field(description="Reported boards the aggregate left out")
    missing: list[str]
    admission: dict[str, int] = Field(description="Admission outcomes in this round")


class Verdict(BaseModel):
    """The server's verdict on one board's update."""

    kept: bool
    weight: float | None
    score: float | None
    reason: str | None


class SirenDecision(BaseModel):
    """SIREN's decision record (Algorithm 2), with board names instead of indices."""

    case: int | None
    branch: str | None
    alarming: list[str]
    silent: list[str]
    benign: list[str]
    malicious: list[str]
    ignored: list[str]
    refused: list[str]
    probed: list[str]
    awarded: list[str]
    rollback: bool | None
    base: str | None
    root_accuracy: dict[str, float | None]
    max_alarming_accuracy: float | None
    max_silent_accuracy: float | None
    penalty_counts: dict[str, float | None]
    banned: list[str]
    newly_banned: list[str]
    rejoined: list[str]
    c_s: float | None
    c_p: float | None
    c_a: float | None


class RoundDetail(RoundSummary):
    """One round with every verdict and the strategy's record."""

    verdicts: dict[str, Verdict] = Field(description="Per reported board")
    sample_counts: dict[str, int]
    siren: SirenDecision | None
    network: dict[str, Any]
    timing: dict[str, Any]
    decision: dict[str, Any] = Field(description="The strategy's raw record (board indices)")


class BoardTelemetry(BaseModel):
    """What a board measured in one round, as its status message reported it
    (``docs/protocol.md`` section 4.2)."""

    round: int = Field(description="The round the figures describe")
    at: float = Field(description="When the status carrying them arrived (Unix s)")
    figures: dict[str, float] = Field(
        description="Exactly the figures the board sent, by name (units in docs/protocol.md 4.2)"
    )
    absent: list[str] = Field(
        description="Fixed figures the board did not send: a sensor it does not have (or, "
        "for alarm_s and alarm_cpu_s, an alarm that did not run). Nothing is filled in"
    )
    throttled: list[str] | None = Field(
        description="The conditions set in throttled_flags (Raspberry Pi get_throttled); "
        "null when the board sent no throttling word"
    )
    process_boards: int = Field(
        description="Boards sharing the process the memory and CPU figures are from "
        "(1 on a real board)"
    )


class ClientSummary(BaseModel):
    """One board at a glance."""

    client: str
    index: int
    status: Literal["online", "offline", "unknown"]
    status_round: int | None
    last_seen: float | None = Field(description="Latest status message or update (Unix s)")
    rounds_reported: int
    rounds_kept: int
    alarms: int = Field(description="Rounds in which it raised the SIREN alarm")
    penalty_count: float | None = Field(description="SIREN malicious index; null without SIREN")
    banned: bool
    siren_banned: bool
    admin_banned: bool
    rejections: int = Field(description="Its logged admission rejections")
    malicious: bool | None = Field(
        description="Made malicious by the simulator; null when the coordinator cannot know"
    )
    telemetry: BoardTelemetry | None = Field(
        description="Its figures of the latest round it reported any for; null if it never did"
    )


class ClientRound(BaseModel):
    """A board in one closed round."""

    round: int
    reported: bool
    alarm: bool | None
    kept: bool | None
    weight: float | None
    score: float | None
    reason: str | None
    penalty_count: float | None


class RejectionEntry(BaseModel):
    """A logged admission rejection."""

    round: int
    reason: str
    detail: str
    at: float


class ClientDetail(ClientSummary):
    """One board: its summary, its round history and its rejections."""

    alarm_rounds: list[int]
    rejections_by_reason: dict[str, int]
    recent_rejections: list[RejectionEntry]
    history: list[ClientRound]
    telemetry_history: list[BoardTelemetry] = Field(
        description="Its figures of every round it reported any for, ascending"
    )


class ModelInfo(BaseModel):
    """The current global model (the one that starts the open round, or the final one)."""

    run: str
    round: int
    final: bool
    sha256: str = Field(description="Model hash: SHA-256 of the float32 little-endian weights")
    previous_sha256: str
    samples: int
    layout_fingerprint: str | None
    message_bytes: int
    message_sha256: str = Field(description="SHA-256 of the whole signed message")
    created_at: float
    coordinator_public_key: str | None = Field(
        description="Informative only: a board verifies with the key pinned at provisioning"
    )
    download: str


class PauseState(BaseModel):
    """Whether closing rounds is paused, after an admin action."""

    paused: bool
    changed: bool


class BanState(BaseModel):
    """Whether a board is banned by an operator, after an admin action."""

    client: str
    banned: bool
    changed: bool


class RevokeState(BaseModel):
    """Whether a board's key is revoked, after an admin action."""

    client: str
    revoked: bool
    changed: bool


class KeyRegistration(BaseModel):
    """A board public key to register in the coordinator's allow-list."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(pattern=CLIENT_ID_PATTERN, description="The board's client id")
    public_key: str = Field(
        pattern=r"^[0-9a-fA-F]{64}$", description="Ed25519 public key, 64 hex digits"
    )


class KeyRegistered(BaseModel):
    """The outcome of a key registration."""

    client_id: str
    fingerprint: str = Field(description="SHA-256 of the 32 raw key bytes")
    changed: bool
    active: bool = Field(description="The board belongs to this run: the key is used now")


# -- reading the store ---------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    """A finite float, or ``None`` (for absent, non-numeric, NaN or infinite values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _clean(value: Any) -> Any:
    """JSON-safe copy of a stored record: non-finite floats become ``None``."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _telemetry(row: TelemetryRow) -> BoardTelemetry:
    """The API's view of one stored round of figures."""
    figures = row.figures
    flags = figures.get("throttled_flags")
    boards = figures.get("process_boards", 1.0)
    return BoardTelemetry(
        round=row.round,
        at=row.at,
        figures=figures,
        absent=[name for name in FIGURES if name not in figures and name != "process_boards"],
        throttled=None if flags is None else throttled_conditions(int(flags)),
        process_boards=int(boards) if boards >= 1 else 1,
    )


class _StoreView(CoordinatorStore):
    """A read-only connection to a coordinator database, shareable between threads.

    It reuses the store's reading methods (they only use ``self._db``) and adds the few
    queries the API needs that the store does not offer. Never writes: the connection is opened
    with ``mode=ro``. Use it only inside :meth:`snapshot`.
    """

    def __init__(self, path: str | Path) -> None:  # no super().__init__: that one writes
        self.path = Path(path)
        uri = self.path.resolve().as_uri() + "?mode=ro"
        self._db = sqlite3.connect(
            uri, uri=True, isolation_level=None, timeout=10.0, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._closed: list[tuple[int, float, float, dict[str, Any]]] = []

    @contextmanager
    def snapshot(self) -> Iterator[_StoreView]:
        """One read transaction (a consistent view), serialised with other requests."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                schema = self.get_meta("schema")
                if schema is not None and schema != str(SCHEMA_VERSION):
                    raise StoreError(
                        f"{self.path} has schema version {schema}, expected {SCHEMA_VERSION}"
                    )
                yield self
            finally:
                self._db.execute("COMMIT")

    def closed_records(self) -> list[tuple[int, float, float, dict[str, Any]]]:
        """``(round, opened_at, closed_at, record)`` of every closed round, ascending.

        Closed rounds are immutable and close in order, so only rounds after the cached ones
        are read (without their strategy state, which can weigh megabytes).
        """
        after = self._closed[-1][0] if self._closed else 0
        rows = self._db.execute(
            "SELECT round, opened_at, closed_at, record FROM rounds "
            "WHERE status = 'closed' AND round > ? ORDER BY round",
            (after,),
        ).fetchall()
        for number, opened, closed, record in rows:
            parsed = json.loads(record) if record else {}
            self._closed.append(
                (int(number), float(opened), float(closed or opened), _dict(_clean(parsed)))
            )
        return self._closed

    def open_round(self) -> tuple[int, float] | None:
        """``(round, opened_at)`` of the open round, or ``None``."""
        row = self._db.execute(
            "SELECT round, opened_at FROM rounds WHERE status = 'open' ORDER BY round DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), float(row[1]))

    def admitted(self, round_index: int) -> list[tuple[str, bool, int, float]]:
        """``(client, alarm, samples, received_at)`` of a round's admitted updates."""
        rows = self._db.execute(
            "SELECT client, alarm, samples, received_at FROM updates WHERE round = ? "
            "ORDER BY client_index",
            (round_index,),
        )
        return [(str(r[0]), bool(r[1]), int(r[2]), float(r[3])) for r in rows]

    def last_updates(self) -> dict[str, float]:
        """Latest admitted update time per client."""
        rows = self._db.execute("SELECT client, MAX(received_at) FROM updates GROUP BY client")
        return {str(r[0]): float(r[1]) for r in rows}

    def rejection_counts(self) -> dict[str, dict[str, int]]:
        """Logged rejections per client and reason."""
        rows = self._db.execute(
            "SELECT client, reason, COUNT(*) FROM rejections WHERE client IS NOT NULL "
            "GROUP BY client, reason"
        )
        out: dict[str, dict[str, int]] = {}
        for client, reason, count in rows:
            out.setdefault(str(client), {})[str(reason)] = int(count)
        return out

    def client_rejections(self, client: str, limit: int) -> list[RejectionEntry]:
        """The most recent logged rejections of one client."""
        rows = self._db.execute(
            "SELECT round, reason, detail, at FROM rejections WHERE client = ? "
            "ORDER BY id DESC LIMIT ?",
            (client, limit),
        )
        return [
            RejectionEntry(round=int(r[0]), reason=str(r[1]), detail=str(r[2]), at=float(r[3]))
            for r in rows
        ]

    def model_row(self, round_index: int) -> tuple[str, str, int, bytes, float] | None:
        """``(sha256, previous_sha256, samples, message, created_at)`` of a model version."""
        row = self._db.execute(
            "SELECT sha256, previous_sha256, samples, message, created_at FROM models "
            "WHERE round = ?",
            (round_index,),
        ).fetchone()
        if row is None:
            return None
        return str(row[0]), str(row[1]), int(row[2]), bytes(row[3]), float(row[4])


# -- turning records into answers ----------------------------------------------------------


@dataclass(frozen=True)
class _RunContext:
    """What every answer needs: the boards in index order and the operator's state."""

    boards: list[str]
    paused: bool
    admin_banned: frozenset[str]

    def name(self, index: Any, record: Mapping[str, Any] | None = None) -> str:
        """Board name of an index (from the round's own mapping first)."""
        if record is not None:
            mapped = _dict(record.get("clients")).get(str(index))
            if isinstance(mapped, str):
                return mapped
        i = int(index) if isinstance(index, str) and index.isdecimal() else _integer(index)
        if i is not None and 0 <= i < len(self.boards):
            return self.boards[i]
        return f"#{index}"

    def names(self, indices: Any, record: Mapping[str, Any] | None = None) -> list[str]:
        if not isinstance(indices, list):
            return []
        return [self.name(i, record) for i in indices]


def _summary(
    number: int,
    opened: float,
    closed: float,
    record: Mapping[str, Any],
    counts: dict[str, int],
    ctx: _RunContext,
) -> RoundSummary:
    decision = _dict(record.get("decision"))
    rule = decision.get("rule")
    siren = rule == "siren"
    selected = record.get("selected")
    reported = ctx.names(selected if isinstance(selected, list) else [], record)
    alarms = [ctx.name(i, record) for i, a in _dict(record.get("alarms")).items() if a is True]
    verdicts = _dict(record.get("verdicts"))
    kept = [ctx.name(i, record) for i, v in verdicts.items() if _dict(v).get("kept") is True]
    rejected = [n for n in reported if n not in set(kept)]
    missing = record.get("missing")
    return RoundSummary(
        round=number,
        status="closed",
        opened_at=opened,
        closed_at=closed,
        seconds=_finite(record.get("seconds")),
        test_accuracy=_finite(record.get("test_accuracy")),
        test_loss=_finite(record.get("test_loss")),
        close_reason=record.get("close_reason")
        if isinstance(record.get("close_reason"), str)
        else None,
        defense_active=record.get("defense_active")
        if isinstance(record.get("defense_active"), bool)
        else None,
        rule=rule if isinstance(rule, str) else None,
        decision_case=_integer(decision.get("case")) if siren else None,
        decision_branch=decision.get("branch")
        if siren and isinstance(decision.get("branch"), str)
        else None,
        rollback=decision.get("rollback") if isinstance(decision.get("rollback"), bool) else None,
        reported=reported,
        alarms=sorted(alarms, key=_board_order(ctx)),
        kept=sorted(kept, key=_board_order(ctx)),
        rejected=rejected,
        missing=[str(m) for m in missing] if isinstance(missing, list) else [],
        admission=counts,
    )


def _board_order(ctx: _RunContext) -> Any:
    position = {name: i for i, name in enumerate(ctx.boards)}
    return lambda name: (position.get(name, len(position)), name)


def _siren_decision(decision: Mapping[str, Any], ctx: _RunContext) -> SirenDecision:
    def names(key: str) -> list[str]:
        return ctx.names(decision.get(key))

    def by_name(key: str) -> dict[str, float | None]:
        return {ctx.name(k): _finite(v) for k, v in _dict(decision.get(key)).items()}

    return SirenDecision(
        case=_integer(decision.get("case")),
        branch=decision.get("branch") if isinstance(decision.get("branch"), str) else None,
        alarming=names("alarming"),
        silent=names("silent"),
        benign=names("benign"),
        malicious=names("malicious"),
        ignored=names("ignored"),
        refused=names("refused"),
        probed=names("probed"),
        awarded=names("awarded"),
        rollback=decision.get("rollback") if isinstance(decision.get("rollback"), bool) else None,
        base=decision.get("base") if isinstance(decision.get("base"), str) else None,
        root_accuracy=by_name("root_accuracy"),
        max_alarming_accuracy=_finite(decision.get("max_alarming_accuracy")),
        max_silent_accuracy=_finite(decision.get("max_silent_accuracy")),
        penalty_counts=by_name("penalty_counts"),
        banned=names("banned"),
        newly_banned=names("newly_banned"),
        rejoined=names("rejoined"),
        c_s=_finite(decision.get("c_s")),
        c_p=_finite(decision.get("c_p")),
        c_a=_finite(decision.get("c_a")),
    )


def _detail(summary: RoundSummary, record: Mapping[str, Any], ctx: _RunContext) -> RoundDetail:
    decision = _dict(record.get("decision"))
    verdicts = {
        ctx.name(i, record): Verdict(
            kept=_dict(v).get("kept") is True,
            weight=_finite(_dict(v).get("weight")),
            score=_finite(_dict(v).get("score")),
            reason=_dict(v).get("reason") if isinstance(_dict(v).get("reason"), str) else None,
        )
        for i, v in _dict(record.get("verdicts")).items()
    }
    samples = {
        ctx.name(i, record): n
        for i, n in _dict(record.get("sample_counts")).items()
        if _integer(n) is not None
    }
    return RoundDetail(
        **summary.model_dump(),
        verdicts=verdicts,
        sample_counts={k: int(v) for k, v in samples.items()},
        siren=_siren_decision(decision, ctx) if decision.get("rule") == "siren" else None,
        network=_dict(record.get("network")),
        timing=_dict(record.get("timing")),
        decision=dict(decision),
    )


def _siren_standing(
    records: Sequence[tuple[int, float, float, dict[str, Any]]], ctx: _RunContext
) -> tuple[dict[str, float], set[str]] | None:
    """Penalty counts and SIREN bans after the last SIREN round, or ``None`` without SIREN."""
    for _, _, _, record in reversed(records):
        decision = _dict(record.get("decision"))
        if decision.get("rule") == "siren":
            counts = {
                ctx.name(k): value
                for k, v in _dict(decision.get("penalty_counts")).items()
                if (value := _finite(v)) is not None
            }
            return counts, set(ctx.names(decision.get("banned")))
    return None


# -- metrics -------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Exposition:
    """Prometheus text exposition format 0.0.4, written by hand."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str) -> None:
        self.lines.append(f"# HELP {name} {text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        if labels:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# -- the application -----------------------------------------------------------------------


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "No such client or round"},
    409: {"model": ErrorBody, "description": "Refused in the current state"},
    503: {"model": ErrorBody, "description": "The run has not started or the service is busy"},
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: _ERRORS[code] for code in codes}


RoundNumber = Annotated[int, PathParam(ge=1, le=MAX_ROUND, description="Round number (from 1)")]
ClientId = Annotated[
    str, PathParam(pattern=CLIENT_ID_PATTERN, max_length=64, description="Board client id")
]

_bearer = HTTPBearer(
    auto_error=False, description="The coordinator's api_token (admin actions only)"
)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> CoordinatorControls:
    """Admit an admin request: the bearer token must match (compared in constant time)."""
    expected: bytes | None = request.app.state.token_digest
    controls: CoordinatorControls | None = request.app.state.controls
    challenge = {"WWW-Authenticate": "Bearer"}
    if expected is None:
        raise HTTPException(
            401, "admin actions are disabled: the coordinator has no api_token", challenge
        )
    # Both sides are SHA-256 digests, so the comparison time does not depend on the token.
    presented = _digest(credentials.credentials) if credentials is not None else bytes(32)
    if not hmac.compare_digest(presented, expected):
        raise HTTPException(401, "missing or wrong bearer token", challenge)
    if controls is None:
        raise HTTPException(409, "no running coordinator service to act on")
    return controls


AdminControls = Annotated[CoordinatorControls, Depends(_admin)]


class _Answers:
    """What each read-only endpoint answers: one read transaction of the store per call.

    Parameters
    ----------
    config : CoordinatorConfig
        The coordinator's settings.
    view : _StoreView
        The read-only connection.
    controls : CoordinatorControls or None
        The running service (its paused state and operator bans).
    admin : bool
        Whether a token is configured.
    clock : callable
        Wall clock, Unix seconds.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        view: _StoreView,
        controls: CoordinatorControls | None,
        *,
        admin: bool,
        clock: Any,
    ) -> None:
        self.config = config
        self.view = view
        self.controls = controls
        self.admin = admin
        self.clock = clock
        self.public_key = _coordinator_key(config)

    # -- reading -----------------------------------------------------------------------------

    @contextmanager
    def _read(self, *, started: bool = True) -> Iterator[tuple[_StoreView, _RunContext]]:
        """A snapshot and the run context; 503 before the run starts when ``started``."""
        with self.view.snapshot() as v:
            if started and not v.initialized:
                raise HTTPException(
                    503, "the run has not started yet; retry", headers={"Retry-After": "2"}
                )
            yield v, self._context(v)

    def _context(self, v: _StoreView) -> _RunContext:
        boards = list(self.config.clients)
        stored = v.get_meta("config")
        if stored:
            listed = _dict(json.loads(stored)).get("clients")
            if isinstance(listed, list) and all(isinstance(c, str) for c in listed):
                boards = list(listed)
        controls = self.controls
        paused = controls.is_paused() if controls is not None else False
        banned = controls.admin_banned() if controls is not None else frozenset()
        return _RunContext(boards, paused, frozenset(banned))

    def _open_round(self, v: _StoreView, ctx: _RunContext) -> OpenRound | None:
        current = None if v.finished else v.open_round()
        if current is None:
            return None
        number, opened = current
        admitted = v.admitted(number)
        names = {c for c, _, _, _ in admitted}
        timeout = self.config.round_timeout
        return OpenRound(
            round=number,
            opened_at=opened,
            age_seconds=max(0.0, float(self.clock()) - opened),
            deadline=opened + timeout if timeout > 0 else None,
            admitted=[c for c, _, _, _ in admitted],
            alarms=[c for c, alarm, _, _ in admitted if alarm],
            missing=[b for b in ctx.boards if b not in names and b not in ctx.admin_banned],
        )

    def _client_summaries(self, v: _StoreView, ctx: _RunContext) -> list[ClientSummary]:
        records = v.closed_records()
        statuses = v.statuses()
        last_updates = v.last_updates()
        rejections = v.rejection_counts()
        latest = v.latest_telemetry()
        standing = _siren_standing(records, ctx)
        reported: dict[str, int] = {}
        kept: dict[str, int] = {}
        alarms: dict[str, int] = {}
        for _, _, _, record in records:
            for i, verdict in _dict(record.get("verdicts")).items():
                name = ctx.name(i, record)
                reported[name] = reported.get(name, 0) + 1
                if _dict(verdict).get("kept") is True:
                    kept[name] = kept.get(name, 0) + 1
            for i, alarm in _dict(record.get("alarms")).items():
                if alarm is True:
                    name = ctx.name(i, record)
                    alarms[name] = alarms.get(name, 0) + 1
        known = self._known_malicious()
        out = []
        for index, board in enumerate(ctx.boards):
            status = statuses.get(board)
            seen = [t for t in (status and status["at"], last_updates.get(board)) if t]
            state = (
                status["status"] if status and status["status"] in ("online", "offline") else None
            )
            siren_banned = standing is not None and board in standing[1]
            admin_banned = board in ctx.admin_banned
            out.append(
                ClientSummary(
                    client=board,
                    index=index,
                    status=state or "unknown",
                    status_round=status["round"] if status else None,
                    last_seen=max(seen) if seen else None,
                    rounds_reported=reported.get(board, 0),
                    rounds_kept=kept.get(board, 0),
                    alarms=alarms.get(board, 0),
                    penalty_count=standing[0].get(board, 0.0) if standing is not None else None,
                    banned=siren_banned or admin_banned,
                    siren_banned=siren_banned,
                    admin_banned=admin_banned,
                    rejections=sum(rejections.get(board, {}).values()),
                    malicious=None if known is None else board in known,
                    telemetry=_telemetry(latest[board]) if board in latest else None,
                )
            )
        return out

    def _known_malicious(self) -> frozenset[str] | None:
        """The boards the simulator made malicious, or None when nobody told the coordinator."""
        simulation = self.config.simulation
        return None if simulation is None else frozenset(simulation.malicious)

    @staticmethod
    def _board_index(ctx: _RunContext, client_id: str) -> int:
        if client_id not in ctx.boards:
            shown = ", ".join(ctx.boards[:5]) + (", ..." if len(ctx.boards) > 5 else "")
            raise HTTPException(
                404,
                f"no board {client_id!r} in this run; its {len(ctx.boards)} boards are {shown}",
            )
        return ctx.boards.index(client_id)

    @staticmethod
    def _history(v: _StoreView, ctx: _RunContext, client_id: str) -> list[ClientRound]:
        history = []
        for number, _, _, record in v.closed_records():
            verdict = next(
                (
                    _dict(value)
                    for i, value in _dict(record.get("verdicts")).items()
                    if ctx.name(i, record) == client_id
                ),
                None,
            )
            alarm = next(
                (
                    value
                    for i, value in _dict(record.get("alarms")).items()
                    if ctx.name(i, record) == client_id and isinstance(value, bool)
                ),
                None,
            )
            penalties = _dict(_dict(record.get("decision")).get("penalty_counts"))
            penalty = next(
                (_finite(value) for i, value in penalties.items() if ctx.name(i) == client_id),
                None,
            )
            reason = None if verdict is None else verdict.get("reason")
            history.append(
                ClientRound(
                    round=number,
                    reported=verdict is not None,
                    alarm=alarm,
                    kept=None if verdict is None else verdict.get("kept") is True,
                    weight=None if verdict is None else _finite(verdict.get("weight")),
                    score=None if verdict is None else _finite(verdict.get("score")),
                    reason=reason if isinstance(reason, str) else None,
                    penalty_count=penalty,
                )
            )
        return history

    @staticmethod
    def _current_model(v: _StoreView) -> tuple[int, tuple[str, str, int, bytes, float]]:
        current = v.current_round
        row = v.model_row(current)
        if row is None:
            raise StoreError(f"no global model for round {current}")
        return current, row

    # -- answers ---------------------------------------------------------------------------

    def health(self) -> Health:
        """``GET /api/health``."""
        with self._read(started=False) as (v, ctx):
            ready = v.initialized
            return Health(
                status="ok" if ready else "starting",
                run=self.config.run,
                round=v.current_round if ready else None,
                finished=v.finished if ready else False,
                paused=ctx.paused,
                time=float(self.clock()),
            )

    def run(self) -> RunInfo:
        """``GET /api/run``."""
        config = self.config
        with self._read() as (v, ctx):
            records = v.closed_records()
            current = v.current_round
            model = v.model_row(current)
            first = v.round_row(1) if not records else None
            standing = _siren_standing(records, ctx)
            banned = [] if standing is None else sorted(standing[1], key=_board_order(ctx))
            known = self._known_malicious()
            ordered_known = None if known is None else sorted(known, key=_board_order(ctx))
            siren = config.aggregator.name == "siren"
            return RunInfo(
                run=config.run,
                aggregator=config.aggregator.name,
                aggregator_params=_clean(dict(config.aggregator.params)),
                dataset=config.data.dataset,
                model=config.model.name,
                rounds_planned=config.rounds,
                rounds_closed=len(records),
                current_round=current,
                finished=v.finished,
                paused=ctx.paused,
                boards=ctx.boards,
                defense_start_round=config.defense_start_round,
                round_timeout=config.round_timeout,
                quorum=config.quorum,
                started_at=records[0][1] if records else (first.opened_at if first else None),
                open_round=self._open_round(v, ctx),
                global_model_sha256=model[0] if model else None,
                admission=v.decision_counts(),
                admin_enabled=self.admin and self.controls is not None,
                siren_profile=config.aggregator.profile if siren else None,
                banned=banned,
                known_malicious=ordered_known,
                honest_banned=None if known is None else [b for b in banned if b not in known],
                attackers_missed=None
                if ordered_known is None
                else [b for b in ordered_known if b not in set(banned)],
            )

    def rounds(self, first: int, last: int | None) -> list[RoundSummary]:
        """``GET /api/rounds``: closed rounds in ``first..last``."""
        with self._read() as (v, ctx):
            return [
                _summary(n, o, c, record, v.decision_counts(n), ctx)
                for n, o, c, record in v.closed_records()
                if n >= first and (last is None or n <= last)
            ]

    def round(self, number: int) -> RoundDetail:
        """``GET /api/rounds/{round}``: a closed round, the open one, or 404."""
        with self._read() as (v, ctx):
            records = v.closed_records()
            if number <= len(records):
                _, opened, closed, record = records[number - 1]
                summary = _summary(number, opened, closed, record, v.decision_counts(number), ctx)
                return _detail(summary, record, ctx)
            current = self._open_round(v, ctx)
            if current is None or current.round != number:
                span = f"rounds 1..{len(records)} are closed" if records else "no round is closed"
                where = f"round {current.round} is open" if current else "the run is finished"
                raise HTTPException(404, f"round {number} does not exist yet: {span} and {where}")
            return RoundDetail(
                round=number,
                status="open",
                opened_at=current.opened_at,
                closed_at=None,
                seconds=None,
                test_accuracy=None,
                test_loss=None,
                close_reason=None,
                defense_active=None,
                rule=None,
                decision_case=None,
                decision_branch=None,
                rollback=None,
                reported=current.admitted,
                alarms=current.alarms,
                kept=[],
                rejected=[],
                missing=current.missing,
                admission=v.decision_counts(number),
                verdicts={},
                sample_counts={c: n for c, _, n, _ in v.admitted(number)},
                siren=None,
                network={},
                timing={},
                decision={},
            )

    def clients(self) -> list[ClientSummary]:
        """``GET /api/clients``."""
        with self._read() as (v, ctx):
            return self._client_summaries(v, ctx)

    def client(self, client_id: str) -> ClientDetail:
        """``GET /api/clients/{client_id}``, or 404."""
        with self._read() as (v, ctx):
            index = self._board_index(ctx, client_id)
            history = self._history(v, ctx, client_id)
            return ClientDetail(
                **self._client_summaries(v, ctx)[index].model_dump(),
                alarm_rounds=[h.round for h in history if h.alarm],
                rejections_by_reason=v.rejection_counts().get(client_id, {}),
                recent_rejections=v.client_rejections(client_id, RECENT_REJECTIONS),
                history=history,
                telemetry_history=[_telemetry(row) for row in v.telemetry(client_id)],
            )

    def model(self) -> ModelInfo:
        """``GET /api/model``."""
        with self._read() as (v, _):
            current, (sha, previous, samples, message, created) = self._current_model(v)
            return ModelInfo(
                run=self.config.run,
                round=current,
                final=v.finished,
                sha256=sha,
                previous_sha256=previous,
                samples=samples,
                layout_fingerprint=v.get_meta("layout"),
                message_bytes=len(message),
                message_sha256=hashlib.sha256(message).hexdigest(),
                created_at=created,
                coordinator_public_key=self.public_key,
                download="/api/model/download",
            )

    def download(self, if_none_match: str) -> Response:
        """``GET /api/model/download``: the stored message as is (304 when the ETag matches)."""
        with self._read() as (v, _):
            current, (sha, _, _, message, _) = self._current_model(v)
        etag = f'"{hashlib.sha256(message).hexdigest()}"'
        headers = {
            "ETag": etag,
            "X-Siren-Round": str(current),
            "X-Siren-Model-Sha256": sha,
            "Content-Disposition": (
                f'attachment; filename="{self.config.run}-global-{current}.siren"'
            ),
        }
        if etag in [tag.strip() for tag in if_none_match.split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(message, media_type="application/octet-stream", headers=headers)

    def metrics(self) -> str:
        """``GET /metrics`` text."""
        with self._read(started=False) as (v, ctx):
            return _metrics(v, self.config, ctx, self.clock)

    def require_board(self, client_id: str) -> None:
        """404 unless ``client_id`` is one of the run's boards."""
        with self._read() as (_, ctx):
            self._board_index(ctx, client_id)

    def is_board(self, client_id: str) -> bool:
        """Whether ``client_id`` is one of the run's boards."""
        with self._read(started=False) as (_, ctx):
            return client_id in ctx.boards


def _act(action: str, call: Any, *args: Any) -> bool:
    """Run an admin action; map the service's refusals to 404, 409 and 503 (see
    :class:`CoordinatorControls`) and log what changed (never the token)."""
    try:
        changed = bool(call(*args))
    except LookupError as exc:
        raise HTTPException(404, str(exc).strip("'\"")) from None
    except TimeoutError as exc:
        raise HTTPException(
            503, f"the coordinator did not carry out {action} in time: {exc}", {"Retry-After": "5"}
        ) from None
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    if changed:
        shown = [bytes(a).hex() if isinstance(a, VerifyKey) else str(a) for a in args]
        logger.info("admin: %s", " ".join([action, *shown]))
    return changed


def _usable_key(text: str) -> VerifyKey:
    """An Ed25519 public key from 64 hex digits that is a curve point not of small order;
    anything else is a 422 naming ``public_key``."""
    try:
        key = parse_verify_key(text)
        if not crypto_core_ed25519_is_valid_point(bytes(key)):
            raise KeyFileError(
                "not a usable Ed25519 public key: not a curve point, or of small order"
            )
    except KeyFileError as exc:
        raise RequestValidationError(
            [{"loc": ("body", "public_key"), "msg": str(exc), "type": "value_error", "input": text}]
        ) from None
    return key


def create_app(
    config: CoordinatorConfig,
    store: CoordinatorStore | str | Path,
    controls: CoordinatorControls | None = None,
    *,
    token: str | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    clock: Any = time.time,
) -> FastAPI:
    """Build the coordinator's HTTP API and dashboard.

    Parameters
    ----------
    config : CoordinatorConfig
        The coordinator's settings (run id, planned rounds, boards, aggregator, key directory).
    store : CoordinatorStore or path
        The run's database (or its path). The app reads it through its own read-only
        connection; it never writes it.
    controls : CoordinatorControls, optional
        The running service, for the admin actions. Without it the admin endpoints answer 409
        and the paused/banned state shown is that of an idle coordinator.
    token : str, optional
        The bearer token of the admin endpoints (``api_token``). ``None`` or empty disables
        them. Compared in constant time; never logged or returned.
    allowed_hosts : sequence of str
        Host header values answered (others get 400): the loopback names by default, so a web
        page cannot reach the API through DNS rebinding.
    clock : callable
        Wall clock in Unix seconds (ages and deadlines).

    Returns
    -------
    fastapi.FastAPI
        The application; serve it with :func:`start_api_server`.
    """
    path = store.path if isinstance(store, CoordinatorStore) else Path(store)
    view = _StoreView(path)
    expected = _digest(token) if token else None

    app = FastAPI(
        title="siren-edge coordinator",
        version="1",
        description="Run, rounds, boards, global model and admin actions of a siren-edge "
        "coordinator. Read-only endpoints are open; admin endpoints need the bearer token.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.state.view = view
    app.state.token_digest = expected
    app.state.controls = controls

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
        )
        if request.url.path.startswith("/api/") or request.url.path == "/metrics":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(sqlite3.Error)
    async def database_error(request: Request, exc: sqlite3.Error) -> JSONResponse:
        logger.warning("API: database read failed: %s", exc)
        return JSONResponse(
            {"detail": "the coordinator database cannot be read right now; retry"},
            status_code=503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 for a body it cannot decode at all (not UTF-8 JSON); the API
        # answers every malformed body with a 422 validation error. The app raises no 400.
        if exc.status_code == 400:
            return JSONResponse(
                {
                    "detail": [
                        {
                            "loc": ["body"],
                            "msg": "the request body is not valid UTF-8 JSON",
                            "type": "json_invalid",
                        }
                    ]
                },
                status_code=422,
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "2"})

    answers = _Answers(config, view, controls, admin=expected is not None, clock=clock)

    # -- read-only endpoints --------------------------------------------------------------

    @app.get("/api/health", tags=["read"], summary="Liveness and position")
    def health() -> Health:
        return answers.health()

    @app.get(
        "/api/run", tags=["read"], summary="The run and the open round", responses=_responses(503)
    )
    def run_info() -> RunInfo:
        return answers.run()

    @app.get(
        "/api/rounds",
        tags=["read"],
        summary="History of the closed rounds",
        responses=_responses(503),
    )
    def rounds(
        first: Annotated[int, QueryParam(ge=1, le=MAX_ROUND, description="First round")] = 1,
        last: Annotated[
            int | None, QueryParam(ge=1, le=MAX_ROUND, description="Last round (inclusive)")
        ] = None,
    ) -> list[RoundSummary]:
        return answers.rounds(first, last)

    @app.get(
        "/api/rounds/{round}",
        tags=["read"],
        summary="One round: verdicts, SIREN decision, network and timing",
        responses=_responses(404, 503),
    )
    def round_detail(round: RoundNumber) -> RoundDetail:
        return answers.round(round)

    @app.get(
        "/api/clients", tags=["read"], summary="Every board of the run", responses=_responses(503)
    )
    def clients() -> list[ClientSummary]:
        return answers.clients()

    @app.get(
        "/api/clients/{client_id}",
        tags=["read"],
        summary="One board: status, alarm history, penalty, bans, rejections",
        responses=_responses(404, 503),
    )
    def client_detail(client_id: ClientId) -> ClientDetail:
        return answers.client(client_id)

    @app.get(
        "/api/model",
        tags=["read"],
        summary="Metadata of the current global model",
        responses=_responses(503),
    )
    def model_info() -> ModelInfo:
        return answers.model()

    @app.get(
        "/api/model/download",
        tags=["read"],
        summary="The signed global message, byte for byte (verify with the pinned key)",
        response_class=Response,
        responses={
            200: {
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
                "description": "The message as published on the global topic",
            },
            304: {"description": "Not modified (If-None-Match matched)"},
            503: _ERRORS[503],
        },
    )
    def model_download(request: Request) -> Response:
        return answers.download(request.headers.get("if-none-match", ""))

    @app.get(
        "/metrics",
        tags=["read"],
        summary="Prometheus metrics (text exposition format 0.0.4)",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(answers.metrics(), media_type=_PROMETHEUS_TYPE)

    # -- admin endpoints --------------------------------------------------------------------

    @app.post(
        "/api/admin/pause",
        tags=["admin"],
        summary="Stop closing rounds (updates are still admitted)",
        responses=_responses(401, 409, 503),
    )
    def pause(ctl: AdminControls) -> PauseState:
        changed = _act("pause", ctl.pause)
        return PauseState(paused=ctl.is_paused(), changed=changed)

    @app.post(
        "/api/admin/resume",
        tags=["admin"],
        summary="Close rounds again",
        responses=_responses(401, 409, 503),
    )
    def resume(ctl: AdminControls) -> PauseState:
        changed = _act("resume", ctl.resume)
        return PauseState(paused=ctl.is_paused(), changed=changed)

    @app.post(
        "/api/admin/clients/{client_id}/ban",
        tags=["admin"],
        summary="Refuse a board's updates",
        responses=_responses(401, 404, 409, 503),
    )
    def ban(client_id: ClientId, ctl: AdminControls) -> BanState:
        answers.require_board(client_id)
        changed = _act("ban", ctl.ban, client_id)
        return BanState(client=client_id, banned=client_id in ctl.admin_banned(), changed=changed)

    @app.post(
        "/api/admin/clients/{client_id}/unban",
        tags=["admin"],
        summary="Accept a board's updates again",
        responses=_responses(401, 404, 409, 503),
    )
    def unban(client_id: ClientId, ctl: AdminControls) -> BanState:
        answers.require_board(client_id)
        changed = _act("unban", ctl.unban, client_id)
        return BanState(client=client_id, banned=client_id in ctl.admin_banned(), changed=changed)

    @app.post(
        "/api/admin/clients/{client_id}/revoke",
        tags=["admin"],
        summary="Revoke a board's key: refuse its updates at once (re-admit with a new key)",
        responses=_responses(401, 404, 409, 503),
    )
    def revoke(client_id: ClientId, ctl: AdminControls) -> RevokeState:
        answers.require_board(client_id)
        changed = _act("revoke", ctl.revoke, client_id)
        return RevokeState(client=client_id, revoked=client_id in ctl.revoked(), changed=changed)

    @app.post(
        "/api/admin/keys",
        tags=["admin"],
        summary="Register or rotate a board's public key",
        responses=_responses(401, 409, 503),
    )
    def register_key(body: KeyRegistration, ctl: AdminControls) -> KeyRegistered:
        key = _usable_key(body.public_key)
        changed = _act("register key of", ctl.register_key, body.client_id, key)
        return KeyRegistered(
            client_id=body.client_id,
            fingerprint=key_fingerprint(key),
            changed=changed,
            active=answers.is_board(body.client_id),
        )

    # -- dashboard ------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=DASHBOARD_DIR), name="static")
    return app


def _coordinator_key(config: CoordinatorConfig) -> str | None:
    """The coordinator's public key (hex) if its file is readable, else ``None``."""
    try:
        return verify_key_hex(load_verify_key(config.key_dir))
    except KeyFileError:
        return None


def _metrics(v: _StoreView, config: CoordinatorConfig, ctx: _RunContext, clock: Any) -> str:
    """The ``/metrics`` text (see ``docs/api.md`` for the series)."""
    out = _Exposition()
    out.family("siren_info", "gauge", "Run identity (always 1).")
    out.sample("siren_info", 1, {"run": config.run, "aggregator": config.aggregator.name})
    out.family("siren_rounds_planned", "gauge", "Rounds the run is configured for.")
    out.sample("siren_rounds_planned", config.rounds)
    ready = v.initialized
    records = v.closed_records() if ready else []
    out.family("siren_round_current", "gauge", "The open round (rounds + 1 once finished).")
    out.sample("siren_round_current", v.current_round if ready else 0)
    out.family("siren_rounds_closed_total", "counter", "Rounds closed.")
    out.sample("siren_rounds_closed_total", len(records))
    out.family("siren_run_finished", "gauge", "1 once the final global model is committed.")
    out.sample("siren_run_finished", int(ready and v.finished))
    out.family("siren_paused", "gauge", "1 while an operator paused the closing of rounds.")
    out.sample("siren_paused", int(ctx.paused))

    counts = v.decision_counts() if ready else {}
    out.family("siren_updates_admitted_total", "counter", "Updates admitted.")
    out.sample("siren_updates_admitted_total", counts.get(Reason.ACCEPTED.value, 0))
    out.family("siren_updates_duplicate_total", "counter", "Identical resends of admitted updates.")
    out.sample("siren_updates_duplicate_total", counts.get(Reason.DUPLICATE.value, 0))
    out.family("siren_updates_rejected_total", "counter", "Messages refused, by reason code.")
    reasons = {r.value for r in Reason} | set(counts)
    for reason in sorted(reasons - {Reason.ACCEPTED.value, Reason.DUPLICATE.value}):
        out.sample("siren_updates_rejected_total", counts.get(reason, 0), {"reason": reason})

    durations = [d for _, _, _, r in records if (d := _finite(r.get("seconds"))) is not None]
    out.family("siren_round_duration_seconds", "histogram", "Wall time of closed rounds.")
    for bound in DURATION_BUCKETS:
        out.sample(
            "siren_round_duration_seconds_bucket",
            sum(1 for d in durations if d <= bound),
            {"le": _number(bound)},
        )
    out.sample("siren_round_duration_seconds_bucket", len(durations), {"le": "+Inf"})
    out.sample("siren_round_duration_seconds_sum", float(sum(durations)))
    out.sample("siren_round_duration_seconds_count", len(durations))

    alarms = [sum(1 for a in _dict(r.get("alarms")).values() if a is True) for *_, r in records]
    out.family("siren_alarms_total", "counter", "SIREN alarms raised by admitted updates.")
    out.sample("siren_alarms_total", sum(alarms))
    out.family("siren_round_alarms", "gauge", "Alarms in the last closed round.")
    out.sample("siren_round_alarms", alarms[-1] if alarms else 0)
    kept = rejected = 0
    cases: dict[str, int] = {}
    for *_, record in records:
        for verdict in _dict(record.get("verdicts")).values():
            if _dict(verdict).get("kept") is True:
                kept += 1
            else:
                rejected += 1
        decision = _dict(record.get("decision"))
        if decision.get("rule") == "siren" and _integer(decision.get("case")) is not None:
            case = str(decision["case"])
            cases[case] = cases.get(case, 0) + 1
    out.family("siren_aggregation_kept_total", "counter", "Admitted updates the aggregate used.")
    out.sample("siren_aggregation_kept_total", kept)
    out.family(
        "siren_aggregation_discarded_total", "counter", "Admitted updates the aggregate left out."
    )
    out.sample("siren_aggregation_discarded_total", rejected)
    out.family("siren_decision_case_total", "counter", "SIREN rounds by decision case.")
    for case in ("0", "1", "3", "4"):
        out.sample("siren_decision_case_total", cases.get(case, 0), {"case": case})

    accuracy = [a for *_, r in records if (a := _finite(r.get("test_accuracy"))) is not None]
    out.family("siren_test_accuracy", "gauge", "Test accuracy of the latest global model.")
    out.sample("siren_test_accuracy", accuracy[-1] if accuracy else float("nan"))

    statuses = v.statuses() if ready else {}
    out.family("siren_boards_expected", "gauge", "Boards of the run.")
    out.sample("siren_boards_expected", len(ctx.boards))
    out.family("siren_boards", "gauge", "Boards by last announced status.")
    tally = {"online": 0, "offline": 0, "unknown": 0}
    for board in ctx.boards:
        state = _dict(statuses.get(board)).get("status")
        tally[state if state in ("online", "offline") else "unknown"] += 1
    for state, n in tally.items():
        out.sample("siren_boards", n, {"status": state})
    standing = _siren_standing(records, ctx)
    out.family("siren_boards_banned", "gauge", "Banned boards, by SIREN's penalty or an operator.")
    out.sample("siren_boards_banned", len(standing[1]) if standing else 0, {"by": "siren"})
    out.sample("siren_boards_banned", len(ctx.admin_banned), {"by": "admin"})
    _telemetry_metrics(out, v.latest_telemetry() if ready else {}, ctx)
    out.family("siren_scrape_timestamp_seconds", "gauge", "Server time of this scrape.")
    out.sample("siren_scrape_timestamp_seconds", float(clock()))
    return out.text()


def _telemetry_metrics(
    out: _Exposition, latest: Mapping[str, TelemetryRow], ctx: _RunContext
) -> None:
    """Per-board gauges of each board's latest figures; a figure a board did not send (an
    absent sensor) has no sample for that board."""
    rows = [latest[b] for b in ctx.boards if b in latest]
    out.family(
        "siren_board_telemetry_round", "gauge", "Round of the board's latest telemetry figures."
    )
    for row in rows:
        out.sample("siren_board_telemetry_round", row.round, {"client": row.client})
    for name, (metric, scale, text) in TELEMETRY_METRICS.items():
        out.family(metric, "gauge", f"{text} Latest round reported; absent sensors: no sample.")
        for row in rows:
            if name in row.figures:
                out.sample(metric, row.figures[name] * scale, {"client": row.client})
    for prefix, (metric, label, scale, text) in TELEMETRY_FAMILY_METRICS.items():
        out.family(metric, "gauge", f"{text} Latest round reported.")
        for row in rows:
            for name, value in row.figures.items():
                head, dot, sensor = name.partition(".")
                if dot and head == prefix:
                    out.sample(metric, value * scale, {"client": row.client, label: sensor})


# -- serving -------------------------------------------------------------------------------


@dataclass
class ApiServer:
    """A running uvicorn server (see :func:`start_api_server`)."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        """The dashboard's URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def start_api_server(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0
) -> ApiServer:
    """Serve ``app`` with uvicorn on a daemon thread, bound to a loopback address.

    Parameters
    ----------
    app : FastAPI
        The application of :func:`create_app`.
    host : str
        A loopback address (``127.0.0.1`` or ``::1``); anything else is refused.
    port : int
        TCP port; 0 picks a free one (read it from the result).
    timeout : float
        Seconds to wait for the server to accept connections.

    Returns
    -------
    ApiServer
        With the bound port and ``url``; call ``stop()`` to shut it down.

    Raises
    ------
    ValueError
        If ``host`` is not a loopback address or ``port`` is outside 0..65535.
    OSError
        If the port cannot be bound (e.g. already in use).
    """
    import uvicorn

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the API listens on a loopback address only, not {host!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"API port must be in 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="siren-api", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise OSError(f"the API server did not start on {host}:{bound}")
    return ApiServer(server, thread, host, bound)
