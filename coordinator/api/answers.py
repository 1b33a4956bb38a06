"""What each read-only endpoint answers: one read transaction of the store per call."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException, Response

from coordinator.api.controls import CoordinatorControls
from coordinator.api.records import (
    RunContext,
    as_dict,
    board_order,
    board_telemetry,
    clean,
    detail_round,
    finite,
    siren_standing,
    summarize_round,
)
from coordinator.api.schemas import (
    ClientDetail,
    ClientRound,
    ClientSummary,
    Health,
    ModelInfo,
    OpenRound,
    RoundDetail,
    RoundSummary,
    RunInfo,
)
from coordinator.api.store_view import StoreView
from coordinator.config import CoordinatorConfig
from coordinator.selection import announced_selection
from coordinator.store import StoreError
from protocol.errors import KeyFileError
from protocol.keys import load_verify_key, verify_key_hex

RECENT_REJECTIONS = 20


class Answers:
    """What each read-only endpoint answers: one read transaction of the store per call.

    Parameters
    ----------
    config : CoordinatorConfig
        The coordinator's settings.
    view : StoreView
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
        view: StoreView,
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
    def read(self, *, started: bool = True) -> Iterator[tuple[StoreView, RunContext]]:
        """A snapshot and the run context; 503 before the run starts when ``started``."""
        with self.view.snapshot() as v:
            if started and not v.initialized:
                raise HTTPException(
                    503, "the run has not started yet; retry", headers={"Retry-After": "2"}
                )
            yield v, self._context(v)

    def _context(self, v: StoreView) -> RunContext:
        boards = list(self.config.clients)
        stored = v.get_meta("config")
        if stored:
            listed = as_dict(json.loads(stored)).get("clients")
            if isinstance(listed, list) and all(isinstance(c, str) for c in listed):
                boards = list(listed)
        controls = self.controls
        paused = controls.is_paused() if controls is not None else False
        banned = controls.admin_banned() if controls is not None else frozenset()
        revoked = as_dict(json.loads(v.get_meta("revoked") or "{}"))
        return RunContext(boards, paused, frozenset(banned), frozenset(revoked))

    def _open_round(self, v: StoreView, ctx: RunContext) -> OpenRound | None:
        current = None if v.finished else v.open_round()
        if current is None:
            return None
        number, opened = current
        admitted = v.admitted(number)
        names = {c for c, _, _, _ in admitted}
        timeout = self.config.round_timeout
        if self.config.mode == "async":
            timeout = 0.0  # a buffer closes on its B-th update, never at a deadline
        # With client sampling only the boards drawn for the round (named in its global model)
        # can be missing.
        model = v.model_row(number)
        drawn = None if model is None else announced_selection(model[3])
        return OpenRound(
            round=number,
            opened_at=opened,
            age_seconds=max(0.0, float(self.clock()) - opened),
            deadline=opened + timeout if timeout > 0 else None,
            admitted=[c for c, _, _, _ in admitted],
            alarms=[c for c, alarm, _, _ in admitted if alarm],
            missing=[
                b
                for b in ctx.boards
                if b not in names
                and b not in ctx.admin_banned
                and b not in ctx.revoked
                and (drawn is None or b in drawn)
            ],
        )

    def _client_summaries(self, v: StoreView, ctx: RunContext) -> list[ClientSummary]:
        records = v.closed_records()
        statuses = v.statuses()
        last_updates = v.last_updates()
        rejections = v.rejection_counts()
        latest = v.latest_telemetry()
        standing = siren_standing(records, ctx)
        reported: dict[str, int] = {}
        kept: dict[str, int] = {}
        alarms: dict[str, int] = {}
        for _, _, _, record in records:
            for i, verdict in as_dict(record.get("verdicts")).items():
                name = ctx.name(i, record)
                reported[name] = reported.get(name, 0) + 1
                if as_dict(verdict).get("kept") is True:
                    kept[name] = kept.get(name, 0) + 1
            for i, alarm in as_dict(record.get("alarms")).items():
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
                    telemetry=board_telemetry(latest[board]) if board in latest else None,
                )
            )
        return out

    def _known_malicious(self) -> frozenset[str] | None:
        """The boards the simulator made malicious, or None when nobody told the coordinator."""
        simulation = self.config.simulation
        return None if simulation is None else frozenset(simulation.malicious)

    @staticmethod
    def _board_index(ctx: RunContext, client_id: str) -> int:
        if client_id not in ctx.boards:
            shown = ", ".join(ctx.boards[:5]) + (", ..." if len(ctx.boards) > 5 else "")
            raise HTTPException(
                404,
                f"no board {client_id!r} in this run; its {len(ctx.boards)} boards are {shown}",
            )
        return ctx.boards.index(client_id)

    @staticmethod
    def _history(v: StoreView, ctx: RunContext, client_id: str) -> list[ClientRound]:
        history = []
        for number, _, _, record in v.closed_records():
            verdict = next(
                (
                    as_dict(value)
                    for i, value in as_dict(record.get("verdicts")).items()
                    if ctx.name(i, record) == client_id
                ),
                None,
            )
            alarm = next(
                (
                    value
                    for i, value in as_dict(record.get("alarms")).items()
                    if ctx.name(i, record) == client_id and isinstance(value, bool)
                ),
                None,
            )
            penalties = as_dict(as_dict(record.get("decision")).get("penalty_counts"))
            penalty = next(
                (finite(value) for i, value in penalties.items() if ctx.name(i) == client_id),
                None,
            )
            reason = None if verdict is None else verdict.get("reason")
            history.append(
                ClientRound(
                    round=number,
                    reported=verdict is not None,
                    alarm=alarm,
                    kept=None if verdict is None else verdict.get("kept") is True,
                    weight=None if verdict is None else finite(verdict.get("weight")),
                    score=None if verdict is None else finite(verdict.get("score")),
                    reason=reason if isinstance(reason, str) else None,
                    penalty_count=penalty,
                )
            )
        return history

    @staticmethod
    def _current_model(v: StoreView) -> tuple[int, tuple[str, str, int, bytes, float]]:
        current = v.current_round
        row = v.model_row(current)
        if row is None:
            raise StoreError(f"no global model for round {current}")
        return current, row

    # -- answers ---------------------------------------------------------------------------

    def health(self) -> Health:
        """``GET /api/health``."""
        with self.read(started=False) as (v, ctx):
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
        with self.read() as (v, ctx):
            records = v.closed_records()
            current = v.current_round
            model = v.model_row(current)
            first = v.round_row(1) if not records else None
            standing = siren_standing(records, ctx)
            banned = [] if standing is None else sorted(standing[1], key=board_order(ctx))
            known = self._known_malicious()
            ordered_known = None if known is None else sorted(known, key=board_order(ctx))
            siren = config.aggregator.name == "siren"
            return RunInfo(
                run=config.run,
                aggregator=config.aggregator.name,
                aggregator_params=clean(dict(config.aggregator.params)),
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
        with self.read() as (v, ctx):
            return [
                summarize_round(n, o, c, record, v.decision_counts(n), ctx)
                for n, o, c, record in v.closed_records()
                if n >= first and (last is None or n <= last)
            ]

    def round(self, number: int) -> RoundDetail:
        """``GET /api/rounds/{round}``: a closed round, the open one, or 404."""
        with self.read() as (v, ctx):
            records = v.closed_records()
            if number <= len(records):
                _, opened, closed, record = records[number - 1]
                summary = summarize_round(
                    number, opened, closed, record, v.decision_counts(number), ctx
                )
                return detail_round(summary, record, ctx)
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
        with self.read() as (v, ctx):
            return self._client_summaries(v, ctx)

    def client(self, client_id: str) -> ClientDetail:
        """``GET /api/clients/{client_id}``, or 404."""
        with self.read() as (v, ctx):
            index = self._board_index(ctx, client_id)
            history = self._history(v, ctx, client_id)
            return ClientDetail(
                **self._client_summaries(v, ctx)[index].model_dump(),
                alarm_rounds=[h.round for h in history if h.alarm],
                rejections_by_reason=v.rejection_counts().get(client_id, {}),
                recent_rejections=v.client_rejections(client_id, RECENT_REJECTIONS),
                history=history,
                telemetry_history=[board_telemetry(row) for row in v.telemetry(client_id)],
            )

    def model(self) -> ModelInfo:
        """``GET /api/model``."""
        with self.read() as (v, _):
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
        with self.read() as (v, _):
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

    def require_board(self, client_id: str) -> None:
        """404 unless ``client_id`` is one of the run's boards."""
        with self.read() as (_, ctx):
            self._board_index(ctx, client_id)

    def is_board(self, client_id: str) -> bool:
        """Whether ``client_id`` is one of the run's boards."""
        with self.read(started=False) as (_, ctx):
            return client_id in ctx.boards


def _coordinator_key(config: CoordinatorConfig) -> str | None:
    """The coordinator's public key (hex) if its file is readable, else ``None``."""
    try:
        return verify_key_hex(load_verify_key(config.key_dir))
    except KeyFileError:
        return None
