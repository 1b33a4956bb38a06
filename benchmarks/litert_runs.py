"""Whole federated runs trained in LiteRT vs Keras (``siren bench litert-runs``).

The same simulated run (:func:`firmware_sim.engine.run_simulation`, fixed seed) twice per
aggregator: every board training with Keras (``--train-backend keras``) and with the model's
builtin-only LiteRT training artifact (``--train-backend litert``). The coordinator's side is
Keras in both. Reports each round's test accuracy, the final difference (the backends should
agree to at most 0.5 points), the boards' mean training time per round, and whether the SIREN
alarms and decision cases agree round by round.

Results: ``benchmarks/results/litert-runs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"


def compare(config: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """Run ``config`` with both backends; return accuracies, times and agreement."""
    from firmware_sim.engine import SimConfig, run_simulation

    runs = {}
    for backend in ("keras", "litert"):
        print(f"  {config['aggregator']} with {backend} boards ...", flush=True)
        t0 = time.perf_counter()
        history = run_simulation(SimConfig(train_backend=backend, **config), dataset=dataset)
        runs[backend] = {
            "accuracy": [r["test_accuracy"] for r in history["rounds"]],
            "train_ms_mean": [r["train_ms_mean"] for r in history["rounds"]],
            "alarms": [r["alarms"] for r in history["rounds"]],
            "cases": [r["decision"].get("case") for r in history["rounds"]],
            "seconds": time.perf_counter() - t0,
            "model": history["fleet"]["model"],
        }
    keras, lite = runs["keras"], runs["litert"]
    return {
        "config": config,
        "model": keras["model"],
        "keras": keras,
        "litert": lite,
        "final_difference_points": 100 * (lite["accuracy"][-1] - keras["accuracy"][-1]),
        "max_round_difference_points": 100
        * max(abs(a - b) for a, b in zip(lite["accuracy"], keras["accuracy"], strict=True)),
        "same_alarms": lite["alarms"] == keras["alarms"],
        "same_cases": lite["cases"] == keras["cases"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per compared run."""
    lines = [
        "| dataset / model | aggregator | final accuracy keras | final accuracy litert | "
        "difference | largest difference in any round | same alarms / cases | board training "
        "per round, keras / litert |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, lt = r["keras"], r["litert"]
        mean_k = sum(k["train_ms_mean"]) / len(k["train_ms_mean"])
        mean_l = sum(lt["train_ms_mean"]) / len(lt["train_ms_mean"])
        lines.append(
            f"| {r['config']['dataset']} / {r['model']} | {r['config']['aggregator']} | "
            f"{100 * k['accuracy'][-1]:.2f}% | {100 * lt['accuracy'][-1]:.2f}% | "
            f"{r['final_difference_points']:+.2f} points | "
            f"{r['max_round_difference_points']:.2f} points | "
            f"{'yes' if r['same_alarms'] else 'no'} / {'yes' if r['same_cases'] else 'no'} | "
            f"{mean_k:.0f} / {mean_l:.0f} ms |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparisons and write the results."""
    p = argparse.ArgumentParser(
        prog="siren bench litert-runs", description=help_description(__doc__)
    )
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--aggregators", default="fedavg,siren", help="comma-separated")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument(
        "--train-samples", type=int, default=20000, help="first N training samples (0: all)"
    )
    p.add_argument("--test-samples", type=int, default=2000, help="first N test samples (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "litert-runs.md")
    args = p.parse_args(argv)
    from models.datasets import load_dataset

    dataset = load_dataset(args.dataset)
    rows = []
    for aggregator in [a for a in args.aggregators.split(",") if a]:
        config = {
            "dataset": args.dataset,
            "aggregator": aggregator,
            "clients": args.clients,
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "train_samples": args.train_samples or None,
            "test_samples": args.test_samples or None,
            "seed": args.seed,
        }
        rows.append(compare(config, dataset))
    write_results(rows, args)
    return 0


def differing_alarms(rows: list[dict[str, Any]]) -> list[str]:
    """``"<aggregator> round t: boards ..."`` for every round whose alarms differ by backend."""
    out = []
    for r in rows:
        pairs = zip(r["keras"]["alarms"], r["litert"]["alarms"], strict=True)
        for t, (a, b) in enumerate(pairs, start=1):
            boards = sorted((c for c in a if a[c] != b.get(c)), key=int)
            if boards:
                out.append(f"{r['config']['aggregator']} round {t}: board(s) {', '.join(boards)}")
    return out


def write_results(rows: list[dict[str, Any]], args: Any) -> None:
    """Print the table and write ``args.out``."""
    table = format_table(rows)
    print(table)
    differ = differing_alarms(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Federated runs trained in LiteRT vs Keras\n\n"
        f"Command: `siren bench litert-runs --dataset {args.dataset} --aggregators "
        f"{args.aggregators} --clients {args.clients} --rounds {args.rounds} --local-epochs "
        f"{args.local_epochs} --train-samples {args.train_samples} --test-samples "
        f"{args.test_samples} --seed {args.seed}`  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared, busy), Python "
        f"{platform.python_version()}.\n\n"
        "Each aggregator's run is played twice from the same seed: once with every board "
        "training in Keras, once with the model's builtin-only LiteRT training artifact (the "
        "`litert` board backend). Boards see the same batches in the same order; the "
        "coordinator's side (aggregation, SIREN's root-set checks, test accuracy) is Keras in "
        "both. Board training per round is the boards' mean wall time per round on this "
        "shared machine (the simulator runs every board in one process; Keras uses every "
        "core, the LiteRT interpreter one thread).\n\n"
        f"{table}\n\n"
        + (
            "Alarms that differ between the backends (their local models differ by float32 "
            "rounding, which can flip an alarm close to its threshold): "
            + "; ".join(differ)
            + ".\n\n"
            if differ
            else ""
        )
        + f"```json\n{json.dumps(rows, indent=1)}\n```\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
