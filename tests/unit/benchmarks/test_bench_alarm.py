"""The alarm benchmark's table arithmetic and the CLI's option forwarding."""

from __future__ import annotations

import pytest

from benchmarks.alarm import format_table
from siren_cli.main import main


def test_table_reports_alarm_as_share_of_training_and_round():
    row = {
        "model": "m",
        "pinned": True,
        "threads": 1,
        "train_samples": 90,
        "test_samples": 10,
        "epochs": 5,
        "train_s": 10.0,
        "alarm_litert_s": 0.1,
        "alarm_keras_s": 0.5,
        "encode_sign_s": 0.0,
        "train_mem": 2**20,
        "alarm_litert_mem": 0,
        "alarm_keras_mem": 0,
        "upload_bytes": 2048,
    }
    table = format_table([row])
    # 0.1 s of 10 s training = 1.00%; of the 10.1 s round = 0.99%.
    assert "| 1.00% | 5.00% | 0.99% |" in table
    assert "1 core, 1 thread" in table and "2 KiB" in table


def test_bench_forwards_options_and_rejects_unknown_models(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "alarm", "--models", "no-such-model"])
    assert info.value.code == 2
    assert "unknown model(s) ['no-such-model']" in capsys.readouterr().err


def test_an_unwritable_output_is_refused_before_measuring(tmp_path, capsys):
    import os

    from benchmarks.alarm import default_output, unwritable

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root may write anywhere
            assert "not writable" in unwritable(locked / "alarm.md")
            with pytest.raises(SystemExit) as info:
                main(["bench", "alarm", "--models", "digits-mlp", "--out", str(locked / "a.md")])
            assert info.value.code == 2 and "cannot write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    assert unwritable(tmp_path / "new" / "alarm.md") is None
    assert "site-packages" not in default_output().parts


def test_board_data_measures_without_a_dataset(tmp_path):
    # A board measures on its own data.npz: 8x8 images pick the digits model; the worker runs.
    import numpy as np

    from benchmarks.alarm import model_for_input, worker

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x_train=rng.random((64, 8, 8, 1), dtype=np.float32), y_train=rng.integers(0, 10, 64),
        x_test=rng.random((16, 8, 8, 1), dtype=np.float32), y_test=rng.integers(0, 10, 16),
    )  # fmt: skip
    assert model_for_input((8, 8, 1)) == "digits-mlp"
    assert model_for_input((28, 28, 1)) == "siren-cnn"
    row = worker("digits-mlp", False, 1, 1, 32, tmp_path / "data.npz")
    assert row["train_samples"] == 64 and row["test_samples"] == 16
    assert row["alarm_litert_s"] > 0 and "board's data" in row["dataset"]
    # This machine's own figures: what it has, and "absent" (None) for what it has not.
    from edge_client.telemetry import read_peak_rss_mib, read_thermal_zones, soc_zones

    assert row["peak_rss_mib"] is not None and row["peak_rss_mib"] <= read_peak_rss_mib()
    assert (row["train_soc_temp_c"] is None) == (not soc_zones(read_thermal_zones() or {}))
    assert row["train_cpu_s"] > 0 and row["alarm_keras_cpu_s"] > 0


def test_telemetry_table_writes_absent_for_what_the_machine_does_not_expose():
    from benchmarks.alarm import format_telemetry

    base = {
        "model": "m",
        "pinned": False,
        "threads": 4,
        "train_cpu_s": 80.25,
        "alarm_litert_cpu_s": 0.0301,
        "alarm_keras_cpu_s": 0.25,
    }
    bare = {
        **base,
        "peak_rss_mib": None,
        "train_soc_temp_c": None,
        "alarm_litert_soc_temp_c": None,
        "train_power_mw": None,
        "alarm_litert_power_mw": None,
        "throttled_before": None,
        "throttled_after": None,
    }
    pi = {
        **bare,
        "peak_rss_mib": 675.4,
        "train_soc_temp_c": 71.5,
        "alarm_litert_soc_temp_c": 60.25,
        "throttled_before": 0,
        "throttled_after": 0x50005,
    }
    older = {"model": "m", "pinned": True, "threads": 1}  # written before telemetry existed
    lines = format_telemetry([bare, pi, older]).splitlines()
    assert len(lines) == 4
    assert lines[2] == (
        "| m | 4 cores | 80.25 s / 30.1 ms / 250.0 ms | absent | absent / absent | "
        "absent / absent | absent |"
    )
    assert lines[3] == (
        "| m | 4 cores | 80.25 s / 30.1 ms / 250.0 ms | 675 MiB | 71.5 °C / 60.2 °C | "
        "absent / absent | 0x0 -> 0x50005 (under-voltage detected, currently throttled, "
        "under-voltage has occurred, throttling has occurred) |"
    )


def test_the_worker_records_what_a_jetson_exposes(tmp_path):
    # The worker on fixture sysfs trees of a Jetson Orin Nano: its zones and rails are read,
    # there is no vcgencmd, and this process's CPU time is measured per phase.
    from pathlib import Path

    import numpy as np

    from benchmarks.alarm import worker
    from edge_client.telemetry import Sensors

    orin = Path(__file__).resolve().parents[1] / "edge_client" / "sysfs" / "jetson-orin-nano"
    sensors = Sensors(
        thermal_root=orin / "sys/class/thermal",
        hwmon_root=orin / "sys/bus/i2c/drivers/ina3221",
        iio_root=tmp_path / "none",
        proc_status=orin / "proc/self/status",
        vcgencmd=(str(tmp_path / "no-vcgencmd"),),
        tegrastats=(str(tmp_path / "no-tegrastats"),),
    )
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "data.npz",
        x_train=rng.random((64, 8, 8, 1), dtype=np.float32), y_train=rng.integers(0, 10, 64),
        x_test=rng.random((16, 8, 8, 1), dtype=np.float32), y_test=rng.integers(0, 10, 16),
    )  # fmt: skip
    row = worker("digits-mlp", False, 1, 1, 32, tmp_path / "data.npz", sensors=sensors)
    assert row["peak_rss_mib"] == 874512 / 1024
    assert row["train_soc_temp_c"] == row["alarm_litert_soc_temp_c"] == 47.5
    assert row["train_power_mw"] == row["alarm_keras_power_mw"] == 5072 * 1184 / 1000
    assert row["throttled_before"] is None and row["throttled_after"] is None
    assert row["train_cpu_s"] > 0 and row["alarm_litert_cpu_s"] > 0
    assert row["sensors"]["power rails"] == "VDD_IN, VDD_CPU_GPU_CV, VDD_SOC"
    assert row["sensors"]["throttling (vcgencmd)"] == "absent"


def test_board_mode_measures_the_litert_backend_without_tensorflow(tmp_path, capsys):
    """``siren bench alarm --backends litert``: a worker that trains and alarms in LiteRT."""
    import json

    out = tmp_path / "board-backends.md"
    argv = ["bench", "alarm", "--backends", "litert", "--models", "digits-mlp"]
    code = main([*argv, "--rounds", "1", "--epochs", "1", "--out", str(out)])
    assert code == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| digits-mlp"))
    assert "| litert |" in row and row.endswith("| LiteRTEvaluator | no |")
    result = json.loads(text.split("```json")[1].split("```")[0])[0]
    assert result["tensorflow_loaded"] == []
    assert 0 < result["installed_bytes"] < 400 * 2**20  # no TensorFlow in the closure
    assert result["train_epoch_s"] > 0 and result["alarm_s"] > 0


def test_repeated_runs_alternate_and_report_medians():
    from benchmarks.board_backends import merge_runs

    runs = [
        {"model": "m", "backend": "litert", "import_s": 0.1, "startup_s": 0.2,
         "train_epoch_s": t, "train_epoch_cpu_s": t / 2, "alarm_s": 0.3, "peak_rss_mib": rss}
        for t, rss in ((3.0, 140.0), (1.0, 150.0), (2.0, 145.0))
    ]  # fmt: skip
    merged = merge_runs(runs)
    assert merged["train_epoch_s"] == 2.0 and merged["train_epoch_cpu_s"] == 1.0
    assert merged["peak_rss_mib"] == 150.0
    assert [r["train_epoch_cpu_s"] for r in merged["runs"]] == [1.5, 0.5, 1.0]


def test_board_mode_rejects_an_unknown_backend(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "alarm", "--backends", "torch", "--models", "digits-mlp"])
    assert "--backends takes keras, litert" in capsys.readouterr().err


def test_installed_size_follows_requirements_through_installed_distributions():
    from benchmarks.board_backends import installed_size

    lean, _ = installed_size(["numpy", "no-such-distribution"])
    with_tf, largest = installed_size(["numpy", "tensorflow-cpu"])
    assert 0 < lean < with_tf
    assert largest[0][0].startswith("tensorflow")
