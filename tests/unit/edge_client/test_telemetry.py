"""The telemetry readers against fixture trees laid out like the boards' sysfs (``sysfs/``)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client.board import BoardUpdate
from edge_client.telemetry import (
    RoundSampler,
    SampledRound,
    Sensors,
    TegrastatsReader,
    input_power,
    parse_tegrastats,
    parse_throttled,
    read_ina3221_hwmon,
    read_ina3221_iio,
    read_peak_rss_mib,
    read_thermal_zones,
    read_throttled,
    round_figures,
    sampled,
    soc_zones,
)
from protocol.envelope import decode_message, encode_status
from protocol.keys import generate_signing_key

SYSFS = Path(__file__).resolve().parent / "sysfs"
BOARDS = ["raspberry-pi-4", "jetson-orin-nano", "jetson-agx-orin", "jetson-nano", "x86-desktop"]


def thermal(board: str) -> Path:
    return SYSFS / board / "sys/class/thermal"


def hwmon(board: str) -> Path:
    return SYSFS / board / "sys/bus/i2c/drivers/ina3221"


def iio(board: str) -> Path:
    return SYSFS / board / "sys/bus/i2c/drivers/ina3221x"


def sensors_of(board: str, tmp_path: Path) -> Sensors:
    """The sensors of a fixture board; no vcgencmd and no tegrastats on PATH."""
    return Sensors(
        thermal_root=thermal(board),
        hwmon_root=hwmon(board),
        iio_root=iio(board),
        proc_status=SYSFS / board / "proc/self/status",
        vcgencmd=(str(tmp_path / "no-vcgencmd"), "get_throttled"),
        tegrastats=(str(tmp_path / "no-tegrastats"),),
    )


def script(folder: Path, name: str, body: str) -> Path:
    """An executable Python script standing in for a board's command-line tool."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def update(alarm: bool = True) -> BoardUpdate:
    return BoardUpdate(
        client_id=0,
        round=3,
        delta=np.zeros(2, dtype=np.float32),
        num_samples=10,
        alarm=False,
        global_accuracy=0.8 if alarm else None,
        local_accuracy=0.7 if alarm else None,
        alarm_seconds=0.03 if alarm else 0.0,
        train_seconds=4.5,
        train_loss=0.4,
        alarm_cpu_seconds=0.025 if alarm else 0.0,
        train_cpu_seconds=8.25,
    )


# -- thermal zones ---------------------------------------------------------------------------


def test_thermal_zones_of_a_raspberry_pi() -> None:
    # thermal_zone0 only; cooling_device0 is not a zone.
    assert read_thermal_zones(thermal("raspberry-pi-4")) == {"cpu-thermal": 48.686}


def test_thermal_zones_of_an_orin_nano_leave_out_the_switched_off_engines() -> None:
    zones = read_thermal_zones(thermal("jetson-orin-nano"))
    assert zones == {
        "cpu-thermal": 47.5,
        "soc0-thermal": 46.062,
        "soc1-thermal": 45.375,
        "soc2-thermal": 44.968,
        "tj-thermal": 47.5,
    }  # gpu-thermal and cv0..2 read -256 °C: their engines are powered down


def test_jetson_nano_board_level_zones_are_not_the_soc_temperature() -> None:
    zones = read_thermal_zones(thermal("jetson-nano"))
    assert zones is not None and zones["PMIC-Die"] == 100.0
    assert list(zones) == [
        "AO-therm",
        "CPU-therm",
        "GPU-therm",
        "PLL-therm",
        "PMIC-Die",
        "thermal-fan-est",
    ]
    assert soc_zones(zones) == {"CPU-therm": 33.0, "GPU-therm": 32.0}


def test_zones_sharing_a_type_are_numbered_and_names_are_cleaned() -> None:
    zones = read_thermal_zones(thermal("x86-desktop"))
    assert zones == {
        "acpitz_0": 27.8,
        "acpitz_1": 29.8,
        "x86_pkg_temp": 45.0,
        "INT3400_Thermal": 20.0,
    }
    assert soc_zones(zones) == {"x86_pkg_temp": 45.0}


def test_damaged_zones_are_left_out_not_guessed() -> None:
    # not a number, no type, empty, a folder, a fraction, below absolute zero: only the last
    # zone is valid.
    assert read_thermal_zones(thermal("damaged")) == {"tj-thermal": 51.0}


def test_absent_thermal_zones(tmp_path: Path) -> None:
    assert read_thermal_zones(tmp_path / "missing") is None
    (tmp_path / "thermal").mkdir()
    assert read_thermal_zones(tmp_path / "thermal") is None  # e.g. a container or this host
    shutil.copytree(thermal("damaged") / "thermal_zone0", tmp_path / "thermal/thermal_zone0")
    assert read_thermal_zones(tmp_path / "thermal") is None


# -- power rails -----------------------------------------------------------------------------


def test_ina3221_hwmon_rails_of_an_orin_nano() -> None:
    rails = read_ina3221_hwmon(hwmon("jetson-orin-nano"))
    assert rails == pytest.approx(
        {
            "VDD_IN": 5072 * 1184 / 1000,
            "VDD_CPU_GPU_CV": 5064 * 152 / 1000,
            "VDD_SOC": 5064 * 296 / 1000,
        }
    )
    assert list(rails) == [
        "VDD_IN",
        "VDD_CPU_GPU_CV",
        "VDD_SOC",
    ]  # in7, the shunt sum, is not a rail
    assert input_power(rails) == pytest.approx(6005.248)


def test_ina3221_hwmon_skips_unconnected_channels_and_never_sums_rails() -> None:
    rails = read_ina3221_hwmon(hwmon("jetson-agx-orin"))
    assert rails is not None
    assert set(rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert rails["VDDQ_VDD2_1V8AO"] == pytest.approx(4984 * 96 / 1000)
    assert input_power(rails) is None  # no VDD_IN rail: the board's total is not known


def test_ina3221_iio_rails_of_a_jetson_nano() -> None:
    rails = read_ina3221_iio(iio("jetson-nano"))
    assert rails == {"POM_5V_IN": 2190.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 404.0}
    assert input_power(rails) == 2190.0


def test_damaged_or_absent_power_monitors_give_nothing(tmp_path: Path) -> None:
    # a non-numeric current, a negative voltage, a disabled channel; a rail without its power
    assert read_ina3221_hwmon(hwmon("damaged")) is None
    assert read_ina3221_iio(iio("damaged")) is None
    for board in ("raspberry-pi-4", "x86-desktop"):
        assert read_ina3221_hwmon(hwmon(board)) is None
        assert read_ina3221_iio(iio(board)) is None
    assert read_ina3221_hwmon(hwmon("jetson-nano")) is None  # the other layout
    assert read_ina3221_iio(iio("jetson-orin-nano")) is None


JETPACK6_LINE = (
    "11-14-2024 10:12:01 RAM 2071/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [3%@729,1%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0% GR3D_FREQ 0% "
    "cpu@47.5C soc2@44.968C soc0@46.062C gpu@-256C tj@47.5C soc1@45.375C "
    "VDD_IN 5012mW/5012mW VDD_CPU_GPU_CV 600mW/600mW VDD_SOC 1400mW/1400mW"
)
JETPACK4_LINE = (
    "RAM 2071/3956MB (lfb 1x2MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [10%@1479,2%@1479,0%@1479,0%@1479] EMC_FREQ 0% GR3D_FREQ 0% PLL@30C CPU@33C "
    "PMIC@100C GPU@32C AO@38.5C thermal@32.75C POM_5V_IN 2190/2190 POM_5V_GPU 0/0 "
    "POM_5V_CPU 404/404"
)


def test_tegrastats_lines_of_both_jetpack_generations() -> None:
    assert parse_tegrastats(JETPACK6_LINE) == {
        "VDD_IN": 5012.0,
        "VDD_CPU_GPU_CV": 600.0,
        "VDD_SOC": 1400.0,
    }
    assert parse_tegrastats(JETPACK4_LINE) == {
        "POM_5V_IN": 2190.0,
        "POM_5V_GPU": 0.0,
        "POM_5V_CPU": 404.0,
    }
    assert parse_tegrastats("RAM 2071/3956MB SWAP 0/1978MB") is None  # memory is not power
    assert parse_tegrastats("") is None


def test_tegrastats_reader_follows_a_running_tegrastats(tmp_path: Path) -> None:
    fake = script(
        tmp_path / "bin",
        "tegrastats",
        "import sys, time\n"
        f"line = {JETPACK6_LINE!r}\n"
        "while True:\n"
        "    print(line, flush=True)\n"
        "    time.sleep(0.05)\n",
    )
    reader = TegrastatsReader((str(fake), "--interval", "50"))
    assert reader.available and reader.read() is None
    try:
        assert reader.start()
        deadline = time.monotonic() + 20
        while reader.read() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reader.read() == {"VDD_IN": 5012.0, "VDD_CPU_GPU_CV": 600.0, "VDD_SOC": 1400.0}
        process = reader._process
    finally:
        reader.close()
    assert process is not None and process.poll() is not None  # stopped


def test_sensors_fall_back_to_tegrastats_only_without_a_readable_tree(tmp_path: Path) -> None:
    fake = script(
        tmp_path / "bin",
        "tegrastats",
        "import time\n"
        "while True:\n"
        f"    print({JETPACK4_LINE!r}, flush=True)\n"
        "    time.sleep(0.05)\n",
    )
    sensors = Sensors(
        hwmon_root=tmp_path / "none", iio_root=tmp_path / "none", tegrastats=(str(fake),)
    )
    try:
        deadline = time.monotonic() + 20
        rails = sensors.power()
        while rails is None and time.monotonic() < deadline:
            time.sleep(0.05)
            rails = sensors.power()
        assert rails == {"POM_5V_IN": 2190.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 404.0}
    finally:
        sensors.close()
    # With a tree, tegrastats is never started.
    with_tree = sensors_of("jetson-nano", tmp_path)
    with_tree.tegrastats = (str(fake),)
    assert with_tree.power() == {"POM_5V_IN": 2190.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 404.0}
    assert with_tree._tegrastats is None
    # A tegrastats that ends gives no figures: its last line would be stale.
    once = script(tmp_path / "bin", "tegrastats-once", f"print({JETPACK4_LINE!r})\n")
    ended = Sensors(
        hwmon_root=tmp_path / "none", iio_root=tmp_path / "none", tegrastats=(str(once),)
    )
    try:
        ended.power()
        assert ended._tegrastats is not None and ended._tegrastats._process is not None
        ended._tegrastats._process.wait(20)
        ended._tegrastats._thread.join(20)  # type: ignore[union-attr]
        assert ended.power() is None
    finally:
        ended.close()
    # Without either: absent, and tegrastats is not looked for again and again.
    bare = sensors_of("raspberry-pi-4", tmp_path)
    assert bare.power() is None and bare.power() is None


# -- throttling ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("throttled=0x0\n", 0),
        ("throttled=0x50005\n", 0x50005),
        ("throttled=0x80008", 0x80008),
        ("throttled=0xe0000\n", 0xE0000),
        ("throttled=0x1000000\n", None),  # beyond the documented bits
        ("VCHI initialization failed\n", None),
        ("", None),
        ("throttled=", None),
    ],
)
def test_parse_get_throttled(text: str, word: int | None) -> None:
    assert parse_throttled(text) == word


def test_read_throttled_runs_vcgencmd(tmp_path: Path) -> None:
    ok = script(tmp_path / "bin", "vcgencmd", "import sys\nprint('throttled=0x50005')\n")
    assert read_throttled((str(ok), "get_throttled")) == 0x50005
    # vcgencmd installed on a machine without a VideoCore: it fails, nothing is reported.
    fails = script(
        tmp_path / "bin",
        "vcgencmd-fails",
        "import sys\nprint('VCHI initialization failed', file=sys.stderr)\nsys.exit(1)\n",
    )
    assert read_throttled((str(fails), "get_throttled")) is None
    hangs = script(tmp_path / "bin", "vcgencmd-hangs", "import time\ntime.sleep(30)\n")
    assert read_throttled((str(hangs), "get_throttled"), timeout=0.5) is None
    assert read_throttled((str(tmp_path / "absent"), "get_throttled")) is None


# -- this process ----------------------------------------------------------------------------


def test_peak_rss_from_proc_status(tmp_path: Path) -> None:
    assert read_peak_rss_mib(SYSFS / "raspberry-pi-4/proc/self/status") == pytest.approx(
        691180 / 1024
    )
    assert read_peak_rss_mib(SYSFS / "damaged/proc/self/status") is None  # no VmHWM line
    assert read_peak_rss_mib(tmp_path / "status") is None
    (tmp_path / "status").write_text("VmHWM:\t  12.5 kB\n")
    assert read_peak_rss_mib(tmp_path / "status") is None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_rss_of_this_process_is_at_least_its_resident_set() -> None:
    peak = read_peak_rss_mib()
    assert peak is not None
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    resident = pages * os.sysconf("SC_PAGE_SIZE")
    assert peak >= resident / 2**20 - 1  # VmHWM >= VmRSS (1 MiB of slack for the read)


# -- sampling and the figures of a round -----------------------------------------------------


def test_sampler_keeps_the_hottest_reading_and_the_mean_power(tmp_path: Path) -> None:
    root = tmp_path / "orin"
    shutil.copytree(SYSFS / "jetson-orin-nano", root)
    sensors = sensors_of("jetson-orin-nano", tmp_path)
    sensors.thermal_root = root / "sys/class/thermal"
    sensors.hwmon_root = root / "sys/bus/i2c/drivers/ina3221"
    hw = sensors.hwmon_root / "1-0040/hwmon/hwmon1"
    # A long interval: exactly two samples, at the start and at the end of the block.
    with RoundSampler(sensors, interval=60.0) as sampler:
        (sensors.thermal_root / "thermal_zone0/temp").write_text("63250\n")
        (sensors.thermal_root / "thermal_zone8/temp").write_text("41000\n")
        (hw / "curr1_input").write_text("2368\n")
    seen = sampler.result
    assert seen.samples == 2
    assert seen.temperatures["cpu-thermal"] == 63.25  # rose during the block
    assert seen.temperatures["tj-thermal"] == 47.5  # fell: the highest reading stays
    assert seen.power["VDD_IN"] == pytest.approx(5072 * (1184 + 2368) / 2 / 1000)


def test_sampler_samples_in_the_background(tmp_path: Path) -> None:
    with RoundSampler(sensors_of("raspberry-pi-4", tmp_path), interval=0.01) as sampler:
        time.sleep(0.3)
    assert sampler.result.samples >= 5
    assert sampler.result.seconds >= 0.3
    assert sampler.result.power == {}  # a Raspberry Pi has no power monitor


def test_figures_of_a_raspberry_pi_round(tmp_path: Path) -> None:
    sensors = sensors_of("raspberry-pi-4", tmp_path)
    sensors.vcgencmd = (str(script(tmp_path / "bin", "vcgencmd", "print('throttled=0x50005')")),)
    with sampled(sensors) as seen:
        pass
    figures = round_figures(
        update(), seen=seen, peak_rss_mib=sensors.peak_rss_mib(), throttled=sensors.throttled()
    )
    assert figures == pytest.approx(
        {
            "train_s": 4.5,
            "train_cpu_s": 8.25,
            "alarm_s": 0.03,
            "alarm_cpu_s": 0.025,
            "rss_peak_mib": 691180 / 1024,
            "throttled_flags": float(0x50005),
            "soc_temp_c": 48.686,
            "temp_c.cpu-thermal": 48.686,
        }
    )
    # The figures travel in a status message and come back as float32.
    key = generate_signing_key()
    data = encode_status(
        run="r", client="pi", signing_key=key, online=True, round=3, telemetry=figures
    )
    assert decode_message(data, key.verify_key).telemetry == pytest.approx(figures, rel=1e-6)


def test_figures_of_jetson_rounds(tmp_path: Path) -> None:
    with sampled(sensors_of("jetson-orin-nano", tmp_path)) as seen:
        pass
    orin = round_figures(update(alarm=False), seen=seen)
    assert "alarm_s" not in orin and "alarm_cpu_s" not in orin  # the alarm did not run
    assert "throttled_flags" not in orin and "rss_peak_mib" not in orin
    assert orin["power_mw"] == pytest.approx(6005.248)
    assert orin["power_mw.VDD_SOC"] == pytest.approx(1498.944)
    assert orin["soc_temp_c"] == 47.5
    assert "temp_c.gpu-thermal" not in orin
    with sampled(sensors_of("jetson-agx-orin", tmp_path)) as seen:
        pass
    agx = round_figures(update(), seen=seen)
    assert "power_mw" not in agx  # no input rail: no total, and rails are not summed
    assert {k for k in agx if k.startswith("power_mw.")} == {
        "power_mw.VDD_GPU_SOC",
        "power_mw.VDD_CPU_CV",
        "power_mw.VIN_SYS_5V0",
        "power_mw.VDDQ_VDD2_1V8AO",
    }
    with sampled(sensors_of("jetson-nano", tmp_path)) as seen:
        pass
    nano = round_figures(update(), seen=seen)
    assert nano["soc_temp_c"] == 33.0  # not PMIC-Die's constant 100 °C
    assert nano["temp_c.PMIC-Die"] == 100.0
    assert nano["power_mw"] == 2190.0


def test_a_board_without_sensors_reports_only_what_it_measured(tmp_path: Path) -> None:
    bare = Sensors(
        thermal_root=tmp_path / "none",
        hwmon_root=tmp_path / "none",
        iio_root=tmp_path / "none",
        proc_status=tmp_path / "none",
        vcgencmd=(str(tmp_path / "none"),),
        tegrastats=(str(tmp_path / "none"),),
    )
    with sampled(bare) as seen:
        pass
    assert seen == SampledRound(samples=2, seconds=seen.seconds)
    figures = round_figures(
        update(), seen=seen, peak_rss_mib=bare.peak_rss_mib(), throttled=bare.throttled()
    )
    assert set(figures) == {"train_s", "train_cpu_s", "alarm_s", "alarm_cpu_s"}
    assert bare.describe() == {
        "thermal zones": "absent",
        "throttling (vcgencmd)": "absent",
        "power rails": "absent",
        "peak RSS (VmHWM)": "absent",
    }
    with sampled(None) as nothing:
        assert nothing is None


def test_a_shared_process_says_so_and_figures_stay_within_the_protocol_limit() -> None:
    many = SampledRound(temperatures={f"zone{i}": 40.0 + i for i in range(80)})
    figures = round_figures(update(), seen=many, peak_rss_mib=900.0, process_boards=50)
    assert figures["process_boards"] == 50.0 and figures["rss_peak_mib"] == 900.0
    assert len(figures) == 64
    assert "soc_temp_c" not in figures  # no zone named like the SoC's
    key = generate_signing_key()
    encode_status(run="r", client="b", signing_key=key, online=True, round=1, telemetry=figures)
    assert "process_boards" not in round_figures(update(), process_boards=1)


def test_a_boards_status_carries_the_figures_of_the_round_it_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import queue

    from edge_client.client import BoardLink
    from edge_client.config import BrokerSettings

    key = generate_signing_key()
    held = [3]
    link = BoardLink(
        BrokerSettings(),
        run="demo",
        client_id="board-007",
        signing_key=key,
        inbox=queue.Queue(),
        status=lambda: (held[0], "ab" * 32),
    )

    def status() -> dict[str, float]:
        message = decode_message(link._status_bytes(True), key.verify_key)
        assert message.round == held[0]
        return message.telemetry

    assert status() == {}  # nothing measured yet
    link.figures = (3, {"train_s": 1.5, "soc_temp_c": 50.0})
    assert status() == {"train_s": 1.5, "soc_temp_c": 50.0}
    held[0] = 4  # a newer model: the round-3 figures do not describe it
    assert status() == {}
    link.figures = (4, {"train_s": -1.0})  # cannot happen from round_figures; still no crash
    with caplog.at_level("WARNING", logger="edge_client.client"):
        assert status() == {}
    assert "without telemetry" in caplog.text


def test_publishing_never_holds_the_links_lock_while_paho_delivers_an_acknowledgement() -> None:
    """paho calls on_publish from its network thread while holding its own outgoing-message
    lock, which publish() needs too; a link that held its lock across publish() deadlocked when
    the acknowledgement of its status arrived while it published the update right after."""
    import queue
    import threading
    from types import SimpleNamespace

    from edge_client.client import BoardLink
    from edge_client.config import BrokerSettings

    link = BoardLink(
        BrokerSettings(),
        run="demo",
        client_id="board-007",
        signing_key=generate_signing_key(),
        inbox=queue.Queue(),
    )
    blocked: list[int] = []

    class AckingClient:
        """Acknowledges every message from another thread before publish() returns."""

        mid = 0

        def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> object:
            self.mid += 1
            ack = threading.Thread(target=link._on_publish, args=(self, None, self.mid, 0, None))
            ack.start()
            ack.join(timeout=2.0)
            if ack.is_alive():
                blocked.append(self.mid)
            return SimpleNamespace(mid=self.mid)

    link._client = AckingClient()  # type: ignore[assignment]
    link.report(1, {"train_s": 1.0})
    link.publish_update(b"update")
    assert blocked == []
    assert link.flush(timeout=1.0)  # both acknowledged, whichever came first
