"""The tamper-evident round log on a real store: the engine logs the run's start, every closed
round and every operator action; the chain verifies with the coordinator's public key alone, and
one flipped byte anywhere is pinned to its record."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from coordinator.audit import canonical_bytes, make_entry, verify_chain
from protocol.keys import save_verify_key
from siren_cli.main import main
from tests.unit.coordinator.test_coord_engine import BOARDS, COORD, _engine, _update


def _two_rounds(tmp_path: Path):
    engine = _engine(tmp_path, rounds=2)
    engine.start()
    for delta in ([1, 0, 0, 0], [0, 1, 0, 0]):
        for client in BOARDS:
            assert engine.handle_update(_update(engine, client, delta, 2)).accepted
        engine.handle_update(b"garbage")  # one refusal per round, counted in the record
        if engine.round == 1:
            engine.set_banned("b2", True)
            engine.set_banned("b2", False)
        assert engine.close_round() is not None
    engine.store.close()
    return engine


def test_the_engine_logs_start_rounds_and_operator_actions(tmp_path: Path) -> None:
    engine = _two_rounds(tmp_path)
    from coordinator.store import CoordinatorStore

    store = CoordinatorStore(engine.config.db)
    entries = store.audit_entries()
    report = verify_chain(entries, COORD.verify_key, run="demo")
    assert report.ok and report.records == 5, report
    kinds = [json.loads(e[0])["kind"] for e in entries]
    assert kinds == ["keys", "operator", "operator", "round", "round"]
    start, ban, _, first, second = (json.loads(e[0])["body"] for e in entries)
    assert sorted(start["keys"]) == ["b0", "b1", "b2"] and ban["action"] == "ban"
    assert first["round"] == 1 and set(first["updates"]) == {"b0", "b1", "b2"}
    assert first["global_before"] == start["global_after"]
    assert second["global_before"] == first["global_after"]
    assert first["refused"] == {"malformed": 1}
    assert first["verdicts"]["b0"] == {"kept": True, "weight": pytest.approx(1 / 3)}
    # The logged update digests are the SHA-256 of the exact messages the boards signed.
    assert first["updates"] == {c: d for c, d in sorted(store.update_digests(1).items())}
    store.close()


def _flip(db: Path, seq: int, offset: int) -> None:
    with sqlite3.connect(db) as conn:
        (blob,) = conn.execute("SELECT record FROM audit WHERE seq = ?", (seq,)).fetchone()
        data = bytearray(blob)
        data[offset] ^= 0x01
        conn.execute("UPDATE audit SET record = ? WHERE seq = ?", (bytes(data), seq))


@pytest.mark.parametrize("seq", [0, 3, 4])
def test_one_flipped_byte_is_pinned_to_its_record(tmp_path: Path, capsys, seq: int) -> None:
    engine = _two_rounds(tmp_path)
    key_file = tmp_path / "coordinator.pub"
    save_verify_key(key_file, COORD.verify_key)
    db = engine.config.db
    assert main(["audit", "verify", str(db), "--key", str(key_file)]) == 0
    assert "ok: 5 record(s)" in capsys.readouterr().out
    length = len(sqlite3.connect(db).execute("SELECT record FROM audit WHERE seq = ?",
                                              (seq,)).fetchone()[0])  # fmt: skip
    for offset in np.random.default_rng(seq).choice(length, 5, replace=False):
        _flip(db, seq, int(offset))
        assert main(["audit", "verify", str(db), "--key", str(key_file)]) == 1
        out = capsys.readouterr().out
        assert f"FAILED after {seq} good record(s): record {seq} (line {seq + 1}" in out, out
        _flip(db, seq, int(offset))  # restore
    assert main(["audit", "verify", str(db), "--key", str(key_file)]) == 0


def test_exported_logs_verify_and_edits_to_them_are_found(tmp_path: Path, capsys) -> None:
    engine = _two_rounds(tmp_path)
    save_verify_key(tmp_path / "public.key", COORD.verify_key)
    log = tmp_path / "audit.jsonl"
    assert main(["audit", "export", str(engine.config.db), "--out", str(log)]) == 0
    assert main(["audit", "verify", str(log)]) == 0  # public.key next to the log
    lines = log.read_text().splitlines()
    # Dropping a record breaks the sequence where it was.
    (tmp_path / "cut.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert main(["audit", "verify", str(tmp_path / "cut.jsonl"), "--key",
                 str(tmp_path / "public.key")]) == 1  # fmt: skip
    assert "record 2 (line 3: round, round 1, claims seq 3)" in capsys.readouterr().out
    # A record re-signed by anyone else does not verify.
    forged = json.loads(lines[4])
    record = json.loads(forged["record"])
    record["body"]["verdicts"]["b2"]["kept"] = False
    entry = make_entry(SigningKey(b"x" * 32), seq=4, prev=record["prev"], run="demo",
                       kind="round", at_ms=record["at_ms"], body=record["body"])  # fmt: skip
    (tmp_path / "forged.jsonl").write_text("\n".join([*lines[:4], entry.to_json()]) + "\n")
    assert main(["audit", "verify", str(tmp_path / "forged.jsonl"), "--key",
                 str(tmp_path / "public.key")]) == 1  # fmt: skip
    assert "record 4 (line 5: round, round 2): the signature does not verify" in (
        capsys.readouterr().out
    )


def test_records_refuse_values_json_cannot_hold_exactly() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        canonical_bytes({"x": float("nan")})
    with pytest.raises(ValueError, match="cannot be logged"):
        canonical_bytes({"x": object()})


def test_a_folder_without_a_round_log_says_which_runs_have_one(tmp_path: Path, capsys) -> None:
    (tmp_path / "history.json").write_text("{}")  # as `siren sim run` leaves a folder
    assert main(["audit", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no coordinator database" in err and "`siren sim run`" in err
