"""Buffered asynchronous aggregation: the coordinator's step when boards train continuously.

In the buffered asynchronous mode (FedBuff-style, made robust) there are no rounds that wait
for boards. Every board trains on the newest global model it holds and sends its update when it
is done; the coordinator admits an update made on any of the last ``S`` global versions and
produces the next version whenever ``B`` updates are buffered, with the configured rule (or
SIREN's decision process) applied to the buffer.

An update trained on version ``r`` and admitted while version ``v`` is current has *staleness*
``τ = v − r`` (0: fresh). Rules (``docs/protocol.md`` section 8.9):

* ``τ > S`` -- refused as ``too_stale``;
* ``1 ≤ τ ≤ S`` -- admitted and counted as ``stale``;
* a board holds at most one update in the open buffer (a second one before the buffer is
  aggregated is ``buffered``), and one per base version (identical resend: ``duplicate``).

**The step.** Each buffered update ``Δ_i`` (relative to the version it was trained on) is
multiplied by its *staleness weight* ``s(τ_i)`` and the strategy runs on the scaled updates as on
a round of ``B`` submissions: ``g_{v+1} = g_v + rule(s(τ_1)Δ_1, …, s(τ_B)Δ_B)``. Scaling the
update rather than its aggregation weight keeps the robust rules' statistics meaningful (a
stale update counts like a shorter step of its board) and works for every rule, weighted or
not. SIREN judges each update by the model it would make of the current version, ``g_v + s·Δ``
(root-set accuracy, weight analysis); an alarm bit, which a board raised about the version it
trained on, counts as an alarm about the current one, of which that version is an ancestor;
rollback goes to the last version SIREN trusted. Silence, however, says nothing about a version
the board never saw: a silent stale update (``τ ≥ 1``) is left out where SIREN would judge a
silent board malicious for its silence (:mod:`coordinator.siren`, choice 9).

**The pool.** By default (``pool = "buffer"``) the rule sees the ``B`` buffered updates, as in
FedBuff. A buffer is not a fair sample of the fleet: it fills with the fastest boards, and
attackers among them can hold half of it even when they are 40% of the boards (measured:
``benchmarks/results/participation.md``), which a coordinate-wise median or trimmed mean does
not survive. With ``pool = "latest"`` the rule sees instead the *latest admissible update of
every board* -- each board's newest update whose staleness is still at most ``S``, the ``B``
new ones included -- so attackers hold their share of the boards, not of the fast ones; a new
version is still made every ``B`` arrivals, and an update keeps being used, with its staleness
growing, until its board sends a newer one or it is more than ``S`` versions old (as the memory
of MIFA, Gu et al. 2021, reuses each client's latest update).

The staleness weight is ``poly:a`` -- ``(1 + τ)^(−a)``, default ``a = 1/2`` -- or ``constant``
(every update weighs 1). :class:`AsyncSettings` holds ``S``, ``B`` and the weight;
:func:`buffered_step` is the step. The in-process engine (:mod:`firmware_sim.async_engine`)
calls it with simulated board times; the MQTT coordinator with real ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.rounds import DEFAULT_GUARD_FACTOR, DEFAULT_GUARD_MAX_ABS, guarded_step
from coordinator.strategy import StepResult, Strategy, Submission

#: What a new version aggregates: the buffer's ``B`` updates, or the latest admissible update
#: of every board (module docstring).
POOLS = ("buffer", "latest")

#: Names of the staleness weights (``poly:a`` takes its exponent after the colon).
STALENESS_WEIGHTS = ("poly", "constant")


def parse_staleness_weight(text: str) -> tuple[str, float]:
    """``"poly:0.5"`` → ``("poly", 0.5)``; ``"poly"`` → exponent 0.5; ``"constant"``.

    Raises
    ------
    ValueError
        For another name, or an exponent that is negative or not a number.
    """
    name, _, arg = text.strip().partition(":")
    if name == "constant" and not arg:
        return "constant", 0.0
    if name == "poly":
        try:
            exponent = float(arg) if arg else 0.5
        except ValueError:
            exponent = -1.0
        if not exponent >= 0 or exponent == float("inf"):
            raise ValueError(
                f"staleness weight poly:a needs an exponent a >= 0, got {text!r} "
                "(e.g. poly:0.5 for (1+τ)^-0.5)"
            )
        return "poly", exponent
    raise ValueError(
        f"unknown staleness weight {text!r}; valid: poly:a ((1+τ)^-a, e.g. poly:0.5) or constant"
    )


@dataclass(frozen=True)
class AsyncSettings:
    """Buffered asynchronous mode: staleness bound ``S``, buffer size ``B``, staleness weight.

    Attributes
    ----------
    staleness_bound : int
        ``S``: an update trained on one of the last ``S`` versions before the current one is
        admitted (``S = 0``: only updates on the current version).
    buffer_size : int
        ``B``: a new global version is made whenever this many updates are buffered.
    staleness_weight : str
        ``poly:a`` (``(1+τ)^-a``) or ``constant``.
    pool : str
        ``buffer``: the rule runs on the ``B`` buffered updates; ``latest``: on the latest
        admissible update of every board (module docstring).
    """

    staleness_bound: int = 4
    buffer_size: int = 10
    staleness_weight: str = "poly:0.5"
    pool: str = "buffer"

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"async pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.staleness_bound < 0:
            raise ValueError(f"staleness bound S must be >= 0, got {self.staleness_bound}")
        if self.buffer_size < 1:
            raise ValueError(f"buffer size B must be >= 1, got {self.buffer_size}")
        parse_staleness_weight(self.staleness_weight)

    def weight(self, staleness: int) -> float:
        """``s(τ)``: ``(1 + τ)^(−a)`` for ``poly:a``, 1 for ``constant``."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        name, exponent = parse_staleness_weight(self.staleness_weight)
        if name == "constant":
            return 1.0
        return float((1.0 + staleness) ** (-exponent))

    def admits(self, staleness: int) -> bool:
        """Whether an update of staleness ``τ`` is admitted (``0 ≤ τ ≤ S``)."""
        return 0 <= staleness <= self.staleness_bound


@dataclass(frozen=True)
class Buffered:
    """One admitted update in the buffer.

    Attributes
    ----------
    client_id : int
        The board's index.
    delta : np.ndarray
        ``Δ`` relative to the version it was trained on.
    num_samples : int
        Its reported sample count.
    alarm : bool
        Its SIREN alarm bit (about the version it was trained on).
    base_round : int
        The version it was trained on.
    staleness : int
        ``τ = v − base_round`` when it was admitted.
    """

    client_id: int
    delta: np.ndarray
    num_samples: int
    alarm: bool
    base_round: int
    staleness: int


def latest_pool(
    entries: Sequence[Buffered], version: int, settings: AsyncSettings
) -> list[Buffered]:
    """Each board's latest admissible update at ``version``: of ``entries`` (in arrival order,
    any number per board), the last one of each board whose staleness ``version − base_round``
    is at most ``S``, with that staleness."""
    latest: dict[int, Buffered] = {}
    for entry in entries:
        latest[entry.client_id] = entry
    return [
        Buffered(b.client_id, b.delta, b.num_samples, b.alarm, b.base_round, version - b.base_round)
        for b in latest.values()
        if settings.admits(version - b.base_round)
    ]


def buffered_step(
    strategy: Strategy,
    version: int,
    global_weights: np.ndarray,
    buffer: Sequence[Buffered],
    settings: AsyncSettings,
    *,
    factor: float = DEFAULT_GUARD_FACTOR,
    max_abs: float = DEFAULT_GUARD_MAX_ABS,
) -> StepResult:
    """``g_{v+1}`` from the buffer: the strategy on the staleness-weighted updates, behind the
    global-model guard (:func:`coordinator.rounds.guarded_step`). The record gains
    ``staleness`` and ``staleness_weight`` per client id.

    Buffered updates are passed in client-index order, whatever their arrival order, so the
    same buffer gives the same version on any transport.
    """
    ordered = sorted(buffer, key=lambda b: b.client_id)
    weights = {b.client_id: settings.weight(b.staleness) for b in ordered}
    submissions = [
        Submission(
            b.client_id,
            (np.float32(weights[b.client_id]) * np.asarray(b.delta, dtype=np.float32)).astype(
                np.float32
            ),
            b.num_samples,
            b.alarm,
            b.staleness,
        )
        for b in ordered
    ]
    result = guarded_step(
        strategy, version, global_weights, submissions, factor=factor, max_abs=max_abs
    )
    extra: dict[str, Any] = {
        "staleness": {str(b.client_id): b.staleness for b in ordered},
        "staleness_weight": {str(c): w for c, w in weights.items()},
    }
    return StepResult(result.new_global, result.verdicts, {**result.record, **extra})
