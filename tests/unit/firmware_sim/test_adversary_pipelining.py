"""Whether a fleet may publish each board's update before the whole round is done."""

from __future__ import annotations

from firmware_sim.adversary import Adversary
from tests.unit.firmware_sim.attacks.builders import adversary


def test_honest_fleet_does_not_tamper_with_rounds() -> None:
    assert Adversary().tampers_rounds is False
    assert Adversary([1, 2]).tampers_rounds is False


def test_attacks_that_rewrite_updates_see_the_whole_round() -> None:
    assert adversary("sign_flip", (0, 1)).tampers_rounds is True
    assert adversary("fang_krum", (0, 1)).tampers_rounds is True
