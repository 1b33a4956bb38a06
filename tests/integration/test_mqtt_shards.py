"""Sharded admission over a real Mosquitto: two admission processes on one shared subscription.

Every board's update is published twice in a row, so the broker's round-robin hands the two
copies to different processes; one board also sends a second, different update, and a stranger
sends one signed with an unknown key. The round must admit each board exactly once, count every
copy as a duplicate and the second update as a conflict, and close with the same model as the
batch engine without shards.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from firmware_sim.broker import BrokerHandle

pytestmark = pytest.mark.integration

K, D = 8, 5000


def _coordinator(work: Path, broker: BrokerHandle, shards: int, streaming: bool) -> Any:
    from coordinator.config import AdmissionSettings, AggregatorSettings, CoordinatorConfig
    from coordinator.config import BrokerSettings as CoordBroker
    from firmware_sim.loadgen import board_keys

    signers = board_keys(K, seed=4)
    return CoordinatorConfig(
        run=f"shards-{shards}-{int(streaming)}",
        key_dir=work / "keys",
        allow_list=work / "allow.txt",
        db=work / "coordinator.sqlite",
        clients=tuple(signers),
        rounds=1,
        round_timeout=0,
        resend_interval=0,
        exit_when_done=True,
        broker=CoordBroker(host=broker.host, port=broker.port, protocol=broker.protocol),
        aggregator=AggregatorSettings(name="multi_krum", params={"f": 2}),
        admission=AdmissionSettings(streaming=streaming, shards=shards),
    )


def _serve(config: Any, coordinator_key: SigningKey, box: dict[str, Any]) -> None:
    from coordinator.rounds import make_strategy
    from coordinator.runtime import CoordinatorRuntime
    from coordinator.shard_service import engine_class, service_class
    from coordinator.store import CoordinatorStore
    from firmware_sim.loadgen import board_keys
    from protocol.layout import TensorLayout

    store = CoordinatorStore(config.db)
    try:
        strategy = make_strategy("multi_krum", {"f": 2}, num_clients=K, num_rounds=1)
        runtime = CoordinatorRuntime(TensorLayout.flat(D), np.zeros(D, np.float32), strategy)
        keys = {c: s.verify_key for c, s in board_keys(K, seed=4).items()}
        admission = config.admission
        engine = engine_class(admission.streaming, admission.shards)(
            config, runtime, store, coordinator_key, keys
        )
        service = service_class(admission.shards)(config, engine)
        box["service"] = service
        service.run(box["stop"])
        box["final"] = engine.final.weights.copy() if engine.final is not None else None
        box["counts"] = store.decision_counts()
        box["admitted"] = sorted(u.client for u in store.updates(1))
    except BaseException as exc:  # reported by the test
        box["error"] = exc
    finally:
        store.close()


def _round(tmp: Path, broker: BrokerHandle, shards: int, streaming: bool) -> dict[str, Any]:
    from firmware_sim.loadgen import board_keys, presign_updates, publish, read_global
    from protocol.envelope import encode_update
    from protocol.layout import TensorLayout
    from protocol.mqtt import BrokerSettings
    from protocol.topics import update_topic

    config = _coordinator(tmp, broker, shards, streaming)
    coordinator_key = SigningKey(b"s" * 32)
    box: dict[str, Any] = {"stop": threading.Event()}
    thread = threading.Thread(target=_serve, args=(config, coordinator_key, box), daemon=True)
    thread.start()
    settings = BrokerSettings(host=broker.host, port=broker.port, protocol=broker.protocol)
    glob = read_global(settings, config.run, coordinator_key.verify_key)
    signers = board_keys(K, seed=4)
    messages = presign_updates(
        run=config.run,
        round_index=glob.round,
        base_sha256=glob.header.payload_sha256,
        signers=signers,
        layout=glob.layout,
        attackers=2,
        seed=4,
    )
    doubled = [m for m in messages for _ in range(2)]
    first = next(iter(signers))
    other = encode_update(
        run=config.run,
        round=glob.round,
        client=first,
        signing_key=signers[first],
        delta=np.ones(D, np.float32),
        layout=TensorLayout.flat(D),
        base_sha256=glob.header.payload_sha256,
        samples=5,
        alarm=False,
    )
    stranger = encode_update(
        run=config.run,
        round=glob.round,
        client="board-00001",
        signing_key=SigningKey(b"x" * 32),
        delta=np.ones(D, np.float32),
        layout=TensorLayout.flat(D),
        base_sha256=glob.header.payload_sha256,
        samples=5,
        alarm=False,
    )
    extra = [
        (update_topic(config.run, first), other),
        (update_topic(config.run, "board-00001"), stranger),
    ]
    # The conflicting and forged messages go first, the doubled updates after them.
    publish(settings, extra, connections=1)
    time.sleep(0.5)
    publish(settings, doubled, connections=1)
    thread.join(120)
    box["stop"].set()
    if "error" in box:
        raise box["error"]
    assert not thread.is_alive(), "the round did not close"
    return box


def test_each_board_is_admitted_once_across_shards(tmp_path: Path, broker: BrokerHandle) -> None:
    sharded = _round(tmp_path / "sharded", broker, shards=2, streaming=True)
    pool = sharded["service"].pool
    assert pool is not None
    # Both processes got messages from the shared subscription.
    assert all(n > 0 for n in pool.received), pool.received
    assert sum(pool.received) == 2 * K + 2
    counts = sharded["counts"]
    # The first board's other update came first and was admitted: both copies of its real one
    # conflict with it; every other board's second copy is a duplicate. The shards deliver in
    # their own order, so a copy may reach the coordinator after the round closed on its K-th
    # board: it is then refused as stale_round instead.
    assert counts.get("accepted") == K
    assert counts.get("bad_signature") == 1
    assert counts.get("conflicting_update", 0) >= 1
    assert _copies_refused(counts) == K + 1
    assert len(sharded["admitted"]) == K == len(set(sharded["admitted"]))


def test_sharded_round_closes_like_the_batch_engine(tmp_path: Path, broker: BrokerHandle) -> None:
    sharded = _round(tmp_path / "sharded", broker, shards=2, streaming=True)
    plain = _round(tmp_path / "plain", broker, shards=0, streaming=False)
    for key in ("accepted", "bad_signature"):
        assert sharded["counts"].get(key) == plain["counts"].get(key), key
    assert _copies_refused(sharded["counts"]) == _copies_refused(plain["counts"]) == K + 1
    assert sharded["admitted"] == plain["admitted"]
    np.testing.assert_array_equal(sharded["final"], plain["final"])


def _copies_refused(counts: dict[str, int]) -> int:
    """Refusals of the second copies and the first board's conflicting copies: ``K - 1``
    duplicates and 2 conflicting updates, any of which may instead be refused as
    ``stale_round`` when it reaches the coordinator after the round closed."""
    assert set(counts) <= {
        "accepted",
        "bad_signature",
        "duplicate",
        "conflicting_update",
        "stale_round",
    }, counts
    return sum(counts.get(k, 0) for k in ("duplicate", "conflicting_update", "stale_round"))
