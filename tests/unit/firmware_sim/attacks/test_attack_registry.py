"""Attack registry, typed parameters, malicious-board selection and camouflage schedule."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_sim.attacks import (
    REGISTRY,
    AttackParameterError,
    AttackSetupError,
    Schedule,
    UnknownAttackError,
    describe_attacks,
    malicious_count,
    resolve_params,
    select_malicious_ids,
)
from firmware_sim.attacks.params import Param
from firmware_sim.engine import SimConfig

from .builders import adversary, tiny_dataset

EXPECTED_ATTACKS = {
    "sign_flip",
    "label_flip",
    "random_label_flip",
    "targeted_label_flip",
    "targeted_poison",
    "gaussian_noise",
    "backdoor",
    "fang_krum",
    "fang_trim",
    "weight_attack",
    "false_alarm",
    "alie",
    "ipm",
    "huge_values",
}


def test_registry_holds_every_attack_with_a_source():
    assert set(REGISTRY) == EXPECTED_ATTACKS
    for cls in REGISTRY.values():
        assert cls.summary and cls.source


def test_describe_lists_each_attack_its_parameters_and_the_common_ones():
    text = describe_attacks()
    for name in EXPECTED_ATTACKS:
        assert f"\n{name}: " in f"\n{text}"
    assert "boost=-4.0" in text
    assert "knowledge='full' (full|partial)" in text
    assert "start_round=1" in text and "every=1" in text and "false_alarm=False" in text


def test_unknown_attack_is_a_value_error_listing_the_valid_names():
    with pytest.raises(UnknownAttackError) as err:
        adversary("sign_flop", (0,))
    assert isinstance(err.value, ValueError)
    assert "sign_flop" in str(err.value) and "sign_flip" in str(err.value)
    assert "fang_trim" in str(err.value)


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(AttackParameterError) as err:
        adversary("sign_flip", (0,), boots=-2)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "boots" in msg and "boost" in msg and "start_round" in msg and "false_alarm" in msg


def test_parameters_are_converted_and_range_checked():
    spec = (
        Param("x", float, 1.0, "", minimum=0.0, exclusive_minimum=True),
        Param("n", int, 2, "", minimum=1),
        Param("flag", bool, False, ""),
        Param("mode", str, "a", "", choices=("a", "b")),
    )
    got = resolve_params("t", spec, {"x": 3, "n": 4.0, "flag": "true", "mode": "b"})
    assert got["x"] == 3.0 and isinstance(got["x"], float)
    assert got["n"] == 4 and isinstance(got["n"], int)
    assert got["flag"] is True and got["mode"] == "b"
    assert got["start_round"] == 1 and got["every"] == 1 and got["false_alarm"] is False
    assert resolve_params("t", spec, {"start-round": 3})["start_round"] == 3
    for bad in (
        {"x": 0.0},
        {"x": "big"},
        {"n": 1.5},
        {"n": 0},
        {"flag": "maybe"},
        {"mode": "c"},
        {"every": 0},
        {"x": float("inf")},
    ):
        with pytest.raises(AttackParameterError):
            resolve_params("t", spec, bad)


def test_sign_flip_rejects_a_positive_boost():
    with pytest.raises(AttackParameterError, match="boost"):
        adversary("sign_flip", (0,), boost=4)


def test_class_parameters_must_name_distinct_classes_of_the_dataset():
    ds = tiny_dataset(num_classes=4)
    with pytest.raises(AttackParameterError, match=r"0\.\.3"):
        adversary("targeted_label_flip", (0,), dataset=ds, source=4, target=1)
    with pytest.raises(AttackParameterError, match="different"):
        adversary("targeted_label_flip", (0,), dataset=ds, source=2, target=2)
    with pytest.raises(AttackParameterError, match="target"):
        adversary("backdoor", (0,), dataset=ds, target=9)


def test_malicious_count_rounds_halves_up():
    assert malicious_count(0.4, 10) == 4
    assert malicious_count(0.25, 10) == 3  # 2.5 -> 3 (not banker's 2)
    assert malicious_count(0.3, 5) == 2  # 1.5 -> 2
    assert malicious_count(0.04, 10) == 0


def test_fraction_selection_is_the_seeded_permutation_prefix():
    ids, how = select_malicious_ids(10, 0.4, None, seed=7)
    expected = sorted(int(i) for i in np.random.default_rng(7).permutation(10)[:4])
    assert list(ids) == expected
    assert "default_rng(7)" in how
    assert select_malicious_ids(10, 0.4, None, seed=7)[0] == ids


def test_explicit_ids_win_and_are_validated():
    ids, how = select_malicious_ids(10, 0.9, [7, 1], seed=0)
    assert ids == (1, 7) and "explicit" in how
    with pytest.raises(AttackSetupError, match=r"outside 0\.\.9"):
        select_malicious_ids(10, 0.0, [10], seed=0)
    with pytest.raises(AttackSetupError, match="duplicates"):
        select_malicious_ids(10, 0.0, [3, 3], seed=0)
    with pytest.raises(AttackSetupError, match="at least one malicious"):
        select_malicious_ids(10, 0.01, None, seed=0)


def test_make_adversary_uses_the_config_fraction_and_records_it():
    cfg = SimConfig(clients=10, attack="label_flip", malicious=0.3, seed=5)
    from firmware_sim.attacks import make_adversary

    adv = make_adversary(cfg, tiny_dataset())
    expected = sorted(int(i) for i in np.random.default_rng(5).permutation(10)[:3])
    assert sorted(adv.malicious_ids) == expected
    info = adv.describe()
    assert info["attack"] == "label_flip" and info["malicious_ids"] == expected
    assert info["attack_schedule"] == {"start_round": 1, "every": 1, "once": False}
    assert "default_rng(5)" in info["malicious_selection"]


def test_schedule_start_every_and_once():
    s = Schedule(start_round=3, every=2)
    assert [t for t in range(1, 10) if s.active(t)] == [3, 5, 7, 9]
    once = Schedule(start_round=4, every=1, once=True)
    assert [t for t in range(1, 10) if once.active(t)] == [4]
    assert [t for t in range(1, 5) if Schedule().active(t)] == [1, 2, 3, 4]
