"""``siren deploy`` against a real Mosquitto: the generated broker listens on its TLS port and
nothing else, sessions cannot be taken over, boards added later get in after a reload without
anyone else being disconnected, mutual TLS works, and a whole run completes over TLS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from deploy.checks import check_broker, listening_sockets, plaintext_refused
from firmware_sim.broker import find_mosquitto, free_port, free_ports, wait_for_port
from siren_cli.main import main

pytestmark = pytest.mark.integration

# pytest's temporary folders are private to root: a broker started as root keeps root.
BROKER_USER = ["--broker-user", "root"] if os.geteuid() == 0 else ["--broker-user", ""]


@dataclass
class Running:
    """A deployment folder and its running broker."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    def reload(self) -> None:
        """SIGHUP: Mosquitto reloads its password file and ACLs."""
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)

    def board(self, board: str) -> Any:
        from edge_client.config import BoardConfig

        return BoardConfig.load(self.root / "boards" / board / "board.toml").broker


def _deploy(root: Path, port: int, *extra: str) -> None:
    argv = [
        *("deploy", "init", str(root), "--run", "demo", "--boards", "3"),
        *("--broker-host", "127.0.0.1", "--broker-port", str(port), "--bind", "127.0.0.1"),
        *("--rounds", "2", "--no-alarm", *BROKER_USER, *extra),
    ]
    assert main(argv) == 0


def _start(root: Path, port: int) -> subprocess.Popen[bytes]:
    exe = find_mosquitto()
    assert exe is not None
    log = root / "broker-stderr.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, "-c", str(root / "broker" / "mosquitto.conf")], stdout=out, stderr=out
        )
    assert wait_for_port("127.0.0.1", port, 10), log.read_text()
    return proc


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[Running]:
    port = free_port()
    _deploy(tmp_path / "dep", port)
    proc = _start(tmp_path / "dep", port)
    try:
        yield Running(tmp_path / "dep", port, proc)
    finally:
        proc.terminate()
        proc.wait(10)


class Session:
    """One paho connection: CONNACK, disconnects and PUBACK codes."""

    def __init__(self, settings: Any, client_id: str) -> None:
        from protocol.mqtt import make_mqtt_client

        self.connack: Any = None
        self.connected = threading.Event()
        self.disconnects = 0
        self.acks: dict[int, int] = {}
        self.client = make_mqtt_client(settings, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        self.client.connect_async(settings.host, settings.port, keepalive=10)
        self.client.loop_start()
        assert self.connected.wait(10), f"{client_id}: no CONNACK"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc
        self.connected.set()

    def _on_disconnect(self, *args: Any) -> None:
        self.disconnects += 1

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 10
        while info.mid not in self.acks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.acks.get(info.mid, -1)

    def subscribe(self, topic: str) -> list[Any]:
        """The SUBACK's reason codes for ``topic``."""
        granted: list[Any] = []
        done = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, codes, p: (granted.extend(codes), done.set())
        self.client.subscribe(topic, qos=1)
        assert done.wait(10), f"no SUBACK for {topic}"
        return granted

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_the_broker_listens_on_its_tls_port_and_nothing_else(deployed: Running) -> None:
    # Before the fix, Mosquitto 2.0.11 also opened plain-text MQTT on 0.0.0.0:1883 and
    # [::]:1883, and accepted a board's password there.
    assert listening_sockets([deployed.proc.pid]) == {("127.0.0.1", deployed.port)}
    findings = check_broker(
        deployed.root / "broker" / "mosquitto.conf", "127.0.0.1", deployed.port,
        deployed.root / "coordinator" / "ca.crt", pids=[deployed.proc.pid],
    )  # fmt: skip
    assert all(f.ok for f in findings), findings
    assert plaintext_refused("127.0.0.1", deployed.port)
    out = subprocess.run(
        [sys.executable, "-m", "siren_cli.main", "deploy", "check", str(deployed.root)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok  ") == 3


def test_a_board_cannot_take_over_another_boards_session(deployed: Running) -> None:
    # Before the fix use_username_as_clientid sat in the global section and did not apply to
    # the TLS listener: board-000's credentials connected as client id board-001 and kicked it.
    victim = Session(deployed.board("board-001"), "board-001")
    assert not victim.connack.is_failure
    intruder = Session(deployed.board("board-000"), "board-001")
    assert not intruder.connack.is_failure
    time.sleep(1.0)
    assert victim.disconnects == 0 and victim.client.is_connected()
    # The intruder speaks as board-000 whatever id it asked for: board-001's topic is closed.
    assert intruder.publish("siren/v1/demo/update/board-001") == 135
    assert intruder.publish("siren/v1/demo/update/board-000") < 128
    for s in (victim, intruder):
        s.close()


def test_a_board_added_later_gets_in_after_a_reload_and_nobody_is_disconnected(
    deployed: Running,
) -> None:
    from coordinator.config import CoordinatorConfig
    from protocol.keys import AllowList

    first = Session(deployed.board("board-000"), "board-000")
    coord_config = CoordinatorConfig.load(deployed.root / "coordinator" / "coord.toml")
    coordinator = Session(coord_config.broker, "coordinator")
    assert main(["deploy", "add-board", str(deployed.root), "--count", "1"]) == 0
    newcomer = deployed.board("board-003")
    assert "board-003" in AllowList.load(deployed.root / "coordinator" / "allow-list.txt")
    assert CoordinatorConfig.load(deployed.root / "coordinator" / "coord.toml").clients == (
        "board-000", "board-001", "board-002", "board-003",
    )  # fmt: skip
    before = Session(newcomer, "board-003")
    assert before.connack.is_failure  # not yet reloaded
    before.client.loop_stop()
    deployed.reload()
    after = Session(newcomer, "board-003")
    assert not after.connack.is_failure
    assert after.publish("siren/v1/demo/update/board-003") < 128
    # The reload rewrote files Mosquitto reads: still owned so that it can read them, and
    # the existing sessions (a board, the coordinator) were not touched.
    assert first.disconnects == 0 and coordinator.disconnects == 0
    assert first.publish("siren/v1/demo/update/board-000") < 128
    again = Session(deployed.board("board-001"), "board-001")
    assert not again.connack.is_failure
    for s in (first, coordinator, after, again):
        s.close()


def test_mutual_tls_boards_connect_with_their_certificate_only(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorConfig

    port = free_port()
    root = tmp_path / "dep"
    _deploy(root, port, "--auth", "mtls")
    assert not (root / "boards" / "board-000" / "mqtt.password").exists()
    proc = _start(root, port)
    try:
        settings = Running(root, port, proc).board("board-000")
        board = Session(settings, "board-000")
        assert not board.connack.is_failure
        assert board.publish("siren/v1/demo/update/board-000") < 128
        assert board.publish("siren/v1/demo/update/board-001") == 135
        coordinator = Session(
            CoordinatorConfig.load(root / "coordinator" / "coord.toml").broker, "coordinator"
        )
        assert not coordinator.connack.is_failure
        # Without a client certificate the broker ends the TLS session: never a CONNACK.
        from protocol.mqtt import make_mqtt_client

        bare = make_mqtt_client(replace(settings, cert_file=None, key_file=None), "board-000")
        acks: list[Any] = []
        bare.on_connect = lambda c, u, f, rc, p: acks.append(rc)
        try:
            bare.connect(settings.host, settings.port, keepalive=5)
            for _ in range(30):
                bare.loop(timeout=0.1)
        except OSError:
            pass  # TLS 1.2: the handshake itself fails
        assert not any(not rc.is_failure for rc in acks) and not bare.is_connected()
        assert not any(rc.is_failure for rc in board.subscribe("siren/v1/demo/global"))
        delivered: list[bytes] = []
        board.client.on_message = lambda c, u, m: delivered.append(bytes(m.payload))
        assert coordinator.publish("siren/v1/demo/global", b"g1") < 128
        deadline = time.monotonic() + 10
        while not delivered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert delivered == [b"g1"]
        # Revoked under mTLS: Mosquitto 2.0 keeps a session whose certificate is still valid
        # open across the reload, with its old rights; revoke-board ends it by taking it over,
        # and from then on the board may neither read nor write any topic.
        assert main(["deploy", "revoke-board", str(root), "board-000"]) == 0
        deadline = time.monotonic() + 10
        while not board.disconnects and time.monotonic() < deadline:
            time.sleep(0.05)
        assert board.disconnects >= 1
        board.close()
        revoked = Session(settings, "board-000")
        after: list[bytes] = []
        revoked.client.on_message = lambda c, u, m: after.append(bytes(m.payload))
        revoked.subscribe("siren/v1/demo/global")
        assert coordinator.publish("siren/v1/demo/global", b"g2") < 128
        time.sleep(1.0)
        assert after == []  # the global model no longer reaches it
        assert revoked.publish("siren/v1/demo/update/board-000") == 135
        assert revoked.publish("siren/v1/demo/status/board-000") == 135
        for s in (revoked, coordinator):
            s.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_deployed_fleet_completes_its_run_over_tls(deployed: Running) -> None:
    """Coordinator and the three bundles, as deployed (commented configs, demo shards), run
    to the end; the coordinator exits with its summary line and every board with status 0."""
    from tests.integration.conftest import query, spawn, stop_process, wait_until

    root = deployed.root
    siren = [sys.executable, "-m", "siren_cli.main"]
    coord = spawn([*siren, "coordinator", "run", "--config", str(root / "coordinator" /
                   "coord.toml")], root / "coordinator.log")  # fmt: skip
    boards = []
    for b in ("board-000", "board-001", "board-002"):
        toml = root / "boards" / b / "board.toml"
        boards.append(spawn([*siren, "client", "run", "--config", str(toml)], root / f"{b}.log"))
    procs = [coord, *boards]
    try:
        wait_until(lambda: all(p.poll() is not None for p in procs), 180, "the run to finish")
    finally:
        for proc in procs:
            stop_process(proc)
    logs = {p.name: p.read_text() for p in root.glob("*.log")}
    assert [p.returncode for p in procs] == [0, 0, 0, 0], logs
    assert "run demo finished: 2 round(s)" in logs["coordinator.log"]
    db = root / "coordinator" / "coordinator.sqlite"
    assert query(db, "SELECT round, COUNT(*) FROM updates GROUP BY round") == [(1, 3), (2, 3)]
    # Each board's status carried its round's figures (sent before the update, so the last
    # round's too): its own process's memory and CPU times, no sensor this machine lacks.
    import json

    from edge_client.telemetry import read_thermal_zones, soc_zones

    rows = query(db, "SELECT client, round, figures FROM telemetry ORDER BY client, round")
    assert [(c, r) for c, r, _ in rows] == [
        (b, t) for b in ("board-000", "board-001", "board-002") for t in (1, 2)
    ]
    for _, _, text in rows:
        figures = json.loads(text)
        assert figures["train_s"] > 0 and figures["train_cpu_s"] > 0
        assert figures["rss_peak_mib"] > 100 and "process_boards" not in figures
        assert ("soc_temp_c" in figures) == bool(soc_zones(read_thermal_zones() or {}))
    # A finished board started again exits at once with status 0 (no crash loop).
    again = subprocess.run(
        [*siren, "client", "run", "--config", str(root / "boards" / "board-000" / "board.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert again.returncode == 0 and "is finished" in again.stdout


def test_files_stay_readable_by_the_mosquitto_account_across_rewrites_and_reloads() -> None:
    """As root with the broker's own account (Debian's 'mosquitto'): before the fix a rewrite
    by root left the password file root-owned 0600, and the next SIGHUP refused every client,
    the coordinator included."""
    import pwd
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root (Mosquitto switches from root to its account)")
    try:
        account = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no 'mosquitto' account")
    base = Path(tempfile.mkdtemp(prefix="siren-deploy-"))
    base.chmod(0o755)  # the account must be able to reach the broker folder
    try:
        root, port = base / "dep", free_port()
        argv = [
            *("deploy", "init", str(root), "--run", "demo", "--boards", "2", "--no-demo-data"),
            *("--broker-host", "127.0.0.1", "--broker-port", str(port), "--bind", "127.0.0.1"),
            *("--broker-user", "mosquitto"),
        ]
        assert main(argv) == 0
        for name in ("passwd", "acl", "server.key", "mosquitto.conf"):
            assert (root / "broker" / name).stat().st_uid == account.pw_uid, name
        proc = _start(root, port)
        try:
            running = Running(root, port, proc)
            assert main(["deploy", "add-board", str(root), "--id", "late-board"]) == 0
            assert (root / "broker" / "passwd").stat().st_uid == account.pw_uid
            running.reload()
            for board in ("board-000", "late-board"):
                session = Session(running.board(board), board)
                assert not session.connack.is_failure, board
                session.close()
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unreachable_or_untrusted_brokers_are_named_within_seconds(
    deployed: Running, tmp_path: Path
) -> None:
    """Before, a board with the wrong CA or host name printed nothing for minutes (the broker
    log said 'tlsv1 alert unknown ca'); the coordinator and `sim fleet` waited silently."""
    from coordinator.broker import generate_ca
    from protocol.mqtt import broker_problem
    from tests.integration.conftest import spawn, stop_process, wait_until

    good = deployed.board("board-000")
    assert broker_problem(good) is None
    _, other_ca = generate_ca(tmp_path / "other")
    cases = {
        "unknown CA": (replace(good, ca_file=other_ca), f"(CA file {other_ca})"),
        "host name": (replace(good, host="localhost"), "mismatch"),
        "closed port": (replace(good, port=free_port()), "Connection refused"),
        "no such host": (replace(good, host="nohost.invalid"), "cannot resolve"),
    }
    for name, (settings, expected) in cases.items():
        problem = broker_problem(settings, timeout=3.0)
        assert problem is not None and expected in problem, (name, problem)
    # The board program says so on stderr and keeps retrying (a service).
    toml = deployed.root / "boards" / "board-000" / "board.toml"
    text = toml.read_text().replace('host = "127.0.0.1"', 'host = "localhost"')
    toml.write_text(text)
    log = tmp_path / "board.log"
    proc = spawn([sys.executable, "-m", "siren_cli.main", "client", "run", "--config", str(toml)],
                 log)  # fmt: skip
    try:
        wait_until(lambda: "retrying in" in log.read_text(), 90, "the board's error line")
        assert "TLS handshake with localhost" in log.read_text()
        assert proc.poll() is None
    finally:
        stop_process(proc)


def test_revoking_a_board_mid_run_stops_it_and_disconnects_nobody_else(tmp_path: Path) -> None:
    """Live revocation: three boards in a run, the coordinator paused after round 1's updates;
    board-002 is revoked, the broker reloads, the run goes on with two boards, and board-002's
    round-1 update is dropped. Nobody else reconnected (each of them connected exactly once),
    board-002's log says why it is refused, and the round log verifies."""
    from tests.integration.conftest import query, spawn, stop_process, wait_until

    port, api = free_ports(2)
    root = tmp_path / "dep"
    _deploy(root, port, "--api-port", str(api), "--rounds", "3")
    broker = _start(root, port)
    siren = [sys.executable, "-m", "siren_cli.main"]
    db = root / "coordinator" / "coordinator.sqlite"
    coord = spawn([*siren, "coordinator", "run", "--config", str(root / "coordinator" /
                   "coord.toml")], root / "coordinator.log")  # fmt: skip
    boards = {}
    try:
        from deploy.folder import Paths, coordinator_api

        paths = Paths(root)
        wait_until(lambda: _api_up(paths), 120, "the coordinator's API")
        coordinator_api(paths, "POST", "/api/admin/pause")
        for b in ("board-000", "board-001", "board-002"):
            toml = root / "boards" / b / "board.toml"
            boards[b] = spawn([*siren, "client", "run", "--config", str(toml)], root / f"{b}.log")
        wait_until(lambda: len(query(db, "SELECT client FROM updates WHERE round=1")) == 3, 120,
                   "round 1's three updates")  # fmt: skip
        assert main(["deploy", "revoke-board", str(root), "board-002"]) == 0
        coordinator_api(paths, "POST", "/api/admin/resume")
        wait_until(lambda: coord.poll() is not None, 180, "the run to finish")
        assert coord.returncode == 0
        for b in ("board-000", "board-001"):
            boards[b].wait(60)
            assert boards[b].returncode == 0
        assert boards["board-002"].poll() is None  # refused by the broker, still retrying
        wait_until(
            lambda: "credentials were revoked or replaced" in (root / "board-002.log").read_text(),
            90,
            "board-002 to say why the broker refuses it",
        )
    finally:
        for proc in (coord, *boards.values()):
            stop_process(proc)
        broker.terminate()
        broker.wait(10)
    rounds = query(db, "SELECT round, client FROM updates ORDER BY round, client")
    # board-002's round-1 update, admitted before the revocation, is not aggregated either
    assert [c for r, c in rounds if r == 1] == ["board-000", "board-001"]
    assert [c for r, c in rounds if r > 1] == ["board-000", "board-001"] * 2
    assert ("board-002", "quarantined") in query(
        db, "SELECT client, reason FROM rejections WHERE round = 1"
    )
    log = (root / "broker" / "mosquitto.log").read_text()
    for client in ("board-000", "board-001", "coordinator"):
        assert log.count(f" as {client} (") == 1, (client, log)  # one CONNECT, never again
    assert "Client board-002 disconnected" in log or "board-002" in log
    assert main(["audit", "verify", str(db)]) == 0
    from coordinator.store import CoordinatorStore

    store = CoordinatorStore(db)
    actions = [json.loads(e[0])["body"].get("action") for e in store.audit_entries()]
    store.close()
    assert "revoke" in actions and actions.count(None) == 3  # three closed rounds


def _api_up(paths: Any) -> bool:
    from deploy.errors import DeployError
    from deploy.folder import coordinator_api

    try:
        coordinator_api(paths, "POST", "/api/admin/resume")
    except DeployError:  # not listening yet, or 503 while the service starts
        return False
    return True
