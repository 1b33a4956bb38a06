"""Buffered asynchronous federated learning in process, on a simulated clock.

``siren sim run --mode async`` (:func:`firmware_sim.engine.run_simulation`) runs the fleet the
way :mod:`coordinator.async_rounds` describes: every board trains continuously on the newest
global version it holds, the coordinator admits updates up to ``S`` versions stale and makes a
new version whenever ``B`` are buffered.

**Simulated time.** All boards train on this machine, one after the other; what orders their
updates is the time each would take on its own device (:mod:`firmware_sim.profiles`):
``compute_factor × compute + latency``, where *compute* is the measured time of the board's
alarm and training (or, with ``nominal_compute``, that many seconds per training sample and
epoch, which makes the order, and so the run, reproducible). An event queue plays the run in
simulated time:

1. at time 0 every board starts on version 1;
2. a board that finishes at time ``t`` delivers its update (unless its profile drops it this
   time: the update is lost, ``lost``); the coordinator admits it when its staleness
   ``τ = v − r`` is at most ``S`` (``accepted``, or ``stale`` when ``τ ≥ 1``), else refuses it
   (``too_stale``), and refuses a second update of a board already in the buffer
   (``buffered``);
3. when the buffer holds ``B`` updates the coordinator runs :func:`~coordinator.async_rounds.
   buffered_step` -- on the buffer, or with ``async_pool = "latest"`` on every board's latest
   admissible update -- and publishes version ``v + 1`` after its (measured) aggregation time;
4. a board that finished starts again at once on the newest version; a board that already
   trained on the newest version waits for the next one.

Each new version is one record of the history (``round`` = the version the buffer was applied
to), with ``sim_time`` (when it was published), ``selected`` (the boards whose updates filled the
buffer), ``staleness`` (of every update the rule ran on: the buffer's, or the latest pool's) and
the admission counts.

Attacks tamper with one update at a time, as its board finishes (:meth:`firmware_sim.adversary.
Adversary.tamper_round` with that update alone): colluding attacks see no buffer.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from coordinator.async_rounds import AsyncSettings, Buffered, buffered_step, latest_pool
from edge_client.alarm import AlarmConfig
from edge_client.board import BoardUpdate, board_step
from firmware_sim.profiles import compute_seconds


def check_async(config: Any) -> None:
    """Check the buffered asynchronous settings of a ``SimConfig``.

    Raises
    ------
    ValueError
        Saying which option is wrong and what is expected.
    """
    if config.sampling.active:
        raise ValueError(
            "--mode async trains every board continuously and draws no boards: drop "
            "--client-fraction / --clients-per-round"
        )
    AsyncSettings(
        config.staleness_bound, config.buffer_size, config.staleness_weight, config.async_pool
    )
    if config.buffer_size > config.clients:
        raise ValueError(
            f"--buffer-size {config.buffer_size} is more than the {config.clients} boards "
            "(a buffer holds at most one update per board)"
        )


class _Board:
    """A board's place in the simulation: what it last trained on, its update in flight."""

    __slots__ = ("index", "trained_on")

    def __init__(self, index: int) -> None:
        self.index = index
        self.trained_on = 0


def run_buffered(
    fleet: Any,
    initial: np.ndarray,
    rounds: list[dict[str, Any]],
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """Play ``fleet.config.rounds`` new global versions in buffered asynchronous mode (module
    docstring); append one record per version to ``rounds``; return the final global model.

    ``fleet`` is a :class:`firmware_sim.engine.Fleet`.
    """
    return _Simulation(fleet, initial, rounds, progress).run()


class _Simulation:
    def __init__(
        self,
        fleet: Any,
        initial: np.ndarray,
        rounds: list[dict[str, Any]],
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        cfg = fleet.config
        self.fleet = fleet
        self.cfg = cfg
        self.settings = AsyncSettings(
            cfg.staleness_bound, cfg.buffer_size, cfg.staleness_weight, cfg.async_pool
        )
        self.admitted: list[Buffered] = []  # every admitted update, for pool = "latest"
        self.alarm = (
            AlarmConfig.for_profile(cfg.siren_profile, cfg.alarm_threshold, cfg.alarm_rule)
            if cfg.alarm_enabled
            else None
        )
        self.rounds = rounds
        self.progress = progress
        self.current = 1
        self.versions: dict[int, np.ndarray] = {1: np.asarray(initial, dtype=np.float32).copy()}
        self.boards = [_Board(i) for i in range(cfg.clients)]
        self.events: list[tuple[float, int, int, BoardUpdate | None, int]] = []
        self.seq = 0
        self.idle: set[int] = set()
        self.buffer: list[Buffered] = []
        self.counts: Counter[str] = Counter()
        self.board_info: dict[int, dict[str, Any]] = {}
        self.clock = 0.0
        self.published_at = 0.0
        self.real = time.perf_counter()

    def run(self) -> np.ndarray:
        for board in self.boards:
            self._start(board, 0.0)
        while self.current <= self.cfg.rounds and self.events:
            at, _, index, update, base = heapq.heappop(self.events)
            self.clock = max(self.clock, at)
            self._arrive(index, update, base)
            if len(self.buffer) >= self.settings.buffer_size:
                self._flush()
                for waiting in sorted(self.idle):
                    self.idle.discard(waiting)
                    self._start(self.boards[waiting], self.clock)
            if self.current <= self.cfg.rounds:
                self._start(self.boards[index], self.clock)
        return self.versions[self.current]

    # -- boards ------------------------------------------------------------------------------

    def _start(self, board: _Board, now: float) -> None:
        """Train ``board`` on the newest version (or let it wait for a newer one)."""
        v = self.current
        if board.trained_on >= v:
            self.idle.add(board.index)
            return
        board.trained_on = v
        cfg, fleet, cid = self.cfg, self.fleet, board.index
        data = fleet.boards[cid]
        if fleet.adversary.is_malicious(cid):
            data = fleet.adversary.round_data(cid, v, data)
        update, fleet.states[cid] = board_step(
            fleet.states[cid],
            self.versions[v],
            v,
            data,
            fleet.board_trainer,
            np.random.default_rng([cfg.seed, v, cid]),
            evaluator=fleet.evaluator,
            alarm=self.alarm,
            epochs=fleet.adversary.round_epochs(cid, v),
        )
        tamper_rng = np.random.default_rng([cfg.seed, v, cid, 65537])
        update = fleet.adversary.tamper_round(v, self.versions[v], [update], tamper_rng)[0]
        profile = fleet.profiles[cid]
        compute = compute_seconds(cfg, update, fleet.boards[cid].num_train)
        seconds = profile.board_seconds(compute, cfg.seed, v, cid)
        lost = profile.drops(cfg.seed, v, cid)
        self.seq += 1
        heapq.heappush(self.events, (now + seconds, self.seq, cid, None if lost else update, v))

    def _arrive(self, index: int, update: BoardUpdate | None, base: int) -> None:
        """The coordinator's admission of one update (module docstring, step 2)."""
        if update is None:
            self.counts["lost"] += 1
            return
        staleness = self.current - base
        if not self.settings.admits(staleness):
            self.counts["too_stale"] += 1
            return
        if any(b.client_id == index for b in self.buffer):
            self.counts["buffered"] += 1
            return
        self.counts["stale" if staleness else "accepted"] += 1
        entry = Buffered(index, update.delta, update.num_samples, update.alarm, base, staleness)
        self.buffer.append(entry)
        if self.settings.pool == "latest":
            self.admitted.append(entry)
        self.board_info[index] = {
            "global_accuracy": update.global_accuracy,
            "local_accuracy": update.local_accuracy,
            "alarm_ms": 1000 * update.alarm_seconds,
            "train_ms": 1000 * update.train_seconds,
            "base_round": base,
            "arrived_at": self.clock,
        }

    # -- coordinator -------------------------------------------------------------------------

    def _flush(self) -> None:
        """Aggregate the buffer into the next version and record it."""
        cfg, fleet = self.cfg, self.fleet
        v = self.current
        g_v = self.versions[v]
        defended = v >= cfg.defense_start_round or fleet.undefended is None
        strategy = fleet.strategy if defended else fleet.undefended
        pool = self.buffer
        if self.settings.pool == "latest":
            pool = latest_pool(self.admitted, v, self.settings)
            oldest = v + 1 - self.settings.staleness_bound
            self.admitted = [b for b in self.admitted if b.base_round >= oldest]
        t0 = time.perf_counter()
        result = buffered_step(
            strategy,
            v,
            g_v,
            pool,
            self.settings,
            factor=cfg.guard_factor,
            max_abs=cfg.guard_max_abs,
        )
        server_seconds = time.perf_counter() - t0
        new_global = np.asarray(result.new_global, dtype=np.float32)
        test_loss, test_acc = fleet.trainer.evaluate(new_global, fleet.x_test, fleet.y_test)
        self.clock += server_seconds
        buffer = sorted(self.buffer, key=lambda b: b.client_id)  # this version's arrivals
        now = time.perf_counter()
        record: dict[str, Any] = {
            "round": v,
            "mode": "async",
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "seconds": now - self.real,
            "server_seconds": server_seconds,
            "sim_time": self.clock,
            "sim_seconds": self.clock - self.published_at,
            "selected": [b.client_id for b in buffer],
            "sample_counts": {str(b.client_id): b.num_samples for b in buffer},
            "alarms": {str(b.client_id): bool(b.alarm) for b in buffer},
            "staleness": {str(b.client_id): b.staleness for b in sorted(pool, key=_board)},
            "admission": dict(sorted(self.counts.items())),
            "boards": {str(b.client_id): self.board_info[b.client_id] for b in buffer},
            "defense_active": defended,
            "verdicts": {str(k): val for k, val in result.verdicts.items()},
            "decision": result.record,
        }
        record.update(fleet.adversary.round_metrics(fleet.trainer, new_global))
        self.real = now
        self.published_at = self.clock
        self.buffer = []
        self.counts = Counter()
        self.current = v + 1
        self.versions[self.current] = new_global
        # Only versions an admissible update can still be based on are kept.
        for old in [k for k in self.versions if k < self.current - self.settings.staleness_bound]:
            del self.versions[old]
        self.rounds.append(record)
        if self.progress is not None:
            self.progress(record)


def _board(entry: Buffered) -> int:
    return entry.client_id
