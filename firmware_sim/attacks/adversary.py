"""The adversary of a simulated run: which boards, which attack, in which rounds.

:class:`AttackAdversary` composes

* the malicious board ids (:func:`select_malicious_ids`),
* one registered :class:`~firmware_sim.attacks.base.Attack`,
* a camouflage :class:`Schedule` (honest before ``start_round`` and between attacking rounds),
* optionally a false SIREN alarm in attacking rounds,

and implements the engine's :class:`~firmware_sim.adversary.Adversary` hooks with them. In an
honest round a malicious board is indistinguishable from a benign one: clean data, its true
update, its true sample count and its own alarm decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_client.board import BoardData, BoardUpdate
from firmware_sim.adversary import Adversary
from firmware_sim.attacks.base import Attack, AttackSetting, get_attack
from firmware_sim.attacks.errors import AttackParameterError, AttackSetupError
from firmware_sim.attacks.params import resolve_params
from models.datasets import Dataset


@dataclass(frozen=True)
class Schedule:
    """When the malicious boards attack.

    Round ``t`` is an attacking round when ``t >= start_round`` and ``(t − start_round)`` is a
    multiple of ``every``; with ``once`` only ``t == start_round`` is.
    """

    start_round: int = 1
    every: int = 1
    once: bool = False

    def active(self, round_index: int) -> bool:
        """Whether the malicious boards attack in ``round_index``."""
        if round_index < self.start_round:
            return False
        if self.once:
            return round_index == self.start_round
        return (round_index - self.start_round) % self.every == 0

    def describe(self) -> dict[str, Any]:
        """JSON-friendly form for the history."""
        return {"start_round": self.start_round, "every": self.every, "once": self.once}


def malicious_count(fraction: float, num_clients: int) -> int:
    """``round(fraction · K)`` with halves rounded up (0.25 · 10 = 2.5 gives 3)."""
    return int(np.floor(fraction * num_clients + 0.5))


def select_malicious_ids(
    num_clients: int,
    fraction: float,
    explicit: Sequence[int] | None,
    seed: int,
    *,
    holding_class: int | None = None,
    board_labels: Sequence[np.ndarray] | None = None,
) -> tuple[tuple[int, ...], str]:
    """The malicious board ids and a description of how they were chosen.

    Explicit ids win. Otherwise ``c = round(fraction · K)`` boards are taken as the first ``c``
    entries of ``numpy.random.default_rng(seed).permutation(K)`` (the run seed), sorted. With
    ``holding_class``, the permutation runs over the boards whose training labels
    (``board_labels[i]``) contain that class instead, in board order.

    Raises
    ------
    AttackSetupError
        An explicit id outside ``0..K-1`` or repeated, no malicious board at all, or fewer
        boards holding ``holding_class`` than malicious boards asked for.
    """
    if explicit is not None:
        ids = tuple(int(i) for i in explicit)
        bad = [i for i in ids if not 0 <= i < num_clients]
        if bad:
            raise AttackSetupError(f"malicious board ids {bad} are outside 0..{num_clients - 1}")
        if len(set(ids)) != len(ids):
            raise AttackSetupError(f"malicious board ids {list(ids)} contain duplicates")
        chosen = tuple(sorted(ids))
        how = "explicit --malicious-ids"
    elif holding_class is not None:
        if board_labels is None or len(board_labels) != num_clients:
            raise AttackSetupError(
                "choosing the malicious boards by class needs every board's training labels"
            )
        holders = [i for i, labels in enumerate(board_labels) if np.any(labels == holding_class)]
        c = malicious_count(fraction, num_clients)
        if len(holders) < c:
            raise AttackSetupError(
                f"{c} malicious boards holding class {holding_class} were asked for, but only "
                f"{len(holders)} {'board holds' if len(holders) == 1 else 'boards hold'} it; "
                "lower --malicious or choose another class"
            )
        perm = np.random.default_rng(seed).permutation(len(holders))
        chosen = tuple(sorted(holders[int(j)] for j in perm[:c]))
        how = (
            f"first round({fraction:g}·{num_clients}) = {c} of default_rng({seed}).permutation "
            f"of the {len(holders)} boards holding class {holding_class}"
        )
    else:
        c = malicious_count(fraction, num_clients)
        perm = np.random.default_rng(seed).permutation(num_clients)
        chosen = tuple(sorted(int(i) for i in perm[:c]))
        how = f"first round({fraction:g}·{num_clients}) = {c} of default_rng({seed}).permutation"
    if not chosen:
        raise AttackSetupError(
            "an attack needs at least one malicious board: give --malicious FRACTION with "
            "round(FRACTION·K) >= 1 or --malicious-ids"
        )
    return chosen, how


class AttackAdversary(Adversary):
    """An :class:`Attack` run by the boards ``malicious_ids`` following ``schedule``.

    Parameters
    ----------
    attack : Attack
        What the malicious boards do in attacking rounds.
    malicious_ids : sequence of int
        The boards the adversary controls.
    schedule : Schedule
        When they attack (honest otherwise).
    false_alarm : bool
        Also raise the SIREN alarm bit in attacking rounds.
    selection : str
        How the ids were chosen (recorded in the history).
    attack_epochs : int, optional
        Local epochs of a malicious board in attacking rounds (the run's own when ``None``).
    """

    def __init__(
        self,
        attack: Attack,
        malicious_ids: Sequence[int],
        schedule: Schedule,
        *,
        false_alarm: bool = False,
        selection: str = "",
        attack_epochs: int | None = None,
    ) -> None:
        super().__init__(malicious_ids)
        self.attack_epochs = attack_epochs
        self.attack = attack
        self.name = attack.name
        self.schedule = schedule
        self.false_alarm = bool(false_alarm or attack.raises_alarm)
        self.selection = selection
        self._true_counts: dict[int, int] = {}
        self._poisoned: dict[int, BoardData] = {}
        self._last_active = False
        self._last_info: dict[str, float] = {}
        self._attacked_rounds: list[int] = []
        self._probe = attack.probe()

    # -- engine hooks --------------------------------------------------------------------

    def board_data(self, client_id: int, data: BoardData, rng: np.random.Generator) -> BoardData:
        """Remember the board's true shard size and prepare its poisoned data (if any).

        The clean data is returned: poisoned data is used only in attacking rounds
        (:meth:`round_data`).
        """
        self._true_counts[client_id] = data.num_train
        poisoned = self.attack.poison_data(client_id, data, rng)
        if poisoned is not None:
            self._poisoned[client_id] = poisoned
        return data

    def round_data(self, client_id: int, round_index: int, data: BoardData) -> BoardData:
        """The poisoned data in attacking rounds, the clean data otherwise."""
        if self.schedule.active(round_index) and client_id in self._poisoned:
            return self._poisoned[client_id]
        return data

    def round_epochs(self, client_id: int, round_index: int) -> int | None:
        """A malicious board's longer training in attacking rounds (``extra_epochs``)."""
        if (
            self.attack_epochs is not None
            and client_id in self.malicious_ids
            and self.schedule.active(round_index)
        ):
            return self.attack_epochs
        return None

    def tamper_round(
        self,
        round_index: int,
        global_weights: np.ndarray,
        updates: list[BoardUpdate],
        rng: np.random.Generator,
    ) -> list[BoardUpdate]:
        """In attacking rounds: restore true counts, let the attack rewrite the malicious
        boards' updates, and raise their alarm bits when ``false_alarm``."""
        self._last_active = self.schedule.active(round_index)
        self._last_info = {}
        malicious = [i for i, u in enumerate(updates) if self.is_malicious(u.client_id)]
        if not self._last_active or not malicious:
            return updates
        self._attacked_rounds.append(round_index)
        restored = list(updates)
        for pos in malicious:
            u = updates[pos]
            true_count = self._true_counts.get(u.client_id, u.num_samples)
            if u.num_samples != true_count:
                restored[pos] = replace(u, num_samples=true_count)
        out = self.attack.tamper(round_index, global_weights, restored, malicious, rng)
        if len(out) != len(updates) or any(
            a.client_id != b.client_id for a, b in zip(out, updates)
        ):
            raise RuntimeError(f"attack {self.name!r} changed the set or order of the updates")
        if self.false_alarm:
            out = [replace(u, alarm=True) if i in malicious else u for i, u in enumerate(out)]
        self._last_info = self.attack.round_info()
        return out

    def round_metrics(self, evaluate: Any, global_weights: np.ndarray) -> dict[str, float]:
        """Whether the round was an attacking one, the attack's own numbers, and for targeted
        and backdoor attacks the attack success rate, the misclassification confidence (SIREN
        Fig. 7) and the main-task accuracy of the new global model.

        ``evaluate`` is the run's :class:`models.training.Trainer`.
        """
        metrics: dict[str, Any] = {"attack_active": bool(self._last_active)}
        metrics.update(self._last_info)
        if self._probe is not None:
            metrics.update(probe_metrics(evaluate, global_weights, self._probe))
        return metrics

    def describe(self) -> dict[str, Any]:
        """Attack, malicious ids (and how they were chosen), parameters, schedule, source."""
        return {
            "attack": self.name,
            "malicious_ids": sorted(self.malicious_ids),
            "malicious_selection": self.selection,
            "attack_params": dict(self.attack.values),
            "attack_schedule": self.schedule.describe(),
            "attack_false_alarm": self.false_alarm,
            "attack_source": self.attack.source,
        }


def probe_metrics(trainer: Any, weights: np.ndarray, probe: Any) -> dict[str, float]:
    """ASR, misclassification confidence and main-task accuracy of ``weights`` on ``probe``.

    * ``attack_success_rate``: share of ``probe.x_attack`` classified as ``probe.target``;
    * ``misclassification_confidence``: mean softmax probability of ``probe.target`` on
      ``probe.x_attack`` (SIREN Fig. 7);
    * ``main_task_accuracy``: top-1 accuracy on ``(probe.x_main, probe.y_main)``.

    Empty image sets (e.g. a test subset without the source class) give no entry.
    """
    out: dict[str, float] = {}
    if len(probe.x_attack):
        p = np.asarray(trainer.predict(weights, probe.x_attack))
        out["attack_success_rate"] = float(np.mean(np.argmax(p, axis=1) == probe.target))
        out["misclassification_confidence"] = float(np.mean(p[:, probe.target]))
    if len(probe.y_main):
        _, acc = trainer.evaluate(weights, probe.x_main, probe.y_main)
        out["main_task_accuracy"] = float(acc)
    return out


def make_adversary(
    config: Any, dataset: Dataset, board_labels: Sequence[np.ndarray] | None = None
) -> AttackAdversary:
    """Build the adversary of a :class:`firmware_sim.engine.SimConfig` with an attack set.

    Uses ``config.attack`` (registry name), ``config.attack_params`` (the attack's parameters
    plus the common ones: ``start_round``, ``every``, ``false_alarm``, ``extra_epochs``,
    ``holding_class``), ``config.malicious`` / ``config.malicious_ids``, ``config.clients``,
    ``config.local_epochs`` and ``config.seed``. ``board_labels`` (each board's training labels)
    is needed when ``holding_class`` is set.

    Raises
    ------
    UnknownAttackError, AttackParameterError, AttackSetupError
        All :class:`ValueError` subclasses with a message naming the valid choices.
    """
    cls = get_attack(str(config.attack))
    values = resolve_params(cls.name, cls.PARAMS, dict(config.attack_params or {}))
    holding = values["holding_class"]
    if holding is not None and not holding < dataset.num_classes:
        raise AttackParameterError(
            f"attack {cls.name!r} parameter 'holding_class' must be a class in "
            f"0..{dataset.num_classes - 1}, got {holding}"
        )
    ids, how = select_malicious_ids(
        int(config.clients),
        float(config.malicious),
        config.malicious_ids,
        int(config.seed),
        holding_class=values["holding_class"],
        board_labels=board_labels,
    )
    setting = AttackSetting(dataset, int(config.clients), ids, int(config.seed))
    attack = cls(setting, values)
    schedule = Schedule(int(values["start_round"]), int(values["every"]), attack.single_shot)
    epochs = None
    if values["extra_epochs"]:
        epochs = int(getattr(config, "local_epochs", 1)) + int(values["extra_epochs"])
    return AttackAdversary(
        attack,
        ids,
        schedule,
        false_alarm=bool(values["false_alarm"]),
        selection=how,
        attack_epochs=epochs,
    )
