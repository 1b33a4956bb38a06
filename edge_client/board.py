"""The board's round step: alarm, choose the starting model, train, return the update.

This is plain computation with no I/O. The in-process simulator calls :func:`board_step`
directly; the MQTT board client calls the very same function from its network loop.

SIREN Algorithm 1: with the alarm enabled, a board that does not trust ``g_t`` (alarm) starts
local training from its own previous local model ``g_t^(i)``; otherwise from ``g_t``. Either
way it returns ``Δ = g_{t+1}^(i) − g_t`` and keeps ``g_{t+1}^(i)`` for the next round.

With client sampling a board takes part only in the rounds it is drawn for; in between its
state does not change, so ``previous_local`` is its *latest* local model, from the last round
it took part in, and the alarm compares ``g_t`` with that (possibly several rounds old) model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_client.alarm import AlarmConfig, AlarmResult, run_alarm


@dataclass(frozen=True)
class BoardData:
    """A board's private data: training part and local test split (SIREN §4.1)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return len(self.y_train)


@dataclass(frozen=True)
class BoardState:
    """What a board keeps between rounds.

    Attributes
    ----------
    client_id : int
        The board's index in the fleet.
    previous_local : np.ndarray or None
        ``g_t^(i)``: the local model it produced in its last round (None before its first).
    last_round : int
        The last round it completed (-1 before its first).
    """

    client_id: int
    previous_local: np.ndarray | None = None
    last_round: int = -1


@dataclass(frozen=True)
class BoardUpdate:
    """What a board sends for one round.

    Attributes
    ----------
    client_id, round : int
        Who and when.
    delta : np.ndarray
        ``Δ = g_{t+1}^(i) − g_t`` as float32 (d,).
    num_samples : int
        Reported training-set size (FedAvg weight; an attacker may lie about it).
    alarm : bool
        ``A_t^(i)``.
    global_accuracy, local_accuracy : float or None
        ``ω_t`` and ``ω_t^(i)`` on the local test split (None when the alarm did not run).
    alarm_seconds, train_seconds : float
        Wall time of the alarm and of local training.
    train_loss : float
        Mean training loss over the local steps.
    alarm_cpu_seconds, train_cpu_seconds : float
        CPU time (user + system, every thread of the process) used during the alarm and
        during local training (:func:`time.process_time`; a process hosting several boards
        counts whatever its other threads did meanwhile too).
    """

    client_id: int
    round: int
    delta: np.ndarray
    num_samples: int
    alarm: bool
    global_accuracy: float | None
    local_accuracy: float | None
    alarm_seconds: float
    train_seconds: float
    train_loss: float
    alarm_cpu_seconds: float = 0.0
    train_cpu_seconds: float = 0.0

    def with_delta(self, delta: np.ndarray) -> BoardUpdate:
        """A copy with another update vector (used by simulated attacks)."""
        return replace(self, delta=np.asarray(delta, dtype=np.float32))


def board_step(
    state: BoardState,
    global_weights: np.ndarray,
    round_index: int,
    data: BoardData,
    trainer: Any,
    rng: np.random.Generator,
    *,
    evaluator: Any = None,
    alarm: AlarmConfig | None = None,
    epochs: int | None = None,
) -> tuple[BoardUpdate, BoardState]:
    """Run one board round (SIREN Algorithm 1 when ``alarm`` is given, plain FedAvg otherwise).

    Parameters
    ----------
    state : BoardState
        The board's state before the round.
    global_weights : np.ndarray
        ``g_t``, flat float32.
    round_index : int
        The round t being played.
    data : BoardData
        The board's private data.
    trainer : models.training.Trainer
        Trains flat weight vectors (shared between boards in a simulator).
    rng : np.random.Generator
        Shuffling randomness for this board and round.
    evaluator : LiteRTEvaluator or KerasEvaluator, optional
        Needed when ``alarm`` is given.
    alarm : AlarmConfig, optional
        Enables the SIREN alarm; without it the board always starts from ``g_t``.
    epochs : int, optional
        Local epochs of this round (the trainer's own when ``None``; a simulated attacker may
        train longer).

    Returns
    -------
    (BoardUpdate, BoardState)
        The update to send and the board's new state (``previous_local = g_{t+1}^(i)``).
    """
    result: AlarmResult | None = None
    start_weights = global_weights
    alarm_cpu = 0.0
    if alarm is not None:
        if evaluator is None:
            raise ValueError("the SIREN alarm needs an evaluator")
        c0 = time.process_time()
        result = run_alarm(
            evaluator, global_weights, state.previous_local, data.x_test, data.y_test, alarm
        )
        alarm_cpu = time.process_time() - c0
        if result.alarm and state.previous_local is not None:
            start_weights = state.previous_local
    c0 = time.process_time()
    t0 = time.perf_counter()
    if epochs is None:
        new_local, stats = trainer.train(start_weights, data.x_train, data.y_train, rng)
    else:
        new_local, stats = trainer.train(
            start_weights, data.x_train, data.y_train, rng, epochs=epochs
        )
    train_seconds = time.perf_counter() - t0
    train_cpu = time.process_time() - c0
    delta = (new_local - np.asarray(global_weights, dtype=np.float32)).astype(np.float32)
    update = BoardUpdate(
        client_id=state.client_id,
        round=round_index,
        delta=delta,
        num_samples=data.num_train,
        alarm=bool(result.alarm) if result else False,
        global_accuracy=result.global_accuracy if result else None,
        local_accuracy=result.local_accuracy if result else None,
        alarm_seconds=result.seconds if result else 0.0,
        train_seconds=train_seconds,
        train_loss=stats.mean_loss,
        alarm_cpu_seconds=alarm_cpu,
        train_cpu_seconds=train_cpu,
    )
    return update, BoardState(state.client_id, new_local, round_index)
