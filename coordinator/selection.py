"""Which boards take part in a round: client sampling, one function for every transport.

Standard federated learning (and the SIREN paper's "|K| randomly selected clients", §2.1) lets
only part of the fleet train in each round. The coordinator draws the round's boards with
:func:`select_participants` and announces them in the global model that starts the round
(``docs/protocol.md`` section 4.3); the in-process engine (``siren sim run``) calls the very same
function, so the same seed selects the same boards, and gives the same result, in process and
over MQTT.

The draw is over board *indices* ``0 .. K−1`` (a board's index is its place in the run's board
list, :func:`coordinator.boards.expected_clients`): ``m`` distinct indices, uniformly, from
``numpy.random.default_rng([seed, round, 31337])``, sorted. ``m`` is the configured count, or
``max(1, round(fraction · K))`` (Python's ``round``: halves to even), capped at K. A draw does
not depend on earlier rounds, on bans or on who reported, so a restarted coordinator draws
again exactly what it announced; boards an operator banned are drawn like the others and then
left out (:meth:`Sampling.select` does not draw a replacement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocol.envelope import MAX_HEADER_BYTES, header_of

#: Third element of the draw's seed sequence (the first two are the run seed and the round).
SELECTION_STREAM = 31337


def participants_per_round(
    num_clients: int, fraction: float = 1.0, count: int | None = None
) -> int:
    """``m``, the number of boards drawn per round (see the module docstring).

    Raises
    ------
    ValueError
        For a fraction outside (0, 1], a count below 1, or no boards.
    """
    if num_clients < 1:
        raise ValueError(f"a run needs at least one board, got {num_clients}")
    if count is not None:
        if count < 1:
            raise ValueError(f"clients per round must be >= 1, got {count}")
        return min(count, num_clients)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"client fraction must be in (0, 1], got {fraction}")
    return min(num_clients, max(1, round(fraction * num_clients)))


def select_participants(
    num_clients: int,
    round_index: int,
    seed: int,
    *,
    fraction: float = 1.0,
    count: int | None = None,
) -> list[int]:
    """The sorted board indices drawn for ``round_index`` (every board when ``m = K``).

    Parameters
    ----------
    num_clients : int
        K, the boards of the run.
    round_index : int
        The round the draw is for.
    seed : int
        The run seed.
    fraction, count : float, int or None
        ``m = count`` when given, else ``max(1, round(fraction · K))``.
    """
    k = num_clients
    m = participants_per_round(k, fraction, count)
    if m >= k:
        return list(range(k))
    rng = np.random.default_rng([seed, round_index, SELECTION_STREAM])
    return sorted(int(i) for i in rng.choice(k, size=m, replace=False))


@dataclass(frozen=True)
class Sampling:
    """A run's client sampling: a fraction of the boards, or a count, per round.

    ``fraction = 1`` and no ``count`` is full participation (:attr:`active` is false): every
    board trains every round and global models carry no selection.
    """

    fraction: float = 1.0
    count: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"client fraction must be in (0, 1], got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"clients per round must be >= 1, got {self.count}")
        if self.count is not None and self.fraction != 1.0:
            raise ValueError(
                "give the boards per round as a fraction or as a count, not both "
                f"(fraction {self.fraction}, count {self.count})"
            )

    @property
    def active(self) -> bool:
        """Whether only some boards may be drawn (a fraction below 1, or a count)."""
        return self.count is not None or self.fraction < 1.0

    def per_round(self, num_clients: int) -> int:
        """``m`` for a run of ``num_clients`` boards."""
        return participants_per_round(num_clients, self.fraction, self.count)

    def select(self, num_clients: int, round_index: int, seed: int) -> list[int]:
        """The board indices drawn for ``round_index`` (:func:`select_participants`)."""
        return select_participants(
            num_clients, round_index, seed, fraction=self.fraction, count=self.count
        )

    def describe(self) -> str:
        """``"5 of 10 boards per round"`` for headers and logs."""
        if self.count is not None:
            return f"{self.count} boards per round"
        return f"fraction {self.fraction:g} of the boards per round"


def announced_selection(message: bytes) -> tuple[str, ...] | None:
    """The selection a (stored, already verified) global message announced; ``None`` when it
    names none (every board takes part)."""
    return header_of(message).selected


#: Room a global header needs besides its selection (its thirteen other keys with a large
#: layout leave far more than this free; the selection is what grows with the fleet).
_HEADER_ROOM = 64 * 1024


def check_selection_fits(sampling: Sampling, clients: Sequence[str]) -> None:
    """Refuse, before the run starts, a sampling whose selection could overflow a header.

    The selection names ``m`` client ids (``docs/protocol.md`` 4.3); the longest ``m`` ids,
    quoted and separated, must leave room for the rest of the header within its limit of
    262,144 bytes (with 12-character ids, about 13,000 boards per round).

    Raises
    ------
    ValueError
        Saying how many boards per round fit.
    """
    if not sampling.active or not clients:
        return
    m = sampling.per_round(len(clients))
    sizes = sorted((len(c) + 3 for c in clients), reverse=True)
    if sum(sizes[:m]) + _HEADER_ROOM > MAX_HEADER_BYTES:
        fits = 0
        total = _HEADER_ROOM
        for size in sizes:
            if total + size > MAX_HEADER_BYTES:
                break
            total += size
            fits += 1
        raise ValueError(
            f"{m} boards per round do not fit in a global model's header "
            f"({MAX_HEADER_BYTES} bytes); at most {fits} with these client ids"
        )
