"""A board with the ``litert`` training backend: trains, alarms and seals updates without
TensorFlow (importing it is made impossible in the board's process)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from edge_client.config import (
    AlarmSettings,
    BoardConfig,
    ConfigError,
    DataSettings,
    TrainingSettings,
)
from edge_client.provision import provision_board, requirements_text
from models.litert_artifact import ARTIFACT_FILE
from models.litert_training import export_litert_training
from models.zoo import build_model
from protocol.keys import save_key_pair, save_verify_key
from siren_cli.main import main

COORDINATOR_SEED = b"c" * 32

#: Runs in a fresh interpreter where TensorFlow and Keras cannot be imported: the board loads
#: its config, builds its runtime, verifies a signed global model for round 1, runs the alarm
#: and local training, seals and persists its update; then a second round with an alarm check.
BOARD_PROCESS = r"""
import importlib.abc, json, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name} is not installed on this board")
        return None

sys.meta_path.insert(0, NoTensorFlow())
import logging
logging.basicConfig(level=logging.INFO)
import numpy as np
from nacl.signing import SigningKey
import siren_cli.main  # the whole command line, as `siren client run` loads it
from edge_client.client import BoardClient
from edge_client.config import BoardConfig
from protocol.envelope import encode_global

config = BoardConfig.load(sys.argv[1])
client = BoardClient(config)
key = SigningKey(bytes.fromhex(sys.argv[2]))
weights = client.runtime.trainer.initial_weights
plans, alarms = [], []
for round_index in (1, 2):
    payload = encode_global(
        run=config.run, round=round_index, signing_key=key, weights=weights,
        layout=client.runtime.layout,
    )
    plans.append(client.handle_global(payload).action)
    record = client.agent.record
    alarms.append(record.pending is not None)
    weights = record.previous_local
print(json.dumps({
    "plans": plans,
    "pending": alarms,
    "trainer": type(client.runtime.trainer).__name__,
    "evaluator": type(client.runtime.evaluator).__name__,
    "moved": float(np.abs(weights - client.runtime.trainer.initial_weights).max()),
    "tensorflow": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")),
}))
"""


def _digits_bundle(tmp_path: Path, digits, model: str = "digits-cnn") -> Path:
    """A board bundle for the litert backend with a digits shard as its data."""
    artifact = export_litert_training(build_model(model, (8, 8, 1), 10), model_name=model)
    artifact_path = artifact.save(tmp_path / "build" / "model-litert.zip")
    save_verify_key(tmp_path / "coordinator.pub", SigningKey(COORDINATOR_SEED).verify_key)
    out = tmp_path / "bundle"
    provision_board(
        out,
        client_id="board-000",
        run="demo",
        index=0,
        broker_host="localhost",
        coordinator_key=tmp_path / "coordinator.pub",
        system_ca=True,
        rounds=5,
        training=TrainingSettings(model=model, backend="litert", learning_rate=0.01),
        alarm=AlarmSettings(enabled=True),
        artifact=artifact_path,
    )
    np.savez(
        out / "data.npz",
        x_train=digits.x_train[:120],
        y_train=digits.y_train[:120],
        x_test=digits.x_train[120:150],
        y_test=digits.y_train[120:150],
    )
    return out


def test_litert_board_trains_and_alarms_without_tensorflow(tmp_path, digits):
    bundle = _digits_bundle(tmp_path, digits)
    done = subprocess.run(
        [sys.executable, "-c", BOARD_PROCESS, str(bundle / "board.toml"), COORDINATOR_SEED.hex()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tensorflow"] == []
    assert result["plans"] == ["train", "train"]
    assert result["pending"] == [True, True]  # both updates sealed and persisted
    assert result["trainer"] == "LiteRTTrainer"
    assert result["evaluator"] == "FrozenLiteRTEvaluator"  # from the artifact: a CNN
    assert result["moved"] > 1e-3
    assert "local training runs in litert" in done.stderr


def test_litert_bundle_carries_the_artifact_and_no_tensorflow(tmp_path, digits):
    bundle = _digits_bundle(tmp_path, digits, model="digits-mlp")
    config = BoardConfig.load(bundle / "board.toml")
    assert config.training.backend == "litert"
    assert config.training.artifact == (bundle / ARTIFACT_FILE).resolve()
    assert 'artifact = "model-litert.zip"' in (bundle / "board.toml").read_text()
    requirements = (bundle / "requirements-board.txt").read_text()
    assert "tensorflow" not in requirements and "ai-edge-litert" in requirements
    assert "tensorflow" in requirements_text("keras")
    assert "no TensorFlow" in (bundle / "SETUP.md").read_text()
    assert "about 100 MB" in (bundle / "install.sh").read_text()


def test_litert_backend_needs_an_artifact_that_fits(tmp_path, digits):
    with pytest.raises(ConfigError, match=r"needs training\.artifact"):
        BoardConfig(
            client_id="b", run="r", key_dir=tmp_path, coordinator_key=tmp_path,
            state_dir=tmp_path, training=TrainingSettings(backend="litert"),
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"training\.backend must be one of keras, litert"):
        TrainingSettings(backend="torch")
    bundle = _digits_bundle(tmp_path, digits, model="digits-mlp")
    config = BoardConfig.load(bundle / "board.toml")
    from edge_client.client import build_runtime

    wrong_model = replace(config, training=replace(config.training, model="digits-cnn"))
    with pytest.raises(ConfigError, match="holds model 'digits-mlp'"):
        build_runtime(wrong_model)
    wrong_data = replace(config, data=DataSettings(source="split", dataset="fashion-mnist"))
    with pytest.raises(ConfigError, match=r"takes \(8, 8, 1\) images"):
        from edge_client.board import BoardData

        x = np.zeros((4, 28, 28, 1), np.float32)
        y = np.zeros(4, np.int64)
        build_runtime(wrong_data, data=BoardData(x, y, x, y))


def test_export_litert_command_writes_an_artifact(tmp_path, capsys):
    out = tmp_path / "a.zip"
    assert main(["client", "export-litert", "--dataset", "digits", "--out", str(out)]) == 0
    assert "digits-mlp (4,810 parameters" in capsys.readouterr().out
    from models.litert_artifact import TrainingArtifact

    assert TrainingArtifact.load(out).model == "digits-mlp"


def test_provision_command_with_litert_backend(tmp_path, capsys):
    save_key_pair(tmp_path / "ckeys", SigningKey(COORDINATOR_SEED), overwrite=True)
    args = [
        "client", "provision", "--client-id", "board-001", "--run", "demo",
        "--broker-host", "localhost", "--coordinator-key", str(tmp_path / "ckeys"),
        "--system-ca", "--out", str(tmp_path / "b"), "--train-backend", "litert",
    ]  # fmt: skip
    assert main(args) != 0  # no --artifact
    assert "needs the model's LiteRT training artifact" in capsys.readouterr().err
    artifact = tmp_path / "m.zip"
    assert main(["client", "export-litert", "--out", str(artifact)]) == 0
    assert main([*args, "--artifact", str(artifact)]) == 0
    assert (tmp_path / "b" / ARTIFACT_FILE).read_bytes() == artifact.read_bytes()
