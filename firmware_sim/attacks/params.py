"""Typed attack parameters: declaration, coercion of command-line values, validation.

Attack parameters arrive from ``--attack-param KEY=VALUE`` already parsed as Python literals
(``boost=-4`` is the int ``-4``, ``mode=full`` the string ``"full"``). Each attack declares its
parameters as :class:`Param` objects; :func:`resolve_params` checks names, converts types,
checks ranges and choices, and fills in defaults. Every attack also accepts the scheduling,
selection and training parameters of :data:`COMMON_PARAMS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from firmware_sim.attacks.errors import AttackParameterError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Param:
    """One typed attack parameter.

    Attributes
    ----------
    name : str
        Key of ``--attack-param KEY=VALUE``.
    kind : type
        ``int``, ``float``, ``bool`` or ``str``.
    default : Any
        Value used when the parameter is not given (``None`` means "derived", see ``help``).
    help : str
        One-line description (shown by ``siren sim attacks``).
    choices : tuple[str, ...], optional
        Allowed values of a ``str`` parameter.
    minimum, maximum : float, optional
        Inclusive bounds of a numeric parameter.
    exclusive_minimum : bool
        Whether ``minimum`` itself is excluded.
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def coerce(self, attack: str, value: Any) -> Any:
        """Convert ``value`` to this parameter's type and check its range; raise otherwise."""
        where = f"attack {attack!r} parameter {self.name!r}"
        if value is None:
            if self.default is None:
                return None
            raise AttackParameterError(f"{where} must be a {self.kind.__name__}, got None")
        out: Any
        if self.kind is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                out = value.strip().lower() in _TRUE
            elif isinstance(value, int) and value in (0, 1):
                out = bool(value)
            else:
                raise AttackParameterError(f"{where} must be True or False, got {value!r}")
            return out
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise AttackParameterError(f"{where} must be an integer, got {value!r}")
            out = int(value)
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AttackParameterError(f"{where} must be a number, got {value!r}")
            out = float(value)
            if not math.isfinite(out):
                raise AttackParameterError(f"{where} must be finite, got {value!r}")
        else:
            out = str(value)
            if self.choices is not None and out not in self.choices:
                raise AttackParameterError(
                    f"{where} must be one of {', '.join(self.choices)}; got {out!r}"
                )
            return out
        if self.minimum is not None:
            low_ok = out > self.minimum if self.exclusive_minimum else out >= self.minimum
            if not low_ok:
                rel = ">" if self.exclusive_minimum else ">="
                raise AttackParameterError(f"{where} must be {rel} {self.minimum:g}, got {out}")
        if self.maximum is not None and out > self.maximum:
            raise AttackParameterError(f"{where} must be <= {self.maximum:g}, got {out}")
        return out

    def signature(self) -> str:
        """``name=default`` as listed by ``siren sim attacks``."""
        if self.choices:
            return f"{self.name}={self.default!r} ({'|'.join(self.choices)})"
        return f"{self.name}={self.default!r}"


#: Parameters every attack accepts: camouflage scheduling, the SIREN false alarm, longer local
#: training of the malicious boards and their choice among the holders of one class.
COMMON_PARAMS: tuple[Param, ...] = (
    Param(
        "start_round",
        int,
        1,
        "first round in which the malicious boards attack (honest before)",
        minimum=1,
    ),
    Param(
        "every",
        int,
        1,
        "attack every k-th round from start_round on, honest in the rounds between",
        minimum=1,
    ),
    Param(
        "false_alarm",
        bool,
        False,
        "also raise the SIREN alarm bit in attacking rounds",
    ),
    Param(
        "extra_epochs",
        int,
        0,
        "local epochs the malicious boards train beyond the honest boards' in attacking "
        "rounds (residual-based reweighting §4.2 gives its label flippers 5 more)",
        minimum=0,
    ),
    Param(
        "holding_class",
        int,
        None,
        "choose the malicious boards among those whose training data holds this class "
        "(residual-based reweighting §4.2: the attackers hold the digit they flip)",
        minimum=0,
    ),
)


def resolve_params(
    attack: str, declared: Sequence[Param], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate ``given`` against ``declared`` (plus :data:`COMMON_PARAMS`); return all values.

    Parameters
    ----------
    attack : str
        Attack name (for messages).
    declared : sequence of Param
        The attack's own parameters.
    given : mapping
        Values from the configuration; dashes in keys are read as underscores.

    Returns
    -------
    dict
        Every declared and common parameter, given values converted, defaults filled in.

    Raises
    ------
    AttackParameterError
        Unknown key (the message lists the valid ones) or a value of the wrong type or range.
    """
    spec = {p.name: p for p in (*declared, *COMMON_PARAMS)}
    normalized = {str(k).strip().replace("-", "_"): v for k, v in given.items()}
    unknown = sorted(set(normalized) - set(spec))
    if unknown:
        raise AttackParameterError(
            f"attack {attack!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(spec)}"
        )
    return {
        name: p.coerce(attack, normalized[name]) if name in normalized else p.default
        for name, p in spec.items()
    }
