"""Sign flipping, label flipping (untargeted and targeted) and boosted targeted poisoning.

* ``sign_flip`` (SIREN §3, after Li et al.): the board trains honestly and sends ``boost · Δ``
  with a negative ``boost`` (SIREN §5.3 uses -4).
* ``label_flip`` (SIREN §3): trains on labels ``l -> L - 1 - l``.
* ``random_label_flip`` (DSPO §4.1, its untargeted attack): every training label is changed to
  another label drawn uniformly at random (drawn once per board).
* ``targeted_label_flip`` (DSPO §4.1): only the source class is relabelled as the target class
  (``A_4^6`` on Fashion-MNIST: coat -> shirt).
* ``targeted_poison`` (Bhagoji et al. as used in SIREN §3/§5.5): the source class is relabelled
  as the target class *and* the resulting update is explicitly boosted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import numpy as np

from edge_client.board import BoardData, BoardUpdate
from firmware_sim.attacks.base import (
    Attack,
    AttackSetting,
    Probe,
    class_param,
    map_malicious,
    register_attack,
)
from firmware_sim.attacks.errors import AttackParameterError
from firmware_sim.attacks.params import Param


def flip_all_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """SIREN's label flip: every label ``l`` becomes ``L - 1 - l`` (an involution)."""
    return (num_classes - 1 - np.asarray(y, dtype=np.int64)).astype(np.int64)


def relabel_randomly(y: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """DSPO's untargeted flip: each label ``l`` becomes a label drawn uniformly from the other
    ``L - 1`` classes (``l + k mod L`` with ``k`` uniform in ``1..L-1``)."""
    y64 = np.asarray(y, dtype=np.int64)
    shift = rng.integers(1, num_classes, size=y64.shape, dtype=np.int64)
    return (y64 + shift) % num_classes


def flip_class(y: np.ndarray, source: int, target: int) -> np.ndarray:
    """DSPO's ``A_source^target``: labels equal to ``source`` become ``target``, others stay."""
    y64 = np.asarray(y, dtype=np.int64)
    return np.where(y64 == source, np.int64(target), y64)


def check_classes(attack: str, setting: AttackSetting, **classes: int) -> None:
    """Raise unless every named class index is below L and the indices are distinct."""
    L = setting.num_classes
    for key, value in classes.items():
        if not 0 <= value < L:
            raise AttackParameterError(
                f"attack {attack!r} parameter {key!r} must be a class in 0..{L - 1}, got {value}"
            )
    if len(set(classes.values())) != len(classes):
        names = " and ".join(classes)
        raise AttackParameterError(f"attack {attack!r}: {names} must be different classes")


def source_class_probe(setting: AttackSetting, source: int, target: int) -> Probe:
    """Source-class test images (to be pushed to ``target``); the main task is every other class."""
    ds = setting.dataset
    is_source = ds.y_test == source
    return Probe(ds.x_test[is_source], target, ds.x_test[~is_source], ds.y_test[~is_source])


@register_attack
class SignFlip(Attack):
    """``Δ' = boost · Δ`` with ``boost < 0``."""

    name = "sign_flip"
    summary = "train honestly, send the update times a negative boost"
    source = "SIREN §3 and §5.3 (boost -4); byzantine survey §V (-4)"
    PARAMS = (
        Param(
            "boost",
            float,
            -4.0,
            "factor applied to the honest update (must be < 0)",
            maximum=-1e-12,
        ),
    )

    def tamper(
        self,
        round_index: int,
        global_weights: np.ndarray,
        updates: list[BoardUpdate],
        malicious: Sequence[int],
        rng: np.random.Generator,
    ) -> list[BoardUpdate]:
        """Multiply every malicious update by ``boost``."""
        boost = np.float32(self.values["boost"])
        return map_malicious(updates, malicious, lambda _, u: u.with_delta(u.delta * boost))


@register_attack
class LabelFlip(Attack):
    """Train on ``L - 1 - l`` instead of ``l``."""

    name = "label_flip"
    summary = "train on flipped labels l -> L-1-l"
    source = "SIREN §3 (after Fung et al.)"

    def poison_data(
        self, client_id: int, data: BoardData, rng: np.random.Generator
    ) -> BoardData | None:
        """The board's data with every training label flipped (the local test split is kept)."""
        return replace(data, y_train=flip_all_labels(data.y_train, self.setting.num_classes))


@register_attack
class RandomLabelFlip(Attack):
    """Train on labels each changed to a random other label."""

    name = "random_label_flip"
    summary = "train on labels each changed to a random other label (drawn once)"
    source = "DSPO §4.1 (its untargeted label-flipping attack)"

    def poison_data(
        self, client_id: int, data: BoardData, rng: np.random.Generator
    ) -> BoardData | None:
        """The board's data with every training label replaced by a random other label."""
        return replace(data, y_train=relabel_randomly(data.y_train, self.setting.num_classes, rng))


@register_attack
class TargetedLabelFlip(Attack):
    """Train with the source class relabelled as the target class."""

    name = "targeted_label_flip"
    summary = "train with the source class relabelled as the target class"
    source = "DSPO §3.2 and §4.1 (Fashion-MNIST A_4^6: coat -> shirt)"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        class_param("source", 4, "class whose training labels are changed"),
        class_param("target", 6, "label given to the source class"),
    )

    def __init__(self, setting: AttackSetting, values: dict[str, object]) -> None:
        super().__init__(setting, dict(values))
        self.source_class = int(self.values["source"])
        self.target_class = int(self.values["target"])
        check_classes(self.name, setting, source=self.source_class, target=self.target_class)
        holding = self.values.get("holding_class")
        if holding is not None and holding != self.source_class:
            raise AttackParameterError(
                f"attack {self.name!r}: holding_class={holding} draws the attackers among the "
                f"boards holding class {holding}, but they relabel class {self.source_class} "
                f"(source={self.source_class}); give source={holding} as well"
            )

    def poison_data(
        self, client_id: int, data: BoardData, rng: np.random.Generator
    ) -> BoardData | None:
        """The board's data with ``source`` training labels replaced by ``target``."""
        return replace(data, y_train=flip_class(data.y_train, self.source_class, self.target_class))

    def probe(self) -> Probe | None:
        """Source-class test images; ASR = share classified as the target."""
        return source_class_probe(self.setting, self.source_class, self.target_class)


@register_attack
class TargetedPoison(TargetedLabelFlip):
    """Targeted label flip plus explicit boosting of the malicious update."""

    name = "targeted_poison"
    summary = "targeted model poisoning: source class mislabelled as target, update boosted"
    source = "Bhagoji et al. 2019 (explicit boosting), as used in SIREN §3 and §5.5"
    PARAMS = (
        *TargetedLabelFlip.PARAMS,
        Param(
            "boost",
            float,
            None,
            "explicit boosting factor (default K/c: the inverse of the malicious boards' "
            "share of the fleet, Bhagoji's 1/alpha_m)",
            minimum=0.0,
            exclusive_minimum=True,
        ),
    )

    def __init__(self, setting: AttackSetting, values: dict[str, object]) -> None:
        super().__init__(setting, values)
        boost = self.values["boost"]
        if boost is None:
            boost = setting.num_clients / max(1, len(setting.malicious_ids))
            self.values["boost"] = boost
        self.boost = float(boost)  # type: ignore[arg-type]

    def tamper(
        self,
        round_index: int,
        global_weights: np.ndarray,
        updates: list[BoardUpdate],
        malicious: Sequence[int],
        rng: np.random.Generator,
    ) -> list[BoardUpdate]:
        """Boost the malicious updates (already trained on the relabelled data)."""
        boost = np.float32(self.boost)
        return map_malicious(updates, malicious, lambda _, u: u.with_delta(u.delta * boost))
