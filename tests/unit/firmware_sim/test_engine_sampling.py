"""SIREN under client sampling, in process, in the README's demo setting on digits.

The demo (``siren sim fleet`` without options) is 10 boards, 4 of them flipping signs, SIREN's
default profile, 10 rounds; here half of the boards are drawn per round. Fashion-MNIST's demo
with sampling is measured by ``siren bench participation`` (benchmarks/participation.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from firmware_sim.engine import SimConfig, run_simulation, select_clients

DEMO: dict[str, Any] = dict(
    dataset="digits",
    clients=10,
    rounds=10,
    aggregator="siren",
    attack="sign_flip",
    malicious=0.4,
    client_fraction=0.5,
)


@pytest.mark.parametrize("seed", [0, 3])
def test_sampled_siren_demo_bans_no_honest_board_and_judges_only_who_took_part(
    digits: Any, seed: int
) -> None:
    config = SimConfig(seed=seed, **DEMO)
    history = run_simulation(config, dataset=digits)
    rounds = history["rounds"]
    bans = history["summary"]["bans"]
    assert bans["honest_banned"] == [] and not set(bans["ever_banned"]) - set(
        history["summary"]["malicious_ids"]
    )
    assert history["summary"]["best_test_accuracy"] > 0.75
    took_part: set[int] = set()
    counts = {str(i): 0.0 for i in range(10)}
    for record in rounds:
        drawn = select_clients(config, record["round"])
        assert record["sampled"] == record["selected"] == drawn and len(drawn) == 5
        assert sorted(int(c) for c in record["alarms"]) == drawn
        for cid, board in record["boards"].items():
            # The alarm compares g_t with the board's own latest local model, from the last
            # round it took part in (none before its first: no alarm then).
            first_time = int(cid) not in took_part
            assert (board["local_accuracy"] is None) == first_time
            if first_time:
                assert record["alarms"][cid] is False
        took_part.update(drawn)
        # Penalties and awards follow the boards that took part: the others' counts stay.
        after = record["decision"]["penalty_counts"]
        for cid, count in after.items():
            if int(cid) not in drawn:
                assert count == counts[cid], (record["round"], cid)
        counts = dict(after)
