"""The coordinator's engine in buffered asynchronous mode, on a real SQLite store, no network.

Four boards with real Ed25519 keys, FedAvg on a 4-value model, staleness bound S = 1, a new
version every B = 2 updates, staleness weight (1+τ)^-1/2. Expected models are worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from coordinator.async_engine import AsyncRoundEngine, make_engine
from coordinator.config import AdmissionSettings, ConfigError, CoordinatorConfig
from coordinator.engine import RoundEngine
from coordinator.rounds import RuleStrategy
from coordinator.runtime import CoordinatorRuntime
from coordinator.store import CoordinatorStore
from protocol.envelope import check_global, encode_update
from protocol.errors import Reason
from protocol.layout import TensorLayout

LAYOUT = TensorLayout.flat(4)
COORD = SigningKey(b"k" * 32)
BOARDS = {f"b{i}": SigningKey(bytes([70 + i]) * 32) for i in range(4)}
INITIAL = np.zeros(4, dtype=np.float32)


def _config(tmp_path: Path, **values) -> CoordinatorConfig:
    return CoordinatorConfig(
        run="demo",
        key_dir=tmp_path / "k",
        allow_list=tmp_path / "a",
        db=tmp_path / "c.sqlite",
        clients=tuple(BOARDS),
        rounds=values.pop("rounds", 4),
        **{"mode": "async", "staleness_bound": 1, "buffer_size": 2, **values},
    )


def _engine(tmp_path: Path, **values) -> RoundEngine:
    config = _config(tmp_path, **values)
    runtime = CoordinatorRuntime(LAYOUT, INITIAL.copy(), RuleStrategy("fedavg"))
    keys = {c: k.verify_key for c, k in BOARDS.items()}
    return make_engine(config, runtime, CoordinatorStore(config.db), COORD, keys, lambda: 1.0)


class Versions:
    """The global messages seen so far, by version."""

    def __init__(self) -> None:
        self.by_round: dict[int, object] = {}

    def add(self, message: bytes) -> None:
        decoded = check_global(message, COORD.verify_key, run="demo")
        self.by_round[decoded.round] = decoded

    def update(self, client: str, version: int, value: float) -> bytes:
        base = self.by_round[version]
        return encode_update(
            run="demo",
            round=version,
            client=client,
            signing_key=BOARDS[client],
            delta=np.full(4, value, np.float32),
            layout=LAYOUT,
            base_sha256=base.header.payload_sha256,  # type: ignore[attr-defined]
            samples=10,
            alarm=False,
        )


def test_buffers_close_at_b_updates_and_weigh_stale_ones(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    assert isinstance(engine, AsyncRoundEngine)
    versions = Versions()
    versions.add(engine.start())
    assert engine.handle_update(versions.update("b0", 1, 1.0)).reason is Reason.ACCEPTED
    assert engine.close_reason() is None, "one update: the buffer waits, whoever is missing"
    assert engine.handle_update(versions.update("b1", 1, 3.0)).reason is Reason.ACCEPTED
    assert engine.close_reason() == "buffer"
    versions.add(engine.close_round(reason="buffer"))
    np.testing.assert_allclose(versions.by_round[2].weights, np.full(4, 2.0))  # type: ignore[attr-defined]
    # Version 2 is open: b2's update on version 1 is one version stale, b0's is fresh.
    stale = engine.handle_update(versions.update("b2", 1, 4.0))
    assert stale.reason is Reason.STALE and stale.accepted
    assert engine.handle_update(versions.update("b2", 2, 9.0)).reason is Reason.BUFFERED
    assert engine.handle_update(versions.update("b0", 2, 2.0)).reason is Reason.ACCEPTED
    versions.add(engine.close_round(reason="buffer"))
    # FedAvg of b0's 2 (weight 1) and b2's 4 scaled by (1 + 1)^-1/2, equal sample counts.
    expected = 2.0 + (2.0 + 4.0 / np.sqrt(2.0)) / 2
    np.testing.assert_allclose(versions.by_round[3].weights, np.full(4, expected), rtol=1e-6)  # type: ignore[attr-defined]
    row = engine.store.round_row(2)
    assert row is not None and row.record is not None
    assert row.record["close_reason"] == "buffer"
    assert row.record["decision"]["staleness"] == {"0": 0, "2": 1}
    assert row.record["network"]["stale"] == 1
    assert row.record["network"]["rejected"] == {"buffered": 1}
    # Version 3: anything trained on version 1 is now too stale (S = 1).
    assert engine.handle_update(versions.update("b3", 1, 5.0)).reason is Reason.TOO_STALE
    pending = versions.update("b1", 2, 1.0)
    assert engine.handle_update(pending).reason is Reason.STALE
    # A restarted coordinator resumes the buffer with its staleness and its admission window.
    engine.store.close()
    again = _engine(tmp_path)
    assert again.start() == engine.global_message
    assert again.state is not None and again.state.admitted["b1"].base_round == 2
    assert again.handle_update(pending).reason is Reason.DUPLICATE
    assert again.handle_update(versions.update("b1", 2, 1.0)).reason is Reason.BUFFERED
    assert again.handle_update(versions.update("b3", 1, 5.0)).reason is Reason.TOO_STALE
    assert again.handle_update(versions.update("b3", 2, 7.0)).reason is Reason.STALE
    versions.add(again.close_round(reason="buffer"))
    weight = 1 / np.sqrt(2.0)
    np.testing.assert_allclose(
        versions.by_round[4].weights,  # type: ignore[attr-defined]
        np.full(4, expected + (1.0 * weight + 7.0 * weight) / 2),
        rtol=1e-6,
    )


def test_async_settings_in_coord_toml(tmp_path: Path) -> None:
    import tomllib

    config = _config(tmp_path, staleness_bound=3, buffer_size=4, staleness_weight="constant")
    text = config.to_toml(relative_to=tmp_path)
    loaded = CoordinatorConfig.from_dict(tomllib.loads(text), base_dir=tmp_path)
    assert (loaded.mode, loaded.staleness_bound, loaded.buffer_size) == ("async", 3, 4)
    assert loaded.asynchronous.weight(5) == 1.0
    with pytest.raises(ConfigError, match="more than the 4 boards"):
        _config(tmp_path, buffer_size=5)
    with pytest.raises(ConfigError, match="client_fraction"):
        _config(tmp_path, client_fraction=0.5)
    with pytest.raises(ConfigError, match="staleness weight"):
        _config(tmp_path, staleness_weight="cubic")
    with pytest.raises(ConfigError, match="sync or async"):
        _config(tmp_path, mode="both")
    with pytest.raises(ConfigError, match=r"admission\.shards"):
        _config(tmp_path, admission=AdmissionSettings(shards=2))


def test_make_engine_picks_the_engine_of_the_mode_and_the_admission_settings(
    tmp_path: Path,
) -> None:
    from coordinator.streaming_engine import StreamingRoundEngine

    assert type(_engine(tmp_path / "a")) is AsyncRoundEngine
    assert type(_engine(tmp_path / "s", mode="sync")) is StreamingRoundEngine
    batch = _engine(tmp_path / "b", mode="sync", admission=AdmissionSettings(streaming=False))
    assert type(batch) is RoundEngine


def test_the_latest_pool_aggregates_every_boards_newest_admissible_update(tmp_path: Path) -> None:
    """async_pool = "latest": version 3 is made from b0's update on version 2 (which replaces
    its update on version 1), and b1's and b2's updates on version 1, one version stale; the
    vectors of version 1's updates stay stored for that."""
    engine = _engine(tmp_path, staleness_bound=2, async_pool="latest")
    versions = Versions()
    versions.add(engine.start())
    engine.handle_update(versions.update("b0", 1, 1.0))
    engine.handle_update(versions.update("b1", 1, 3.0))
    versions.add(engine.close_round(reason="buffer"))
    np.testing.assert_allclose(versions.by_round[2].weights, np.full(4, 2.0))  # type: ignore[attr-defined]
    assert engine.handle_update(versions.update("b2", 1, 4.0)).reason is Reason.STALE
    assert engine.handle_update(versions.update("b0", 2, 2.0)).reason is Reason.ACCEPTED
    versions.add(engine.close_round(reason="buffer"))
    expected = 2.0 + (2.0 + 3.0 / np.sqrt(2.0) + 4.0 / np.sqrt(2.0)) / 3
    np.testing.assert_allclose(versions.by_round[3].weights, np.full(4, expected), rtol=1e-6)  # type: ignore[attr-defined]
    row = engine.store.round_row(2)
    assert row is not None and row.record is not None
    assert row.record["decision"]["staleness"] == {"0": 0, "1": 1, "2": 1}
    assert row.record["selected"] == [0, 2]  # the buffer: who sent this version's updates
    # Version 1's vectors are still stored (S = 2); with the buffer pool they would be gone.
    assert all(u.delta is not None for u in engine.store.updates(1))


def test_a_revoked_board_adds_nothing_from_its_earlier_updates_to_the_latest_pool(
    tmp_path: Path,
) -> None:
    from protocol.keys import AllowList

    engine = _engine(tmp_path, staleness_bound=2, async_pool="latest")
    AllowList({c: k.verify_key for c, k in BOARDS.items()}).save(engine.config.allow_list)
    versions = Versions()
    versions.add(engine.start())
    engine.handle_update(versions.update("b0", 1, 1.0))
    engine.handle_update(versions.update("b1", 1, 100.0))
    versions.add(engine.close_round(reason="buffer"))
    assert engine.handle_update(versions.update("b1", 2, 100.0)).accepted
    assert engine.revoke_key("b1")
    assert engine.handle_update(versions.update("b0", 2, 1.0)).accepted
    assert engine.handle_update(versions.update("b2", 2, 1.0)).accepted
    versions.add(engine.close_round(reason="buffer"))
    staleness = engine.store.round_row(2).record["decision"].get("staleness", {})
    assert "1" not in staleness  # b1 (index 1) is in no pool after its revocation
    assert np.max(np.abs(versions.by_round[3].weights - versions.by_round[2].weights)) < 50
