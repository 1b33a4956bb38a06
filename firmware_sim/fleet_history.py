"""The history of a fleet run: the coordinator's round records merged with the workers' figures.

Each worker writes JSON lines (a ``fleet`` line describing the data and the attack, then one
``round`` line per round: boards, drops, compute, bytes, wall-clock marks);
:func:`read_worker_stats` reads them, :func:`merge_round` adds them to the coordinator's record
of a round, and :func:`fleet_history` builds the whole ``history.json`` of a finished run (the
in-process engine's keys plus ``network`` and ``timing`` per round).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from firmware_sim.errors import FleetError
from firmware_sim.fleet_spec import FleetOptions

logger = logging.getLogger(__name__)


def read_worker_stats(paths: list[Path]) -> tuple[dict[str, Any], dict[int, list[dict[str, Any]]]]:
    """Parse worker JSON-lines files: the fleet description and per-round lines per round."""
    describe: dict[str, Any] = {}
    rounds: dict[int, list[dict[str, Any]]] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item.get("kind") == "fleet":
                describe = describe or item
            elif item.get("kind") == "round":
                rounds.setdefault(int(item["round"]), []).append(item)
    return describe, rounds


def merge_round(
    record: dict[str, Any], worker_rounds: list[dict[str, Any]], opened_at: float
) -> dict[str, Any]:
    """The history record of one round: the coordinator's record plus the workers' figures."""
    out = dict(record)
    boards = sum(w["boards"] for w in worker_rounds)
    out["board_seconds"] = float(sum(w["board_seconds"] for w in worker_rounds))
    n = max(1, boards)
    out["alarm_ms_mean"] = float(sum(w["alarm_ms_sum"] for w in worker_rounds) / n)
    out["train_ms_mean"] = float(sum(w["train_ms_sum"] for w in worker_rounds) / n)
    out["dropped"] = sorted(i for w in worker_rounds for i in w.get("dropped", []))
    out["sat_out"] = sorted(i for w in worker_rounds for i in w.get("sat_out", []))
    for w in worker_rounds:
        out.update(w.get("metrics", {}))
    net = dict(out.get("network", {}))
    net["update_bytes_sent"] = int(sum(w["update_bytes"] for w in worker_rounds))
    net["global_bytes_delivered"] = int(sum(w["global_bytes"] for w in worker_rounds))
    net["global_deliveries"] = int(sum(w["global_deliveries"] for w in worker_rounds))
    net["resends"] = int(sum(w.get("resends", 0) for w in worker_rounds))
    net["bytes_total"] = net["update_bytes_sent"] + net["global_bytes_delivered"]
    out["network"] = net
    timing = dict(out.get("timing", {}))
    if worker_rounds:
        first = min(w["received_at"] for w in worker_rounds)
        trained = max(w["trained_at"] for w in worker_rounds)
        timing["global_delivery_seconds"] = max(0.0, first - opened_at)
        timing["board_compute_seconds"] = out["board_seconds"]
        timing["train_and_tamper_seconds"] = max(0.0, trained - first)
        timing["seal_seconds"] = float(sum(w.get("seal_seconds", 0.0) for w in worker_rounds))
        timing["published_at"] = max(w.get("published_at", 0.0) for w in worker_rounds)
        timing["trained_at"] = trained
        timing["first_received_at"] = first
        timing["pipelined"] = all(bool(w.get("pipelined")) for w in worker_rounds)
        timing["async_start_lag_max"] = max(w.get("start_lag_max", 0.0) for w in worker_rounds)
    timing["wall_seconds"] = out.get("seconds", 0.0)
    out["timing"] = timing
    out["boards_reporting"] = boards
    return out


def fleet_history(
    config: Any,
    options: FleetOptions,
    store: Any,
    stats_paths: list[Path],
    broker_kind: str,
    protocol: int,
    workers: int,
) -> dict[str, Any]:
    """The ``history.json`` of a finished fleet run from its coordinator database (``store``)
    and its workers' statistics files."""
    from firmware_sim.report import ban_outcome

    describe, worker_rounds = read_worker_stats(stats_paths)
    describe = {k: v for k, v in describe.items() if k not in ("kind", "worker")}
    rows = [r for r in store.round_rows() if r.status == "closed"]
    rounds = [
        merge_round(r.record or {}, worker_rounds.get(r.round, []), r.opened_at) for r in rows
    ]
    if not rounds:
        raise FleetError("the coordinator closed no round")
    final_round = store.current_round
    final = store.global_version(final_round)
    accs = [r["test_accuracy"] for r in rounds if r.get("test_accuracy") is not None]
    totals = [r["network"]["bytes_total"] for r in rounds]
    seconds = [r["seconds"] for r in rounds]
    config_dict = asdict(config)
    config_dict["dataset"] = describe.get("dataset", config.dataset)
    malicious = describe.get("malicious_ids")
    bans = ban_outcome(rounds, malicious if isinstance(malicious, list) else None)
    return {
        "config": config_dict,
        "fleet": {
            **describe,
            "clients": config.clients,
            "transport": {
                "kind": "mqtt",
                "broker": broker_kind,
                "protocol": "5" if protocol == 5 else "3.1.1",
                "workers": workers,
                "connections": config.clients + 1,
                "profiles": config.profile,
            },
        },
        "rounds": rounds,
        "summary": {
            "final_test_accuracy": rounds[-1].get("test_accuracy"),
            "final_test_loss": rounds[-1].get("test_loss"),
            "best_test_accuracy": max(accs) if accs else None,
            "round_seconds_mean": float(np.mean(seconds)),
            "bytes_per_round_mean": float(np.mean(totals)),
            "rejections": {
                k: v
                for k, v in store.decision_counts().items()
                if k not in ("accepted", "stale", "duplicate")
            },
            "malicious_ids": malicious if isinstance(malicious, list) else None,
            "bans": bans,
        },
        "strategy_state": rows[-1].strategy_state,
        "final_global": final.weights,
    }
