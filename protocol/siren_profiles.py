"""Named SIREN configurations, shared by the boards (alarm) and the coordinator (server decision).

The SIREN paper's text (Alg. 1, Alg. 2, Table 2) and the authors' public code differ in three
places. A *profile* names one consistent choice for all three, so that a board's alarm and the
coordinator's decision process come from the same reading:

* client alarm (C_c): ``paper-text`` raises no alarm iff ``ω_global − ω_local ≥ C_c``;
  ``authors`` alarms iff ``ω_local > ω_global + C_c·ω_local``;
* server threshold C_s: ``paper-text`` absolute, ``max − ω < C_s``; ``authors`` relative,
  ``max − ω < C_s·max``;
* penalty threshold C_p: ``paper-text`` ``0.45·K`` (K boards); ``authors`` ``int(0.45·T)``
  (T rounds).

**The relative server threshold.** The paper states every server test as a difference to the
best accuracy of a group, ``max{ω} − ω^(i) < C_s`` (cases 3 and 4, Fig. 3 and Alg. 2 lines 9 and
11). The authors' client rule makes C_c relative by scaling it with the accuracy it is compared
against, the one expected to be higher (``ω_local − ω_global > C_c·ω_local``). The relative
server threshold is read the same way: C_s is scaled by the accuracy every test compares against,
the group's maximum. So ``max − ω^(i) < C_s·max`` (membership of a group), ``max_a − max_s ≤
C_s·max_a`` (false alarms in case 3) and, for the probe of a banned board, ``ω_ref − ω^(i) <
C_s·ω_ref``. With accuracies near 0.9 this is a threshold of about 9 points instead of 10; at low
accuracies (early rounds, attacked models) it is proportionally tighter. Dividing by the other
side (``ω^(i)``) would loosen the test exactly for the poor models it must reject; we take the
reading that mirrors the client rule.

**The penalty threshold.** ``int(c_p_fraction · T)`` with ``c_p_fraction = 0.45`` and T the
number of rounds of the run; a board is banned, as in the paper, when its count *exceeds* C_p.

Both profiles keep every other Table 2 setting (C_c = 4%, C_s = 10%, C_a = 0.5, root set of 100).
Which one is the default, and why, is recorded in ``docs/reproducing.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALARM_RULES",
    "DEFAULT_PROFILE",
    "PENALTY_BASES",
    "PROFILES",
    "SERVER_THRESHOLDS",
    "SirenProfile",
    "get_profile",
    "profile_names",
]

#: Client alarm rules: ``paper`` (Alg. 1 line 18) and ``relative`` (the authors' code).
ALARM_RULES = ("paper", "relative")
#: How the server threshold C_s is applied: a difference of accuracies, or a fraction of the best.
SERVER_THRESHOLDS = ("absolute", "relative")
#: What C_p is a fraction of: the number of boards K, or the number of rounds T (rounded down).
PENALTY_BASES = ("clients", "rounds")


@dataclass(frozen=True)
class SirenProfile:
    """One consistent reading of SIREN's client alarm and server thresholds.

    Attributes
    ----------
    name : str
        The profile's name (``authors``, ``paper-text``).
    alarm_rule : {"paper", "relative"}
        The boards' alarm rule (:mod:`edge_client.alarm`).
    server_threshold : {"absolute", "relative"}
        How the coordinator applies C_s (:mod:`coordinator.siren`).
    penalty_basis : {"clients", "rounds"}
        ``C_p = c_p_fraction · K`` or ``int(c_p_fraction · T)``.
    summary : str
        One line for ``--help`` and logs.
    """

    name: str
    alarm_rule: str
    server_threshold: str
    penalty_basis: str
    summary: str

    def __post_init__(self) -> None:
        for field_name, value, allowed in (
            ("alarm_rule", self.alarm_rule, ALARM_RULES),
            ("server_threshold", self.server_threshold, SERVER_THRESHOLDS),
            ("penalty_basis", self.penalty_basis, PENALTY_BASES),
        ):
            if value not in allowed:
                raise ValueError(f"profile {field_name} must be one of {allowed}, got {value!r}")


PROFILES: dict[str, SirenProfile] = {
    "authors": SirenProfile(
        "authors",
        alarm_rule="relative",
        server_threshold="relative",
        penalty_basis="rounds",
        summary="the authors' public code: relative alarm rule, relative C_s, ban after "
        "int(0.45·T) penalties",
    ),
    "paper-text": SirenProfile(
        "paper-text",
        alarm_rule="paper",
        server_threshold="absolute",
        penalty_basis="clients",
        summary="Alg. 1 / Table 2 as printed: alarm unless acc(global) - acc(local) >= C_c, "
        "absolute C_s, ban above 0.45·K penalties",
    ),
}

#: The profile used when none is named: the one that reproduces the paper's published numbers
#: (measurements in docs/reproducing.md).
DEFAULT_PROFILE = "authors"


def profile_names() -> list[str]:
    """The valid profile names, default first."""
    return [DEFAULT_PROFILE, *sorted(n for n in PROFILES if n != DEFAULT_PROFILE)]


def get_profile(name: str | None = None) -> SirenProfile:
    """The profile called ``name`` (``None``: :data:`DEFAULT_PROFILE`).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    key = DEFAULT_PROFILE if name is None else name
    try:
        return PROFILES[key]
    except KeyError:
        raise ValueError(
            f"unknown SIREN profile {name!r}; valid: {', '.join(profile_names())}"
        ) from None
