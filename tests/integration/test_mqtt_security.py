"""Deployment broker security against a real Mosquitto: TLS only, per-board passwords, ACLs.

The configuration comes from the project's own commands (``siren client provision`` for two
boards, ``siren coordinator broker-config --self-signed``), and the boards connect with the
settings of their bundles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.broker import find_mosquitto, free_port, wait_for_port
from siren_cli.main import main

pytestmark = pytest.mark.integration

RUN = "secure"
# Mosquitto started as root switches to the 'mosquitto' user, which cannot read pytest's private
# temporary directory: keep the invoking account.
RUN_AS = ["--run-as", "root"] if os.geteuid() == 0 else []


class Recorder:
    """Connection outcome, PUBACK reason codes and received messages of one paho client."""

    def __init__(self) -> None:
        self.connack: Any = None
        self.connected = threading.Event()
        self.acks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()

    def attach(self, client: Any) -> None:
        client.on_connect = self._on_connect
        client.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc
        self.connected.set()


def _client(settings: Any, client_id: str) -> tuple[Any, Recorder]:
    from protocol.mqtt import make_mqtt_client

    client = make_mqtt_client(settings, client_id)
    recorder = Recorder()
    recorder.attach(client)
    client.connect_async(settings.host, settings.port, keepalive=10)
    client.loop_start()
    assert recorder.connected.wait(10), f"{client_id}: no CONNACK"
    return client, recorder


def _publish(client: Any, recorder: Recorder, topic: str, payload: bytes) -> int:
    info = client.publish(topic, payload, qos=1)
    deadline = time.monotonic() + 10
    while info.mid not in recorder.acks and time.monotonic() < deadline:
        time.sleep(0.02)
    return recorder.acks[info.mid]


def _provision(root: Path, index: int, port: int) -> int:
    name = f"board-{index:03d}"
    return main(
        [
            *("client", "provision", "--client-id", name, "--run", RUN, "--index", str(index)),
            *("--out", str(root / "bundles" / name)),
            *("--broker-host", "127.0.0.1", "--broker-port", str(port)),
            *("--coordinator-key", str(root / "coordinator" / "keys")),
            *("--ca-cert", str(root / "broker" / "tls" / "ca.crt")),
            *("--allow-list", str(root / "coordinator" / "allow-list.txt")),
            *("--rounds", "2", "--no-alarm"),
        ]
    )


def _broker_config(root: Path, port: int, *tls: str) -> int:
    return main(
        [
            *("coordinator", "broker-config", "--out", str(root / "broker"), "--run", RUN),
            *("--port", str(port), "--bind", "127.0.0.1", "--bundles", str(root / "bundles")),
            *tls,
            *RUN_AS,
        ]
    )


@pytest.fixture
def secure_broker(tmp_path: Path):
    from protocol.keys import generate_signing_key, save_key_pair

    port = free_port()
    save_key_pair(tmp_path / "coordinator" / "keys", generate_signing_key())
    # Before the broker's CA exists, provisioning is refused with a user error.
    assert _provision(tmp_path, 0, port) == 2
    assert _broker_config(tmp_path, port, "--self-signed", "--hostname", "127.0.0.1") == 0
    assert _provision(tmp_path, 0, port) == 0
    assert _provision(tmp_path, 1, port) == 0
    # The boards were provisioned after the broker config: write it again for their passwords.
    tls = tmp_path / "broker" / "tls"
    assert (
        _broker_config(
            tmp_path,
            port,
            "--cafile",
            str(tls / "ca.crt"),
            "--certfile",
            str(tls / "server.crt"),
            "--keyfile",
            str(tls / "server.key"),
        )
        == 0
    )
    exe = find_mosquitto()
    assert exe is not None
    log_path = tmp_path / "broker" / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, "-c", str(tmp_path / "broker" / "mosquitto.conf")], stdout=log, stderr=log
        )
    try:
        assert wait_for_port("127.0.0.1", port, 10), log_path.read_text()
        yield tmp_path, port
    finally:
        proc.terminate()
        proc.wait(10)


def test_boards_publish_only_on_their_own_topics_and_only_the_coordinator_on_global(
    secure_broker: tuple[Path, int],
) -> None:
    from dataclasses import replace

    from edge_client.config import BoardConfig
    from protocol.keys import AllowList

    root, _ = secure_broker
    board = BoardConfig.load(root / "bundles" / "board-000" / "board.toml")
    assert board.broker.tls and board.broker.username == "board-000"
    assert sorted(AllowList.load(root / "coordinator" / "allow-list.txt")) == [
        "board-000",
        "board-001",
    ]
    coordinator_settings = replace(
        board.broker,
        username="coordinator",
        password=(root / "broker" / "coordinator.password").read_text().strip(),
    )
    coord, coord_rec = _client(coordinator_settings, "coordinator")
    assert not coord_rec.connack.is_failure
    base = f"siren/v1/{RUN}"
    coord.subscribe([(f"{base}/update/+", 1), (f"{base}/status/+", 1)])
    assert coord_rec.subscribed.wait(5)

    client, rec = _client(board.broker, "board-000")
    assert not rec.connack.is_failure
    client.subscribe(f"{base}/global", qos=1)
    assert rec.subscribed.wait(5)
    allowed = _publish(client, rec, f"{base}/update/board-000", b"mine")
    other_update = _publish(client, rec, f"{base}/update/board-001", b"impersonation")
    other_status = _publish(client, rec, f"{base}/status/board-001", b"offline")
    forged_global = _publish(client, rec, f"{base}/global", b"forged global")
    assert allowed < 128
    assert other_update == other_status == forged_global == 135  # MQTT v5: not authorized
    assert _publish(coord, coord_rec, f"{base}/global", b"real global") < 128

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not rec.messages:
        time.sleep(0.05)
    assert rec.messages == [(f"{base}/global", b"real global")]
    time.sleep(0.3)
    assert coord_rec.messages == [(f"{base}/update/board-000", b"mine")]
    for c in (client, coord):
        c.disconnect()
        c.loop_stop()


def test_anonymous_wrong_password_and_plain_text_connections_are_refused(
    secure_broker: tuple[Path, int],
) -> None:
    from dataclasses import replace

    import paho.mqtt.client as mqtt

    from edge_client.config import BoardConfig

    root, port = secure_broker
    good = BoardConfig.load(root / "bundles" / "board-000" / "board.toml").broker
    cases = {
        "anonymous": replace(good, username=None, password=None),
        "wrong password": replace(good, password="guess"),
        "someone else's user": replace(good, username="board-001"),
    }
    for name, settings in cases.items():
        client, rec = _client(settings, "intruder")
        assert rec.connack.is_failure, name
        client.loop_stop()
    plain = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    plain_rec = Recorder()
    plain_rec.attach(plain)
    plain.username_pw_set("board-000", good.password)
    plain.connect("127.0.0.1", port, keepalive=5)  # TCP connects; MQTT in clear text must not
    for _ in range(30):
        plain.loop(timeout=0.1)
    assert plain_rec.connack is None or plain_rec.connack.is_failure
    assert not plain.is_connected()


def test_provisioned_boards_complete_a_run_over_tls(secure_broker: tuple[Path, int]) -> None:
    """The deployment path end to end: each board runs `siren client run` on its bundle (its
    own data file, TLS, its MQTT user) and the coordinator runs with its broker password."""
    import numpy as np

    from coordinator.config import BrokerSettings, CoordinatorConfig, DataSettings, ModelSettings
    from coordinator.runtime import save_initial_model
    from models.datasets import load_digits
    from models.partition import make_federated_split
    from models.training import TrainConfig, Trainer
    from protocol.layout import TensorLayout
    from tests.integration.conftest import query, spawn, stop_process, wait_until

    root, port = secure_broker
    ds = load_digits()
    split = make_federated_split(ds.y_train, 2, seed=0)
    for shard in split.shards:  # what an operator places next to board.toml
        np.savez(
            root / "bundles" / f"board-{shard.client_id:03d}" / "data.npz",
            x_train=ds.x_train[shard.train_idx], y_train=ds.y_train[shard.train_idx],
            x_test=ds.x_train[shard.test_idx], y_test=ds.y_train[shard.test_idx],
        )  # fmt: skip
    trainer = Trainer("digits-mlp", (8, 8, 1), 10, TrainConfig(), seed=0)
    coord_dir = root / "coordinator"
    save_initial_model(
        coord_dir / "initial.npz", trainer.initial_weights, TensorLayout(trainer.layout.as_list())
    )
    config = CoordinatorConfig(
        run=RUN,
        key_dir=coord_dir / "keys",
        allow_list=coord_dir / "allow-list.txt",
        db=coord_dir / "coordinator.sqlite",
        rounds=2,
        broker=BrokerSettings(
            host="127.0.0.1", port=port, username="coordinator", tls=True,
            ca_file=root / "broker" / "tls" / "ca.crt",
        ),
        model=ModelSettings(name="digits-mlp", initial=coord_dir / "initial.npz"),
        data=DataSettings(root="none", evaluate=False),
    )  # fmt: skip
    toml = coord_dir / "coord.toml"
    password = str(root / "broker" / "coordinator.password")
    toml.write_text(config.to_toml(relative_to=coord_dir, password_file=password))
    siren = [sys.executable, "-m", "siren_cli.main"]
    procs = [spawn([*siren, "coordinator", "run", "--config", str(toml)], root / "coord.log")]
    for i in range(2):
        bundle = root / "bundles" / f"board-{i:03d}"
        procs.append(
            spawn([*siren, "client", "run", "--config", str(bundle / "board.toml")],
                  root / f"board-{i}.log")
        )  # fmt: skip
    try:
        wait_until(lambda: all(p.poll() is not None for p in procs), 120, "the run to finish")
        assert [p.returncode for p in procs] == [0, 0, 0], (root / "board-0.log").read_text()
    finally:
        for proc in procs:
            stop_process(proc)
    db = coord_dir / "coordinator.sqlite"
    assert query(db, "SELECT round FROM rounds WHERE status='closed'") == [(1,), (2,)]
    assert query(db, "SELECT round, COUNT(*) FROM updates GROUP BY round") == [(1, 2), (2, 2)]
    assert query(db, "SELECT reason FROM decisions WHERE reason != 'accepted'") == []


def test_the_printed_start_command_works_as_root_without_run_as() -> None:
    """Before, the files were root-owned 0600 while Mosquitto started as root switched to the
    'mosquitto' account and could not read its password file or write its log."""
    import pwd
    import shutil
    import tempfile

    from firmware_sim.broker import free_port, wait_for_port

    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no 'mosquitto' account")
    base = Path(tempfile.mkdtemp(prefix="siren-broker-"))
    base.chmod(0o755)
    try:
        port = free_port()
        argv = ["coordinator", "broker-config", "--out", str(base / "broker"), "--run", RUN,
                "--port", str(port), "--bind", "127.0.0.1", "--self-signed",
                "--hostname", "127.0.0.1"]  # fmt: skip
        assert main(argv) == 0
        assert "user mosquitto" in (base / "broker" / "mosquitto.conf").read_text()
        assert (base / "broker" / "passwd").stat().st_uid == pwd.getpwnam("mosquitto").pw_uid
        exe = find_mosquitto()
        assert exe is not None
        proc = subprocess.Popen([exe, "-c", str(base / "broker" / "mosquitto.conf")])
        try:
            assert wait_for_port("127.0.0.1", port, 10)
            time.sleep(0.5)
            assert proc.poll() is None  # it read its password file and opened its log
            assert "Error" not in (base / "broker" / "mosquitto.log").read_text()
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)
