"""Partial participation with SIREN: client sampling in the README's demo
(``siren bench participation sampling``); synchronous, sampled and buffered asynchronous rounds
on an uneven fleet are ``siren bench participation compare``
(:mod:`benchmarks.participation_compare`).

The demo is what ``siren sim fleet`` runs without options: 10 boards of Fashion-MNIST, 4 of them
flipping signs (boost −4), SIREN's default profile on the server and the alarm on the boards,
10 rounds of one local epoch. The benchmark runs it

* in process (:func:`firmware_sim.engine.run_simulation`) for several seeds, with every board in
  every round, with half of the boards drawn per round, and with half drawn and SIREN's penalty
  threshold ``c_p`` lowered to match (``int(0.45 · T/2) = 2``);
* over MQTT (:func:`firmware_sim.fleet.run_fleet`: a private Mosquitto, the coordinator service,
  a worker hosting the boards) with half of the boards drawn, for the first seed, and compares
  it round by round with the in-process run of the same seed.

It reports final and best test accuracy, the honest boards banned (at any point of the run)
and the attackers missed (not banned at the end), the honest boards' highest penalty count
against ``C_p``, and the rounds in which no drawn board alarmed while attackers took part (the
rounds a sign flipper can poison, SIREN Fig. 3 case 2). Results:
``benchmarks/results/participation-sampling.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

#: The demo's settings (``siren sim fleet`` without options), dataset left to the caller.
DEMO: dict[str, Any] = dict(
    clients=10,
    rounds=10,
    aggregator="siren",
    attack="sign_flip",
    malicious=0.4,
)

#: The variants compared: label, client fraction, SIREN parameters.
VARIANTS: tuple[tuple[str, float, dict[str, Any]], ...] = (
    ("every board, every round", 1.0, {}),
    ("half drawn per round", 0.5, {}),
    ("half drawn, c_p = 2", 0.5, {"c_p": 2.0}),
)


def summarize(history: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run (module docstring)."""
    rounds = history["rounds"]
    summary = history["summary"]
    bans = summary.get("bans") or {}
    malicious = set(summary.get("malicious_ids") or [])
    last = rounds[-1]["decision"]
    honest_counts = [v for c, v in last["penalty_counts"].items() if int(c) not in malicious]
    open_rounds = [
        r["round"]
        for r in rounds
        if not any(r["alarms"].values()) and malicious & {int(c) for c in r["alarms"]}
    ]
    return {
        "final": summary["final_test_accuracy"],
        "best": summary["best_test_accuracy"],
        "honest_banned": list(bans.get("honest_ever_banned", [])),
        "missed": list(bans.get("attackers_missed", [])),
        "honest_max_count": max(honest_counts) if honest_counts else 0.0,
        "c_p": last["c_p"],
        "open_rounds": open_rounds,
        "accuracy": [r["test_accuracy"] for r in rounds],
    }


def compare_transports(fleet: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """How far the MQTT run is from the in-process run of the same seed, round by round."""
    pairs = list(zip(fleet["rounds"], engine["rounds"]))
    return {
        "same_draws": all(a.get("sampled") == b.get("sampled") for a, b in pairs),
        "same_decisions": all(
            a["decision"].get(k) == b["decision"].get(k)
            for a, b in pairs
            for k in ("case", "rollback", "banned")
        ),
        "max_accuracy_gap": max(abs(a["test_accuracy"] - b["test_accuracy"]) for a, b in pairs),
        "rounds": len(pairs),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the in-process runs."""
    lines = [
        "| variant | seed | final | best | honest boards banned | attackers missed | honest max "
        "count / C_p | rounds open to the attack |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {_pct(r['final'])} | {_pct(r['best'])} | "
            f"{r['honest_banned'] or 'none'} | {r['missed'] or 'none'} | "
            f"{r['honest_max_count']:g} / {r['c_p']:g} | {r['open_rounds'] or 'none'} |"
        )
    return "\n".join(lines)


def format_means(rows: list[dict[str, Any]]) -> str:
    """Mean final accuracy and ban counts per variant."""
    lines = [
        "| variant | runs | mean final | mean best | honest boards banned (all runs) | "
        "attackers missed (all runs) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, _, _ in VARIANTS:
        mine = [r for r in rows if r["variant"] == label]
        if not mine:
            continue
        final = sum(r["final"] for r in mine) / len(mine)
        best = sum(r["best"] for r in mine) / len(mine)
        honest = sum(len(r["honest_banned"]) for r in mine)
        missed = sum(len(r["missed"]) for r in mine)
        lines.append(
            f"| {label} | {len(mine)} | {_pct(final)} | {_pct(best)} | {honest} | "
            f"{missed} of {4 * len(mine)} |"
        )
    return "\n".join(lines)


def run_sampling(args: argparse.Namespace) -> int:
    """The ``sampling`` benchmark (module docstring)."""
    from firmware_sim.engine import SimConfig, run_simulation
    from firmware_sim.fleet import run_fleet
    from firmware_sim.fleet_spec import FleetOptions
    from models.datasets import load_dataset

    dataset = load_dataset(args.dataset)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    engine_runs: dict[int, dict[str, Any]] = {}
    for seed in range(args.seeds):
        for label, fraction, params in VARIANTS:
            config = SimConfig(
                dataset=dataset.name,
                client_fraction=fraction,
                aggregator_params=dict(params),
                seed=seed,
                **DEMO,
            )
            t0 = time.perf_counter()
            history = run_simulation(config, dataset=dataset)
            row = {"variant": label, "seed": seed, **summarize(history)}
            rows.append(row)
            if fraction < 1.0 and not params:
                engine_runs[seed] = history
            print(
                f"{label}, seed {seed}: final {_pct(row['final'])}, honest banned "
                f"{row['honest_banned']}, missed {row['missed']} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    fleet_row: dict[str, Any] | None = None
    if not args.no_fleet:
        config = SimConfig(dataset=dataset.name, client_fraction=0.5, seed=0, **DEMO)
        with tempfile.TemporaryDirectory(prefix="siren-bench-participation-") as tmp:
            t0 = time.perf_counter()
            history = run_fleet(
                config, FleetOptions(broker=args.broker), Path(tmp) / "fleet", timeout=3600
            )
            seconds = time.perf_counter() - t0
        fleet_row = {
            **summarize(history),
            **compare_transports(history, engine_runs[0]),
            "seconds": seconds,
            "sat_out": [len(r.get("sat_out", [])) for r in history["rounds"]],
            "missing": sum(len(r.get("missing", [])) for r in history["rounds"]),
        }
        print(
            f"MQTT, half drawn, seed 0: final {_pct(fleet_row['final'])}, same draws "
            f"{fleet_row['same_draws']}, same decisions {fleet_row['same_decisions']}, largest "
            f"accuracy gap {fleet_row['max_accuracy_gap']:.2e} ({seconds:.0f} s)",
            flush=True,
        )
    print(format_means(rows))
    out = Path(args.out)
    write_report(rows, fleet_row, args, time.perf_counter() - started, out)
    print(f"wrote {out}")
    return 0


def write_report(
    rows: list[dict[str, Any]],
    fleet_row: dict[str, Any] | None,
    args: argparse.Namespace,
    seconds: float,
    out: Path,
) -> None:
    """Write the Markdown results file."""
    command = "siren bench participation sampling " + " ".join(args.argv)
    text = [
        "# Client sampling with SIREN in the demo",
        "",
        f"`{command.strip()}` — {args.dataset}, 10 boards, 4 sign flippers (boost −4), SIREN "
        "(default `authors` profile: C_p = int(0.45·T) = 4) with the boards' alarm, 10 rounds "
        "of one local epoch; half drawn = `--client-fraction 0.5`, 5 boards per round. Each "
        "drawn board's alarm compares the global model with its own latest local model, from "
        "the last round it took part in (none on its first: no alarm); penalties change only "
        "for the boards that took part (`docs/participation.md`).",
        "",
        "## Per variant",
        "",
        format_means(rows),
        "",
        "## Every run",
        "",
        format_table(rows),
        "",
        "*Rounds open to the attack*: rounds in which attackers were drawn and no drawn board "
        "alarmed, so SIREN aggregated everything (Fig. 3 cases 1-2); the next round's alarms "
        "roll such a model back.",
    ]
    if fleet_row is not None:
        text += [
            "",
            "## Over MQTT",
            "",
            "`siren sim fleet --client-fraction 0.5` (seed 0: a private Mosquitto, the "
            "coordinator service, one worker hosting the 10 boards) against the in-process run "
            "of the same seed:",
            "",
            f"- final accuracy {_pct(fleet_row['final'])} (best {_pct(fleet_row['best'])}); "
            f"honest boards banned: {fleet_row['honest_banned'] or 'none'}; attackers missed: "
            f"{fleet_row['missed'] or 'none'};",
            f"- the same boards drawn in every round: {fleet_row['same_draws']}; the same SIREN "
            f"case, rollback and bans in every round: {fleet_row['same_decisions']}; largest "
            f"difference in test accuracy over the {fleet_row['rounds']} rounds: "
            f"{fleet_row['max_accuracy_gap']:.2e};",
            f"- boards sitting out per round: {fleet_row['sat_out']}; drawn boards missing: "
            f"{fleet_row['missing']}; wall time {fleet_row['seconds']:.0f} s.",
        ]
    text += [
        "",
        "## Environment",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, Python "
        f"{platform.python_version()}; whole benchmark {seconds / 60:.0f} min.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    """``siren bench participation sampling [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="siren bench participation",
        description="Partial participation with SIREN: client sampling in the README's demo "
        "(sampling); synchronous, sampled and buffered asynchronous rounds on an uneven fleet "
        "(compare); buffered asynchronous rounds in process and over MQTT (transports).",
    )
    sub = p.add_subparsers(dest="part", required=True, metavar="PART")
    s = sub.add_parser("sampling", help="client sampling with SIREN in the README's demo")
    s.add_argument("--dataset", default="fashion-mnist", help="dataset (default: fashion-mnist)")
    s.add_argument("--seeds", type=int, default=3, help="in-process seeds (default: 3)")
    s.add_argument("--broker", default="mosquitto", help="broker of the MQTT run")
    s.add_argument("--no-fleet", action="store_true", help="skip the MQTT run")
    s.add_argument(
        "--out",
        default=str(RESULTS / "participation-sampling.md"),
        help="Markdown output file (default: benchmarks/results/participation-sampling.md)",
    )
    c = sub.add_parser(
        "compare", help="sync, sampled and buffered async rounds on a mixed 50-board fleet"
    )
    from benchmarks.participation_compare import (
        add_arguments,
        add_transport_arguments,
        run_compare,
        run_transports,
    )

    add_arguments(c)
    t = sub.add_parser(
        "transports", help="buffered async in process and over MQTT, same seeds, side by side"
    )
    add_transport_arguments(t)
    args = p.parse_args(argv)
    args.argv = argv[1:]
    if args.part == "compare":
        return run_compare(args)
    if args.part == "transports":
        return run_transports(args)
    if args.part == "sampling":
        if args.seeds < 1:
            p.error(f"--seeds must be >= 1, got {args.seeds}")
        return run_sampling(args)
    return 2  # pragma: no cover - argparse refuses other parts


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
