"""Client sampling: the draw every transport shares, and the round engine announcing it.

The engine part runs the coordinator's round state machine on a real SQLite store with six
boards holding real Ed25519 keys, FedAvg on a 4-value model, half of the boards drawn per round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib
from nacl.signing import SigningKey

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.engine import RoundEngine
from coordinator.rounds import RuleStrategy
from coordinator.runtime import CoordinatorRuntime
from coordinator.selection import (
    Sampling,
    check_selection_fits,
    participants_per_round,
    select_participants,
)
from coordinator.store import CoordinatorStore
from firmware_sim.engine import SimConfig, select_clients
from protocol.envelope import SELECTION_VERSION, check_global, encode_update
from protocol.errors import Reason
from protocol.layout import TensorLayout

LAYOUT = TensorLayout.flat(4)
COORD = SigningKey(b"k" * 32)
BOARDS = {f"b{i}": SigningKey(bytes([65 + i]) * 32) for i in range(6)}
INITIAL = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)


def test_the_draw_is_seeded_sorted_distinct_and_sized_as_configured() -> None:
    picks = [select_participants(10, t, seed=7, fraction=0.3) for t in range(1, 9)]
    assert all(len(p) == 3 == len(set(p)) and p == sorted(p) for p in picks)
    assert all(0 <= i < 10 for p in picks for i in p)
    assert len({tuple(p) for p in picks}) > 1, "rounds draw different boards"
    assert picks == [select_participants(10, t, seed=7, fraction=0.3) for t in range(1, 9)]
    assert picks != [select_participants(10, t, seed=8, fraction=0.3) for t in range(1, 9)]
    assert select_participants(10, 1, seed=7, count=4) == select_participants(
        10, 1, seed=7, fraction=0.4
    )
    assert select_participants(4, 1, seed=0, fraction=1.0) == [0, 1, 2, 3]
    # m = max(1, round(fraction * K)), capped at K; Python's round takes halves to even.
    assert [participants_per_round(10, f) for f in (0.01, 0.25, 0.35, 1.0)] == [1, 2, 4, 10]
    assert participants_per_round(5, count=9) == 5


def test_the_in_process_engine_draws_with_the_coordinators_function() -> None:
    cfg = SimConfig(clients=10, client_fraction=0.5, seed=4)
    assert [select_clients(cfg, t) for t in range(1, 6)] == [
        select_participants(10, t, 4, fraction=0.5) for t in range(1, 6)
    ]
    by_count = SimConfig(clients=10, clients_per_round=3, seed=4)
    assert all(len(select_clients(by_count, t)) == 3 for t in range(1, 6))
    with pytest.raises(ValueError, match="not both"):
        SimConfig(clients=10, clients_per_round=3, client_fraction=0.5)
    with pytest.raises(ValueError, match=r"1\.\.10"):
        SimConfig(clients=10, clients_per_round=11)


def test_sampling_settings_are_checked() -> None:
    assert not Sampling().active and Sampling(0.5).active and Sampling(count=3).active
    for bad in (dict(fraction=0.0), dict(fraction=1.5), dict(count=0), dict(fraction=0.5, count=2)):
        with pytest.raises(ValueError):
            Sampling(**bad)  # type: ignore[arg-type]
    # A selection of 64-character ids for 10,000 boards per round cannot fit in a header.
    clients = [f"{i:064d}" for i in range(10_000)]
    with pytest.raises(ValueError, match="at most 2934"):
        check_selection_fits(Sampling(count=5_000), clients)
    check_selection_fits(Sampling(count=2_000), clients)


def _engine(tmp_path: Path, **config) -> RoundEngine:
    cfg = CoordinatorConfig(
        run="demo",
        key_dir=tmp_path / "k",
        allow_list=tmp_path / "a",
        db=tmp_path / "c.sqlite",
        clients=tuple(BOARDS),
        rounds=config.pop("rounds", 3),
        seed=5,
        **config,
    )
    runtime = CoordinatorRuntime(LAYOUT, INITIAL.copy(), RuleStrategy("fedavg"))
    keys = {c: k.verify_key for c, k in BOARDS.items()}
    return RoundEngine(cfg, runtime, CoordinatorStore(cfg.db), COORD, keys, lambda: 1000.0)


def _update(engine: RoundEngine, client: str, delta: float) -> bytes:
    assert engine.state is not None
    return encode_update(
        run="demo",
        round=engine.round,
        client=client,
        signing_key=BOARDS[client],
        delta=np.full(4, delta, np.float32),
        layout=LAYOUT,
        base_sha256=engine.state.glob.sha256,
        samples=10,
        alarm=False,
    )


def test_a_sampled_round_announces_its_boards_waits_for_them_only_and_refuses_others(
    tmp_path: Path,
) -> None:
    engine = _engine(tmp_path, client_fraction=0.5)
    first = check_global(engine.start(), COORD.verify_key, run="demo")
    drawn = [f"b{i}" for i in select_participants(6, 1, seed=5, fraction=0.5)]
    assert first.header.version == SELECTION_VERSION
    assert first.selected == tuple(drawn) and len(drawn) == 3
    assert engine.expected() == drawn and engine.missing() == drawn
    others = [c for c in BOARDS if c not in drawn]
    refused = engine.handle_update(_update(engine, others[0], 1.0))
    assert refused.reason is Reason.NOT_SELECTED and "not drawn for round 1" in refused.detail
    for c in drawn:
        assert engine.handle_update(_update(engine, c, 1.0)).accepted
    # The boards not drawn are not missing: the round closes with "all" of the drawn ones.
    assert engine.missing() == [] and engine.close_reason() == "all"
    second = check_global(engine.close_round(reason="all"), COORD.verify_key, run="demo")
    np.testing.assert_array_equal(second.weights, INITIAL + 1.0)
    assert second.selected == tuple(f"b{i}" for i in select_participants(6, 2, 5, fraction=0.5))
    row = engine.store.round_row(1)
    assert row is not None and row.record is not None
    assert row.record["sampled"] == row.record["selected"] == [int(c[1:]) for c in drawn]
    assert row.record["missing"] == [] and row.record["network"]["rejected"] == {"not_selected": 1}
    # A restarted coordinator reads round 2's selection back from the stored global message.
    engine.store.close()
    again = _engine(tmp_path, client_fraction=0.5)
    assert again.start() == engine.global_message
    assert again.state is not None and again.state.selected == second.selected
    assert again.admission is not None and again.admission.selected == set(second.selected)


def test_the_final_model_names_no_one_and_full_participation_stays_version_1(
    tmp_path: Path,
) -> None:
    engine = _engine(tmp_path / "sampled", clients_per_round=2, rounds=1)
    first = check_global(engine.start(), COORD.verify_key, run="demo")
    assert first.selected is not None and len(first.selected) == 2
    for c in first.selected:
        engine.handle_update(_update(engine, c, 0.5))
    final = check_global(engine.close_round(reason="all"), COORD.verify_key, run="demo")
    assert final.round == 2 and final.selected is None and final.header.version == 1
    plain = _engine(tmp_path / "plain")
    message = check_global(plain.start(), COORD.verify_key, run="demo")
    assert message.header.version == 1 and message.selected is None
    assert plain.expected() == list(BOARDS)


def test_the_coordinator_configuration_takes_a_fraction_or_a_count(tmp_path: Path) -> None:
    base = dict(run="r", key_dir=tmp_path, allow_list=tmp_path / "a", db=tmp_path / "d")
    cfg = CoordinatorConfig(**base, client_fraction=0.25)  # type: ignore[arg-type]
    loaded = CoordinatorConfig.from_dict(
        tomllib.loads(cfg.to_toml(relative_to=tmp_path)), base_dir=tmp_path
    )
    assert loaded.sampling == Sampling(0.25)
    counted = CoordinatorConfig(**base, clients_per_round=4)  # type: ignore[arg-type]
    text = counted.to_toml(relative_to=tmp_path)
    assert "clients_per_round = 4" in text
    for bad in (dict(client_fraction=0.0), dict(clients_per_round=0)):
        with pytest.raises(ConfigError):
            CoordinatorConfig(**base, **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not both"):
        CoordinatorConfig(**base, client_fraction=0.5, clients_per_round=2)  # type: ignore[arg-type]
