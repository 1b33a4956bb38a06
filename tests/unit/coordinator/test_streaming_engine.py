"""The streaming round engine against the batch engine, on a real SQLite store and real keys.

Both engines admit the same signed updates (in different orders); every round must close with
the same global model bytes, the same verdicts and the same counts, and the streaming engine
must have closed from its streaming state. A restart in the middle of a round rebuilds the
buffer and the Gram matrix from the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from coordinator.config import AggregatorSettings, CoordinatorConfig
from coordinator.engine import RoundEngine
from coordinator.rounds import make_strategy
from coordinator.runtime import CoordinatorRuntime
from coordinator.store import CoordinatorStore
from coordinator.streaming_engine import StreamingRoundEngine
from protocol.envelope import check_global, encode_update
from protocol.errors import Reason
from protocol.layout import TensorLayout

D = 257
LAYOUT = TensorLayout.flat(D)
COORD = SigningKey(b"c" * 32)
BOARDS = {f"b{i}": SigningKey(bytes([80 + i]) * 32) for i in range(9)}
INITIAL = np.linspace(-1, 1, D, dtype=np.float32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RootSet:
    """A deterministic root set: accuracy from the first coordinate, server update from the
    global model (counts its calls)."""

    def __init__(self) -> None:
        self.server_calls = 0

    def accuracy(self, weights: np.ndarray) -> float:
        return float(1.0 / (1.0 + np.exp(-float(np.mean(weights[:8])))))

    def server_update(self, global_weights: np.ndarray, round_index: int) -> np.ndarray:
        self.server_calls += 1
        rng = np.random.default_rng([round_index, 5])
        return (0.1 * rng.standard_normal(D) - 0.01 * global_weights).astype(np.float32)


def _engine(
    cls: type[RoundEngine], tmp: Path, name: str, params: dict[str, Any], oracle: Any = None
) -> RoundEngine:
    cfg = CoordinatorConfig(
        run="stream",
        key_dir=tmp / "k",
        allow_list=tmp / "a",
        db=tmp / f"{cls.__name__}.sqlite",
        clients=tuple(BOARDS),
        rounds=3,
        round_timeout=0,
        aggregator=AggregatorSettings(name=name, params=params),
    )
    strategy = make_strategy(
        name, params, oracle=oracle, num_clients=len(BOARDS), num_rounds=3, seed=1
    )
    runtime = CoordinatorRuntime(LAYOUT, INITIAL.copy(), strategy)
    keys = {c: k.verify_key for c, k in BOARDS.items()}
    return cls(cfg, runtime, CoordinatorStore(cfg.db), COORD, keys, Clock())


def _updates(engine: RoundEngine, t: int) -> dict[str, bytes]:
    rng = np.random.default_rng([t, 11])
    out = {}
    for i, client in enumerate(BOARDS):
        delta = rng.standard_normal(D).astype(np.float32)
        if i in (6, 7):  # two attackers sending the same boosted update
            delta = np.full(D, 3.0, dtype=np.float32)
        out[client] = encode_update(
            run="stream",
            round=t,
            client=client,
            signing_key=BOARDS[client],
            delta=delta,
            layout=LAYOUT,
            base_sha256=engine.state.glob.sha256,
            samples=10 + i,
            alarm=i % 3 == 0,
            nonce=bytes([t, i]) * 8,
            timestamp_ms=1_700_000_000_000,
        )
    return out


def _run(engine: RoundEngine, order_seed: int) -> list[bytes]:
    engine.start()
    messages = []
    while not engine.finished:
        t = engine.round
        updates = _updates(engine, t)
        order = np.random.default_rng([order_seed, t]).permutation(len(BOARDS))
        for n, i in enumerate(order):
            payload = updates[list(BOARDS)[i]]
            assert engine.handle_update(payload).accepted
            assert engine.handle_update(payload).reason is Reason.DUPLICATE
            if n % 3 == 2:
                engine.close_reason()  # the service asks after each burst
        assert engine.close_reason() == "all"
        message = engine.close_round()
        assert message is not None
        messages.append(message)
    return messages


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("krum", {"f": 2}),
        ("multi_krum", {"f": 2}),
        ("bulyan", {"f": 1}),
        ("median", {}),
        ("trimmed_mean", {"beta": 2}),
        ("fltrust", {}),
        ("siren", {}),
        ("fedavg", {}),
    ],
)
def test_streaming_engine_closes_every_round_like_the_batch_engine(
    tmp_path: Path, name: str, params: dict[str, Any]
) -> None:
    oracle = RootSet() if name in ("fltrust", "siren") else None
    stream_oracle = RootSet() if oracle is not None else None
    batch = _engine(RoundEngine, tmp_path, name, params, oracle)
    streaming = _engine(StreamingRoundEngine, tmp_path, name, params, stream_oracle)
    want = _run(batch, order_seed=1)
    got = _run(streaming, order_seed=2)
    for a, b in zip(got, want):
        ga = check_global(a, COORD.verify_key, run="stream")
        gb = check_global(b, COORD.verify_key, run="stream")
        np.testing.assert_allclose(ga.weights, gb.weights, rtol=1e-6, atol=1e-6)
        if name != "fltrust":  # FLTrust's weights are cosines: equal within rounding
            np.testing.assert_array_equal(ga.weights, gb.weights)
    for t in (1, 2, 3):
        rec_s = streaming.store.round_row(t).record
        rec_b = batch.store.round_row(t).record
        kept_s = {c: v["kept"] for c, v in rec_s["verdicts"].items()}
        kept_b = {c: v["kept"] for c, v in rec_b["verdicts"].items()}
        assert kept_s == kept_b
        if name in ("krum", "multi_krum", "bulyan", "median", "trimmed_mean", "fltrust"):
            assert rec_s["decision"]["close"] == "streamed"
        if name == "siren":
            assert rec_s["decision"]["close"].startswith("streamed")
            assert rec_s["decision"]["case"] == rec_b["decision"]["case"]
            assert rec_s["decision"]["benign"] == rec_b["decision"]["benign"]
    assert streaming.store.decision_counts() == batch.store.decision_counts()
    if name == "fltrust":
        assert stream_oracle is not None and stream_oracle.server_calls == 3  # once per round


def test_a_restart_mid_round_rebuilds_the_streaming_state(tmp_path: Path) -> None:
    reference = _engine(StreamingRoundEngine, tmp_path / "ref", "multi_krum", {"f": 2})
    want = _run(reference, order_seed=3)

    first = _engine(StreamingRoundEngine, tmp_path, "multi_krum", {"f": 2})
    first.start()
    updates = _updates(first, 1)
    clients = list(BOARDS)
    for c in clients[:5]:
        assert first.handle_update(updates[c]).accepted
    first.store.close()  # the process dies here

    again = _engine(StreamingRoundEngine, tmp_path, "multi_krum", {"f": 2})
    again.start()
    assert isinstance(again, StreamingRoundEngine) and again.stream is not None
    assert sorted(again.stream.rows) == [0, 1, 2, 3, 4]
    for c in clients[:5]:
        assert again.handle_update(updates[c]).reason is Reason.DUPLICATE
    for c in clients[5:]:
        assert again.handle_update(updates[c]).accepted
    assert again.close_reason() == "all"
    message = again.close_round()
    assert message is not None
    np.testing.assert_array_equal(
        check_global(message, COORD.verify_key, run="stream").weights,
        check_global(want[0], COORD.verify_key, run="stream").weights,
    )
    assert again.store.round_row(1).record["decision"]["close"] == "streamed"


@pytest.mark.parametrize(("name", "params"), [("median", {}), ("trimmed_mean", {"beta": 2})])
def test_a_restart_rebuilds_the_buckets_or_tails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, params: dict[str, Any]
) -> None:
    from coordinator import streaming_bucket_close, streaming_buckets

    # Buckets from 3 sample updates for rounds of 5 or more (the defaults need 252 boards).
    monkeypatch.setattr(streaming_buckets, "SAMPLE_ROWS", 3)
    monkeypatch.setattr(streaming_buckets, "MIN_ROWS", 5)
    closes: list[int] = []
    real = streaming_bucket_close._close

    def spy(buffer: np.ndarray, rows: list[int], buckets: Any, trim: int) -> Any:
        closes.append(len(rows))
        return real(buffer, rows, buckets, trim)

    monkeypatch.setattr(streaming_bucket_close, "_close", spy)
    want = _run(_engine(RoundEngine, tmp_path / "ref", name, params), order_seed=3)

    first = _engine(StreamingRoundEngine, tmp_path, name, params)
    first.start()
    updates = _updates(first, 1)
    clients = list(BOARDS)
    for c in clients[::-1][:4]:  # not the rows the rebuilt state takes its sample from
        assert first.handle_update(updates[c]).accepted
    first.close_reason()
    first.store.close()  # the process dies here

    again = _engine(StreamingRoundEngine, tmp_path, name, params)
    again.start()
    assert isinstance(again, StreamingRoundEngine) and again.stream is not None
    if name == "median":
        buckets = again.stream.buckets
        assert buckets is not None and buckets.covers([5, 6, 7, 8])
    else:  # the trimmed mean keeps sums and tail heaps instead
        tails = again.stream.tails
        assert again.stream.buckets is None
        assert tails is not None and sorted(tails.rows) == [5, 6, 7, 8]
    closes.clear()  # the kernels' warm-up
    for c in clients[:5]:
        assert again.handle_update(updates[c]).accepted
    assert again.close_reason() == "all"
    message = again.close_round()
    assert message is not None
    np.testing.assert_array_equal(
        check_global(message, COORD.verify_key, run="stream").weights,
        check_global(want[0], COORD.verify_key, run="stream").weights,
    )
    assert closes == ([len(BOARDS)] if name == "median" else [])
    assert again.store.round_row(1).record["decision"]["close"] == "streamed"
