"""Common attack parameters that change who attacks and how long they train: ``holding_class``
(the malicious boards are chosen among the holders of one class) and ``extra_epochs`` (they
train longer in attacking rounds), as in residual-based reweighting's label-flipping setting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from firmware_sim.attacks import select_malicious_ids
from firmware_sim.attacks.errors import AttackParameterError, AttackSetupError
from firmware_sim.engine import SimConfig, build_fleet, malicious_board_ids, play_round
from tests.unit.firmware_sim.attacks.builders import adversary


def _config(**params: object) -> SimConfig:
    return SimConfig(
        dataset="digits",
        clients=12,
        rounds=1,
        local_epochs=1,
        partition="classes",
        classes_per_board=2,
        attack="targeted_label_flip",
        malicious=0.17,
        attack_params={"source": 1, "target": 7, **params},
        seed=3,
    )


def test_malicious_boards_are_drawn_among_the_holders_of_the_class() -> None:
    labels = [np.array([c % 5, (c + 1) % 5]) for c in range(20)]
    holders = [i for i, y in enumerate(labels) if 3 in y]
    ids, how = select_malicious_ids(20, 0.1, None, 4, holding_class=3, board_labels=labels)
    assert len(ids) == 2 and set(ids) <= set(holders)
    assert "holding class 3" in how
    again, _ = select_malicious_ids(20, 0.1, None, 4, holding_class=3, board_labels=labels)
    assert again == ids
    with pytest.raises(AttackSetupError, match="only 8 boards hold it"):
        select_malicious_ids(20, 0.5, None, 4, holding_class=3, board_labels=labels)
    with pytest.raises(AttackSetupError, match="training labels"):
        select_malicious_ids(20, 0.1, None, 4, holding_class=3)


def test_the_fleet_and_its_manifest_choose_the_same_holders() -> None:
    config = _config(holding_class=1)
    fleet = build_fleet(config)
    ids = sorted(fleet.adversary.malicious_ids)
    assert tuple(ids) == malicious_board_ids(config)
    assert len(ids) == 2
    for cid in ids:
        shard = fleet.split.shards[cid]
        assert 1 in set(fleet.dataset.y_train[shard.train_idx].tolist())


def test_malicious_boards_train_the_extra_epochs_in_attacking_rounds_only() -> None:
    adv = adversary("label_flip", (1,), clients=3, extra_epochs=5, start_round=2)
    assert adv.round_epochs(1, 1) is None  # honest before start_round
    assert adv.round_epochs(1, 2) == 1 + 5  # SimConfig's local_epochs is 1
    assert adv.round_epochs(0, 2) is None
    assert adversary("label_flip", (1,), clients=3).round_epochs(1, 2) is None


class _Recording:
    """The fleet's real trainer, noting the epochs each call asked for."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.epochs: list[int | None] = []

    def train(self, *args: Any, epochs: int | None = None) -> Any:
        self.epochs.append(epochs)
        return self.inner.train(*args, epochs=epochs)


def test_the_engine_trains_the_attackers_longer_and_the_honest_boards_as_configured() -> None:
    config = _config(extra_epochs=2, holding_class=1)
    fleet = build_fleet(config)
    recording = _Recording(fleet.board_trainer)
    fleet.board_trainer = recording
    play_round(fleet, 1, fleet.trainer.initial_weights.copy())
    bad = fleet.adversary.malicious_ids
    assert recording.epochs == [3 if c in bad else None for c in range(config.clients)]
    # the attacker's longer run is a real one: its delta is that of three epochs
    cid = min(bad)
    data = fleet.adversary.round_data(cid, 1, fleet.boards[cid])
    start = fleet.trainer.initial_weights.copy()
    _, three = fleet.trainer.train(
        start, data.x_train, data.y_train, np.random.default_rng(0), epochs=3
    )
    assert three.steps == 3 * -(-len(data.y_train) // config.batch_size)


def test_a_holding_class_outside_the_dataset_is_refused_by_name() -> None:
    with pytest.raises(AttackParameterError, match=r"'holding_class' must be a class in 0\.\.3"):
        adversary("label_flip", (1,), clients=3, holding_class=4)


def test_a_targeted_flip_drawn_among_other_holders_than_its_source_is_refused() -> None:
    with pytest.raises(AttackParameterError, match="give source=1 as well"):
        adversary("targeted_label_flip", (1,), clients=3, holding_class=1, source=2, target=3)
    adv = adversary("targeted_label_flip", (1,), clients=3, holding_class=1, source=1, target=3)
    assert adv.attack.values["holding_class"] == 1
