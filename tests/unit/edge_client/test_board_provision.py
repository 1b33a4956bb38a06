"""Provisioned board bundles: keys, pinned coordinator key, TLS config, service unit."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from edge_client.config import BoardConfig
from edge_client.provision import ProvisionError, provision_board
from protocol.keys import AllowList, load_signing_key, load_verify_key, save_key_pair


def _provision(tmp_path: Path, **kw):
    coordinator = SigningKey(b"q" * 32)
    save_key_pair(tmp_path / "coord", coordinator, overwrite=True)
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    return coordinator, provision_board(
        tmp_path / "bundle",
        client_id="board-003",
        run="demo",
        index=3,
        broker_host="broker.lan",
        coordinator_key=tmp_path / "coord",
        ca_cert=tmp_path / "ca.crt",
        allow_list=tmp_path / "allow.txt",
        rounds=20,
        **kw,
    )


def test_bundle_holds_everything_a_board_needs(tmp_path: Path) -> None:
    coordinator, bundle = _provision(tmp_path)
    root = bundle.directory
    config = BoardConfig.load(bundle.config)
    assert config.client_id == "board-003" and config.index == 3 and config.rounds == 20
    assert config.broker.tls and config.broker.port == 8883
    assert config.broker.username == "board-003"
    assert config.broker.password == (root / "mqtt.password").read_text().strip()
    assert config.broker.ca_file == (root / "ca.crt").resolve()
    assert config.data.source == "npz"
    assert bytes(load_verify_key(config.coordinator_key)) == bytes(coordinator.verify_key)
    key = load_signing_key(config.key_dir)
    assert stat.S_IMODE((root / "keys" / "private.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "mqtt.password").stat().st_mode) == 0o600
    allow = AllowList.load(tmp_path / "allow.txt")
    assert bytes(allow["board-003"]) == bytes(key.verify_key)
    unit = bundle.service.read_text()
    assert "ExecStart=/opt/siren/venv/bin/siren client run --config " in unit
    assert "/opt/siren/board-003/board.toml" in unit
    # A finished run (exit 0) or an unusable configuration (exit 2) is not restarted.
    assert "Restart=on-failure" in unit and "RestartPreventExitStatus=2" in unit
    assert "ReadWritePaths=/opt/siren/board-003/state" in unit and (root / "state").is_dir()
    assert (root / "install.sh").stat().st_mode & 0o111
    assert "tensorflow" in (root / "requirements-board.txt").read_text()
    setup = bundle.setup.read_text()
    assert "Raspberry Pi OS 64-bit" in setup and "JetPack" in setup
    assert "ai-edge-litert" in setup and "tensorflow" in setup
    toml = (root / "board.toml").read_text()
    assert (root / "keys" / "private.key").read_text().strip() not in toml
    assert config.broker.password not in toml


def test_existing_bundle_is_not_overwritten_without_force(tmp_path: Path) -> None:
    _, first = _provision(tmp_path)
    key = (first.directory / "keys" / "private.key").read_text()
    with pytest.raises(ProvisionError, match="already holds a board key"):
        _provision(tmp_path)
    assert (first.directory / "keys" / "private.key").read_text() == key
    _, second = _provision(tmp_path, force=True)
    assert (second.directory / "keys" / "private.key").read_text() != key
    allow = AllowList.load(tmp_path / "allow.txt")
    assert bytes(allow["board-003"]) == bytes(
        load_signing_key(second.directory / "keys").verify_key
    )


def test_a_bundle_without_the_brokers_ca_is_refused(tmp_path: Path) -> None:
    # Made before the CA existed, the board would fail its TLS handshake silently.
    save_key_pair(tmp_path / "coord", SigningKey(b"q" * 32), overwrite=True)
    with pytest.raises(ProvisionError, match="needs the broker's CA certificate"):
        provision_board(
            tmp_path / "bundle", client_id="b1", run="demo", index=0, broker_host="h",
            coordinator_key=tmp_path / "coord",
        )  # fmt: skip
    assert not (tmp_path / "bundle").exists()
    bundle = provision_board(
        tmp_path / "bundle", client_id="b1", run="demo", index=0, broker_host="h",
        coordinator_key=tmp_path / "coord", system_ca=True,
    )  # fmt: skip
    assert BoardConfig.load(bundle.config).broker.ca_file is None


def test_mutual_tls_bundle_carries_the_client_certificate_and_no_password(tmp_path: Path) -> None:
    (tmp_path / "c.crt").write_text("cert")
    (tmp_path / "c.key").write_text("key")
    _, bundle = _provision(tmp_path, client_cert=(tmp_path / "c.crt", tmp_path / "c.key"))
    config = BoardConfig.load(bundle.config)
    assert config.broker.cert_file == (bundle.directory / "client.crt").resolve()
    assert config.broker.key_file == (bundle.directory / "client.key").resolve()
    assert config.broker.password is None and not (bundle.directory / "mqtt.password").exists()
    assert stat.S_IMODE((bundle.directory / "client.key").stat().st_mode) == 0o600


def test_install_script_places_the_bundle_idempotently_and_the_unit_verifies(
    tmp_path: Path,
) -> None:
    """install.sh as root into a scratch placement (service user root, venv linked to this
    project's): files, state folder and modes are right, a second run changes nothing, and
    systemd-analyze accepts the installed unit."""
    import os
    import shutil
    import subprocess
    import sys

    from edge_client.provision import Placement

    if os.geteuid() != 0:
        pytest.skip("install.sh runs as root")
    place = Placement(str(tmp_path / "opt"), "root", str(tmp_path / "venv"))
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "siren").symlink_to(Path(sys.executable).parent / "siren")
    _, bundle = _provision(tmp_path, place=place)
    home = tmp_path / "opt" / "board-003"
    for _ in range(2):
        done = subprocess.run(
            ["sh", str(bundle.install), "--no-systemd", "--no-venv"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "runuser -u root" in done.stdout
    assert (home / "state").is_dir() and stat.S_IMODE((home / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "keys" / "private.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "mqtt.password").stat().st_mode) == 0o600
    assert BoardConfig.load(home / "board.toml").client_id == "board-003"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze (Debian package systemd) is not installed")
    unit = home / "siren-board-board-003.service"
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def test_provision_command_writes_the_siren_profile(tmp_path: Path) -> None:
    from siren_cli.main import main

    coordinator = SigningKey(b"p" * 32)
    save_key_pair(tmp_path / "coord", coordinator, overwrite=True)
    base = ["client", "provision", "--run", "demo", "--broker-host", "broker.lan", "--system-ca",
            "--coordinator-key", str(tmp_path / "coord"), "--dataset", "digits"]  # fmt: skip
    out = tmp_path / "b1"
    assert main([*base, "--client-id", "b1", "--out", str(out)]) == 0
    default = BoardConfig.load(out / "board.toml")
    assert (default.alarm.profile, default.alarm.rule) == ("authors", "relative")
    out = tmp_path / "b2"
    argv = [*base, "--client-id", "b2", "--out", str(out), "--siren-profile", "paper-text"]
    assert main(argv) == 0
    printed = BoardConfig.load(out / "board.toml")
    assert (printed.alarm.profile, printed.alarm.rule) == ("paper-text", "paper")
