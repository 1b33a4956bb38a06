"""A read-only view of the coordinator's database, shared by the API's request threads.

The service writes the database through its own connection on its own thread (a ``sqlite3``
connection belongs to one thread). The app opens a second, read-only connection to the same
file (``mode=ro``: the API cannot write the database) and reads each request in one
transaction, so a response is a consistent snapshot even while a round closes (the database is
in WAL mode: readers never block the coordinator). Closed rounds never change, so their parsed
records are cached and a poll reads only the rounds closed since the last one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coordinator.api.records import as_dict, clean
from coordinator.api.schemas import RejectionEntry
from coordinator.store import SCHEMA_VERSION, CoordinatorStore, StoreError


class StoreView(CoordinatorStore):
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
    def snapshot(self) -> Iterator[StoreView]:
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
                (int(number), float(opened), float(closed or opened), as_dict(clean(parsed)))
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
