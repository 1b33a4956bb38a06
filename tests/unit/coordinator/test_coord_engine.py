"""The coordinator's round state machine on a real SQLite store, without a network.

A 4-value model, FedAvg, three boards with real Ed25519 keys. Expected global models are
worked out by hand from FedAvg's definition g' = g + sum_i n_i d_i / sum_i n_i.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from coordinator.config import CoordinatorConfig
from coordinator.engine import RoundEngine
from coordinator.rounds import RuleStrategy
from coordinator.runtime import CoordinatorRuntime
from coordinator.store import CoordinatorStore
from protocol.envelope import check_global, encode_update
from protocol.errors import Reason
from protocol.layout import TensorLayout, weights_sha256
from protocol.topics import update_topic

LAYOUT = TensorLayout.flat(4)
COORD = SigningKey(b"k" * 32)
BOARDS = {f"b{i}": SigningKey(bytes([65 + i]) * 32) for i in range(3)}
INITIAL = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _engine(tmp_path: Path, clock: Clock | None = None, **config) -> RoundEngine:
    cfg = CoordinatorConfig(
        run="demo",
        key_dir=tmp_path / "k",
        allow_list=tmp_path / "a",
        db=tmp_path / "c.sqlite",
        clients=tuple(BOARDS),
        rounds=config.pop("rounds", 2),
        **config,
    )
    runtime = CoordinatorRuntime(LAYOUT, INITIAL.copy(), RuleStrategy("fedavg"))
    keys = {c: k.verify_key for c, k in BOARDS.items()}
    return RoundEngine(cfg, runtime, CoordinatorStore(cfg.db), COORD, keys, clock or Clock())


def _update(
    engine: RoundEngine,
    client: str,
    delta,
    samples: int,
    round_index: int | None = None,
    base: str | None = None,
) -> bytes:
    t = engine.round if round_index is None else round_index
    return encode_update(
        run="demo",
        round=t,
        client=client,
        signing_key=BOARDS[client],
        delta=np.asarray(delta, np.float32),
        layout=LAYOUT,
        base_sha256=base or engine.state.glob.sha256,
        samples=samples,
        alarm=False,
    )


def test_round_closes_when_every_board_reported_with_the_fedavg_model(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    first = check_global(engine.start(), COORD.verify_key, run="demo")
    assert first.round == 1
    np.testing.assert_array_equal(first.weights, INITIAL)
    for client, delta, n in (("b0", [1, 0, 0, 0], 1), ("b1", [0, 2, 0, 0], 1)):
        d = engine.handle_update(
            _update(engine, client, delta, n), topic=update_topic("demo", client)
        )
        assert d.accepted
    assert engine.close_reason() is None
    engine.handle_update(_update(engine, "b2", [0, 0, 4, 8], 2))
    assert engine.close_reason() == "all"
    message = engine.close_round()
    assert message is not None
    second = check_global(message, COORD.verify_key, run="demo", last_round=1)
    # n = (1, 1, 2): g + ([1,0,0,0] + [0,2,0,0] + 2*[0,0,4,8]) / 4 = g + [.25, .5, 2, 4]
    np.testing.assert_allclose(second.weights, [1.25, 2.5, 5.0, 8.0])
    assert second.round == 2 and second.header.base_sha256 == weights_sha256(INITIAL)
    row = engine.store.round_row(1)
    assert row is not None and row.status == "closed"
    assert row.record["selected"] == [0, 1, 2]
    assert row.record["sample_counts"] == {"0": 1, "1": 1, "2": 2}
    assert row.record["network"]["updates"] == 3
    assert engine.store.updates(1)[0].delta is None  # vectors dropped once the round closed


def test_duplicates_late_and_forged_updates_are_counted_not_admitted(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    engine.start()
    good = _update(engine, "b0", [1, 1, 1, 1], 3)
    assert engine.handle_update(good).accepted
    assert engine.handle_update(good).reason is Reason.DUPLICATE
    other = _update(engine, "b0", [2, 2, 2, 2], 3)
    assert engine.handle_update(other).reason is Reason.CONFLICTING_UPDATE
    forged = bytearray(_update(engine, "b1", [1, 1, 1, 1], 3))
    forged[-1] ^= 0x40
    assert engine.handle_update(bytes(forged)).reason is Reason.PAYLOAD_HASH_MISMATCH
    stranger = encode_update(
        run="demo",
        round=1,
        client="b1",
        signing_key=SigningKey(b"z" * 32),
        delta=np.ones(4, np.float32),
        layout=LAYOUT,
        base_sha256=engine.state.glob.sha256,
        samples=3,
        alarm=False,
    )
    assert engine.handle_update(stranger).reason is Reason.BAD_SIGNATURE
    wrong_topic = _update(engine, "b2", [0, 0, 0, 0], 1)
    assert engine.handle_update(wrong_topic, topic=update_topic("demo", "b1")).reason is (
        Reason.TOPIC_MISMATCH
    )
    assert engine.handle_update(b"\x00" * 10).reason is Reason.MALFORMED
    engine.handle_update(_update(engine, "b1", [0, 0, 0, 0], 1))
    engine.handle_update(_update(engine, "b2", [0, 0, 0, 0], 1))
    engine.close_round()
    # The first update again, after its round closed: recognised by its digest.
    assert engine.handle_update(good).reason is Reason.DUPLICATE
    late = _update(engine, "b1", [0, 0, 0, 0], 1, round_index=1, base=weights_sha256(INITIAL))
    assert engine.handle_update(late).reason is Reason.STALE_ROUND
    counts = engine.store.decision_counts()
    assert counts == {
        "accepted": 3,
        "duplicate": 2,
        "conflicting_update": 1,
        "payload_hash_mismatch": 1,
        "bad_signature": 1,
        "topic_mismatch": 1,
        "malformed": 1,
        "stale_round": 1,
    }
    assert len(engine.store.updates(1)) == 3 and engine.store.updates(2) == []


def test_a_restarted_engine_resumes_the_open_round_without_double_counting(
    tmp_path: Path,
) -> None:
    engine = _engine(tmp_path)
    engine.start()
    u0 = _update(engine, "b0", [4, 0, 0, 0], 1)
    engine.handle_update(u0)
    engine.store.close()
    # "kill -9": a new engine on the same database.
    resumed = _engine(tmp_path)
    message = resumed.start()
    assert check_global(message, COORD.verify_key, run="demo").round == 1
    assert resumed.missing() == ["b1", "b2"]
    assert resumed.handle_update(u0).reason is Reason.DUPLICATE  # the broker's redelivery
    resumed.handle_update(_update(resumed, "b1", [0, 4, 0, 0], 1))
    resumed.handle_update(_update(resumed, "b2", [0, 0, 4, 0], 2))
    new = check_global(resumed.close_round(), COORD.verify_key, run="demo")
    # n = (1, 1, 2): g + ([4,0,0,0] + [0,4,0,0] + 2*[0,0,4,0]) / 4 = g + [1, 1, 2, 0]
    np.testing.assert_allclose(new.weights, [2.0, 3.0, 5.0, 4.0])
    assert resumed.store.decision_counts() == {"accepted": 3, "duplicate": 1}


def test_deadline_closes_with_a_quorum_only(tmp_path: Path) -> None:
    clock = Clock()
    engine = _engine(tmp_path, clock, round_timeout=10.0, quorum=0.6)
    engine.start()
    engine.handle_update(_update(engine, "b0", [1, 1, 1, 1], 1))
    clock.now += 11
    assert engine.close_reason() is None  # 1 of 3 < ceil(0.6 * 3) = 2
    engine.handle_update(_update(engine, "b1", [3, 3, 3, 3], 1))
    assert engine.close_reason() == "deadline"
    new = check_global(engine.close_round(reason="deadline"), COORD.verify_key, run="demo")
    np.testing.assert_allclose(new.weights, INITIAL + 2.0)
    record = engine.store.round_row(1).record
    assert record["missing"] == ["b2"] and record["close_reason"] == "deadline"


def test_final_round_finishes_the_run_and_restart_keeps_it_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(tmp_path, rounds=1)
    engine.start()
    for c in BOARDS:
        engine.handle_update(_update(engine, c, [0, 0, 0, 1], 1))
    final = engine.close_round()
    assert engine.finished and final is not None
    assert check_global(final, COORD.verify_key, run="demo").round == 2
    assert engine.store.model_rounds() == [1, 2]
    again = _engine(tmp_path, rounds=1)
    with caplog.at_level("INFO", logger="coordinator.engine"):
        assert again.start() == final and again.finished
    assert "run demo is finished: 1 round(s) closed, serving the final global model" in caplog.text
    assert again.handle_update(b"late").reason is Reason.STALE_ROUND


def test_strategy_refusal_keeps_the_round_open_until_more_updates(tmp_path: Path) -> None:
    engine = _engine(tmp_path, round_timeout=1.0, quorum=0.3)
    engine.runtime = replace(engine.runtime, strategy=RuleStrategy("krum", {"f": 1}))
    engine.start()
    engine.handle_update(_update(engine, "b0", [1, 1, 1, 1], 1))
    engine.clock.now += 5  # type: ignore[attr-defined]
    assert engine.close_reason() == "deadline"
    assert engine.close_round(reason="deadline") is None  # Krum with f=1 needs K >= 5
    assert engine.close_reason() is None  # not retried until another update arrives
    assert engine.round == 1 and engine.store.round_row(1).status == "open"
    engine.handle_update(_update(engine, "b1", [1, 1, 1, 1], 1))
    engine.handle_update(_update(engine, "b2", [1, 1, 1, 1], 1))
    # Every board reported and the bound still fails: the round closes without moving the
    # model and says why, instead of stopping the coordinator (and every restart after it).
    message = engine.close_round()
    assert message is not None and engine.round == 2
    np.testing.assert_array_equal(
        check_global(message, COORD.verify_key, run="demo").weights, INITIAL
    )
    assert "K >= 2f+3 = 5" in engine.store.round_row(1).record["failure"]


def test_operator_ban_pause_and_key_rotation(tmp_path: Path) -> None:
    from protocol.keys import AllowList

    engine = _engine(tmp_path)
    engine.start()
    assert engine.set_banned("b2", True) and not engine.set_banned("b2", True)
    with pytest.raises(LookupError):
        engine.set_banned("nobody", True)
    banned = engine.handle_update(_update(engine, "b2", [1, 1, 1, 1], 1))
    assert (banned.reason, banned.client_id, banned.message) == (Reason.BANNED, "b2", None)
    # Naming a banned board without its key is no proof of being it: still unknown_client.
    forged = encode_update(
        run="demo", round=1, client="b2", signing_key=SigningKey(b"f" * 32),
        delta=np.ones(4, np.float32), layout=LAYOUT,
        base_sha256=engine.state.glob.sha256, samples=1, alarm=False,
    )  # fmt: skip
    assert engine.handle_update(forged).reason is Reason.UNKNOWN_CLIENT
    logged = [(r["client"], r["reason"]) for r in engine.store.rejections(1)]
    # The forgery only claims to be b2: it is not counted against b2.
    assert logged == [("b2", "banned"), (None, "unknown_client")]
    assert "claims to be 'b2'" in engine.store.rejections(1)[1]["detail"]
    engine.handle_update(_update(engine, "b0", [1, 1, 1, 1], 1))
    assert engine.missing() == ["b1"]
    # Rotate b1's key: the old key no longer verifies, the new one does.
    AllowList({c: k.verify_key for c, k in BOARDS.items()}).save(engine.config.allow_list)
    new_key = SigningKey(b"n" * 32)
    with pytest.raises(ValueError, match="not a board of run"):
        engine.register_key("nobody", new_key.verify_key)
    assert engine.register_key("b1", new_key.verify_key)
    assert bytes(AllowList.load(engine.config.allow_list)["b1"]) == bytes(new_key.verify_key)
    old_signed = _update(engine, "b1", [3, 3, 3, 3], 1)
    assert engine.handle_update(old_signed).reason is Reason.BAD_SIGNATURE
    rotated = encode_update(
        run="demo", round=1, client="b1", signing_key=new_key,
        delta=np.full(4, 3.0, np.float32), layout=LAYOUT,
        base_sha256=engine.state.glob.sha256, samples=1, alarm=False,
    )  # fmt: skip
    assert engine.handle_update(rotated).accepted
    assert engine.close_reason() == "all"  # the banned board is not waited for
    assert engine.set_paused(True)
    engine.store.close()
    restarted = _engine(tmp_path)
    restarted.start()
    assert restarted.paused and restarted.admin_banned == {"b2"}
    assert restarted.set_banned("b2", False) and restarted.missing() == ["b2"]


def test_service_calls_need_a_running_service(tmp_path: Path) -> None:
    from coordinator.controls import ServiceControls
    from coordinator.service import CoordinatorService

    engine = _engine(tmp_path)
    service = CoordinatorService(engine.config, engine)
    controls = ServiceControls(service, timeout=0.1)
    assert controls.is_paused() is False and controls.admin_banned() == frozenset()
    with pytest.raises(TimeoutError, match="not running"):
        controls.pause()
    api = pytest.importorskip("coordinator.api")
    assert isinstance(controls, api.CoordinatorControls)
