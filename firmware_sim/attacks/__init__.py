"""The attack suite: simulated malicious boards.

>>> from firmware_sim.attacks import REGISTRY, make_adversary, describe_attacks
>>> sorted(REGISTRY)[:3]
['alie', 'backdoor', 'false_alarm']

A malicious board runs the same board code as an honest one; the attack then tampers with its
training data, its update, its declared sample count or its alarm bit (see
:mod:`firmware_sim.attacks.base`). ``make_adversary(config, dataset)`` is what the in-process
engine calls when ``config.attack`` is set.

Attacks (``siren sim attacks`` lists their parameters): ``sign_flip``, ``label_flip``,
``targeted_label_flip``, ``targeted_poison``, ``gaussian_noise``, ``backdoor``, ``fang_krum``,
``fang_trim``, ``weight_attack``, ``false_alarm``, ``alie``, ``ipm``, ``huge_values``.
"""

from firmware_sim.attacks import (
    backdoor,
    fang,
    flipping,
    magnitude,
    noise,
    signalling,
    statistical,
)
from firmware_sim.attacks.adversary import (
    AttackAdversary,
    Schedule,
    make_adversary,
    malicious_count,
    probe_metrics,
    select_malicious_ids,
)
from firmware_sim.attacks.base import (
    REGISTRY,
    Attack,
    AttackSetting,
    Probe,
    attack_names,
    describe_attacks,
    get_attack,
    register_attack,
)
from firmware_sim.attacks.errors import (
    AttackError,
    AttackParameterError,
    AttackSetupError,
    UnknownAttackError,
)
from firmware_sim.attacks.params import COMMON_PARAMS, Param, resolve_params

__all__ = [
    "COMMON_PARAMS",
    "REGISTRY",
    "Attack",
    "AttackAdversary",
    "AttackError",
    "AttackParameterError",
    "AttackSetting",
    "AttackSetupError",
    "Param",
    "Probe",
    "Schedule",
    "UnknownAttackError",
    "attack_names",
    "backdoor",
    "describe_attacks",
    "fang",
    "flipping",
    "get_attack",
    "magnitude",
    "make_adversary",
    "malicious_count",
    "noise",
    "probe_metrics",
    "register_attack",
    "resolve_params",
    "select_malicious_ids",
    "signalling",
    "statistical",
]
