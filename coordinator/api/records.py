"""Turning the coordinator's stored round records into the API's answers.

A round's record (written by :class:`coordinator.engine.RoundEngine` when it closes the round)
names boards by index; the answers name them by client id (:class:`RunContext`). Values are
read defensively: a field of the wrong type, or a non-finite number, becomes ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.api.schemas import (
    BoardTelemetry,
    RoundDetail,
    RoundSummary,
    SirenDecision,
    Verdict,
)
from coordinator.store import TelemetryRow
from protocol.telemetry import FIGURES, throttled_conditions


def finite(value: Any) -> float | None:
    """A finite float, or ``None`` (for absent, non-numeric, NaN or infinite values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def clean(value: Any) -> Any:
    """JSON-safe copy of a stored record: non-finite floats become ``None``."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def board_telemetry(row: TelemetryRow) -> BoardTelemetry:
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


@dataclass(frozen=True)
class RunContext:
    """What every answer needs: the boards in index order and the operator's state."""

    boards: list[str]
    paused: bool
    admin_banned: frozenset[str]
    revoked: frozenset[str] = frozenset()

    def name(self, index: Any, record: Mapping[str, Any] | None = None) -> str:
        """Board name of an index (from the round's own mapping first)."""
        if record is not None:
            mapped = as_dict(record.get("clients")).get(str(index))
            if isinstance(mapped, str):
                return mapped
        i = int(index) if isinstance(index, str) and index.isdecimal() else integer(index)
        if i is not None and 0 <= i < len(self.boards):
            return self.boards[i]
        return f"#{index}"

    def names(self, indices: Any, record: Mapping[str, Any] | None = None) -> list[str]:
        if not isinstance(indices, list):
            return []
        return [self.name(i, record) for i in indices]


def summarize_round(
    number: int,
    opened: float,
    closed: float,
    record: Mapping[str, Any],
    counts: dict[str, int],
    ctx: RunContext,
) -> RoundSummary:
    decision = as_dict(record.get("decision"))
    rule = decision.get("rule")
    siren = rule == "siren"
    selected = record.get("selected")
    reported = ctx.names(selected if isinstance(selected, list) else [], record)
    alarms = [ctx.name(i, record) for i, a in as_dict(record.get("alarms")).items() if a is True]
    verdicts = as_dict(record.get("verdicts"))
    kept = [ctx.name(i, record) for i, v in verdicts.items() if as_dict(v).get("kept") is True]
    rejected = [n for n in reported if n not in set(kept)]
    missing = record.get("missing")
    return RoundSummary(
        round=number,
        status="closed",
        opened_at=opened,
        closed_at=closed,
        seconds=finite(record.get("seconds")),
        test_accuracy=finite(record.get("test_accuracy")),
        test_loss=finite(record.get("test_loss")),
        close_reason=record.get("close_reason")
        if isinstance(record.get("close_reason"), str)
        else None,
        defense_active=record.get("defense_active")
        if isinstance(record.get("defense_active"), bool)
        else None,
        rule=rule if isinstance(rule, str) else None,
        decision_case=integer(decision.get("case")) if siren else None,
        decision_branch=decision.get("branch")
        if siren and isinstance(decision.get("branch"), str)
        else None,
        rollback=decision.get("rollback") if isinstance(decision.get("rollback"), bool) else None,
        reported=reported,
        alarms=sorted(alarms, key=board_order(ctx)),
        kept=sorted(kept, key=board_order(ctx)),
        rejected=rejected,
        missing=[str(m) for m in missing] if isinstance(missing, list) else [],
        admission=counts,
    )


def board_order(ctx: RunContext) -> Any:
    position = {name: i for i, name in enumerate(ctx.boards)}
    return lambda name: (position.get(name, len(position)), name)


def siren_decision(decision: Mapping[str, Any], ctx: RunContext) -> SirenDecision:
    def names(key: str) -> list[str]:
        return ctx.names(decision.get(key))

    def by_name(key: str) -> dict[str, float | None]:
        return {ctx.name(k): finite(v) for k, v in as_dict(decision.get(key)).items()}

    return SirenDecision(
        case=integer(decision.get("case")),
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
        max_alarming_accuracy=finite(decision.get("max_alarming_accuracy")),
        max_silent_accuracy=finite(decision.get("max_silent_accuracy")),
        penalty_counts=by_name("penalty_counts"),
        banned=names("banned"),
        newly_banned=names("newly_banned"),
        rejoined=names("rejoined"),
        c_s=finite(decision.get("c_s")),
        c_p=finite(decision.get("c_p")),
        c_a=finite(decision.get("c_a")),
    )


def detail_round(summary: RoundSummary, record: Mapping[str, Any], ctx: RunContext) -> RoundDetail:
    decision = as_dict(record.get("decision"))
    verdicts = {
        ctx.name(i, record): Verdict(
            kept=as_dict(v).get("kept") is True,
            weight=finite(as_dict(v).get("weight")),
            score=finite(as_dict(v).get("score")),
            reason=as_dict(v).get("reason") if isinstance(as_dict(v).get("reason"), str) else None,
        )
        for i, v in as_dict(record.get("verdicts")).items()
    }
    samples = {
        ctx.name(i, record): n
        for i, n in as_dict(record.get("sample_counts")).items()
        if integer(n) is not None
    }
    return RoundDetail(
        **summary.model_dump(),
        verdicts=verdicts,
        sample_counts={k: int(v) for k, v in samples.items()},
        siren=siren_decision(decision, ctx) if decision.get("rule") == "siren" else None,
        network=as_dict(record.get("network")),
        timing=as_dict(record.get("timing")),
        decision=dict(decision),
    )


def siren_standing(
    records: Sequence[tuple[int, float, float, dict[str, Any]]], ctx: RunContext
) -> tuple[dict[str, float], set[str]] | None:
    """Penalty counts and SIREN bans after the last SIREN round, or ``None`` without SIREN."""
    for _, _, _, record in reversed(records):
        decision = as_dict(record.get("decision"))
        if decision.get("rule") == "siren":
            counts = {
                ctx.name(k): value
                for k, v in as_dict(decision.get("penalty_counts")).items()
                if (value := finite(v)) is not None
            }
            return counts, set(ctx.names(decision.get("banned")))
    return None
