"""SIREN's server settings: the thresholds of Table 2, the profile they come from, the choices
the paper leaves open, and how ``--agg-param KEY=VALUE`` values become them.

:class:`SirenParams` holds them (validated on construction); :meth:`SirenParams.from_kwargs`
builds them from parameters as given on the command line or in ``coord.toml`` (unknown names
are an error listing the valid ones); :func:`describe_parameters` lists them with their
defaults. The decision process that uses them is :mod:`coordinator.siren`, whose module
docstring explains each choice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from coordinator.errors import UnknownAggregatorError
from protocol.siren_profiles import DEFAULT_PROFILE, PENALTY_BASES, SERVER_THRESHOLDS, get_profile

ALPHA_MODES = ("benign", "all", "uniform")
ROLLBACK_MODES = ("rebase", "literal")
CASE4_SILENT_MODES = ("malicious", "ignored")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class SirenParams:
    """SIREN server settings (Table 2 defaults), settable with ``--agg-param KEY=VALUE``.

    Attributes
    ----------
    c_s : float
        Server identification threshold C_s (0.10: 10 points of accuracy, or 10% of the
        reference accuracy with ``server_threshold="relative"``).
    c_p : float or None
        Penalty threshold C_p; None means ``c_p_fraction · K`` or ``int(c_p_fraction · T)``
        (``penalty_basis``).
    c_p_fraction : float
        C_p as a fraction of the number of clients K or of rounds T (0.45).
    c_a : float
        Award C_a subtracted from a banned client's count when it is judged benign (0.5).
    weight_analysis : bool
        Apply the angle test of §4.5 (``False`` = accuracy checks only, the paper's ablation).
    penalty : bool
        Ban clients whose count exceeds C_p (counts are kept either way).
    award : bool
        Probe banned clients and let them rejoin (choice 1 of :mod:`coordinator.siren`'s docstring).
    probe_probability : float
        Chance that a banned client is checked in a round.
    alpha : {"benign", "all", "uniform"}
        Aggregation weights (choice 3).
    rollback : {"rebase", "literal"}
        Arithmetic of the rollback to ``g_{t−1}`` (choice 2).
    case4_silent : {"malicious", "ignored"}
        What case 4 does with silent clients (choice 5).
    false_alarm_check : bool
        Test alarming clients in the false-alarm branch instead of rejecting them all (choice 6).
    seed : int
        Seed of the probe draws.
    profile : str
        SIREN profile (:mod:`protocol.siren_profiles`) giving the defaults of the next two.
    server_threshold : {"absolute", "relative"} or None
        ``max − ω < C_s`` or ``max − ω < C_s · max``; None: the profile's.
    penalty_basis : {"clients", "rounds"} or None
        ``C_p = c_p_fraction · K`` or ``int(c_p_fraction · T)``; None: the profile's.
    """

    c_s: float = 0.10
    c_p: float | None = None
    c_p_fraction: float = 0.45
    c_a: float = 0.5
    weight_analysis: bool = True
    penalty: bool = True
    award: bool = True
    probe_probability: float = 0.5
    alpha: str = "benign"
    rollback: str = "rebase"
    case4_silent: str = "malicious"
    false_alarm_check: bool = False
    seed: int = 0
    profile: str = DEFAULT_PROFILE
    server_threshold: str | None = None
    penalty_basis: str | None = None

    def __post_init__(self) -> None:
        try:
            chosen = get_profile(self.profile)
        except ValueError as exc:
            raise ValueError(f"siren: {exc}") from None
        # Unset overrides take the profile's value, so the recorded parameters are explicit.
        if self.server_threshold is None:
            object.__setattr__(self, "server_threshold", chosen.server_threshold)
        if self.penalty_basis is None:
            object.__setattr__(self, "penalty_basis", chosen.penalty_basis)
        if not 0.0 <= self.c_s <= 1.0:
            raise ValueError(f"siren: c_s must be in [0, 1], got {self.c_s}")
        if self.c_p is not None and not self.c_p > 0:
            raise ValueError(f"siren: c_p must be > 0, got {self.c_p}")
        if not self.c_p_fraction > 0:
            raise ValueError(f"siren: c_p_fraction must be > 0, got {self.c_p_fraction}")
        if not self.c_a >= 0:
            raise ValueError(f"siren: c_a must be >= 0, got {self.c_a}")
        if not 0.0 <= self.probe_probability <= 1.0:
            raise ValueError(
                f"siren: probe_probability must be in [0, 1], got {self.probe_probability}"
            )
        for name, value, allowed in (
            ("alpha", self.alpha, ALPHA_MODES),
            ("rollback", self.rollback, ROLLBACK_MODES),
            ("case4_silent", self.case4_silent, CASE4_SILENT_MODES),
            ("server_threshold", self.server_threshold, SERVER_THRESHOLDS),
            ("penalty_basis", self.penalty_basis, PENALTY_BASES),
        ):
            if value not in allowed:
                raise ValueError(f"siren: {name} must be one of {allowed}, got {value!r}")

    @classmethod
    def from_kwargs(cls, params: dict[str, Any]) -> SirenParams:
        """Build from ``--agg-param`` values, checking names and types.

        Raises
        ------
        UnknownAggregatorError
            An unknown parameter name (the message lists the valid ones).
        ValueError
            A value of the wrong type or out of range.
        """
        valid = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise UnknownAggregatorError(
                f"unknown siren parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        defaults = cls()
        converted: dict[str, Any] = {}
        for name, raw in params.items():
            kind = type(getattr(defaults, name))
            if name == "c_p":
                kind = float
            optional = name in ("c_p", "server_threshold", "penalty_basis")
            converted[name] = _coerce(name, raw, kind, allow_none=optional)
        return cls(**converted)

    def threshold(self, reference: float) -> float:
        """The C_s margin of a test against ``reference`` (the accuracy compared with).

        ``c_s`` itself (absolute) or ``c_s · reference`` (relative); see
        :mod:`protocol.siren_profiles` for the derivation.
        """
        return self.c_s * reference if self.server_threshold == "relative" else self.c_s


def describe_parameters() -> str:
    """``name=default, ...`` for every :class:`SirenParams` field (``siren sim aggregators``)."""
    defaults = SirenParams()
    return ", ".join(f"{f.name}={getattr(defaults, f.name)!r}" for f in fields(SirenParams))


def _coerce(name: str, raw: Any, kind: type, allow_none: bool = False) -> Any:
    """Convert one parameter value to ``kind`` or raise a ValueError naming it."""
    if raw is None and allow_none:
        return None
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif kind is str and isinstance(raw, str):
        return raw
    raise ValueError(f"siren parameter {name} expects {kind.__name__}, got {raw!r}")
