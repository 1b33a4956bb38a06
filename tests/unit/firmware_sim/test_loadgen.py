"""The load generator's updates are real, verifiable protocol messages from seeded keys."""

from __future__ import annotations

import numpy as np

from firmware_sim.loadgen import board_keys, presign_updates, synthetic_updates
from protocol.envelope import ZERO_SHA256, decode_message
from protocol.layout import TensorLayout
from protocol.topics import parse_topic


def test_keys_are_seeded_and_updates_verify() -> None:
    keys = board_keys(5, seed=3)
    assert list(keys) == [f"board-{i:05d}" for i in range(5)]
    assert bytes(board_keys(5, seed=3)["board-00002"]) == bytes(keys["board-00002"])
    assert bytes(board_keys(5, seed=4)["board-00002"]) != bytes(keys["board-00002"])
    layout = TensorLayout.flat(50)
    messages = presign_updates(
        run="lg", round_index=2, base_sha256=ZERO_SHA256, signers=keys, layout=layout, attackers=1
    )
    verify = {c: k.verify_key for c, k in keys.items()}
    for (topic, payload), client in zip(messages, keys):
        message = decode_message(payload, verify)
        assert message.client == client == parse_topic(topic).client
        assert message.round == 2 and message.header.samples == 100
    # The attacker's update points the other way, ten times longer.
    vectors = [v for _, v in synthetic_updates(5, 50, attackers=1)]
    honest = np.mean(vectors[:4], axis=0)
    assert float(np.dot(vectors[4], honest)) < 0
    assert np.linalg.norm(vectors[4]) > 5 * np.linalg.norm(vectors[0])
