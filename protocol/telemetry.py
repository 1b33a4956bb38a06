"""Board telemetry carried by status messages: the fixed table of figures a board may report.

A status message (``docs/protocol.md`` section 4.2) may carry a small payload: one float32
scalar per figure, each named by the layout. Only the names below are allowed; a board
reports the figures its hardware and software expose and simply leaves the others out, so an
absent sensor is an absent name, never a placeholder value. An empty layout (no figures) stays
valid: older boards and every Last Will send one.

Fixed names
    =================== ========= ==========================================================
    name                unit      meaning
    =================== ========= ==========================================================
    ``rss_peak_mib``    MiB       peak resident set size of the process running the board
                                  (Linux ``VmHWM``), since the process started
    ``process_boards``  boards    boards sharing that process (a simulated fleet's worker);
                                  absent means one. ``rss_peak_mib`` is then the shared
                                  process's, not the board's
    ``alarm_s``         s         wall time of the SIREN alarm in the round
    ``alarm_cpu_s``     s         CPU time (user + system, all threads) of the process during
                                  the alarm
    ``train_s``         s         wall time of local training in the round
    ``train_cpu_s``     s         CPU time of the process during local training
    ``soc_temp_c``      °C        highest temperature of the SoC's own thermal zones sampled
                                  during the round
    ``throttled_flags`` bit field Raspberry Pi firmware's ``get_throttled`` word after the round
    ``power_mw``        mW        mean board input power during the round (the ``VDD_IN`` or
                                  ``POM_5V_IN`` rail)
    =================== ========= ==========================================================

Families (the suffix is a sensor's own name, 1-48 characters from ``[A-Za-z0-9_-]``)
    ``temp_c.<zone>`` (°C) the highest reading of one thermal zone, named by its ``type``;
    ``power_mw.<rail>`` (mW) the mean power of one power-monitor rail.

Values are finite (as in every payload) and within the figure's domain: times, sizes and powers
are ``>= 0``; temperatures are ``>= -273.15``; ``process_boards`` is an integer ``>= 1``;
``throttled_flags`` an integer in ``[0, 2^24)`` (every such integer is exact in float32).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocol.errors import InvalidHeaderError, TelemetryValueError, brief
from protocol.layout import TensorLayout

#: Most figures one status message may carry.
MAX_TELEMETRY_ENTRIES = 64
#: Longest sensor name after a family prefix.
MAX_SENSOR_NAME = 48
#: Exclusive upper bound of ``throttled_flags``.
THROTTLED_LIMIT = 2**24
#: Absolute zero, the lowest temperature a sensor can report.
ABSOLUTE_ZERO_C = -273.15

_SENSOR_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_SENSOR_NAME}}}")


@dataclass(frozen=True)
class Figure:
    """One kind of telemetry figure: its unit, meaning and domain.

    Attributes
    ----------
    unit : str
        Unit of the value (``"MiB"``, ``"s"``, ``"°C"``, ``"mW"``, ...).
    meaning : str
        One line for documentation and metric help texts.
    minimum : float
        Smallest allowed value (inclusive).
    limit : float
        Exclusive upper bound (``inf``: none beyond finiteness).
    integer : bool
        Whether the value must be a whole number.
    """

    unit: str
    meaning: str
    minimum: float = 0.0
    limit: float = math.inf
    integer: bool = False

    def check(self, name: str, value: float) -> None:
        """Raise :class:`TelemetryValueError` unless ``value`` is within this figure's domain."""
        if not math.isfinite(value) or value < self.minimum or value >= self.limit:
            upper = "" if math.isinf(self.limit) else f" and below {self.limit:g}"
            raise TelemetryValueError(
                f"telemetry figure {name!r} is {value!r}; it must be at least "
                f"{self.minimum:g}{upper}"
            )
        if self.integer and not float(value).is_integer():
            raise TelemetryValueError(
                f"telemetry figure {name!r} is {value!r}; it must be a whole number"
            )


_TEMPERATURE = Figure("°C", "highest temperature sampled during the round", ABSOLUTE_ZERO_C)
_POWER = Figure("mW", "mean power during the round")

#: The fixed figure names (module docstring).
FIGURES: dict[str, Figure] = {
    "rss_peak_mib": Figure("MiB", "peak resident set size of the process running the board"),
    "process_boards": Figure("boards", "boards sharing the process", 1.0, integer=True),
    "alarm_s": Figure("s", "wall time of the SIREN alarm"),
    "alarm_cpu_s": Figure("s", "CPU time of the process during the SIREN alarm"),
    "train_s": Figure("s", "wall time of local training"),
    "train_cpu_s": Figure("s", "CPU time of the process during local training"),
    "soc_temp_c": Figure("°C", "hottest SoC thermal zone during the round", ABSOLUTE_ZERO_C),
    "throttled_flags": Figure(
        "bit field", "Raspberry Pi get_throttled word", limit=THROTTLED_LIMIT, integer=True
    ),
    "power_mw": Figure("mW", "mean board input power during the round"),
}

#: Figure families: ``<prefix>.<sensor name>``.
FAMILIES: dict[str, Figure] = {"temp_c": _TEMPERATURE, "power_mw": _POWER}


def figure_of(name: str) -> Figure | None:
    """The :class:`Figure` a telemetry name denotes, or ``None`` if the name is not allowed.

    Examples
    --------
    >>> figure_of("power_mw.VDD_IN").unit
    'mW'
    >>> figure_of("power_mw.") is None
    True
    """
    if name in FIGURES:
        return FIGURES[name]
    prefix, dot, sensor = name.partition(".")
    if dot and prefix in FAMILIES and _SENSOR_RE.fullmatch(sensor):
        return FAMILIES[prefix]
    return None


def sensor_name(raw: str) -> str | None:
    """A sensor's label made fit for a family suffix, or ``None`` when nothing usable is left.

    Characters outside ``[A-Za-z0-9_-]`` become ``_`` and the name is cut to 48 characters,
    so ``"CPU therm"`` becomes ``"CPU_therm"``.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", raw.strip())[:MAX_SENSOR_NAME]
    return cleaned if cleaned.strip("_") else None


def check_status_layout(layout: TensorLayout) -> None:
    """Check the layout of a status message: empty, or telemetry scalars with allowed names.

    Raises
    ------
    InvalidHeaderError
        If the layout has more than :data:`MAX_TELEMETRY_ENTRIES` entries, an entry that is
        not a scalar (shape ``[]``), or a name that is neither a fixed name nor a family
        member.
    """
    if len(layout) > MAX_TELEMETRY_ENTRIES:
        raise InvalidHeaderError(
            f"a status message carries at most {MAX_TELEMETRY_ENTRIES} telemetry figures, "
            f"got {len(layout)}"
        )
    for name, shape in layout:
        if shape != ():
            raise InvalidHeaderError(
                f"telemetry figure {brief(name)} must be a scalar (shape []), got {list(shape)}"
            )
        if figure_of(name) is None:
            raise InvalidHeaderError(
                f"{brief(name)} is not a telemetry figure; allowed: {', '.join(FIGURES)}, "
                f"temp_c.<zone>, power_mw.<rail> (docs/protocol.md 4.2)"
            )


def check_values(layout: TensorLayout, values: np.ndarray) -> None:
    """Check every telemetry value of a status message against its figure's domain.

    Raises
    ------
    TelemetryValueError
        For the first value outside its domain.
    """
    for (name, _), value in zip(layout, values.tolist()):
        figure = figure_of(name)
        if figure is not None:
            figure.check(name, float(value))


def pack(figures: Mapping[str, float]) -> tuple[TensorLayout, np.ndarray]:
    """Layout and float32 vector of a status message carrying ``figures`` (sorted by name).

    Each value is rounded to float32 first, and the domain is checked on the rounded value.

    Raises
    ------
    InvalidHeaderError
        If a name is not allowed or there are too many figures.
    TelemetryValueError
        If a value is outside its domain.
    """
    names = sorted(figures)
    layout = TensorLayout([(name, ()) for name in names])
    check_status_layout(layout)
    vector = np.array([figures[name] for name in names], dtype=np.float32)
    check_values(layout, vector)
    return layout, vector


def unpack(layout: TensorLayout, values: np.ndarray | None) -> dict[str, float]:
    """The figures of a decoded status message as ``{name: value}`` (empty without figures).

    Each float32 value becomes the shortest decimal that reads back as the same float32
    (0.1, not 0.10000000149011612): the same number at the precision it was sent with.
    """
    if values is None or layout.size == 0:
        return {}
    vector = np.asarray(values, dtype=np.float32)
    return {name: float(str(v)) for (name, _), v in zip(layout, vector)}


#: Bits of the Raspberry Pi ``get_throttled`` word (Raspberry Pi documentation, ``vcgencmd``).
THROTTLED_BITS: dict[int, str] = {
    0: "under-voltage detected",
    1: "ARM frequency capped",
    2: "currently throttled",
    3: "soft temperature limit active",
    16: "under-voltage has occurred",
    17: "ARM frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}


def throttled_conditions(flags: int) -> list[str]:
    """The documented conditions set in a ``get_throttled`` word, lowest bit first.

    Examples
    --------
    >>> throttled_conditions(0x50005)
    ['under-voltage detected', 'currently throttled', 'under-voltage has occurred', \
'throttling has occurred']
    """
    return [text for bit, text in THROTTLED_BITS.items() if flags >> bit & 1]
