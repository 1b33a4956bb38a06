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
    assert "/opt/siren/board-003/board.toml" in unit and "Restart=always" in unit
    setup = bundle.setup.read_text()
    assert "Raspberry Pi OS 64-bit" in setup and "JetPack" in setup
    assert "ai-edge-litert" in setup and "tensorflow" in setup
    assert "private" not in (root / "board.toml").read_text().lower()


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


def test_provision_command_writes_the_siren_profile(tmp_path: Path) -> None:
    from siren_cli.main import main

    coordinator = SigningKey(b"p" * 32)
    save_key_pair(tmp_path / "coord", coordinator, overwrite=True)
    base = ["client", "provision", "--run", "demo", "--broker-host", "broker.lan",
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
