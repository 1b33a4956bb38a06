"""Deployment broker files: Mosquitto password hashes, ACL patterns, file modes."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from coordinator.broker import (
    BrokerConfigError,
    TlsFiles,
    acl_text,
    hash_password,
    read_bundle_credentials,
    verify_password,
    write_broker_config,
)

# Written by Mosquitto 2.0.11's own `mosquitto_passwd -b pw alice secret`.
MOSQUITTO_LINE = (
    "$7$101$vMP3vReQQTHpX8vV$9wOFW+TEkn7mLwMIjwv++zJa0L+SOJ5NWUvadnUeX8ItZr7pO2Kr63l9d1qStbnf"
    "mBOFKnochvgCuvejVs5XrQ=="
)


def test_hash_matches_mosquitto_passwd_for_the_same_salt() -> None:
    salt = base64.b64decode("vMP3vReQQTHpX8vV")
    assert hash_password("secret", salt=salt) == MOSQUITTO_LINE
    assert verify_password("secret", MOSQUITTO_LINE)
    assert not verify_password("Secret", MOSQUITTO_LINE)


def test_fresh_hashes_use_random_salts() -> None:
    a, b = hash_password("pw"), hash_password("pw")
    assert a != b and a.startswith("$7$101$")
    assert verify_password("pw", a) and verify_password("pw", b)


def test_acl_lets_boards_write_only_their_own_topics() -> None:
    lines = acl_text("demo").splitlines()
    assert "pattern write siren/v1/demo/update/%u" in lines
    assert "pattern readwrite siren/v1/demo/status/%u" in lines
    assert "pattern read siren/v1/demo/global" in lines
    writers_of_global = [
        line for line in lines if line.endswith("/global") and "write" in line.split()[1]
    ]
    assert writers_of_global == ["topic readwrite siren/v1/demo/global"]
    # ... and that line belongs to the coordinator's block.
    assert lines.index("user coordinator") < lines.index(writers_of_global[0])
    with pytest.raises(BrokerConfigError):
        acl_text("bad/run")


def _tls(tmp_path: Path) -> TlsFiles:
    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("x")
    return TlsFiles(tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key")


def test_a_bad_name_says_which_one_and_what_is_allowed() -> None:
    allowed = "expected 1-64 characters from [A-Za-z0-9_.-] starting with a letter or digit"
    with pytest.raises(BrokerConfigError) as bad_user:
        acl_text("demo", "bad user!")
    assert str(bad_user.value) == f"invalid coordinator user 'bad user!': {allowed}"
    with pytest.raises(BrokerConfigError) as bad_run:
        acl_text("-demo", "coordinator")
    assert str(bad_run.value) == f"invalid run id '-demo': {allowed}"
    with pytest.raises(BrokerConfigError) as bad_board:
        acl_text("demo", boards=["board 1"])
    assert str(bad_board.value) == f"invalid board user 'board 1': {allowed}"
    with pytest.raises(BrokerConfigError, match="is the coordinator's user name"):
        acl_text("demo", boards=["coordinator"])


def test_written_files_and_kept_coordinator_password(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    files = write_broker_config(
        out, run="demo", tls=_tls(tmp_path), port=9883, boards={"b1": "pw1"}
    )
    assert files.users == ("b1", "coordinator")
    assert stat.S_IMODE(files.passwd.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.coordinator_password.stat().st_mode) == 0o600
    conf = files.conf.read_text().splitlines()
    assert "allow_anonymous false" in conf and "listener 9883 0.0.0.0" in conf
    assert "use_username_as_clientid true" in conf
    assert not any(line.startswith("listener 1883") for line in conf)
    entries = dict(line.split(":", 1) for line in files.passwd.read_text().splitlines())
    assert verify_password("pw1", entries["b1"])
    first = files.coordinator_password.read_text()
    again = write_broker_config(out, run="demo", tls=_tls(tmp_path))
    assert again.coordinator_password.read_text() == first
    with pytest.raises(BrokerConfigError, match="may not be called"):
        write_broker_config(out, run="demo", tls=_tls(tmp_path), boards={"coordinator": "x"})
    with pytest.raises(BrokerConfigError, match="does not exist"):
        write_broker_config(
            out, run="demo", tls=TlsFiles(tmp_path / "no", tmp_path / "no", tmp_path / "no")
        )


def test_bundle_credentials_are_read_per_client_id(tmp_path: Path) -> None:
    for cid, pw in (("board-1", "aa"), ("board-2", "bb")):
        (tmp_path / cid / "keys").mkdir(parents=True)
        (tmp_path / cid / "keys" / "client_id").write_text(cid + "\n")
        (tmp_path / cid / "mqtt.password").write_text(pw + "\n")
    assert read_bundle_credentials(tmp_path) == {"board-1": "aa", "board-2": "bb"}
