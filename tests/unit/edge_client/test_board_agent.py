"""A board's protocol logic: global-model checks, what to do with it, sealing and resuming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from edge_client.board import BoardState, BoardUpdate
from edge_client.client import BoardAgent, UpdateTooLargeError
from edge_client.store import DiskBoardStore, MemoryBoardStore
from protocol.envelope import decode_message, encode_global
from protocol.layout import TensorLayout, weights_sha256

LAYOUT = TensorLayout([("dense/kernel", (2, 2)), ("dense/bias", (2,))])
COORD = SigningKey(b"c" * 32)
BOARD = SigningKey(b"b" * 32)


def _agent(store=None, **kw) -> BoardAgent:
    return BoardAgent(
        client_id="board-001",
        run="demo",
        index=1,
        signing_key=BOARD,
        coordinator_key=COORD.verify_key,
        layout=LAYOUT,
        store=store or MemoryBoardStore(),
        rounds=kw.pop("rounds", 3),
        **kw,
    )


def _global(round_index: int, value: float = 0.0, key: SigningKey = COORD, run: str = "demo"):
    weights = np.full(LAYOUT.size, value, dtype=np.float32)
    return encode_global(
        run=run, round=round_index, signing_key=key, weights=weights, layout=LAYOUT
    )


def _update(round_index: int, delta: np.ndarray) -> BoardUpdate:
    return BoardUpdate(1, round_index, delta.astype(np.float32), 37, True, 0.5, 0.6, 0.0, 0.0, 1.0)


def test_only_globals_signed_by_the_pinned_key_for_this_run_and_layout_are_accepted() -> None:
    agent = _agent()
    assert agent.verify_global(_global(1)) is not None
    assert agent.verify_global(_global(1, key=SigningKey(b"x" * 32))) is None
    assert agent.verify_global(_global(1, run="other")) is None
    other_layout = encode_global(
        run="demo",
        round=1,
        signing_key=COORD,
        weights=np.zeros(3, np.float32),
        layout=TensorLayout.flat(3),
    )
    assert agent.verify_global(other_layout) is None
    assert agent.verify_global(b"garbage") is None


def test_plan_follows_the_round_numbers() -> None:
    agent = _agent(rounds=3)
    first = agent.verify_global(_global(1))
    assert first is not None
    assert agent.plan(first).action == "train"
    sealed = agent.seal(
        _update(1, np.ones(LAYOUT.size)), BoardState(1, np.ones(6, np.float32), 1), first
    )
    assert agent.plan(first).action == "resend"
    assert agent.record.pending == sealed
    second = agent.verify_global(_global(2))
    assert second is not None and agent.plan(second).action == "train"
    final = agent.verify_global(_global(4))
    assert final is not None and agent.plan(final).action == "finish"
    agent.finish(final)
    assert agent.finished and agent.record.pending is None
    # An older round than the held one is ignored.
    assert agent.plan(first).action == "ignore"


def test_sealed_update_is_signed_by_the_board_against_the_received_global() -> None:
    agent = _agent()
    glob = agent.verify_global(_global(2, value=0.25))
    assert glob is not None
    delta = np.array([1, -2, 3, -4, 5, -6], dtype=np.float32)
    sealed = agent.seal(_update(2, delta), BoardState(1, delta + 0.25, 2), glob)
    message = decode_message(sealed, {"board-001": BOARD.verify_key})
    assert message.kind.value == "update" and message.round == 2 and message.client == "board-001"
    assert message.header.base_sha256 == weights_sha256(np.full(6, 0.25, np.float32))
    assert message.header.samples == 37 and message.header.alarm is True
    np.testing.assert_array_equal(message.weights, delta)
    assert agent.state == BoardState(1, agent.record.previous_local, 2)
    np.testing.assert_array_equal(agent.record.previous_local, delta + 0.25)


def test_oversized_update_is_refused_before_anything_is_saved() -> None:
    agent = _agent(max_message_bytes=100)
    glob = agent.verify_global(_global(1))
    assert glob is not None
    with pytest.raises(UpdateTooLargeError, match="more than the limit of 100"):
        agent.seal(_update(1, np.zeros(6)), BoardState(1, np.zeros(6, np.float32), 1), glob)
    assert agent.record.last_round == -1 and agent.record.pending is None


def test_restarted_board_resumes_its_round_and_resends_the_identical_message(
    tmp_path: Path,
) -> None:
    agent = _agent(DiskBoardStore(tmp_path))
    glob = agent.verify_global(_global(1))
    assert glob is not None
    sealed = agent.seal(_update(1, np.ones(6)), BoardState(1, np.ones(6, np.float32), 1), glob)
    restarted = _agent(DiskBoardStore(tmp_path))
    assert restarted.record.last_round == 1
    assert restarted.plan(glob).action == "resend"
    assert restarted.record.pending == sealed
    assert restarted.state.previous_local is not None


def test_state_of_another_board_is_refused(tmp_path: Path) -> None:
    from edge_client.errors import BoardStateError

    _agent(DiskBoardStore(tmp_path)).skip(_agent().verify_global(_global(1)))  # type: ignore[arg-type]
    with pytest.raises(BoardStateError, match="belongs to run"):
        BoardAgent(
            client_id="board-009",
            run="demo",
            index=9,
            signing_key=BOARD,
            coordinator_key=COORD.verify_key,
            layout=LAYOUT,
            store=DiskBoardStore(tmp_path),
        )


def test_rng_is_the_in_process_engines_seeding() -> None:
    agent = _agent(seed=5)
    expected = np.random.default_rng([5, 3, 1]).random(4)
    np.testing.assert_array_equal(agent.rng(3).random(4), expected)


def test_a_board_not_drawn_sits_the_round_out_and_keeps_its_own_latest_model() -> None:
    """Client sampling (docs/protocol.md 4.3): a board the selection does not name neither
    trains nor sends, however often the round is announced; it still holds the model, and its
    own latest local model (round 1's) stays what its next alarm compares with."""
    agent = _agent(rounds=4)
    first = agent.verify_global(_global(1))
    assert first is not None and agent.plan(first).action == "train"
    local = np.full(LAYOUT.size, 0.5, np.float32)
    agent.seal(_update(1, local), BoardState(1, local, 1), first)

    def sampled(round_index: int, names: list[str]):
        return agent.verify_global(
            encode_global(
                run="demo", round=round_index, signing_key=COORD, selected=names,
                weights=np.zeros(LAYOUT.size, np.float32), layout=LAYOUT,
            )
        )  # fmt: skip

    second = sampled(2, ["board-000", "board-002"])
    assert second is not None
    plan = agent.plan(second)
    assert plan.action == "sit_out" and "not among the boards drawn" in plan.reason
    agent.skip(second)
    assert agent.plan(second).action == "sit_out"  # a re-announcement changes nothing
    assert agent.held() == (2, second.header.payload_sha256)
    assert agent.record.last_round == 1 and agent.record.pending is not None
    np.testing.assert_array_equal(agent.state.previous_local, local)
    third = sampled(3, ["board-001"])
    assert third is not None and agent.plan(third).action == "train"
