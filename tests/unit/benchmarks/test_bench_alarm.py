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
