"""Writing a run's results: ``history.json`` and the accuracy-per-round plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def write_history(history: dict[str, Any], out_dir: Path) -> Path:
    """Write ``history.json``; the final weights go to ``global.npy`` and the server's saved
    state (for SIREN a whole model vector) to ``strategy_state.json``, so the history stays small.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in history.items() if k not in ("final_global", "strategy_state")}
    path = out_dir / "history.json"
    _write_json(path, data)
    if "strategy_state" in history:
        _write_json(out_dir / "strategy_state.json", history["strategy_state"])
    if "final_global" in history:
        np.save(out_dir / "global.npy", np.asarray(history["final_global"], dtype=np.float32))
    return path


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_default))
    tmp.replace(path)


def ban_outcome(
    rounds: list[dict[str, Any]], malicious_ids: list[int] | None
) -> dict[str, Any] | None:
    """Who the server banned by the end of a run, against who was malicious.

    Parameters
    ----------
    rounds : list of dict
        The history's round records; a strategy that bans (SIREN's penalty mechanism) lists its
        banned clients in ``decision["banned"]`` after every round.
    malicious_ids : list of int or None
        The malicious boards, when the simulator knows them (None: unknown).

    Returns
    -------
    dict or None
        None when no round records bans (rules without a penalty mechanism). Otherwise
        ``banned`` (after the last round), ``ever_banned`` (in any round), and when
        ``malicious_ids`` is known: ``honest_banned`` / ``honest_banned_count`` (honest boards
        banned at the end), ``honest_ever_banned`` (honest boards banned at some point, even if
        they rejoined) and ``attackers_missed`` / ``attackers_missed_count`` (malicious boards
        not banned at the end).
    """
    lists = [
        r["decision"]["banned"]
        for r in rounds
        if isinstance(r.get("decision"), dict) and isinstance(r["decision"].get("banned"), list)
    ]
    if not lists:
        return None
    banned = sorted(int(c) for c in lists[-1])
    ever = sorted({int(c) for banned_then in lists for c in banned_then})
    out: dict[str, Any] = {"banned": banned, "ever_banned": ever}
    if malicious_ids is not None:
        bad = {int(c) for c in malicious_ids}
        out["honest_banned"] = [c for c in banned if c not in bad]
        out["honest_banned_count"] = len(out["honest_banned"])
        out["honest_ever_banned"] = [c for c in ever if c not in bad]
        out["attackers_missed"] = sorted(bad - set(banned))
        out["attackers_missed_count"] = len(out["attackers_missed"])
    return out


def format_ban_outcome(outcome: dict[str, Any] | None) -> str | None:
    """One line for a run's summary (None when the strategy does not ban).

    ``banned [2, 4, 6, 7]: 0 honest boards banned, 0 of 4 attackers missed``; without known
    malicious boards only the banned list.
    """
    if outcome is None:
        return None
    line = f"banned {outcome['banned']}"
    if "honest_banned" not in outcome:
        return line + " (malicious boards unknown)"
    honest = outcome["honest_banned"]
    attackers = outcome["attackers_missed_count"] + len(outcome["banned"]) - len(honest)
    line += f": {len(honest)} honest board{'' if len(honest) == 1 else 's'} banned"
    if honest:
        line += f" {honest}"
    if attackers:
        line += f", {outcome['attackers_missed_count']} of {attackers} attackers missed"
    else:
        line += " (no attackers)"
    if outcome["attackers_missed"]:
        line += f" {outcome['attackers_missed']}"
    rejoined = [c for c in outcome["honest_ever_banned"] if c not in honest]
    if rejoined:
        line += f"; honest boards banned and readmitted: {rejoined}"
    return line


def plot_accuracy(histories: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """Test accuracy per round, one line per labelled history, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, hist in histories.items():
        rounds = [r["round"] for r in hist["rounds"]]
        acc = [100 * r["test_accuracy"] for r in hist["rounds"]]
        ax.plot(rounds, acc, marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def malicious_index(history: dict[str, Any]) -> dict[int, list[float]]:
    """Per client, its SIREN penalty count (malicious index) after each round.

    Read from ``rounds[*].decision.penalty_counts``; NaN in rounds without a SIREN decision
    (e.g. before ``--defense-start-round``). Empty when the run never used SIREN.
    """
    rounds = history.get("rounds", [])
    clients: set[int] = set()
    for r in rounds:
        clients.update(int(c) for c in (r.get("decision") or {}).get("penalty_counts", {}))
    out: dict[int, list[float]] = {c: [] for c in sorted(clients)}
    for r in rounds:
        counts = (r.get("decision") or {}).get("penalty_counts")
        for c, series in out.items():
            value = None if counts is None else counts.get(str(c))
            series.append(float("nan") if value is None else float(value))
    return out


def plot_malicious_index(history: dict[str, Any], path: Path, title: str = "") -> Path | None:
    """Plot each client's malicious index per round (SIREN Figs. 11-14); None without SIREN data.

    Malicious boards (``fleet.malicious_ids``) are drawn dashed in warm colours, benign boards
    solid in cool ones; the dotted green line is the penalty threshold C_p.
    """
    index = malicious_index(history)
    if not index:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history["rounds"]]
    bad = set(history.get("fleet", {}).get("malicious_ids") or [])
    warm = plt.get_cmap("autumn")
    cool = plt.get_cmap("winter")
    n_bad = max(1, len(bad))
    n_good = max(1, len(index) - len(bad))
    i_bad = i_good = 0
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for client, series in index.items():
        if client in bad:
            colour, style, label = warm(i_bad / n_bad), "--", f"board {client} (malicious)"
            i_bad += 1
        else:
            colour, style, label = cool(i_good / n_good), "-", f"board {client}"
            i_good += 1
        ax.plot(rounds, series, style, color=colour, marker="o", markersize=2, label=label)
    c_p = next(
        (r["decision"]["c_p"] for r in history["rounds"] if "c_p" in (r.get("decision") or {})),
        None,
    )
    if c_p is not None:
        ax.axhline(c_p, color="green", linestyle=":", label=f"C_p = {c_p:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("malicious index (penalty count)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=6, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
