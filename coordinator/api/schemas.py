"""The API's response and request models (pydantic): what every endpoint answers.

The OpenAPI schema (``/api/openapi.json``) is generated from them; ``docs/api.md`` describes
the fields. Path and body values are bounded here (:data:`MAX_ROUND`, :data:`CLIENT_ID_PATTERN`),
so malformed input is a 422 before any route runs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Largest round number accepted in a path or query (the protocol's integer range).
MAX_ROUND = 2**53 - 1
#: The protocol's identifier rule (run and client ids), as a schema pattern.
CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


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
