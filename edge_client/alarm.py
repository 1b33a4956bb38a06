"""The SIREN local-test alarm (SIREN Algorithm 1, lines 15-25).

Each round a board measures, on its local test split (never trained on):

* ``ω_t``     — the accuracy of the received global model ``g_t``;
* ``ω_t^(i)`` — the accuracy of its own previous local model ``g_t^(i)``.

Two rules decide the alarm bit ``A_t^(i)``:

* ``paper`` (SIREN §4.2 step 3, Alg. 1 line 18): no alarm iff ``ω_t − ω_t^(i) ≥ C_c``;
* ``relative`` (the authors' public code): alarm iff ``ω_t^(i) > ω_t + C_c · ω_t^(i)``.

The rule comes from the SIREN profile (:mod:`protocol.siren_profiles`; ``authors`` →
``relative``, ``paper-text`` → ``paper``) unless it is set explicitly. With the printed rule and
C_c = 4% a benign board alarms whenever the global model is not 4 points better than its own
previous model, which in IID training is most rounds once the local models have caught up; with
the relative rule it alarms only when the global model is worse than its own by more than 4% of
its own accuracy, i.e. when the global model is actually poor.

Without a previous local model (the board's first round) there is never an alarm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.siren_profiles import ALARM_RULES, DEFAULT_PROFILE, get_profile

__all__ = ["ALARM_RULES", "EPS", "AlarmConfig", "AlarmResult", "decide_alarm", "run_alarm"]


@dataclass(frozen=True)
class AlarmConfig:
    """Client-side alarm settings (SIREN Table 2: C_c = 4%).

    Attributes
    ----------
    threshold : float
        C_c, as a fraction (0.04 = 4 points of accuracy).
    rule : {"paper", "relative"}
        Which comparison decides the alarm (module docstring); the default is the default
        SIREN profile's rule.
    """

    threshold: float = 0.04
    rule: str = get_profile(DEFAULT_PROFILE).alarm_rule

    @classmethod
    def for_profile(
        cls, profile: str | None = None, threshold: float = 0.04, rule: str | None = None
    ) -> AlarmConfig:
        """The alarm of SIREN profile ``profile`` (None: the default); ``rule`` overrides it.

        Raises
        ------
        ValueError
            An unknown profile or rule, or a threshold outside [0, 1].
        """
        return cls(threshold, rule if rule is not None else get_profile(profile).alarm_rule)

    def __post_init__(self) -> None:
        if self.rule not in ALARM_RULES:
            raise ValueError(f"alarm rule must be one of {ALARM_RULES}, got {self.rule!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"alarm threshold C_c must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class AlarmResult:
    """Outcome of one alarm check.

    Attributes
    ----------
    alarm : bool
        ``A_t^(i)``.
    global_accuracy : float
        ``ω_t``.
    local_accuracy : float or None
        ``ω_t^(i)``; None in the first round (no previous local model).
    seconds : float
        Wall time of the two evaluations.
    """

    alarm: bool
    global_accuracy: float
    local_accuracy: float | None
    seconds: float


#: Rounding allowance of the comparisons: accuracies are ratios of counts, and a difference that
#: equals C_c exactly (0.29 − 0.25 = 0.03999999999999998 in floating point) must count as equal.
EPS = 1e-9


def decide_alarm(global_accuracy: float, local_accuracy: float | None, config: AlarmConfig) -> bool:
    """Apply the configured alarm rule to ``ω_t`` and ``ω_t^(i)`` (see module docstring).

    ``paper``: alarm unless ``ω_t − ω_t^(i) ≥ C_c``; ``relative``: alarm iff
    ``ω_t^(i) − ω_t > C_c · ω_t^(i)``. Both compare with a 1e-9 rounding allowance (:data:`EPS`).
    No previous local model (``local_accuracy`` None) never alarms.
    """
    if local_accuracy is None:
        return False
    if config.rule == "paper":
        return not (global_accuracy - local_accuracy >= config.threshold - EPS)
    return local_accuracy - global_accuracy > config.threshold * local_accuracy + EPS


def run_alarm(
    evaluator: Any,
    global_weights: np.ndarray,
    previous_local: np.ndarray | None,
    x_test: np.ndarray,
    y_test: np.ndarray,
    config: AlarmConfig,
) -> AlarmResult:
    """Evaluate ``g_t`` and ``g_t^(i)`` on the local test split and decide the alarm.

    ``evaluator`` is a :class:`models.litert.LiteRTEvaluator` (one interpreter, weights swapped
    through ``set_weights``) or its Keras fallback; both expose ``accuracy(weights, x, y)``.
    Cost: two forward passes over the local test split.
    """
    start = time.perf_counter()
    global_acc = evaluator.accuracy(global_weights, x_test, y_test)
    local_acc = (
        None if previous_local is None else evaluator.accuracy(previous_local, x_test, y_test)
    )
    return AlarmResult(
        alarm=decide_alarm(global_acc, local_acc, config),
        global_accuracy=global_acc,
        local_accuracy=local_acc,
        seconds=time.perf_counter() - start,
    )
