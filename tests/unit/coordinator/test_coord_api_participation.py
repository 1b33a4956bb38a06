"""The API's open round under partial participation: with client sampling only the boards drawn
for the round can be missing; in buffered asynchronous mode a round has no deadline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from nacl.signing import SigningKey

from coordinator.api import create_app
from coordinator.async_engine import make_engine
from coordinator.config import AggregatorSettings
from coordinator.rounds import RuleStrategy
from coordinator.runtime import CoordinatorRuntime
from coordinator.selection import select_participants
from coordinator.store import CoordinatorStore
from tests.unit.coordinator.api_builders import BASE, COORD, LAYOUT, make_config

BOARDS = {f"b{i}": SigningKey(bytes([90 + i]) * 32) for i in range(6)}


def _open_round(tmp_path: Path, **settings: object) -> dict:
    config = make_config(
        tmp_path, clients=tuple(BOARDS), aggregator=AggregatorSettings(), seed=4, **settings
    )
    runtime = CoordinatorRuntime(LAYOUT, np.zeros(LAYOUT.size, np.float32), RuleStrategy("fedavg"))
    store = CoordinatorStore(config.db)
    keys = {c: k.verify_key for c, k in BOARDS.items()}
    try:
        make_engine(config, runtime, store, COORD, keys).start()
        client = TestClient(create_app(config, store), base_url=BASE)
        return client.get("/api/run").json()["open_round"]
    finally:
        store.close()


def test_only_drawn_boards_are_missing_and_async_rounds_have_no_deadline(tmp_path: Path) -> None:
    sampled = _open_round(tmp_path / "sampled", client_fraction=0.5)
    drawn = [f"b{i}" for i in select_participants(6, 1, seed=4, fraction=0.5)]
    assert sampled["missing"] == drawn and len(drawn) == 3
    assert sampled["deadline"] is not None
    buffered = _open_round(tmp_path / "async", mode="async", buffer_size=2)
    assert buffered["missing"] == list(BOARDS) and buffered["deadline"] is None
