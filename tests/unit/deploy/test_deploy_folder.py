"""``siren deploy init`` / ``add-board`` on disk: what is written, with which modes, what is
refused, and the lean board wheel."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deploy.folder import Deployment, unreachable_for
from deploy.wheel import BOARD_PACKAGES, NOT_ON_BOARDS, build_board_wheel
from siren_cli.main import main


def _init(root: Path, *extra: str) -> int:
    return main(
        [
            *("deploy", "init", str(root), "--run", "demo", "--boards", "2"),
            *("--broker-host", "broker.lan", "--hostname", "10.0.0.5", "--broker-user", ""),
            *extra,
        ]
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_complete_folder_with_private_files_private(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorConfig
    from edge_client.config import BoardConfig
    from protocol.keys import AllowList

    root = tmp_path / "dep"
    assert _init(root, "--no-demo-data") == 0
    deployment = Deployment.load(root)
    assert deployment.boards == ("board-000", "board-001") and deployment.auth == "password"
    for secret in (
        "ca/ca.key",
        "broker/passwd",
        "broker/server.key",
        "coordinator/mqtt.password",
        "boards/board-000/keys/private.key",
        "boards/board-000/mqtt.password",
    ):
        assert _mode(root / secret) == 0o600, secret  # fmt: skip
    coord = CoordinatorConfig.load(root / "coordinator" / "coord.toml")
    assert coord.clients == ("board-000", "board-001") and coord.aggregator.name == "siren"
    assert coord.broker.tls and coord.broker.password
    assert sorted(AllowList.load(coord.allow_list)) == ["board-000", "board-001"]
    board = BoardConfig.load(root / "boards" / "board-001" / "board.toml")
    assert board.broker.host == "broker.lan" and board.broker.ca_file is not None
    assert board.broker.ca_file.read_text() == (root / "ca" / "ca.crt").read_text()
    assert board.index == 1 and board.data.source == "npz"
    assert "# MQTT user" in (root / "boards" / "board-001" / "board.toml").read_text()
    acl = (root / "broker" / "acl").read_text().splitlines()
    assert "topic write siren/v1/demo/update/board-001" in acl
    assert not any(line.startswith("pattern") for line in acl)
    conf = (root / "broker" / "mosquitto.conf").read_text()
    assert conf.index("listener ") < conf.index("use_username_as_clientid")
    san = subprocess.run(
        ["openssl", "x509", "-in", str(root / "broker" / "server.crt"), "-noout", "-ext",
         "subjectAltName"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "DNS:broker.lan" in san and "IP Address:10.0.0.5" in san
    readme = (root / "README.md").read_text()
    assert "mosquitto -c" in readme and "siren coordinator run --config" in readme
    assert "install.sh" in readme and "siren deploy add-board" in readme


def test_init_never_replaces_keys_without_force(tmp_path: Path, capsys) -> None:
    root = tmp_path / "dep"
    assert _init(root, "--no-demo-data") == 0
    key = (root / "coordinator" / "keys" / "private.key").read_text()
    assert _init(root, "--no-demo-data") == 2
    assert "already holds a deployment" in capsys.readouterr().err
    assert (root / "coordinator" / "keys" / "private.key").read_text() == key
    assert _init(root, "--no-demo-data", "--force") == 0
    assert (root / "coordinator" / "keys" / "private.key").read_text() != key


def test_demo_data_gives_each_bundle_its_shard(tmp_path: Path) -> None:
    import numpy as np

    root = tmp_path / "dep"
    assert _init(root) == 0
    sizes = []
    for board in ("board-000", "board-001"):
        with np.load(root / "boards" / board / "data.npz") as data:
            assert set(data.files) == {"x_train", "y_train", "x_test", "y_test"}
            sizes.append(len(data["y_train"]))
    assert min(sizes) > 500  # digits' 1,797 images minus the root set, over two boards


def test_add_board_keeps_existing_credentials_and_lists_the_new_board(tmp_path: Path) -> None:
    root = tmp_path / "dep"
    assert _init(root, "--no-demo-data") == 0
    passwd = (root / "broker" / "passwd").read_text().splitlines()
    assert main(["deploy", "add-board", str(root), "--count", "2"]) == 0
    after = (root / "broker" / "passwd").read_text().splitlines()
    assert set(passwd) <= set(after)  # the old lines (hashes) are kept byte for byte
    assert {line.split(":")[0] for line in after} == {
        "coordinator", "board-000", "board-001", "board-002", "board-003",
    }  # fmt: skip
    assert Deployment.load(root).boards[-2:] == ("board-002", "board-003")
    assert main(["deploy", "add-board", str(root), "--id", "board-000"]) == 2


def test_litert_deployment_builds_the_artifact_once_and_every_bundle_carries_it(
    tmp_path: Path,
) -> None:
    from edge_client.config import BoardConfig
    from models.litert_artifact import ARTIFACT_FILE, TrainingArtifact

    root = tmp_path / "dep"
    assert _init(root, "--no-demo-data", "--train-backend", "litert") == 0
    assert Deployment.load(root).train_backend == "litert"
    built = root / "dist" / ARTIFACT_FILE
    assert TrainingArtifact.load(built).model == "digits-mlp"
    made = built.stat().st_mtime_ns
    assert main(["deploy", "add-board", str(root), "--count", "1"]) == 0
    assert built.stat().st_mtime_ns == made  # reused, not rebuilt
    for board in ("board-000", "board-001", "board-002"):
        bundle = root / "boards" / board
        config = BoardConfig.load(bundle / "board.toml")
        assert config.training.backend == "litert"
        assert config.training.artifact == (bundle / ARTIFACT_FILE).resolve()
        assert (bundle / ARTIFACT_FILE).read_bytes() == built.read_bytes()
        assert "tensorflow" not in (bundle / "requirements-board.txt").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run", "bad run"], "invalid run id"),
        (["--auth", "kerberos"], "invalid choice"),
        (["--broker-port", "70000"], "broker-port must be in 1..65535"),
        (["--boards", "0"], "at least one board"),
        (["--hostname", "a b"], "--hostname 'a b' is neither a host name"),
        (["--bind", "999.1.1.1"], "--bind '999.1.1.1' is neither"),
        (["--api-port", "8883"], "--api-port and --broker-port are both 8883"),
        (["--round-timeout", "-5"], "--round-timeout must be >= 0 seconds"),
        (["--aggregator", "nosuch"], "unknown aggregator 'nosuch'; valid:"),
        (["--coordinator-user", "nosuchuser"], "no account 'nosuchuser' for the coordinator"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message) -> None:
    base = ["deploy", "init", str(tmp_path / "dep"), "--run", "demo", "--boards", "2",
            "--broker-host", "h", "--no-demo-data"]  # fmt: skip
    if "choice" in message:  # argparse's own error
        with pytest.raises(SystemExit):
            main([*base, *argv])
    else:
        assert main([*base, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "dep").exists()


def test_unreachable_folders_are_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    (private / "broker").mkdir(parents=True)
    private.chmod(0o700)
    nobody = (65534, 65534)
    blocked = unreachable_for(private / "broker", nobody)
    assert blocked is not None and (private / "broker").resolve().is_relative_to(blocked)
    assert unreachable_for(private / "broker", (os.geteuid(), os.getegid())) is None


def test_board_wheel_holds_only_the_board_packages_and_imports_without_the_rest(
    tmp_path: Path,
) -> None:
    wheel = build_board_wheel(tmp_path)
    assert wheel.read_bytes() == build_board_wheel(tmp_path / "again").read_bytes()
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        meta = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
        entry = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt")))
    assert {t for t in tops if not t.endswith(".dist-info")} == {*BOARD_PACKAGES, "benchmarks"}
    with zipfile.ZipFile(wheel) as zf:
        benches = sorted(n for n in zf.namelist() if n.startswith("benchmarks/"))
    assert benches == [
        "benchmarks/__init__.py",
        "benchmarks/alarm.py",
        "benchmarks/board_backends.py",
        "benchmarks/board_data.py",
        "benchmarks/cli.py",
    ]
    assert "siren = siren_cli.main:main" in entry.decode()
    assert "Requires-Dist: paho-mqtt" in meta and "scikit-learn" not in meta
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(target), str(wheel)], check=True,
    )  # fmt: skip
    # The board program from the wheel alone: no coordinator, simulator or desktop library.
    # `python -S` skips site-packages' .pth files (this project's editable install) and `-E` a
    # PYTHONPATH naming a source tree, so only the wheel's packages and the third-party libraries
    # are importable.
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{str(target)!r}, {site!r}]; "
        "import importlib.util as u; "
        "assert u.find_spec('coordinator') is None and u.find_spec('firmware_sim') is None; "
        "import edge_client.client, edge_client.cli, siren_cli.main as m; "
        "import benchmarks.alarm, benchmarks.board_backends; "
        "parser = m.build_parser(); "
        "names = set(parser._subparsers._group_actions[0].choices); "
        "assert names == {'client', 'keys', 'bench'}, names; "
        f"bad = [n for n in {list(NOT_ON_BOARDS)!r} if n in sys.modules]; "
        "assert not bad, bad; print('ok')"
    )
    # Without PYTHONPATH either: a source checkout on it would bring the other packages back.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert out.stdout.strip() == "ok", out.stderr


def _fake_run(root: Path, finished: bool) -> None:
    import sqlite3

    with sqlite3.connect(root / "coordinator" / "coordinator.sqlite") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('run', 'demo')")
        if finished:
            db.execute("INSERT INTO meta VALUES ('finished', '1')")


def test_a_run_in_progress_without_its_coordinator_changes_nothing(tmp_path: Path, capsys) -> None:
    from coordinator.broker import read_passwd

    root = tmp_path / "dep"
    assert _init(root, "--no-demo-data", "--api-port", "1") == 0
    _fake_run(root, finished=False)
    key = (root / "boards" / "board-001" / "keys" / "private.key").read_text()
    passwd = (root / "broker" / "passwd").read_text()
    allow = (root / "coordinator" / "allow-list.txt").read_text()
    for command in ("rotate-board", "revoke-board", "readmit-board"):
        assert main(["deploy", command, str(root), "board-001"]) == 2
        assert "nothing was changed" in capsys.readouterr().err or command == "readmit-board"
    assert (root / "boards" / "board-001" / "keys" / "private.key").read_text() == key
    assert (root / "broker" / "passwd").read_text() == passwd
    assert (root / "coordinator" / "allow-list.txt").read_text() == allow
    assert not list((root / "boards").glob(".renew-*"))
    assert "board-001" in read_passwd(root / "broker" / "passwd")


def test_after_the_run_the_files_change_without_a_coordinator(tmp_path: Path) -> None:
    from protocol.keys import AllowList

    root = tmp_path / "dep"
    assert _init(root, "--no-demo-data", "--api-port", "1") == 0
    _fake_run(root, finished=True)
    assert main(["deploy", "revoke-board", str(root), "board-000"]) == 0
    assert "board-000" not in AllowList.load(root / "coordinator" / "allow-list.txt")


def test_a_deployment_path_that_is_a_file_is_one_line(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target in (afile, afile / "sub"):
        assert _init(target, "--no-demo-data") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "siren: error:" in err, err


def test_force_keeps_the_run_aside_and_refuses_while_the_broker_runs(
    tmp_path: Path, capsys
) -> None:
    root = tmp_path / "dep"
    assert _init(root, "--no-demo-data") == 0
    db = root / "coordinator" / "coordinator.sqlite"
    db.write_bytes(b"the run's rounds and round log")
    conf = str((root / "broker" / "mosquitto.conf").resolve())
    # a process started with this deployment's broker configuration (as `mosquitto -c`)
    broker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-c", conf])
    try:
        assert _init(root, "--no-demo-data", "--force") == 2
        assert "is in use: broker (pid" in capsys.readouterr().err
        assert db.read_bytes() == b"the run's rounds and round log"
    finally:
        broker.kill()
        broker.wait()
    assert _init(root, "--no-demo-data", "--force") == 0
    assert "kept in" in capsys.readouterr().out
    kept = list((root / "archive").glob("demo-*/coordinator.sqlite"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"the run's rounds and round log"
    assert not db.exists()


def test_a_broker_that_is_not_running_is_explained_from_its_log(tmp_path: Path) -> None:
    from deploy.checks import check_broker

    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 8883 127.0.0.1\n")
    (tmp_path / "mosquitto.log").write_text(
        "1733400000: mosquitto version 2.0.11 starting\n"
        "1733400000: Opening ipv4 listen socket on port 8883.\n"
        "1733400000: Error: Address already in use\n"
    )
    findings = check_broker(conf, "127.0.0.1", 8883, tmp_path / "ca.crt", pids=[])
    assert len(findings) == 1 and not findings[0].ok
    assert "ends with: 1733400000: Error: Address already in use" in findings[0].what


def test_only_processes_started_with_the_configuration_are_found(tmp_path: Path) -> None:
    from deploy.checks import processes_with_argument

    conf = tmp_path / "broker" / "mosquitto.conf"
    conf.parent.mkdir()
    conf.write_text("listener 8883\n")
    sleep = "import time; time.sleep(30)"
    started = [
        subprocess.Popen(
            [sys.executable, "-c", sleep, "-c", "broker/mosquitto.conf"], cwd=tmp_path
        ),
        subprocess.Popen([sys.executable, "-c", sleep, "--config", str(conf)]),
    ]
    viewer = subprocess.Popen([sys.executable, "-c", sleep, str(conf)])  # like `tail -f conf`
    try:
        import time

        time.sleep(0.3)
        assert processes_with_argument(str(conf)) == sorted(p.pid for p in started)
    finally:
        for proc in (*started, viewer):
            proc.kill()
            proc.wait()


def test_host_names_with_underscores_and_wildcards_are_accepted(tmp_path: Path) -> None:
    assert _init(tmp_path / "dep", "--no-demo-data", "--hostname", "*.example.com",
                 "--coordinator-host", "proj_broker_1") == 0  # fmt: skip
    loaded = Deployment.load(tmp_path / "dep")
    assert loaded.hostnames[-1] == "*.example.com" and loaded.coordinator_host == "proj_broker_1"
