"""``siren keys`` commands, run through the real ``siren`` entry point."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from protocol.keys import AllowList, key_fingerprint, load_signing_key, load_verify_key
from siren_cli.main import main


def test_generate_writes_private_key_0600_and_never_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "board-1"
    assert main(["keys", "generate", "--out", str(out), "--client-id", "board-1"]) == 0
    captured = capsys.readouterr()
    private = load_signing_key(out)
    assert stat.S_IMODE((out / "private.key").stat().st_mode) == 0o600
    assert bytes(private).hex() not in captured.out + captured.err
    assert key_fingerprint(private.verify_key) in captured.out
    assert (out / "client_id").read_text().strip() == "board-1"


def test_generate_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "private.key").read_text()
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "private.key").read_text() == before
    assert main(["keys", "generate", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "private.key").read_text() != before


def test_generate_over_a_key_pair_names_the_option_that_replaces_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{tmp_path / 'private.key'} already exists; pass --force to replace" in err


def test_register_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allow = tmp_path / "allow.txt"
    board = tmp_path / "b1"
    assert main(["keys", "generate", "--out", str(board)]) == 0
    key = load_verify_key(board)
    assert (
        main(
            [
                "keys",
                "register",
                "--allow-list",
                str(allow),
                "--client-id",
                "b1",
                "--public-key",
                str(board / "public.key"),
            ]
        )
        == 0
    )
    assert AllowList.load(allow)["b1"] == key
    # Registering by hex is equivalent and idempotent.
    capsys.readouterr()
    args = [
        "keys",
        "register",
        "--allow-list",
        str(allow),
        "--client-id",
        "b1",
        "--public-key",
        bytes(key).hex(),
    ]
    assert main(args) == 0
    assert "already registered" in capsys.readouterr().out

    assert main(["keys", "list", "--allow-list", str(allow)]) == 0
    assert capsys.readouterr().out.strip() == f"b1 {key_fingerprint(key)}"

    assert main(["keys", "revoke", "--allow-list", str(allow), "--client-id", "b1"]) == 0
    assert len(AllowList.load(allow)) == 0


def test_register_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allow = tmp_path / "allow.txt"
    code = main(
        [
            "keys",
            "register",
            "--allow-list",
            str(allow),
            "--client-id",
            "b1",
            "--public-key",
            "beef",
        ]
    )
    assert code == 2
    assert "neither an existing key file nor 64 hex digits" in capsys.readouterr().err
    assert not allow.exists()
    assert main(["keys", "revoke", "--allow-list", str(allow), "--client-id", "b1"]) == 2


def test_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path), "--client-id", "c7"]) == 0
    capsys.readouterr()
    assert main(["keys", "show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    key = load_verify_key(tmp_path)
    assert "c7" in out
    assert bytes(key).hex() in out
    assert key_fingerprint(key) in out
    assert bytes(load_signing_key(tmp_path)).hex() not in out
    assert main(["keys", "show", str(tmp_path / "missing")]) == 2


def test_group_without_action_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys"]) == 2
    assert "generate" in capsys.readouterr().out
