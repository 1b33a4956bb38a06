"""The coordinator's durable state in SQLite: every global model, update, decision and count.

Every state change is one transaction, so a coordinator killed at any instant (``kill -9``
included) restarts from the last committed change:

* admitting an update inserts its metadata *and its vector* (:meth:`CoordinatorStore.admit`);
  the MQTT acknowledgement is sent only after the commit, so an update is either stored or
  redelivered by the broker;
* closing a round (:meth:`CoordinatorStore.close_round`) writes, together, the round's record,
  the strategy's state, the next global model (weights and the signed message) and opens the
  next round; the closed round's update vectors are dropped (their metadata stays).

The admission state is not stored separately: which client sent which message, and the nonces
seen, are the rows of the current round's updates; the counters are the ``decisions`` table.

The tables and the rows read from them are described in :mod:`coordinator.store_schema`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.errors import CoordinatorError
from coordinator.store_schema import (
    MAX_LOGGED_PER_REASON,
    SCHEMA_SQL,
    SCHEMA_VERSION,
    GlobalVersion,
    RoundRow,
    StoredUpdate,
    TelemetryRow,
    json_default,
    parse_figures,
    to_json,
)

__all__ = [
    "SCHEMA_VERSION",
    "CoordinatorStore",
    "GlobalVersion",
    "RoundRow",
    "StoreError",
    "StoredUpdate",
    "TelemetryRow",
    "json_default",
]


class StoreError(CoordinatorError):
    """The database belongs to another run or model, or is inconsistent."""


class CoordinatorStore:
    """SQLite persistence of one coordinator run.

    Parameters
    ----------
    path : path
        Database file (created with its schema). Opened in WAL mode with ``synchronous=FULL``:
        a committed transaction survives a crash of the process or of the machine, and readers
        (``siren sim fleet`` progress, dashboards) never block the coordinator.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._depth = 0
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA_SQL)
        with self.transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
        schema = self.get_meta("schema")
        if schema != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has schema version {schema}, expected {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on an exception).

        Nested uses join the outermost transaction: a caller may group several changes (e.g.
        every update received in one burst) into one commit, one ``fsync``.
        """
        if self._depth > 0:
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._db
        except BaseException:
            self._depth = 0
            self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        self._db.execute("COMMIT")

    # -- meta --------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A ``meta`` value, or ``None``."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a ``meta`` value (operator settings such as bans), in its own transaction."""
        with self.transaction() as db:
            self._set_meta(db, key, value)

    def _set_meta(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @property
    def initialized(self) -> bool:
        """Whether the run was started in this database."""
        return self.get_meta("run") is not None

    @property
    def current_round(self) -> int:
        """The open round (or ``rounds + 1`` once finished)."""
        value = self.get_meta("current_round")
        if value is None:
            raise StoreError(f"{self.path} holds no run")
        return int(value)

    @property
    def finished(self) -> bool:
        """Whether the final global model was committed."""
        return self.get_meta("finished") == "1"

    def initialize(
        self,
        *,
        run: str,
        layout_fingerprint: str,
        config: dict[str, Any],
        first: GlobalVersion,
        strategy_state: dict[str, Any],
        now: float | None = None,
    ) -> None:
        """Start a run: its metadata, the first global model and round ``first.round`` open."""
        at = time.time() if now is None else now
        with self.transaction() as db:
            self._set_meta(db, "run", run)
            self._set_meta(db, "layout", layout_fingerprint)
            self._set_meta(db, "config", to_json(config))
            self._set_meta(db, "current_round", str(first.round))
            self._set_meta(db, "finished", "0")
            self._set_meta(db, "initial_strategy_state", to_json(strategy_state))
            self._insert_model(db, first, at)
            db.execute(
                "INSERT INTO rounds (round, opened_at, base_sha256, status) VALUES (?, ?, ?, ?)",
                (first.round, at, first.sha256, "open"),
            )

    def check_run(self, run: str) -> None:
        """Refuse a database of another run (a new database belongs to no run yet).

        Raises
        ------
        StoreError
            Naming the stored and the configured run, and what to do.
        """
        stored_run = self.get_meta("run")
        if self.initialized and stored_run != run:
            raise StoreError(
                f"{self.path} belongs to run {stored_run!r}, not {run!r}: point the "
                "configuration's db at a new file for a new run, or set its run back to "
                f"{stored_run!r} to resume that one"
            )

    def check_identity(self, run: str, layout_fingerprint: str) -> None:
        """Refuse a database of another run or model layout.

        Raises
        ------
        StoreError
            Naming the stored and the configured values.
        """
        self.check_run(run)
        if self.get_meta("layout") != layout_fingerprint:
            raise StoreError(f"{self.path} was created for a model with another layout")

    def _insert_model(self, db: sqlite3.Connection, version: GlobalVersion, at: float) -> None:
        db.execute(
            "INSERT INTO models (round, sha256, previous_sha256, samples, weights, message, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                version.round,
                version.sha256,
                version.previous_sha256,
                version.samples,
                np.ascontiguousarray(version.weights, dtype="<f4").tobytes(),
                version.message,
                at,
            ),
        )

    # -- reading -----------------------------------------------------------------------------

    def global_version(self, round_index: int) -> GlobalVersion:
        """The global model that starts ``round_index``.

        Raises
        ------
        StoreError
            If there is none.
        """
        row = self._db.execute(
            "SELECT round, weights, sha256, previous_sha256, message, samples FROM models "
            "WHERE round = ?",
            (round_index,),
        ).fetchone()
        if row is None:
            raise StoreError(f"no global model for round {round_index} in {self.path}")
        return GlobalVersion(
            round=int(row[0]),
            weights=np.frombuffer(row[1], dtype="<f4").astype(np.float32),
            sha256=str(row[2]),
            previous_sha256=str(row[3]),
            message=bytes(row[4]),
            samples=int(row[5]),
        )

    def model_rounds(self) -> list[int]:
        """Rounds with a stored global model, ascending."""
        return [int(r[0]) for r in self._db.execute("SELECT round FROM models ORDER BY round")]

    def round_row(self, round_index: int) -> RoundRow | None:
        """One round's row, or ``None``."""
        rows = self.round_rows(round_index, round_index)
        return rows[0] if rows else None

    def round_rows(self, first: int = 0, last: int | None = None) -> list[RoundRow]:
        """Rows of rounds ``first..last`` (inclusive), ascending."""
        upper = last if last is not None else 2**62
        out = []
        for row in self._db.execute(
            "SELECT round, opened_at, closed_at, base_sha256, status, record, strategy_state "
            "FROM rounds WHERE round BETWEEN ? AND ? ORDER BY round",
            (first, upper),
        ):
            out.append(
                RoundRow(
                    round=int(row[0]),
                    opened_at=float(row[1]),
                    closed_at=None if row[2] is None else float(row[2]),
                    base_sha256=str(row[3]),
                    status=str(row[4]),
                    record=None if row[5] is None else json.loads(row[5]),
                    strategy_state=None if row[6] is None else json.loads(row[6]),
                )
            )
        return out

    def latest_strategy_state(self) -> dict[str, Any] | None:
        """The strategy state saved with the last closed round (else the initial one)."""
        row = self._db.execute(
            "SELECT strategy_state FROM rounds WHERE status = 'closed' AND strategy_state IS NOT "
            "NULL ORDER BY round DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            return dict(json.loads(row[0]))
        initial = self.get_meta("initial_strategy_state")
        return None if initial is None else dict(json.loads(initial))

    def updates(self, round_index: int) -> list[StoredUpdate]:
        """Admitted updates of a round, ordered by client index."""
        out = []
        for row in self._db.execute(
            "SELECT u.round, u.client, u.client_index, u.message_id, u.digest, u.nonce, "
            "u.samples, u.alarm, u.nbytes, u.received_at, u.delta, b.base_round FROM updates u "
            "LEFT JOIN update_bases b ON b.round = u.round AND b.client = u.client "
            "WHERE u.round = ? ORDER BY u.client_index",
            (round_index,),
        ):
            out.append(
                StoredUpdate(
                    round=int(row[0]),
                    client=str(row[1]),
                    client_index=int(row[2]),
                    message_id=str(row[3]),
                    digest=str(row[4]),
                    nonce=str(row[5]),
                    samples=int(row[6]),
                    alarm=bool(row[7]),
                    nbytes=int(row[8]),
                    received_at=float(row[9]),
                    delta=None
                    if row[10] is None
                    else np.frombuffer(row[10], dtype="<f4").astype(np.float32),
                    base_round=None if row[11] is None else int(row[11]),
                )
            )
        return out

    def digest_round(self, digest: str) -> int | None:
        """The round of an admitted update with this whole-message SHA-256, or ``None``."""
        row = self._db.execute(
            "SELECT round FROM updates WHERE digest = ? LIMIT 1", (digest,)
        ).fetchone()
        return None if row is None else int(row[0])

    def decision_counts(self, round_index: int | None = None) -> dict[str, int]:
        """Admission outcome counts of one round, or summed over all rounds."""
        if round_index is None:
            rows = self._db.execute("SELECT reason, SUM(count) FROM decisions GROUP BY reason")
        else:
            rows = self._db.execute(
                "SELECT reason, count FROM decisions WHERE round = ?", (round_index,)
            )
        return {str(r[0]): int(r[1]) for r in rows}

    def status_counts(self, round_index: int | None = None) -> dict[str, int]:
        """Outcome counts of status-topic messages of one round, or summed over all rounds."""
        if round_index is None:
            rows = self._db.execute(
                "SELECT reason, SUM(count) FROM status_decisions GROUP BY reason"
            )
        else:
            rows = self._db.execute(
                "SELECT reason, count FROM status_decisions WHERE round = ?", (round_index,)
            )
        return {str(r[0]): int(r[1]) for r in rows}

    def rejections(self, round_index: int | None = None) -> list[dict[str, Any]]:
        """Logged rejections (round, client, reason, detail, at), oldest first."""
        query = "SELECT round, client, reason, detail, at FROM rejections"
        args: tuple[Any, ...] = ()
        if round_index is not None:
            query += " WHERE round = ?"
            args = (round_index,)
        return [
            {"round": r[0], "client": r[1], "reason": r[2], "detail": r[3], "at": r[4]}
            for r in self._db.execute(query + " ORDER BY id", args)
        ]

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Last status per board: ``{client: {status, round, at}}``."""
        return {
            str(r[0]): {"status": r[1], "round": int(r[2]), "at": float(r[3])}
            for r in self._db.execute("SELECT client, status, round, at FROM statuses")
        }

    def _has_table(self, name: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def telemetry(self, client: str | None = None) -> list[TelemetryRow]:
        """Stored telemetry figures, ordered by board and round (one board's with ``client``).

        A database written before the ``telemetry`` table existed has none: ``[]``.
        """
        if not self._has_table("telemetry"):
            return []
        query = "SELECT client, round, figures, at FROM telemetry"
        args: tuple[Any, ...] = ()
        if client is not None:
            query += " WHERE client = ?"
            args = (client,)
        return [
            TelemetryRow(str(r[0]), int(r[1]), parse_figures(r[2]), float(r[3]))
            for r in self._db.execute(query + " ORDER BY client, round", args)
        ]

    def latest_telemetry(self) -> dict[str, TelemetryRow]:
        """Each board's figures of its latest round with figures, by board."""
        if not self._has_table("telemetry"):
            return {}
        rows = self._db.execute(
            "SELECT t.client, t.round, t.figures, t.at FROM telemetry AS t JOIN "
            "(SELECT client, MAX(round) AS round FROM telemetry GROUP BY client) AS last "
            "ON t.client = last.client AND t.round = last.round"
        )
        return {
            str(r[0]): TelemetryRow(str(r[0]), int(r[1]), parse_figures(r[2]), float(r[3]))
            for r in rows
        }

    # -- writing -----------------------------------------------------------------------------

    def _count(self, db: sqlite3.Connection, round_index: int, reason: str) -> int:
        db.execute(
            "INSERT INTO decisions (round, reason, count) VALUES (?, ?, 1) "
            "ON CONFLICT(round, reason) DO UPDATE SET count = count + 1",
            (round_index, reason),
        )
        row = db.execute(
            "SELECT count FROM decisions WHERE round = ? AND reason = ?", (round_index, reason)
        ).fetchone()
        return int(row[0])

    def admit(self, update: StoredUpdate, outcome: str = "accepted") -> None:
        """Store an admitted update and count it under ``outcome`` (``accepted``, or ``stale``
        in buffered asynchronous mode, which also records the version it was trained on), in
        one transaction."""
        assert update.delta is not None
        with self.transaction() as db:
            db.execute(
                "INSERT INTO updates (round, client, client_index, message_id, digest, nonce, "
                "samples, alarm, nbytes, received_at, delta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    update.round,
                    update.client,
                    update.client_index,
                    update.message_id,
                    update.digest,
                    update.nonce,
                    update.samples,
                    int(update.alarm),
                    update.nbytes,
                    update.received_at,
                    np.ascontiguousarray(update.delta, dtype="<f4").tobytes(),
                ),
            )
            if update.base_round is not None and update.base_round != update.round:
                db.execute(
                    "INSERT INTO update_bases (round, client, base_round) VALUES (?, ?, ?)",
                    (update.round, update.client, update.base_round),
                )
            self._count(db, update.round, outcome)

    def quarantine(self, round_index: int, client: str, detail: str) -> None:
        """Take an admitted update of an open round out of the store (a stored update the current
        admission rules refuse, e.g. one written by an older version with looser bounds).

        The update no longer counts as ``accepted`` but as ``quarantined``, with ``detail``
        logged; a resend of it goes through admission again.
        """
        with self.transaction() as db:
            gone = db.execute(
                "DELETE FROM updates WHERE round = ? AND client = ?", (round_index, client)
            ).rowcount
            stale = db.execute(
                "DELETE FROM update_bases WHERE round = ? AND client = ?", (round_index, client)
            ).rowcount
            if gone:
                db.execute(
                    "UPDATE decisions SET count = count - 1 "
                    "WHERE round = ? AND reason = ? AND count > 0",
                    (round_index, "stale" if stale else "accepted"),
                )
            self._count(db, round_index, "quarantined")
            db.execute(
                "INSERT INTO rejections (round, client, reason, detail, at) "
                "VALUES (?, ?, 'quarantined', ?, ?)",
                (round_index, client, detail[:500], time.time()),
            )

    def count(
        self,
        round_index: int,
        reason: str,
        *,
        client: str | None = None,
        detail: str = "",
        log: bool = False,
        at: float | None = None,
    ) -> None:
        """Count an admission outcome; with ``log`` also keep its detail (capped per reason)."""
        with self.transaction() as db:
            n = self._count(db, round_index, reason)
            if log and n <= MAX_LOGGED_PER_REASON:
                db.execute(
                    "INSERT INTO rejections (round, client, reason, detail, at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (round_index, client, reason, detail[:500], time.time() if at is None else at),
                )

    def count_status(self, round_index: int, reason: str) -> None:
        """Count the outcome of one status-topic message."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO status_decisions (round, reason, count) VALUES (?, ?, 1) "
                "ON CONFLICT(round, reason) DO UPDATE SET count = count + 1",
                (round_index, reason),
            )

    def set_status(
        self,
        client: str,
        status: str,
        round_index: int,
        at: float,
        telemetry: Mapping[str, float] | None = None,
    ) -> None:
        """Record a board's announced status and, when it carried any, the round's telemetry
        figures (replacing figures stored earlier for the same board and round)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO statuses (client, status, round, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(client) DO UPDATE SET status = excluded.status, "
                "round = excluded.round, at = excluded.at",
                (client, status, round_index, at),
            )
            if telemetry:
                db.execute(
                    "INSERT INTO telemetry (client, round, figures, at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(client, round) DO UPDATE SET figures = excluded.figures, "
                    "at = excluded.at",
                    (client, round_index, to_json(dict(telemetry)), at),
                )

    # -- the audit log (coordinator.audit) ---------------------------------------------------

    def audit_head(self) -> tuple[int, str]:
        """``(next seq, hash of the last record)`` of the audit log (``(0, GENESIS)`` if empty)."""
        from coordinator.audit import GENESIS

        row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, GENESIS) if row is None else (int(row[0]) + 1, str(row[1]))

    def audit_entries(self) -> list[tuple[bytes, str, str]]:
        """Every audit record as ``(bytes, hash, signature)``, in order."""
        return [
            (bytes(r[0]), str(r[1]), str(r[2]))
            for r in self._db.execute("SELECT record, hash, signature FROM audit ORDER BY seq")
        ]

    def append_audit(self, entry: Any) -> None:
        """Append an :class:`coordinator.audit.AuditEntry` (its seq must be the next one)."""
        with self.transaction() as db:
            self._insert_audit(db, entry)

    def _insert_audit(self, db: sqlite3.Connection, entry: Any) -> None:
        db.execute(
            "INSERT INTO audit (seq, record, hash, signature) VALUES (?, ?, ?, ?)",
            (entry.seq, entry.data, entry.hash, entry.signature),
        )

    def update_digests(self, round_index: int) -> dict[str, str]:
        """SHA-256 of each admitted update message of a round, by board."""
        return {
            str(r[0]): str(r[1])
            for r in self._db.execute(
                "SELECT client, digest FROM updates WHERE round = ?", (round_index,)
            )
        }

    def close_round(
        self,
        round_index: int,
        *,
        record: dict[str, Any],
        strategy_state: dict[str, Any],
        next_global: GlobalVersion,
        finished: bool,
        now: float | None = None,
        audit: Any = None,
        keep_vectors: int = 0,
    ) -> None:
        """Close ``round_index`` and open the next one, atomically.

        Writes the round record and strategy state, stores ``next_global``, drops the update
        vectors of the round (with ``keep_vectors = k``, of the rounds before the last ``k``
        closed ones: buffered asynchronous mode reuses them), appends the round's ``audit``
        entry (when given), and either opens round ``next_global.round`` or marks the run
        finished.

        Raises
        ------
        StoreError
            If ``round_index`` is not the open round.
        """
        at = time.time() if now is None else now
        with self.transaction() as db:
            current = db.execute("SELECT value FROM meta WHERE key = 'current_round'").fetchone()
            row = db.execute("SELECT status FROM rounds WHERE round = ?", (round_index,)).fetchone()
            if current is None or int(current[0]) != round_index or row is None or row[0] != "open":
                raise StoreError(f"round {round_index} is not the open round")
            db.execute(
                "UPDATE rounds SET status = 'closed', closed_at = ?, record = ?, "
                "strategy_state = ? WHERE round = ?",
                (at, to_json(record), to_json(strategy_state), round_index),
            )
            self._insert_model(db, next_global, at)
            if audit is not None:
                self._insert_audit(db, audit)
            db.execute(
                "UPDATE updates SET delta = NULL WHERE round <= ? AND delta IS NOT NULL",
                (round_index - keep_vectors,),
            )
            self._set_meta(db, "current_round", str(next_global.round))
            if finished:
                self._set_meta(db, "finished", "1")
            else:
                db.execute(
                    "INSERT INTO rounds (round, opened_at, base_sha256, status) "
                    "VALUES (?, ?, ?, 'open')",
                    (next_global.round, at, next_global.sha256),
                )
