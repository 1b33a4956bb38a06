"""What the board's hardware exposes: temperatures, throttling, power rails, memory.

Every reader takes the root of the tree it reads (default: the real one), so tests point it at a
fixture tree laid out like the real sysfs, and returns ``None`` when the sensor is absent --
no file, an unreadable file, or content that does not parse. Nothing is ever estimated: a board
without a power monitor reports no power.

Sources
-------
* **Thermal zones** (every Linux board): ``/sys/class/thermal/thermal_zone<N>/type`` (the
  zone's name, e.g. ``cpu-thermal`` on a Raspberry Pi, ``CPU-therm``/``GPU-therm`` or
  ``cpu-thermal``/``gpu-thermal``/``tj-thermal`` on Jetson boards) and ``temp`` (millidegrees
  Celsius, an integer). A reading below -100 °C means the sensor is off (JetPack reports
  -256 °C for the zone of a powered-down engine) and is left out. The SoC temperature is the
  hottest of the SoC's own zones (:func:`soc_zones`); board-level zones such as Jetson's
  ``PMIC-Die`` (a constant 100 °C) or ``thermal-fan-est`` (an estimate computed from other
  zones) are reported per zone only.
* **Throttling** (Raspberry Pi): ``vcgencmd get_throttled`` prints ``throttled=0x50005``; the
  bits are decoded by :func:`protocol.telemetry.throttled_conditions`.
* **Power** (Jetson INA3221 power monitors), in the two layouts JetPack uses:

  - hwmon (JetPack 5 and 6): ``/sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon<M>/``
    ``in<N>_label`` (rail name, e.g. ``VDD_IN``), ``in<N>_input`` (bus voltage, mV) and
    ``curr<N>_input`` (current, mA), channels 1-3; power = voltage x current;
  - iio (JetPack 4): ``/sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:device<M>/``
    ``rail_name_<N>`` and ``in_power<N>_input`` (mW), channels 0-2;
  - ``tegrastats`` output (``VDD_IN 5012mW/5012mW`` or ``POM_5V_IN 2190/2190``) when neither
    tree is readable.

  Channels labelled ``NC`` (not connected) are skipped. The board's input power is the
  ``VDD_IN`` (or ``POM_5V_IN``) rail when the board has one; rails are never summed (``VDD_IN``
  already contains the others).
* **Memory**: the peak resident set size of this process, ``VmHWM`` in ``/proc/self/status``.

:class:`Sensors` bundles the sources; :class:`RoundSampler` samples temperatures and power in a
background thread while a round runs; :func:`round_figures` turns a round into the figures of a
status message (``docs/protocol.md`` section 4.2).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.telemetry import (
    ABSOLUTE_ZERO_C,
    MAX_TELEMETRY_ENTRIES,
    THROTTLED_LIMIT,
    sensor_name,
)

logger = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")
INA3221_HWMON_ROOT = Path("/sys/bus/i2c/drivers/ina3221")
INA3221_IIO_ROOT = Path("/sys/bus/i2c/drivers/ina3221x")
PROC_STATUS = Path("/proc/self/status")
VCGENCMD = ("vcgencmd", "get_throttled")
TEGRASTATS = ("tegrastats", "--interval", "500")

#: Rails that carry the whole board's input power, in order of preference.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
#: Label of an unconnected INA3221 channel.
NOT_CONNECTED = "NC"

#: Lowest reading taken as a temperature; below it the sensor is off.
SENSOR_OFF_BELOW_C = -100.0
#: Zone names (case-insensitive prefixes) that measure the SoC itself.
SOC_ZONE_PREFIXES = ("cpu", "bcpu", "mcpu", "gpu", "soc", "tj", "cv", "x86_pkg_temp")

_ZONE_DIR = re.compile(r"thermal_zone(\d+)")
# Channels 1-3 are the rails; in7 (its label included) is the sum of the shunt voltages.
_HWMON_LABEL = re.compile(r"in([123])_label")
_IIO_RAIL = re.compile(r"rail_name_(\d+)")
_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+|\d+)")
_VMHWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB\s*$", re.MULTILINE)
# "VDD_IN 5012mW/5012mW" (JetPack 5/6) or "POM_5V_IN 2190/2190" (JetPack 4): current/average.
_TEGRASTATS_RAIL = re.compile(r"\b([A-Z][A-Z0-9]*_[A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="strict").strip()
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None or re.fullmatch(r"-?\d+", text) is None:
        return None
    return int(text)


# -- thermal zones ---------------------------------------------------------------------------


def read_thermal_zones(root: Path = THERMAL_ROOT) -> dict[str, float] | None:
    """Temperature of every readable thermal zone, in °C, by zone name.

    Parameters
    ----------
    root : Path
        The ``/sys/class/thermal`` folder (or a fixture laid out like it).

    Returns
    -------
    dict of str to float, or None
        ``{zone type: °C}``, in zone order. A zone whose ``type`` or ``temp`` is missing,
        unreadable (a sensor that is off answers with an error) or not an integer, or reads
        below :data:`SENSOR_OFF_BELOW_C`, is left out. Zone names are cleaned with
        :func:`protocol.telemetry.sensor_name`; a name several zones share gets the zone
        number appended (``acpitz_0``, ``acpitz_1``). ``None`` when no zone could be read.
    """
    zones: list[tuple[int, str, float]] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return None
    for entry in entries:
        match = _ZONE_DIR.fullmatch(entry.name)
        if match is None:
            continue
        kind = _read_text(entry / "type")
        millidegrees = _read_int(entry / "temp")
        name = sensor_name(kind) if kind else None
        if name is None or millidegrees is None:
            continue
        celsius = millidegrees / 1000.0
        if celsius < max(SENSOR_OFF_BELOW_C, ABSOLUTE_ZERO_C):
            continue
        zones.append((int(match.group(1)), name, celsius))
    if not zones:
        return None
    zones.sort()
    counts: dict[str, int] = {}
    for _, name, _ in zones:
        counts[name] = counts.get(name, 0) + 1
    out: dict[str, float] = {}
    for number, name, celsius in zones:
        key = name if counts[name] == 1 else sensor_name(f"{name}_{number}")
        if key is not None and key not in out:
            out[key] = celsius
    return out


def soc_zones(temperatures: Mapping[str, float]) -> dict[str, float]:
    """The zones of ``temperatures`` that measure the SoC: names starting (in any case) with
    one of :data:`SOC_ZONE_PREFIXES` (``cpu-thermal``, ``CPU-therm``, ``BCPU-therm``,
    ``gpu-thermal``, ``soc0-thermal``, ``tj-thermal``, ``cv0-thermal``, ``x86_pkg_temp``)."""
    return {
        zone: celsius
        for zone, celsius in temperatures.items()
        if zone.lower().startswith(SOC_ZONE_PREFIXES)
    }


# -- Raspberry Pi throttling -----------------------------------------------------------------


def parse_throttled(text: str) -> int | None:
    """The word of ``vcgencmd get_throttled`` output (``throttled=0x50005`` -> 0x50005).

    Returns ``None`` for anything else, including a word beyond the documented 24 bits.
    """
    match = _THROTTLED.search(text)
    if match is None:
        return None
    value = int(match.group(1), 0)
    return value if 0 <= value < THROTTLED_LIMIT else None


def read_throttled(command: Sequence[str] = VCGENCMD, timeout: float = 2.0) -> int | None:
    """Run ``vcgencmd get_throttled`` and return its word, or ``None``.

    ``None`` when the program is not installed (every board but a Raspberry Pi), fails (no
    VideoCore, no permission for ``/dev/vchiq``), times out, or prints something else.
    """
    program = shutil.which(command[0])
    if program is None:
        return None
    try:
        done = subprocess.run(
            [program, *command[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_throttled(done.stdout)


# -- Jetson power rails ----------------------------------------------------------------------


def _rail(label: str | None) -> str | None:
    if label is None or label.strip() in ("", NOT_CONNECTED):
        return None
    return sensor_name(label)


def read_ina3221_hwmon(root: Path = INA3221_HWMON_ROOT) -> dict[str, float] | None:
    """Power of every INA3221 rail in the hwmon layout (JetPack 5, 6), in mW, by rail name.

    Reads ``<root>/*/hwmon/hwmon*/in<N>_label``, ``in<N>_input`` (mV) and ``curr<N>_input``
    (mA) for channels N = 1-3 (the kernel's ``Documentation/hwmon/ina3221.rst``). A channel
    without a label, labelled ``NC``, disabled (``in<N>_enable`` is 0), or with a missing,
    unreadable (a disabled channel answers with an error), non-integer or negative reading is
    left out. ``None``
    when no rail could be read.
    """
    rails: dict[str, float] = {}
    for label_path in sorted(root.glob("*/hwmon/hwmon*/in*_label")):
        match = _HWMON_LABEL.fullmatch(label_path.name)
        name = _rail(_read_text(label_path)) if match else None
        if match is None or name is None or name in rails:
            continue
        channel = match.group(1)
        if _read_int(label_path.with_name(f"in{channel}_enable")) == 0:
            continue
        millivolts = _read_int(label_path.with_name(f"in{channel}_input"))
        milliamps = _read_int(label_path.with_name(f"curr{channel}_input"))
        if millivolts is None or milliamps is None or millivolts < 0 or milliamps < 0:
            continue
        rails[name] = millivolts * milliamps / 1000.0
    return rails or None


def read_ina3221_iio(root: Path = INA3221_IIO_ROOT) -> dict[str, float] | None:
    """Power of every INA3221 rail in the iio layout (JetPack 4), in mW, by rail name.

    Reads ``<root>/*/iio:device*/rail_name_<N>`` and ``in_power<N>_input`` (mW). Channels are
    left out as in :func:`read_ina3221_hwmon`; ``None`` when no rail could be read.
    """
    rails: dict[str, float] = {}
    for label_path in sorted(root.glob("*/iio:device*/rail_name_*")):
        match = _IIO_RAIL.fullmatch(label_path.name)
        name = _rail(_read_text(label_path)) if match else None
        if match is None or name is None or name in rails:
            continue
        milliwatts = _read_int(label_path.with_name(f"in_power{match.group(1)}_input"))
        if milliwatts is None or milliwatts < 0:
            continue
        rails[name] = float(milliwatts)
    return rails or None


def parse_tegrastats(line: str) -> dict[str, float] | None:
    """The rails' current power (mW) in one line of ``tegrastats`` output, or ``None``.

    Understands ``VDD_IN 5012mW/5012mW`` (JetPack 5, 6) and ``POM_5V_IN 2190/2190``
    (JetPack 4): a rail name with an underscore, the current and the average power.
    """
    rails: dict[str, float] = {}
    for match in _TEGRASTATS_RAIL.finditer(line):
        name = sensor_name(match.group(1))
        if name is not None and name not in rails:
            rails[name] = float(match.group(2))
    return rails or None


class TegrastatsReader:
    """Keeps one ``tegrastats`` process running and remembers the rails of its latest line.

    Parameters
    ----------
    command : sequence of str
        The program and its arguments (``tegrastats --interval 500``).

    Notes
    -----
    The process is started by :meth:`start` and stopped by :meth:`close`; :meth:`read` returns
    ``None`` until the first line arrived and after the process ended.
    """

    def __init__(self, command: Sequence[str] = TEGRASTATS) -> None:
        self.command = tuple(command)
        self._latest: dict[str, float] | None = None
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        """Whether the program is installed."""
        return shutil.which(self.command[0]) is not None

    def start(self) -> bool:
        """Start the process (once); ``False`` when it cannot run."""
        if self._process is not None:
            return self._process.poll() is None
        program = shutil.which(self.command[0])
        if program is None:
            return False
        try:
            self._process = subprocess.Popen(
                [program, *self.command[1:]],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return False
        self._thread = threading.Thread(target=self._follow, name="tegrastats", daemon=True)
        self._thread.start()
        return True

    def _follow(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            rails = parse_tegrastats(line)
            if rails is not None:
                with self._lock:
                    self._latest = rails
        with self._lock:
            self._latest = None

    def read(self) -> dict[str, float] | None:
        """Rails of the latest line (mW), or ``None``."""
        with self._lock:
            return None if self._latest is None else dict(self._latest)

    def close(self) -> None:
        """Stop the process."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


def input_power(rails: Mapping[str, float]) -> float | None:
    """The board's input power among ``rails`` (``VDD_IN``, else ``POM_5V_IN``), or ``None``."""
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name]
    return None


# -- this process ----------------------------------------------------------------------------


def read_peak_rss_mib(status: Path = PROC_STATUS) -> float | None:
    """Peak resident set size of the process (``VmHWM`` of ``/proc/<pid>/status``), in MiB.

    ``None`` where there is no such file or line (not Linux) or it does not parse.
    """
    text = _read_text(status)
    if text is None:
        return None
    match = _VMHWM.search(text)
    return None if match is None else int(match.group(1)) / 1024.0


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far, all threads included."""
    return time.process_time()


# -- sampling a round ------------------------------------------------------------------------


@dataclass
class Sensors:
    """Where this board's figures come from (default: the real places).

    Attributes
    ----------
    thermal_root, hwmon_root, iio_root, proc_status : Path
        Roots of the trees of :func:`read_thermal_zones`, :func:`read_ina3221_hwmon`,
        :func:`read_ina3221_iio` and :func:`read_peak_rss_mib`.
    vcgencmd : sequence of str
        The throttling command (:func:`read_throttled`).
    tegrastats : sequence of str
        The fallback power source (:class:`TegrastatsReader`) when no INA3221 tree is readable.
    """

    thermal_root: Path = THERMAL_ROOT
    hwmon_root: Path = INA3221_HWMON_ROOT
    iio_root: Path = INA3221_IIO_ROOT
    proc_status: Path = PROC_STATUS
    vcgencmd: Sequence[str] = VCGENCMD
    tegrastats: Sequence[str] = TEGRASTATS
    _tegrastats: TegrastatsReader | None = field(default=None, init=False, repr=False)
    _no_tegrastats: bool = field(default=False, init=False, repr=False)

    def temperatures(self) -> dict[str, float] | None:
        """:func:`read_thermal_zones` of :attr:`thermal_root`."""
        return read_thermal_zones(self.thermal_root)

    def power(self) -> dict[str, float] | None:
        """Rail powers in mW: the hwmon tree, else the iio tree, else ``tegrastats``."""
        rails = read_ina3221_hwmon(self.hwmon_root) or read_ina3221_iio(self.iio_root)
        if rails is not None:
            return rails
        if self._tegrastats is None:
            self._tegrastats = TegrastatsReader(self.tegrastats)
            self._no_tegrastats = not self._tegrastats.available
        if self._no_tegrastats or not self._tegrastats.start():
            self._no_tegrastats = True
            return None
        return self._tegrastats.read()

    def throttled(self) -> int | None:
        """:func:`read_throttled` with :attr:`vcgencmd`."""
        return read_throttled(self.vcgencmd)

    def peak_rss_mib(self) -> float | None:
        """:func:`read_peak_rss_mib` of :attr:`proc_status`."""
        return read_peak_rss_mib(self.proc_status)

    def close(self) -> None:
        """Stop a running ``tegrastats``."""
        if self._tegrastats is not None:
            self._tegrastats.close()

    def describe(self) -> dict[str, str]:
        """What is present, one word per sensor (``"absent"`` where nothing is), for logs and
        reports."""
        temps = self.temperatures()
        rails = self.power()
        throttled = self.throttled()
        rss = self.peak_rss_mib()
        return {
            "thermal zones": ", ".join(temps) if temps else "absent",
            "throttling (vcgencmd)": "present" if throttled is not None else "absent",
            "power rails": ", ".join(rails) if rails else "absent",
            "peak RSS (VmHWM)": "present" if rss is not None else "absent",
        }


@dataclass
class SampledRound:
    """What a :class:`RoundSampler` saw.

    Attributes
    ----------
    temperatures : dict of str to float
        Highest reading per thermal zone (°C); empty without zones.
    power : dict of str to float
        Mean power per rail (mW) over the samples; empty without a power monitor.
    samples : int
        Number of samples taken (at least one: the last, at the end).
    seconds : float
        Wall time of the sampled block.
    """

    temperatures: dict[str, float] = field(default_factory=dict)
    power: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0


class RoundSampler:
    """Sample temperatures and power in a background thread while a block runs.

    Use as a context manager around a round; ``result`` then holds the highest temperature per
    zone and the mean power per rail. A sample is taken when the block starts, every
    ``interval`` seconds, and when it ends, so even a short block has readings.

    Parameters
    ----------
    sensors : Sensors
        Where to read.
    interval : float
        Seconds between samples (reading a few sysfs files costs well under a millisecond).
    """

    def __init__(self, sensors: Sensors, interval: float = 0.5) -> None:
        self.sensors = sensors
        self.interval = interval
        self.result = SampledRound()
        self._power_sums: dict[str, float] = {}
        self._power_counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._start = 0.0

    def _sample(self) -> None:
        result = self.result
        for zone, celsius in (self.sensors.temperatures() or {}).items():
            result.temperatures[zone] = max(celsius, result.temperatures.get(zone, -math.inf))
        for rail, milliwatts in (self.sensors.power() or {}).items():
            self._power_sums[rail] = self._power_sums.get(rail, 0.0) + milliwatts
            self._power_counts[rail] = self._power_counts.get(rail, 0) + 1
        result.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RoundSampler:
        self._start = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.result.power = {
            rail: total / self._power_counts[rail] for rail, total in self._power_sums.items()
        }
        self.result.seconds = time.perf_counter() - self._start


def sample_once(sensors: Sensors) -> SampledRound:
    """One reading of the temperatures and the power rails (no thread), for callers that
    cannot keep a sampler running across a round."""
    start = time.perf_counter()
    return SampledRound(
        temperatures=sensors.temperatures() or {},
        power=sensors.power() or {},
        samples=1,
        seconds=time.perf_counter() - start,
    )


@contextlib.contextmanager
def sampled(sensors: Sensors | None, interval: float = 0.5) -> Iterator[SampledRound | None]:
    """``with sampled(sensors) as seen:`` -- a :class:`RoundSampler`, or nothing when
    ``sensors`` is ``None`` (``seen`` is then ``None``)."""
    if sensors is None:
        yield None
        return
    sampler = RoundSampler(sensors, interval)
    with sampler:
        yield sampler.result


def round_figures(
    update: Any,
    *,
    seen: SampledRound | None = None,
    peak_rss_mib: float | None = None,
    throttled: int | None = None,
    process_boards: int = 1,
) -> dict[str, float]:
    """The telemetry figures of one board round (``docs/protocol.md`` section 4.2).

    Parameters
    ----------
    update : edge_client.board.BoardUpdate
        The round's update: wall and CPU times of the alarm (when it ran) and of training.
    seen : SampledRound, optional
        Temperatures and power sampled during the round.
    peak_rss_mib : float, optional
        Peak RSS of the process (:func:`read_peak_rss_mib`).
    throttled : int, optional
        The ``get_throttled`` word read after the round.
    process_boards : int
        Boards sharing this process (a simulated fleet's worker): more than one adds
        ``process_boards`` so readers know the memory figure is the process's.

    Returns
    -------
    dict of str to float
        Only what was measured: an absent sensor is an absent name.
    """
    figures: dict[str, float] = {
        "train_s": max(0.0, float(update.train_seconds)),
        "train_cpu_s": max(0.0, float(update.train_cpu_seconds)),
    }
    if update.global_accuracy is not None:  # the alarm ran
        figures["alarm_s"] = max(0.0, float(update.alarm_seconds))
        figures["alarm_cpu_s"] = max(0.0, float(update.alarm_cpu_seconds))
    if peak_rss_mib is not None:
        figures["rss_peak_mib"] = peak_rss_mib
    if process_boards > 1:
        figures["process_boards"] = float(process_boards)
    if throttled is not None:
        figures["throttled_flags"] = float(throttled)
    if seen is not None:
        if seen.temperatures:
            soc = soc_zones(seen.temperatures)
            if soc:
                figures["soc_temp_c"] = max(soc.values())
            for zone, celsius in seen.temperatures.items():
                figures[f"temp_c.{zone}"] = celsius
        if seen.power:
            total = input_power(seen.power)
            if total is not None:
                figures["power_mw"] = total
            for rail, milliwatts in seen.power.items():
                figures[f"power_mw.{rail}"] = milliwatts
    return _bounded(figures)


def _bounded(figures: dict[str, float], limit: int = MAX_TELEMETRY_ENTRIES) -> dict[str, float]:
    """At most ``limit`` figures: the fixed names first, then the per-sensor ones in order."""
    if len(figures) <= limit:
        return figures
    fixed = {k: v for k, v in figures.items() if "." not in k}
    rest = [(k, v) for k, v in figures.items() if "." in k]
    return {**fixed, **dict(rest[: max(0, limit - len(fixed))])}
