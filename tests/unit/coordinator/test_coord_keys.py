"""Key lifecycle on the live engine: revoke stops a board at once (its updates count as
``revoked``, rounds stop waiting for it), survives a restart, and re-admission takes a new key;
every change is in the round log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from coordinator.audit import verify_chain
from coordinator.boards import expected_clients, revoked_keys
from protocol.envelope import encode_update
from protocol.errors import Reason
from protocol.keys import AllowList
from tests.unit.coordinator.test_coord_engine import BOARDS, COORD, LAYOUT, _engine, _update


def _signed(engine, key: SigningKey, client: str = "b1") -> bytes:
    return encode_update(
        run="demo", round=engine.round, client=client, signing_key=key,
        delta=np.full(4, 2.0, np.float32), layout=LAYOUT,
        base_sha256=engine.state.glob.sha256, samples=1, alarm=False,
    )  # fmt: skip


def test_revoke_readmit_and_restart(tmp_path: Path) -> None:
    engine = _engine(tmp_path, rounds=3)
    AllowList({c: k.verify_key for c, k in BOARDS.items()}).save(engine.config.allow_list)
    engine.start()
    assert engine.revoke_key("b1") and not engine.revoke_key("b1")
    with pytest.raises(LookupError):
        engine.revoke_key("nobody")
    assert "b1" not in AllowList.load(engine.config.allow_list)
    refused = engine.handle_update(_update(engine, "b1", [1, 1, 1, 1], 1))
    assert refused.reason is Reason.REVOKED
    assert engine.missing() == ["b0", "b2"]  # no longer waited for
    for client in ("b0", "b2"):
        assert engine.handle_update(_update(engine, client, [1, 1, 1, 1], 1)).accepted
    assert engine.close_reason() == "all" and engine.close_round() is not None
    engine.store.close()
    # Restarted: the allow-list has no key for b1, the store remembers the revocation.
    again = _engine(tmp_path, rounds=3)
    from coordinator.store import CoordinatorStore

    store = CoordinatorStore(again.config.db)
    revoked = revoked_keys(store)
    assert list(revoked) == ["b1"]
    keys = expected_clients(again.config, AllowList.load(again.config.allow_list), revoked)
    assert list(keys) == ["b0", "b1", "b2"]
    store.close()
    again.start()
    assert again.revoked.keys() == {"b1"} and again.missing() == ["b0", "b2"]
    assert again.handle_update(_update(again, "b1", [1, 1, 1, 1], 1)).reason is Reason.REVOKED
    # Re-admission needs a new key; the revoked one is refused.
    with pytest.raises(ValueError, match="was revoked"):
        again.register_key("b1", BOARDS["b1"].verify_key)
    new_key = SigningKey(b"R" * 32)
    assert again.register_key("b1", new_key.verify_key)
    assert again.missing() == ["b0", "b1", "b2"]
    assert again.handle_update(_signed(again, new_key)).accepted
    assert again.handle_update(_signed(again, BOARDS["b1"])).reason is Reason.BAD_SIGNATURE
    entries = again.store.audit_entries()
    assert verify_chain(entries, COORD.verify_key).ok
    actions = [json.loads(e[0])["body"].get("action") for e in entries]
    assert actions == ["start", "revoke", None, "readmit"]


def test_boards_added_to_the_configuration_join_a_resumed_run(tmp_path: Path) -> None:
    from dataclasses import replace

    from coordinator.store import StoreError

    engine = _engine(tmp_path, rounds=3)
    engine.start()
    engine.store.close()
    newcomer = SigningKey(b"N" * 32)
    grown = _engine(tmp_path, rounds=3)
    grown.config = replace(grown.config, clients=("b0", "b1", "b2", "b3"))
    grown.keys["b3"] = newcomer.verify_key
    grown.clients = list(grown.config.clients)
    grown.index_of = {c: i for i, c in enumerate(grown.clients)}
    grown.start()
    assert grown.missing() == ["b0", "b1", "b2", "b3"]
    assert grown.handle_update(_signed(grown, newcomer, client="b3")).accepted
    stored = json.loads(grown.store.get_meta("config"))
    assert stored["clients"] == ["b0", "b1", "b2", "b3"]
    actions = [json.loads(e[0])["body"].get("action") for e in grown.store.audit_entries()]
    assert actions == ["start", "join"]
    grown.store.close()
    reordered = _engine(tmp_path, rounds=3)
    reordered.config = replace(reordered.config, clients=("b1", "b0", "b2", "b3"))
    reordered.clients = list(reordered.config.clients)
    with pytest.raises(StoreError, match="keep their place"):
        reordered.start()


def test_an_update_sent_before_the_revocation_is_not_aggregated(tmp_path: Path) -> None:
    def run(folder: Path, sent_first: bool) -> np.ndarray:
        engine = _engine(folder, rounds=3)
        AllowList({c: k.verify_key for c, k in BOARDS.items()}).save(engine.config.allow_list)
        engine.start()
        if sent_first:
            assert engine.handle_update(_update(engine, "b1", [50, 50, 50, 50], 1)).accepted
        assert engine.revoke_key("b1")
        assert "b1" not in engine.state.admitted
        for client in ("b0", "b2"):
            assert engine.handle_update(_update(engine, client, [1, 2, 3, 4], 1)).accepted
        assert engine.close_reason() == "all" and engine.close_round() is not None
        weights = np.array(engine.state.glob.weights, copy=True)
        engine.store.close()
        if sent_first:  # a restart does not bring the dropped update back
            again = _engine(folder, rounds=3)
            again.start()
            assert again.round == 2 and "b1" not in again.state.admitted
            again.store.close()
        return weights

    assert np.array_equal(run(tmp_path / "sent", True), run(tmp_path / "never", False))


def test_a_board_revoked_and_readmitted_in_one_round_rejoins_from_the_next(tmp_path: Path) -> None:
    engine = _engine(tmp_path, rounds=3, round_timeout=0)  # waits for every expected board
    AllowList({c: k.verify_key for c, k in BOARDS.items()}).save(engine.config.allow_list)
    engine.start()
    assert engine.handle_update(_update(engine, "b1", [50, 50, 50, 50], 1)).accepted
    assert engine.revoke_key("b1")
    new_key = SigningKey(b"S" * 32)
    assert engine.register_key("b1", new_key.verify_key)
    for client in ("b0", "b2"):
        assert engine.handle_update(_update(engine, client, [1, 2, 3, 4], 1)).accepted
    assert engine.missing() == []  # the round does not wait for b1 again
    assert engine.close_reason() == "all" and engine.close_round() is not None
    assert engine.round == 2 and engine.missing() == ["b0", "b1", "b2"]
    assert engine.handle_update(_signed(engine, new_key)).accepted
