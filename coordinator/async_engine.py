"""The coordinator's engine in buffered asynchronous mode (``mode = "async"`` in ``coord.toml``).

:class:`AsyncRoundEngine` is the :class:`coordinator.engine.RoundEngine` with three changes
(:mod:`coordinator.async_rounds` explains the mode; ``docs/protocol.md`` 8.9 its admission):

* a "round" is the buffer of one global version ``v``: admission takes updates trained on any of
  the last ``S`` versions (``accepted`` when fresh, ``stale`` when ``1 ≤ τ ≤ S``; ``too_stale``,
  ``buffered`` and ``conflicting_update`` refuse) and stores each with the version it was trained
  on;
* the buffer closes as soon as it holds ``B`` updates (close reason ``buffer``), never at a
  deadline and without waiting for any board;
* the step is :func:`coordinator.async_rounds.buffered_step`: the rule (or SIREN) on the
  staleness-weighted updates, behind the global-model guard -- the buffer's, or with
  ``async_pool = "latest"`` every board's latest admissible one (their vectors are kept in the
  database for ``S`` versions).

Everything else -- persistence and resumption, duplicates, the audit log, operator actions,
re-announcing a version that makes no progress -- is the synchronous engine's. A restarted
coordinator rebuilds the admission window (the model hashes of the last ``S + 1`` versions and
which board already sent an update on which of them) from its database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from coordinator.async_rounds import Buffered, buffered_step, latest_pool
from coordinator.config import CoordinatorConfig
from coordinator.engine import RoundEngine
from coordinator.round_state import Admitted
from coordinator.rounds import StepResult
from coordinator.runtime import CoordinatorRuntime
from coordinator.store import CoordinatorStore


class AsyncRoundEngine(RoundEngine):
    """:class:`RoundEngine` in buffered asynchronous mode (module docstring)."""

    #: The service closes the buffer as soon as it is full, before it handles another message.
    closes_when_full = True

    @property
    def settings(self) -> Any:
        """``S``, ``B`` and the staleness weight (:class:`coordinator.async_rounds.
        AsyncSettings`)."""
        return self.config.asynchronous

    def close_reason(self, now: float | None = None) -> str | None:
        """``"buffer"`` once ``B`` updates are buffered, else ``None``."""
        state = self.state
        if state is None or len(state.admitted) < self.settings.buffer_size:
            return None
        if len(state.admitted) == state.postponed_at:
            return None
        return "buffer"

    def _kept_rounds(self) -> int:
        """With ``pool = "latest"`` the vectors of the last ``S`` versions' updates are kept:
        an update stays in the pool while its staleness is at most ``S``."""
        return self.settings.staleness_bound if self.settings.pool == "latest" else 0

    def _aggregate(
        self, strategy: Any, t: int, weights: np.ndarray, entries: list[Admitted]
    ) -> StepResult:
        buffer = [
            Buffered(e.index, e.delta, e.samples, e.alarm, e.base_round, t - e.base_round)
            for e in entries
        ]
        if self.settings.pool == "latest":
            # A board revoked or banned since contributes nothing from its earlier updates.
            distrusted = {*self.revoked, *self.admin_banned}
            earlier = [
                Buffered(u.client_index, u.delta, u.samples, u.alarm, u.trained_on, 0)
                for r in range(max(1, t - self.settings.staleness_bound), t)
                for u in self.store.updates(r)
                if u.delta is not None and u.client not in distrusted
            ]
            buffer = latest_pool(earlier + buffer, t, self.settings)
        guard = self.config.aggregator
        return buffered_step(
            strategy,
            t,
            weights,
            buffer,
            self.settings,
            factor=guard.guard_factor,
            max_abs=guard.guard_max_abs,
        )

    def _admission_window(self, current: int, base: str) -> dict[str, Any]:
        """The model hashes of the versions an update may still be trained on, and the
        (board, version) pairs already admitted on them, from the database."""
        oldest = max(1, current - self.settings.staleness_bound)
        bases = {str(r): self.store.global_version(r).sha256 for r in range(oldest, current)}
        bases[str(current)] = base
        based = [
            [u.client, u.trained_on]
            for r in range(oldest, current + 1)
            for u in self.store.updates(r)
            if u.trained_on >= oldest
        ]
        return {"bases": bases, "based": based}


def make_engine(
    config: CoordinatorConfig,
    runtime: CoordinatorRuntime,
    store: CoordinatorStore,
    signing_key: SigningKey,
    keys: Mapping[str, VerifyKey],
    clock: Callable[[], float] = time.time,
) -> RoundEngine:
    """The engine of ``config.mode`` and ``[admission]``: :class:`AsyncRoundEngine` for buffered
    asynchronous mode; for synchronous rounds, the engine of ``admission.streaming`` and
    ``admission.shards`` (:func:`coordinator.shard_service.engine_class`)."""
    from coordinator.shard_service import engine_class

    if config.mode == "async":
        cls: type[RoundEngine] = AsyncRoundEngine
    else:
        cls = engine_class(config.admission.streaming, config.admission.shards)
    return cls(config, runtime, store, signing_key, keys, clock)
