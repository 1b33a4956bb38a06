"""The leader's side of sharded admission, without a broker: updates verified by an admission
process (VerifiedPayload) go through the same stateful rules as any message, against the
boards' keys of the moment."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from coordinator import shard_service
from coordinator.config import AdmissionSettings, AggregatorSettings, CoordinatorConfig
from coordinator.rounds import make_strategy
from coordinator.runtime import CoordinatorRuntime
from coordinator.shard_service import (
    ShardedRoundEngine,
    ShardedStreamingEngine,
    engine_class,
    service_class,
)
from coordinator.shards import ShardAdmission, VerifiedPayload
from coordinator.store import CoordinatorStore
from protocol.admission import AdmissionPolicy
from protocol.envelope import (
    PREFIX_BYTES,
    SIGNATURE_BYTES,
    ZERO_SHA256,
    decode_message,
    encode_update,
)
from protocol.errors import Reason
from protocol.layout import TensorLayout

LAYOUT = TensorLayout.flat(16)
BOARDS = {f"b{i}": SigningKey(bytes([40 + i]) * 32) for i in range(3)}


def _update(client: str, value: float, base: str = ZERO_SHA256, round_index: int = 1) -> bytes:
    return encode_update(
        run="sh",
        round=round_index,
        client=client,
        signing_key=BOARDS[client],
        delta=np.full(16, value, np.float32),
        layout=LAYOUT,
        base_sha256=base,
        samples=3,
        alarm=False,
    )


def _verified(data: bytes, key_of: str | None = None) -> VerifiedPayload:
    """What the leader receives from an admission process for ``data``."""
    import hashlib

    message = decode_message(data, {c: k.verify_key for c, k in BOARDS.items()})
    cut = PREFIX_BYTES + len(message.header_bytes) + SIGNATURE_BYTES
    key = BOARDS[key_of or message.client].verify_key
    assert message.weights is not None
    return VerifiedPayload.make(
        data[:cut], hashlib.sha256(data).hexdigest(), len(data), message.weights.copy(), bytes(key)
    )


def test_shard_admission_applies_the_stateful_rules() -> None:
    keys = {c: k.verify_key for c, k in BOARDS.items()}
    adm = ShardAdmission(run="sh", keys=keys, policy=AdmissionPolicy(LAYOUT), round=1)
    first = _update("b0", 1.0)
    decision = adm.admit(_verified(first))
    assert decision.accepted and decision.message is not None
    np.testing.assert_array_equal(decision.message.weights, np.ones(16, np.float32))
    assert len(_verified(first)) == len(first)  # the engine counts the whole message
    # The same update again (through the other process): a duplicate, not a second admission.
    assert adm.admit(_verified(first)).reason is Reason.DUPLICATE
    assert adm.admit(first).reason is Reason.DUPLICATE  # or received by the leader itself
    assert adm.admit(_verified(_update("b0", 2.0))).reason is Reason.CONFLICTING_UPDATE
    assert adm.admit(_verified(_update("b1", 1.0, round_index=2))).reason is Reason.FUTURE_ROUND


def test_the_leader_checks_the_signature_against_the_key_of_the_moment() -> None:
    keys = {c: k.verify_key for c, k in BOARDS.items()}
    adm = ShardAdmission(run="sh", keys=keys, policy=AdmissionPolicy(LAYOUT), round=1)
    payload = _verified(_update("b1", 1.0))
    tampered = VerifiedPayload.make(
        payload[:-1] + bytes([payload[-1] ^ 1]),
        payload.digest,
        payload.size,
        payload.values,
        payload.shard_key,
    )
    assert adm.admit(tampered).reason is Reason.BAD_SIGNATURE
    keys["b1"] = SigningKey(b"n" * 32).verify_key  # rotated since the process verified
    assert adm.admit(payload).reason is Reason.BAD_SIGNATURE
    del keys["b1"]  # banned or revoked: no key
    assert adm.admit(payload).reason is Reason.UNKNOWN_CLIENT


def _engine(tmp_path: Path, streaming: bool) -> ShardedRoundEngine:
    cfg = CoordinatorConfig(
        run="sh",
        key_dir=tmp_path / "k",
        allow_list=tmp_path / "a",
        db=tmp_path / f"c{int(streaming)}.sqlite",
        clients=tuple(BOARDS),
        rounds=1,
        aggregator=AggregatorSettings(name="median"),
        admission=AdmissionSettings(streaming=streaming, shards=2),
    )
    runtime = CoordinatorRuntime(LAYOUT, np.zeros(16, np.float32), make_strategy("median"))
    cls = engine_class(streaming, 2)
    keys = {c: k.verify_key for c, k in BOARDS.items()}
    return cls(cfg, runtime, CoordinatorStore(cfg.db), SigningKey(b"c" * 32), keys)  # type: ignore[return-value]


@pytest.mark.parametrize("streaming", [True, False])
def test_sharded_engine_admits_counts_and_closes(tmp_path: Path, streaming: bool) -> None:
    engine = _engine(tmp_path, streaming)
    assert isinstance(engine, ShardedStreamingEngine if streaming else ShardedRoundEngine)
    engine.start()
    base = engine.state.glob.sha256
    updates = {c: _update(c, float(i + 1), base) for i, c in enumerate(BOARDS)}
    assert engine.handle_update(_verified(updates["b0"])).accepted
    assert engine.handle_update(_verified(updates["b0"])).reason is Reason.DUPLICATE
    assert engine.handle_update(updates["b0"]).reason is Reason.DUPLICATE  # same digest
    engine.set_banned("b2", True)
    assert engine.handle_update(_verified(updates["b2"])).reason is Reason.BANNED
    assert engine.handle_update(_verified(updates["b1"])).accepted
    stored = engine.store.updates(1)
    assert sorted(u.client for u in stored) == ["b0", "b1"]
    assert stored[0].nbytes == len(updates["b0"])  # the whole message, not the prefix
    assert engine.close_reason() == "all"
    assert engine.close_round() is not None
    assert engine.store.decision_counts() == {"accepted": 2, "duplicate": 2, "banned": 1}
    assert service_class(2).__name__ == "ShardedService"
    assert service_class(0).__name__ == "CoordinatorService"


class _SilentPool:
    """A :class:`coordinator.shards.ShardPool` whose processes never subscribe."""

    def __init__(self, *args: object) -> None:
        self.ready = threading.Event()
        self.received = [0, 0]
        self.stopped = False

    def start(self) -> None:
        """Start nothing."""

    def stop(self) -> None:
        """Record the stop."""
        self.stopped = True


def test_a_stop_request_ends_the_wait_for_the_admission_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_service, "ShardPool", _SilentPool)
    engine = _engine(tmp_path, True)
    service = shard_service.ShardedService(engine.config, engine)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()  # Ctrl-C while the processes are not subscribed
    started = time.monotonic()
    assert service.run(stop) == 0
    assert time.monotonic() - started < 10  # not the 60 s of shard_service.SUBSCRIBE_WAIT
    assert isinstance(service.pool, _SilentPool) and service.pool.stopped
