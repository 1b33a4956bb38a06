"""A small SIREN run in a real coordinator store, for the HTTP API tests.

Four boards: round 1 is a clean case-1 round, round 2 a case-4 round with a rollback in which
``board-002`` is judged malicious and banned and ``board-003`` is missing (its update failed the
signature check), and round 3 is open with one admitted update.

Telemetry: ``board-000`` is a Raspberry Pi (rounds 2 and 3; no power monitor; its alarm did not
run in round 2), ``board-001`` a Jetson with power rails (round 2), ``board-002`` a simulated board
sharing its process with three others and reading no sensor (round 2), ``board-003`` sent none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from coordinator.config import AggregatorSettings, CoordinatorConfig
from coordinator.store import CoordinatorStore, GlobalVersion, StoredUpdate
from protocol.envelope import ZERO_SHA256, encode_global
from protocol.keys import save_key_pair
from protocol.layout import TensorLayout, weights_sha256

RUN = "demo"
TOKEN = "s3cret-admin-token"
BOARDS = ["board-000", "board-001", "board-002", "board-003"]
LAYOUT = TensorLayout.flat(4)
COORD = SigningKey(b"c" * 32)
BASE = "http://127.0.0.1"
NOW = 1030.0
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Controls:
    """The admin contract of :class:`CoordinatorControls`, kept in memory.

    ``fail`` makes the next action raise (as a service that refuses or times out would).
    """

    def __init__(self) -> None:
        self.paused = False
        self.banned: set[str] = set()
        self.keys: dict[str, VerifyKey] = {}
        self.revoked_ids: set[str] = set()
        self.fail: Exception | None = None

    def _check(self) -> None:
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error

    def is_paused(self) -> bool:
        return self.paused

    def admin_banned(self) -> frozenset[str]:
        return frozenset(self.banned)

    def pause(self) -> bool:
        self._check()
        changed, self.paused = not self.paused, True
        return changed

    def resume(self) -> bool:
        self._check()
        changed, self.paused = self.paused, False
        return changed

    def ban(self, client_id: str) -> bool:
        self._check()
        changed = client_id not in self.banned
        self.banned.add(client_id)
        return changed

    def unban(self, client_id: str) -> bool:
        self._check()
        changed = client_id in self.banned
        self.banned.discard(client_id)
        return changed

    def register_key(self, client_id: str, public_key: VerifyKey) -> bool:
        self._check()
        changed = self.keys.get(client_id) != public_key or client_id in self.revoked_ids
        self.keys[client_id] = public_key
        self.revoked_ids.discard(client_id)
        return changed

    def revoke(self, client_id: str) -> bool:
        self._check()
        changed = client_id not in self.revoked_ids
        self.revoked_ids.add(client_id)
        return changed

    def revoked(self) -> frozenset[str]:
        return frozenset(self.revoked_ids)


def _global(round_index: int, value: float, previous: str) -> GlobalVersion:
    weights = np.full(4, value, dtype=np.float32)
    message = encode_global(
        run=RUN,
        round=round_index,
        signing_key=COORD,
        weights=weights,
        layout=LAYOUT,
        previous_sha256=previous,
        samples=0 if round_index == 1 else 400,
    )
    return GlobalVersion(round_index, weights, weights_sha256(weights), previous, message, 0)


def _admit(store: CoordinatorStore, round_index: int, index: int, alarm: bool, at: float) -> None:
    tag = f"{round_index}{index}"
    store.admit(
        StoredUpdate(
            round=round_index,
            client=BOARDS[index],
            client_index=index,
            message_id=tag * 8,
            digest=hashlib.sha256(tag.encode()).hexdigest(),
            nonce=tag * 16,
            samples=100,
            alarm=alarm,
            nbytes=500,
            received_at=at,
            delta=np.zeros(4, dtype=np.float32),
        )
    )


def _siren(case: int, branch: str, **sets: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "rule": "siren",
        "case": case,
        "branch": branch,
        "alarming": [],
        "silent": [],
        "benign": [],
        "malicious": [],
        "ignored": [],
        "refused": [],
        "probed": [],
        "awarded": [],
        "root_accuracy": {},
        "max_alarming_accuracy": None,
        "max_silent_accuracy": None,
        "rollback": False,
        "base": "g_t",
        "penalty_counts": {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0},
        "banned": [],
        "newly_banned": [],
        "rejoined": [],
        "c_s": 0.1,
        "c_p": 0.5,
        "c_a": 0.5,
    }
    record.update(sets)
    return record


ROUND_1 = {
    "round": 1,
    "test_accuracy": 0.5,
    "test_loss": float("nan"),
    "seconds": 5.0,
    "selected": [0, 1, 2, 3],
    "clients": {str(i): b for i, b in enumerate(BOARDS)},
    "missing": [],
    "close_reason": "all",
    "sample_counts": {str(i): 100 for i in range(4)},
    "alarms": {str(i): False for i in range(4)},
    "defense_active": True,
    "verdicts": {
        str(i): {"kept": True, "weight": 0.25, "score": None, "reason": "siren case 1: benign"}
        for i in range(4)
    },
    "decision": _siren(1, "no-alarm", silent=[0, 1, 2, 3], benign=[0, 1, 2, 3]),
    "network": {"updates": 4, "update_bytes": 2000, "global_bytes": 300, "duplicates": 0},
    "timing": {"aggregate_seconds": 0.01},
}

ROUND_2 = {
    "round": 2,
    "test_accuracy": 0.7,
    "test_loss": 0.9,
    "seconds": 12.0,
    "selected": [0, 1, 2],
    "clients": {str(i): BOARDS[i] for i in range(3)},
    "missing": ["board-003"],
    "close_reason": "deadline",
    "sample_counts": {"0": 100, "1": 100, "2": 100},
    "alarms": {"0": True, "1": True, "2": False},
    "defense_active": True,
    "verdicts": {
        "0": {"kept": True, "weight": 0.5, "score": 0.8, "reason": "siren case 4: benign"},
        "1": {"kept": True, "weight": 0.5, "score": 0.75, "reason": "siren case 4: benign"},
        "2": {"kept": False, "weight": 0.0, "score": 0.3, "reason": "siren case 4: malicious"},
    },
    "decision": _siren(
        4,
        "divergent",
        alarming=[0, 1],
        silent=[2],
        benign=[0, 1],
        malicious=[2],
        root_accuracy={"0": 0.8, "1": 0.75, "2": 0.3},
        max_alarming_accuracy=0.8,
        rollback=True,
        base="g_{t-1}",
        penalty_counts={"0": 0.0, "1": 0.0, "2": 1.0, "3": 0.0},
        banned=[2],
        newly_banned=[2],
    ),
    "network": {"updates": 3, "update_bytes": 1500, "global_bytes": 300, "duplicates": 0},
    "timing": {"aggregate_seconds": 0.02},
}


PI_ROUND_2 = {
    "rss_peak_mib": 640.0,
    "train_s": 40.0,
    "train_cpu_s": 79.0,
    "soc_temp_c": 65.0,
    "temp_c.cpu-thermal": 65.0,
    "throttled_flags": 0.0,
}
PI_ROUND_3 = {
    "rss_peak_mib": 675.0,
    "alarm_s": 0.031,
    "alarm_cpu_s": 0.03,
    "train_s": 41.5,
    "train_cpu_s": 80.25,
    "soc_temp_c": 71.5,
    "temp_c.cpu-thermal": 71.5,
    "throttled_flags": float(0x50005),
}
JETSON_ROUND_2 = {
    "rss_peak_mib": 870.5,
    "alarm_s": 0.012,
    "alarm_cpu_s": 0.02,
    "train_s": 9.5,
    "train_cpu_s": 30.0,
    "soc_temp_c": 47.5,
    "temp_c.cpu-thermal": 47.5,
    "temp_c.tj-thermal": 47.5,
    "power_mw": 6005.0,
    "power_mw.VDD_IN": 6005.0,
    "power_mw.VDD_SOC": 1499.0,
}
FLEET_ROUND_2 = {
    "rss_peak_mib": 1200.0,
    "process_boards": 4.0,
    "alarm_s": 0.002,
    "alarm_cpu_s": 0.002,
    "train_s": 0.05,
    "train_cpu_s": 0.08,
}


def populate(store: CoordinatorStore) -> list[GlobalVersion]:
    """Two closed rounds and an open third one (see the module docstring)."""
    g1 = _global(1, 0.0, ZERO_SHA256)
    g2 = _global(2, 1.0, g1.sha256)
    g3 = _global(3, 2.0, g2.sha256)
    store.initialize(
        run=RUN,
        layout_fingerprint=LAYOUT.fingerprint,
        config={"clients": BOARDS, "rounds": 5},
        first=g1,
        strategy_state={},
        now=1000.0,
    )
    for i in range(4):
        _admit(store, 1, i, False, 1001.0 + i)
    store.close_round(
        1, record=ROUND_1, strategy_state={}, next_global=g2, finished=False, now=1005
    )
    _admit(store, 2, 0, True, 1006.0)
    _admit(store, 2, 1, True, 1007.0)
    _admit(store, 2, 2, False, 1008.0)
    store.count(
        2,
        "bad_signature",
        client="board-003",
        detail="signature of the update message from 'board-003' does not verify",
        log=True,
        at=1009.0,
    )
    store.close_round(
        2, record=ROUND_2, strategy_state={}, next_global=g3, finished=False, now=1017
    )
    _admit(store, 3, 0, True, 1018.0)
    store.count(
        3,
        "stale_round",
        client="board-001",
        detail="update is for round 2, the current round is 3",
        log=True,
        at=1019.0,
    )
    store.count(3, "duplicate")
    store.set_status("board-001", "online", 2, 1007.5, telemetry=JETSON_ROUND_2)
    store.set_status("board-000", "online", 2, 1012.0, telemetry=PI_ROUND_2)
    store.set_status("board-000", "online", 3, 1020.0, telemetry=PI_ROUND_3)
    store.set_status("board-001", "online", 3, 1015.0)
    store.set_status("board-002", "offline", 2, 1016.0, telemetry=FLEET_ROUND_2)
    return [g1, g2, g3]


def make_config(tmp_path: Path, **overrides: Any) -> CoordinatorConfig:
    save_key_pair(tmp_path / "keys", COORD, overwrite=True)
    values: dict[str, Any] = {
        "run": RUN,
        "key_dir": tmp_path / "keys",
        "allow_list": tmp_path / "allow-list.txt",
        "db": tmp_path / "coordinator.sqlite",
        "clients": tuple(BOARDS),
        "rounds": 5,
        "round_timeout": 60.0,
        "aggregator": AggregatorSettings("siren"),
    }
    values.update(overrides)
    return CoordinatorConfig(**values)
