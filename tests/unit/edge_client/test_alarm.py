"""SIREN alarm rules (Algorithm 1 lines 15-25, and the authors' relative rule)."""

from __future__ import annotations

import pytest

from edge_client.alarm import AlarmConfig, decide_alarm

PAPER = AlarmConfig(threshold=0.04, rule="paper")
RELATIVE = AlarmConfig(threshold=0.04, rule="relative")


def test_first_round_never_alarms():
    assert decide_alarm(0.1, None, PAPER) is False
    assert decide_alarm(0.1, None, RELATIVE) is False


@pytest.mark.parametrize(
    "global_acc,local_acc,expected",
    [
        (0.90, 0.85, False),  # global better by 5 points >= 4: trust it
        (0.90, 0.86, False),  # exactly C_c (0.04): "≥ C_c" means no alarm
        (0.90, 0.87, True),  # only 3 points better: alarm
        (0.50, 0.88, True),  # poisoned global
    ],
)
def test_paper_rule(global_acc, local_acc, expected):
    assert decide_alarm(global_acc, local_acc, PAPER) is expected


@pytest.mark.parametrize(
    "global_acc,local_acc,expected",
    [
        (0.90, 0.92, False),  # 0.92 > 0.90 + 0.04*0.92 = 0.9368? no
        (0.88, 0.92, True),  # 0.92 > 0.88 + 0.0368 = 0.9168: alarm
        (0.50, 0.88, True),
    ],
)
def test_relative_rule(global_acc, local_acc, expected):
    assert decide_alarm(global_acc, local_acc, RELATIVE) is expected


def test_config_rejects_unknown_rule():
    with pytest.raises(ValueError, match="alarm rule"):
        AlarmConfig(rule="sometimes")


def test_paper_rule_treats_a_gap_of_exactly_c_c_as_enough():
    # 0.29 - 0.25 is 0.03999999999999998 in floating point; in counts it is exactly 4 points.
    assert decide_alarm(0.29, 0.25, PAPER) is False
    assert decide_alarm(0.29, 0.2501, PAPER) is True


def test_relative_rule_equality_does_not_alarm():
    # 0.5 - 0.48 = 0.04 * 0.5 exactly (0.020000000000000018 in floating point): not "greater".
    assert decide_alarm(0.48, 0.5, RELATIVE) is False
    assert decide_alarm(0.4799, 0.5, RELATIVE) is True


def test_profiles_choose_the_rule_and_an_explicit_rule_wins():
    assert AlarmConfig().rule == "relative"  # the default profile is the authors' code
    assert AlarmConfig.for_profile("authors").rule == "relative"
    assert AlarmConfig.for_profile("paper-text").rule == "paper"
    assert AlarmConfig.for_profile("paper-text", 0.05, rule="relative") == AlarmConfig(
        0.05, "relative"
    )
    # The two rules disagree on a good global model that is not 4 points better.
    assert decide_alarm(0.90, 0.88, AlarmConfig.for_profile("paper-text")) is True
    assert decide_alarm(0.90, 0.88, AlarmConfig.for_profile("authors")) is False
    with pytest.raises(ValueError, match="unknown SIREN profile"):
        AlarmConfig.for_profile("printed")
