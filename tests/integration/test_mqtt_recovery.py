"""Crash recovery over a real Mosquitto: coordinator SIGKILL, board kill, broker restart,
forged updates. Every scenario must end with the same final model as the in-process engine:
nothing lost, nothing counted twice."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tests.integration.conftest import PreparedRun, query, stop_process, wait_until

pytestmark = pytest.mark.integration


def _engine_final(run: PreparedRun) -> np.ndarray:
    from firmware_sim.engine import run_simulation

    return np.asarray(run_simulation(run.config)["final_global"], dtype=np.float32)


def _coordinator_final(run: PreparedRun) -> np.ndarray:
    from coordinator.store import CoordinatorStore

    store = CoordinatorStore(run.db)
    try:
        assert store.finished
        return store.global_version(store.current_round).weights
    finally:
        store.close()


def _assert_complete(run: PreparedRun) -> None:
    assert run.closed_rounds() == [1, 2, 3]
    for t in (1, 2, 3):
        assert run.admitted(t) == ["board-000", "board-001", "board-002"]
        (record,) = query(run.db, "SELECT record FROM rounds WHERE round=?", (t,))[0:1]
        assert '"selected": [0, 1, 2]' in record[0]
    np.testing.assert_allclose(_coordinator_final(run), _engine_final(run), atol=1e-5)


def test_coordinator_killed_mid_round_resumes_without_loss(prepared_run: PreparedRun) -> None:
    run = prepared_run
    # Board 2 answers 2.5 s after the others: every round has a window with 2 of 3 admitted.
    worker, thread = run.start_worker([0, 1, 2], slow={2: 2500.0})
    coordinator = run.start_coordinator()
    try:
        wait_until(
            lambda: (
                2 in [r[0] for r in query(run.db, "SELECT round FROM rounds WHERE status='open'")]
                and len(run.admitted(2)) >= 1
                and "board-002" not in run.admitted(2)
            ),
            timeout=60,
            what="round 2 open with some but not all updates admitted",
        )
        coordinator.kill()  # SIGKILL mid-round
        coordinator.wait()
        before = run.admitted(2)
        assert run.closed_rounds() == [1]
        assert 1 <= len(before) <= 2
        coordinator = run.start_coordinator()
        wait_until(run.finished, timeout=60, what="the restarted coordinator to finish")
        assert coordinator.wait(20) == 0
        thread.join(20)
        assert not thread.is_alive()
    finally:
        worker.stop_event.set()
        stop_process(coordinator)
    _assert_complete(run)
    log = (run.workdir / "coordinator.log").read_text()
    assert "resumed round 2 with" in log
    # The finished run started again with its broker gone: one probe, then it exits with its
    # summary instead of waiting for the broker for ever.
    run.broker.stop()
    again = run.start_coordinator()
    try:
        assert again.wait(60) == 0, run.logs()
    finally:
        stop_process(again)
    tail = (run.workdir / "coordinator.log").read_text()[len(log) :]
    assert "did not answer" in tail and "finished: 3 round(s)" in tail, tail


def test_board_killed_and_restarted_rejoins_and_forged_updates_are_counted(
    prepared_run: PreparedRun,
) -> None:
    from nacl.signing import SigningKey

    from protocol.envelope import encode_update
    from protocol.layout import TensorLayout
    from protocol.topics import update_topic

    run = prepared_run
    # Board 2 loads first; the other boards answer 0.7 s after each global model. So round 1
    # stays open for 0.7 s after board 2's update, time enough to kill it before round 2 (on an
    # idle machine the rounds of digits otherwise take less time than one poll of its state).
    board = run.start_board(2)
    board_log = run.workdir / "standalone-2" / "board.log"
    state_file = run.workdir / "standalone-2" / "state" / "board-state.npz"
    wait_until(
        lambda: board_log.exists() and "telemetry:" in board_log.read_text(),
        timeout=120,
        what="board 2 to load its model",
    )
    worker, _ = run.start_worker([0, 1], latency_ms=700.0)
    coordinator = run.start_coordinator()
    try:
        wait_until(state_file.exists, timeout=90, what="board 2 to finish round 1")
        board.kill()  # SIGKILL: no clean disconnect, the broker publishes the Last Will
        board.wait()
        wait_until(
            lambda: (
                query(run.db, "SELECT status FROM statuses WHERE client='board-002'")
                == [("offline",)]
            ),
            timeout=60,
            what="board 2's Last Will (offline) to reach the coordinator",
            logs=run.logs,
        )
        # Round 1 (board 2's last update) closes once the other boards answer; the forged
        # messages below go to round 2, which board 2 has not reached.
        # (the worker hosting boards 0 and 1 may still be loading TensorFlow on a busy machine)
        wait_until(lambda: 1 in run.closed_rounds(), timeout=120, what="round 1 to close")
        # While board 2 is down: an update for it signed with a stranger's key, and garbage.
        layout = TensorLayout(worker.layout.entries)
        (base,) = query(run.db, "SELECT base_sha256 FROM rounds WHERE status='open'")[0]
        (current,) = query(run.db, "SELECT round FROM rounds WHERE status='open'")[0]
        forged = encode_update(
            run=run.spec.run,
            round=current,
            client="board-002",
            signing_key=SigningKey.generate(),
            delta=np.full(layout.size, 9.0, np.float32),
            layout=layout,
            base_sha256=base,
            samples=400,
            alarm=False,
        )
        topic = update_topic(run.spec.run, "board-002")
        forged_file = run.workdir / "forged.bin"
        forged_file.write_bytes(forged)
        for payload in (["-f", str(forged_file)], ["-m", "not a message"]):
            subprocess.run(
                [
                    "mosquitto_pub",
                    "-h",
                    run.broker.host,
                    "-p",
                    str(run.broker.port),
                    "-q",
                    "1",
                    "-V",
                    "5",
                    "-t",
                    topic,
                    *payload,
                ],
                check=True,
                timeout=10,
            )
        wait_until(
            lambda: {"bad_signature", "malformed"} <= set(run.decisions()),
            timeout=20,
            what="the forged messages to be rejected and counted",
        )
        assert "board-002" not in run.admitted(current)
        board = run.start_board(2)
        wait_until(run.finished, timeout=90, what="the run to finish after board 2 restarted")
        assert coordinator.wait(20) == 0
        assert board.wait(30) == 0
    finally:
        worker.stop_event.set()
        stop_process(board)
        stop_process(coordinator)
    _assert_complete(run)
    counts = run.decisions()
    assert counts["bad_signature"] == 1 and counts["malformed"] == 1
    reasons = {r[0] for r in query(run.db, "SELECT reason FROM rejections")}
    assert reasons == {"bad_signature", "malformed"}
    assert "resumed state" in (run.workdir / "standalone-2" / "board.log").read_text()


def test_broker_restart_mid_run_everyone_recovers(prepared_run: PreparedRun) -> None:
    run = prepared_run
    worker, thread = run.start_worker([0, 1, 2], latency_ms=700.0)
    coordinator = run.start_coordinator()
    try:
        wait_until(lambda: run.closed_rounds() == [1], timeout=60, what="round 1 to close")
        run.broker.restart(down_seconds=1.5)
        wait_until(run.finished, timeout=60, what="the run to finish after the broker restart")
        assert coordinator.wait(20) == 0
        thread.join(20)
        assert not thread.is_alive()
    finally:
        worker.stop_event.set()
        stop_process(coordinator)
    _assert_complete(run)
    assert sum(link.connects for link in worker.links.values()) >= 6
