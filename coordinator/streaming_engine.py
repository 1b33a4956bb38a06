"""The round engine with streaming admission: each update's share of the close is done on admission.

:class:`StreamingRoundEngine` is :class:`coordinator.engine.RoundEngine` (same admission rules,
same store, same records, the same once-per-board-per-round guarantee) plus a
:class:`coordinator.streaming.StreamingRound`:

* an admitted update is copied into its board's row of the round's buffer, and the engine's
  admitted entry points at that row (no second copy of the matrix);
* the Gram rows of the updates admitted since the last check are computed whenever the
  service asks whether the round can close (:meth:`StreamingRoundEngine.close_reason`), i.e.
  after each burst of messages: updates arriving together share one pass over the buffer;
* with FLTrust, the server's own update is trained at the round's first admission and every
  update's dot product with it is taken on admission;
* the close runs the strategy through :class:`StreamingStep`: Krum, Multi-Krum, Bulyan,
  FLTrust, median and trimmed mean via :class:`coordinator.streaming_rules.StreamedClose`,
  SIREN with its weight analysis read from the Gram matrix, any other rule as its batch rule on
  the buffer; the global-model guard takes the norms and largest values kept on admission.

A restarted engine rebuilds the round's buffer and Gram matrix from the stored updates. The
batch engine remains available (``[admission] streaming = false``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.aggregators.base import get_rule
from coordinator.engine import RoundEngine
from coordinator.rounds import RuleStrategy, StepResult, Submission, guarded_step
from coordinator.siren import SirenStrategy, cosine
from coordinator.streaming import StreamingRound
from coordinator.streaming_rules import PAIRWISE, StreamedClose, StreamingCosines
from protocol.admission import AdmissionDecision

logger = logging.getLogger(__name__)


def needs_gram(strategy: Any) -> bool:
    """Whether closing with ``strategy`` reads pairwise dot products of the updates."""
    if isinstance(strategy, RuleStrategy):
        return strategy.name in PAIRWISE
    if isinstance(strategy, SirenStrategy):
        return bool(strategy.params.weight_analysis)
    return False


def needs_buckets(strategy: Any) -> bool:
    """Whether closing with ``strategy`` reads per-coordinate bucket counts (the median:
    :mod:`coordinator.streaming_bucket_close`)."""
    return isinstance(strategy, RuleStrategy) and strategy.name == "median"


def trimmed_beta(strategy: Any) -> int | float | None:
    """The trimmed mean's ``beta`` when ``strategy`` closes with it (its sums and tail heaps
    are kept on admission: :mod:`coordinator.streaming_tails`), else None."""
    if not (isinstance(strategy, RuleStrategy) and strategy.name == "trimmed_mean"):
        return None
    beta = strategy.params.get("beta", get_rule("trimmed_mean").params["beta"].default)
    return beta  # type: ignore[no-any-return]


class StreamingStep:
    """``strategy`` (the :class:`~coordinator.strategy.Strategy` protocol) with its step read from
    a streaming round.

    Submissions whose update is not the stream's buffer row of their board (or a strategy of
    another kind) are stepped by the strategy itself.
    """

    def __init__(self, strategy: Any, stream: StreamingRound) -> None:
        self.strategy = strategy
        self.stream = stream
        self.name = getattr(strategy, "name", "")
        #: How the last step was closed (``streamed``, ``batch: ...``).
        self.how = ""

    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state."""
        return dict(self.strategy.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the wrapped strategy's state."""
        self.strategy.load_state_dict(state)

    def _backed(self, submissions: Sequence[Submission]) -> bool:
        stream = self.stream
        for s in submissions:
            row = int(s.client_id)
            if row not in stream.digests or not np.shares_memory(s.delta, stream.buffer[row]):
                return False
        return True

    def step(
        self, round_index: int, global_weights: np.ndarray, submissions: Sequence[Submission]
    ) -> StepResult:
        """The round's step from the streaming state (see the class docstring)."""
        strategy = self.strategy
        if not submissions or not self._backed(submissions):
            self.how = "batch: updates not in the round's buffer"
            return strategy.step(round_index, global_weights, submissions)
        rows = [int(s.client_id) for s in submissions]
        if isinstance(strategy, RuleStrategy):
            params, rng = strategy.rule_inputs(
                round_index, global_weights, submissions, self.stream.server_update
            )
            close = StreamedClose(self.stream, rows)
            counts = np.array([s.num_samples for s in submissions], dtype=np.float64)
            result = close.aggregate(
                strategy.name,
                weights=counts,
                rng=rng,
                state=strategy.state,
                device=strategy.device,
                **params,
            )
            self.how = close.how
            out = strategy.finish(result, global_weights, submissions)
            out.record["close"] = close.how
            return out
        if isinstance(strategy, SirenStrategy) and self.stream.gram is not None:
            cosines = StreamingCosines(self.stream, cosine, len(rows))
            out = strategy.step(round_index, global_weights, submissions, cosine=cosines)
            self.how = "streamed"
            out.record["close"] = f"streamed ({cosines.exact_calls} cosine(s) recomputed)"
            return out
        self.how = "batch: not streamed"
        return strategy.step(round_index, global_weights, submissions)


class StreamingRoundEngine(RoundEngine):
    """:class:`~coordinator.engine.RoundEngine` with streaming admission (module docstring)."""

    stream: StreamingRound | None = None

    def _round_stream(self) -> StreamingRound | None:
        """The stream of the open round (created on first use, reset when a round opens)."""
        state = self.state
        if state is None:
            return None
        stream = self.stream
        if stream is None or stream.capacity != len(self.clients):
            stream = StreamingRound(
                len(self.clients),
                self.runtime.layout.size,
                pairwise=needs_gram(self.runtime.strategy),
                coordinatewise=needs_buckets(self.runtime.strategy),
                trimmed=trimmed_beta(self.runtime.strategy),
            )
            self.stream = stream
        if stream.round != state.round:
            selected = state.selected
            stream.reset(state.round, expected=None if selected is None else len(selected))
        return stream

    def start(self) -> bytes:
        """:meth:`RoundEngine.start`, with the streaming kernels compiled (or loaded from
        numba's cache) before the first update arrives."""
        from coordinator import (
            streaming,
            streaming_bucket_close,
            streaming_select,
            streaming_tails,
        )

        streaming.warm_up()
        if needs_buckets(self.runtime.strategy):
            streaming_select.warm_up()
            streaming_bucket_close.warm_up()
        if trimmed_beta(self.runtime.strategy) is not None:
            streaming_tails.warm_up()
        return super().start()

    def _load(self) -> bytes:
        message = super()._load()
        self.stream = None
        stream = self._round_stream()
        if stream is not None and self.state is not None and self.state.admitted:
            t0 = time.perf_counter()
            for entry in sorted(self.state.admitted.values(), key=lambda e: e.index):
                entry.delta = stream.add(entry.index, entry.delta)
            stream.flush()
            self._server_update(stream)
            logger.info(
                "round %d: streaming state rebuilt from %d stored update(s) in %.1f s",
                self.state.round,
                len(self.state.admitted),
                time.perf_counter() - t0,
            )
        return message

    def _server_update(self, stream: StreamingRound) -> None:
        """FLTrust: train the server's own update of the round once, at its first admission."""
        strategy = self.runtime.strategy
        state = self.state
        if (
            state is None
            or stream.server_update is not None
            or not isinstance(strategy, RuleStrategy)
            or not strategy.needs_server_update
            or strategy.oracle is None
            or state.round < self.config.defense_start_round
        ):
            return
        stream.set_server_update(strategy.oracle.server_update(state.glob.weights, state.round))

    def handle_update(
        self, payload: bytes, *, topic: str | None = None, received_at: float | None = None
    ) -> AdmissionDecision:
        """:meth:`RoundEngine.handle_update`, then the admitted update goes into the round's
        buffer (its Gram row follows at the next :meth:`close_reason`)."""
        stream = self._round_stream()
        decision = super().handle_update(payload, topic=topic, received_at=received_at)
        state = self.state
        if decision.accepted and stream is not None and state is not None:
            message = decision.message
            assert message is not None
            entry = state.admitted[message.client]
            entry.delta = stream.add(entry.index, entry.delta, digest=message.header.payload_sha256)
            self._server_update(stream)
        return decision

    def close_reason(self, now: float | None = None) -> str | None:
        """Bring the Gram matrix up to date (one pass for every update admitted since the last
        call), then :meth:`RoundEngine.close_reason`."""
        if self.stream is not None and self.state is not None:
            self.stream.flush()
        return super().close_reason(now)

    def _aggregate(self, strategy: Any, t: int, weights: np.ndarray, entries: list[Any]) -> Any:
        stream = self.stream
        if stream is None or stream.round != t or not entries:
            return super()._aggregate(strategy, t, weights, entries)
        submissions = [Submission(e.index, e.delta, e.samples, e.alarm) for e in entries]
        rows = [e.index for e in entries]
        if any(r not in stream.digests for r in rows):
            return super()._aggregate(strategy, t, weights, entries)
        guard = self.config.aggregator
        step = StreamingStep(strategy, stream)
        result = guarded_step(
            step,
            t,
            weights,
            submissions,
            factor=guard.guard_factor,
            max_abs=guard.guard_max_abs,
            norms=np.sqrt(np.maximum(stream.sq_norms[rows], 0.0)),
            largest=stream.max_abs[rows].tolist(),
        )
        if step.how.startswith("batch"):
            logger.info("round %d: closed by the batch rule (%s)", t, step.how[7:])
        return result
