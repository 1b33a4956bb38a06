"""What every server strategy speaks: a round's submissions, a step's result, the root set.

The types shared by the round step (:mod:`coordinator.rounds`: registered aggregation rules,
the global-model guard, the strategy factory) and the SIREN decision process
(:mod:`coordinator.siren`), so that neither has to import the other's module for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Submission:
    """One admitted client update of a round.

    Attributes
    ----------
    client_id : int
        The board's index.
    delta : np.ndarray
        Its update Δ (float32, d).
    num_samples : int
        Its reported sample count.
    alarm : bool
        Its SIREN alarm bit.
    staleness : int
        Buffered asynchronous mode: how many global versions old the model it was trained on
        is (:mod:`coordinator.async_rounds`); 0 in a synchronous round.
    """

    client_id: int
    delta: np.ndarray
    num_samples: int
    alarm: bool = False
    staleness: int = 0


@dataclass(frozen=True)
class StepResult:
    """What a strategy produced for one round.

    Attributes
    ----------
    new_global : np.ndarray
        ``g_{t+1}`` (float32, d).
    verdicts : dict[int, dict]
        Per client id: ``kept``, ``weight``, ``score``, ``reason``.
    record : dict
        Strategy-specific, JSON-serializable details (e.g. the SIREN decision record).
    """

    new_global: np.ndarray
    verdicts: dict[int, dict[str, Any]]
    record: dict[str, Any] = field(default_factory=dict)


class RootOracle(Protocol):
    """The server's view of its root test set (SIREN §5.1, FLTrust's root data)."""

    def accuracy(self, weights: np.ndarray) -> float:
        """Accuracy of flat weights on the root set."""
        ...

    def server_update(self, global_weights: np.ndarray, round_index: int) -> np.ndarray:
        """The server's own update trained on the root set from ``global_weights``."""
        ...


class Strategy(Protocol):
    """A server-side decision rule for one round."""

    name: str

    def step(
        self, round_index: int, global_weights: np.ndarray, submissions: Sequence[Submission]
    ) -> StepResult:
        """Aggregate one round."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state (for coordinator restarts)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


def stack_submissions(submissions: Sequence[Submission]) -> tuple[np.ndarray, np.ndarray]:
    """The ``(K, d)`` float32 update matrix and the ``(K,)`` sample counts, in submission order."""
    if not submissions:
        raise ValueError("a round needs at least one submission")
    matrix = np.stack([np.asarray(s.delta, dtype=np.float32) for s in submissions])
    counts = np.array([s.num_samples for s in submissions], dtype=np.float64)
    return matrix, counts
