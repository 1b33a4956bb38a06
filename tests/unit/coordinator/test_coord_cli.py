"""``siren coordinator run`` refuses what it cannot serve in one line, before TensorFlow loads."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from coordinator.store import CoordinatorStore
from protocol.keys import AllowList
from tests.unit.coordinator.api_builders import BOARDS, make_config, populate

REPO = Path(__file__).resolve().parents[3]


def test_a_database_of_another_run_is_refused_in_one_line_before_tensorflow(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)  # run "demo"
    store = CoordinatorStore(config.db)
    populate(store)
    store.close()
    other = replace(config, run="other")
    allow = AllowList()
    for i, board in enumerate(BOARDS):
        allow.add(board, SigningKey(bytes([40 + i]) * 32).verify_key)
    allow.save(tmp_path / "allow-list.txt")
    toml = tmp_path / "coord.toml"
    toml.write_text(other.to_toml(relative_to=tmp_path))
    code = (
        "import sys\n"
        "from siren_cli.main import main\n"
        f"rc = main(['coordinator', 'run', '--config', {str(toml)!r}])\n"
        "print('TF', 'tensorflow' in sys.modules, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    error, loaded = proc.stderr.strip().splitlines()[-2:]
    assert proc.returncode == 2, proc.stderr
    assert loaded == "TF False"
    assert error == (
        f"siren: error: {config.db} belongs to run 'demo', not 'other': point the "
        "configuration's db at a new file for a new run, or set its run back to 'demo' to "
        "resume that one"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("device", "error"),
    [
        ("gpu", "siren: error: --device gpu: aggregator.device must be one of numpy, cpu, cuda, "),
        ("cuda", "siren: error: --device cuda: aggregator.device: "),  # no GPU visible
    ],
)
def test_a_device_this_machine_cannot_provide_is_refused_before_tensorflow(
    tmp_path: Path, device: str, error: str
) -> None:
    config = make_config(tmp_path)
    allow = AllowList()
    for i, board in enumerate(BOARDS):
        allow.add(board, SigningKey(bytes([40 + i]) * 32).verify_key)
    allow.save(tmp_path / "allow-list.txt")
    toml = tmp_path / "coord.toml"
    toml.write_text(config.to_toml(relative_to=tmp_path))
    code = (
        "import sys\n"
        "from siren_cli.main import main\n"
        f"rc = main(['coordinator', 'run', '--config', {str(toml)!r}, '--device', {device!r}])\n"
        "print('TF', 'tensorflow' in sys.modules, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2, proc.stderr
    message, loaded = proc.stderr.strip().splitlines()[-2:]
    assert loaded == "TF False"
    assert message.startswith(error), message
    assert "loading the model" not in proc.stderr and "Traceback" not in proc.stderr
