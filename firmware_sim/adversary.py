"""The hook through which simulated malicious boards tamper with what honest board code produces.

The engine runs the same :func:`edge_client.board.board_step` for every board. An
:class:`Adversary` may then intervene at three points:

1. :meth:`Adversary.board_data` — once, when the fleet is built: poison a malicious board's
   training data (label flipping, backdoor triggers);
2. :meth:`Adversary.round_data` — every round, before local training: data for this round only
   (e.g. a backdoor that is active only in some rounds);
3. :meth:`Adversary.tamper_round` — every round, after all boards trained: replace malicious
   boards' updates, sample counts or alarm bits. Colluding attacks (Fang et al.) see the whole
   round here; what they may read (full or partial knowledge) is the attack's own business.

:class:`Adversary` itself is the honest fleet: every hook returns its input unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_client.board import BoardData, BoardUpdate


class Adversary:
    """No attack. Subclasses override the hooks they need.

    Attributes
    ----------
    malicious_ids : frozenset[int]
        Boards controlled by the adversary.
    name : str
        Attack name recorded in the history (``"none"`` here).
    """

    name = "none"

    def __init__(self, malicious_ids: Sequence[int] = ()) -> None:
        self.malicious_ids = frozenset(int(i) for i in malicious_ids)

    def is_malicious(self, client_id: int) -> bool:
        """Whether ``client_id`` is controlled by the adversary."""
        return client_id in self.malicious_ids

    def board_data(self, client_id: int, data: BoardData, rng: np.random.Generator) -> BoardData:
        """Data a board trains on for the whole run (called once per board)."""
        return data

    def round_data(self, client_id: int, round_index: int, data: BoardData) -> BoardData:
        """Data a board trains on in ``round_index`` (called every round, before training)."""
        return data

    def round_epochs(self, client_id: int, round_index: int) -> int | None:
        """Local epochs of ``client_id`` in ``round_index`` (``None``: the run's own)."""
        return None

    def tamper_round(
        self,
        round_index: int,
        global_weights: np.ndarray,
        updates: list[BoardUpdate],
        rng: np.random.Generator,
    ) -> list[BoardUpdate]:
        """Return the round's updates after the adversary's changes (same order and clients)."""
        return updates

    @property
    def tampers_rounds(self) -> bool:
        """Whether :meth:`tamper_round` may change anything (a subclass overrides it).

        When it does not, a fleet may publish each board's update as soon as the board is done
        instead of waiting for the whole round.
        """
        return type(self).tamper_round is not Adversary.tamper_round

    def round_metrics(self, evaluate: Any, global_weights: np.ndarray) -> dict[str, float]:
        """Attack-specific metrics of the new global model (e.g. attack success rate)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """JSON-serializable description for the run history."""
        return {"attack": self.name, "malicious_ids": sorted(self.malicious_ids)}
