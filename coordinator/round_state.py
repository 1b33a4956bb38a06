"""What the round engine keeps about the open round, and the record it writes when it closes.

:class:`RoundState` mirrors the open round of the database (its global model, the boards drawn
for it, the admitted updates); :func:`closed_round_record` is the JSON record of a closed
round that :class:`coordinator.engine.RoundEngine` commits and the API, the audit log and
``siren sim fleet`` read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.rounds import StepResult, jsonable
from coordinator.store import GlobalVersion
from protocol.errors import Reason


@dataclass
class Admitted:
    """One admitted update of the open round (``base_round``: the global version it was
    trained on; older than the round only in buffered asynchronous mode)."""

    client: str
    index: int
    delta: np.ndarray
    samples: int
    alarm: bool
    nbytes: int
    received_at: float
    base_round: int = 0


@dataclass
class RoundState:
    """The open round in memory (mirrors the database).

    ``selected``: the client ids drawn for the round and named in its global model (client
    sampling), ``None`` when every board takes part. ``dropped``: boards whose update of this
    round was taken out (their key revoked); the round no longer waits for them, even if they
    are re-admitted before it closes (they rejoin from the next round).
    """

    round: int
    opened_at: float
    glob: GlobalVersion
    admitted: dict[str, Admitted] = field(default_factory=dict)
    update_bytes: int = 0
    postponed_at: int = -1
    selected: tuple[str, ...] | None = None
    dropped: set[str] = field(default_factory=set)


def closed_round_record(
    state: RoundState,
    entries: Sequence[Admitted],
    result: StepResult,
    *,
    index_of: Mapping[str, int],
    missing: list[str],
    reason: str,
    defended: bool,
    failure: str | None,
    evaluation: tuple[float | None, float | None],
    global_after: str,
    samples: int,
    global_bytes: int,
    counts: Mapping[str, int],
    times: Mapping[str, float],
) -> dict[str, Any]:
    """The record of a closed round (``rounds.record`` in the database).

    ``selected`` lists the boards whose updates the round aggregated, ``sampled`` (only with
    client sampling) the boards drawn for it, ``missing`` the expected boards that did not
    report. ``evaluation`` is ``(test loss, test accuracy)``; ``times`` holds ``started``,
    ``closed``, ``aggregate`` and ``evaluate`` (seconds).
    """
    test_loss, test_acc = evaluation
    opened = state.opened_at
    record: dict[str, Any] = {
        "round": state.round,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "seconds": times["closed"] - opened,
        "server_seconds": times["aggregate"],
        "selected": [e.index for e in entries],
        "clients": {str(e.index): e.client for e in entries},
        "missing": missing,
        "close_reason": reason,
        "sample_counts": {str(e.index): e.samples for e in entries},
        "alarms": {str(e.index): bool(e.alarm) for e in entries},
        "defense_active": defended,
        "verdicts": {str(k): jsonable(v) for k, v in result.verdicts.items()},
        "decision": jsonable(result.record),
        "failure": failure,
        "global_before": state.glob.sha256,
        "global_after": global_after,
        "samples_total": samples,
        "network": {
            "updates": len(entries),
            "update_bytes": state.update_bytes,
            "global_bytes": global_bytes,
            "duplicates": counts.get(Reason.DUPLICATE.value, 0),
            "stale": counts.get(Reason.STALE.value, 0),
            "rejected": {
                k: v
                for k, v in counts.items()
                if k not in (Reason.ACCEPTED.value, Reason.STALE.value, Reason.DUPLICATE.value)
            },
        },
        "timing": {
            "collect_seconds": (max(e.received_at for e in entries) - opened) if entries else 0.0,
            "wait_seconds": times["started"] - opened,
            "aggregate_seconds": times["aggregate"],
            "evaluate_seconds": times["evaluate"],
        },
    }
    if state.selected is not None:
        record["sampled"] = sorted(index_of[c] for c in state.selected if c in index_of)
    return record
