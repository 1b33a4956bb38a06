"""Synchronous rounds, client sampling and buffered asynchronous aggregation on an uneven fleet
(``siren bench participation compare``).

A fleet of 50 boards with the ``mixed`` device profiles (:mod:`firmware_sim.profiles`: 20% Pi
Zero 2-class boards 8x slower than the 60% Pi 4-class ones, 20% Jetson-class, every class
dropping out now and then) trains in three ways, each doing the same amount of local training
(``50·T`` board trainings):

* **sync** -- ``T`` rounds in which every board trains; a round lasts as long as its slowest
  reporting board;
* **sampled** -- ``2T`` rounds of half of the boards (``--client-fraction 0.5``);
* **async** -- buffered asynchronous mode, ``50·T/B`` versions of ``B`` updates, staleness bound
  ``S``, staleness weight ``(1+τ)^-1/2``, the rule on the ``B`` buffered updates;
* **async-latest** -- the same, the rule on every board's latest admissible update
  (``--async-pool latest``).

Every run is in process (:func:`firmware_sim.engine.run_simulation`) on the *simulated* clock:
a board needs ``compute factor × compute + latency`` per update, so the comparison holds on a
2-core machine that trains the boards one after the other. *Compute* is measured on this
machine once, before the runs: the median time per training sample of a few boards' local
training (``--nominal-compute`` of every run). Measuring every training instead would let a
preemption by another process on this shared machine, multiplied by a Pi Zero 2's factor of
48, decide a synchronous round's length; one calibrated cost gives every mode the same boards.

Cells: no attack with FedAvg, and 40% sign flipping (boost −4) against SIREN, the coordinate-wise
median, the trimmed mean (β = 0.4) and FedAvg. For each run: final and best test accuracy, the
simulated time, and the time at which it first reaches the synchronous run's final accuracy (of
the same cell).
Results: ``benchmarks/results/participation.md`` (``--out``) and one accuracy-vs-time plot per
dataset; the committed runs are ``participation-digits.md`` and ``participation-fashion-mnist.md``
(one dataset each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

#: (label, aggregator, its parameters, attack)
CELLS: tuple[tuple[str, str, dict[str, Any], str | None], ...] = (
    ("no attack, FedAvg", "fedavg", {}, None),
    ("40% sign flipping, SIREN", "siren", {}, "sign_flip"),
    ("40% sign flipping, median", "median", {}, "sign_flip"),
    ("40% sign flipping, trimmed mean", "trimmed_mean", {"beta": 0.4}, "sign_flip"),
    ("40% sign flipping, FedAvg", "fedavg", {}, "sign_flip"),
)

MODES = ("sync", "sampled", "async", "async-latest")


def mode_settings(mode: str, rounds: int, clients: int, buffer: int, bound: int) -> dict[str, Any]:
    """The ``SimConfig`` fields of a mode for ``rounds`` synchronous rounds' worth of work."""
    if mode == "sync":
        return {"rounds": rounds}
    if mode == "sampled":
        return {"rounds": 2 * rounds, "client_fraction": 0.5}
    return {
        "mode": "async",
        "rounds": max(1, round(rounds * clients / buffer)),
        "buffer_size": buffer,
        "staleness_bound": bound,
        "staleness_weight": "poly:0.5",
        "async_pool": "latest" if mode == "async-latest" else "buffer",
    }


def time_to(history: dict[str, Any], target: float) -> float | None:
    """Simulated time at which the run first reached ``target`` test accuracy (None: never)."""
    for r in history["rounds"]:
        if r["test_accuracy"] >= target - 1e-12:
            return float(r["sim_time"])
    return None


def calibrate(dataset: Any, args: argparse.Namespace, boards: int = 5) -> float:
    """Seconds of local training per sample and epoch on this machine (median of ``boards``
    boards of the benchmark's fleet, after one training that traces the graphs)."""
    import numpy as np

    from firmware_sim.engine import SimConfig, build_fleet

    fleet = build_fleet(
        SimConfig(dataset=dataset.name, clients=args.clients, seed=args.seed), dataset
    )
    start = fleet.trainer.initial_weights
    rng = np.random.default_rng(0)
    first = fleet.boards[0]
    fleet.trainer.train(start, first.x_train, first.y_train, rng)
    per_sample = []
    for data in fleet.boards[1 : boards + 1]:
        t0 = time.perf_counter()
        fleet.trainer.train(start, data.x_train, data.y_train, rng)
        per_sample.append((time.perf_counter() - t0) / max(1, data.num_train))
    return float(np.median(per_sample))


def run_cell(
    dataset: Any, cell: tuple[str, str, dict[str, Any], str | None], args: argparse.Namespace
) -> dict[str, Any]:
    """The three modes of one cell; returns their summaries and accuracy-vs-time series."""
    from firmware_sim.engine import SimConfig, run_simulation

    label, aggregator, params, attack = cell
    out: dict[str, Any] = {"cell": label, "runs": {}}
    nominal = args.calibrated
    for mode in args.mode_list:
        config = SimConfig(
            dataset=dataset.name,
            clients=args.clients,
            seed=args.seed,
            profile=args.profile,
            aggregator=aggregator,
            aggregator_params=dict(params),
            attack=attack,
            malicious=0.4 if attack else 0.0,
            nominal_compute=nominal,
            **mode_settings(mode, args.rounds, args.clients, args.buffer_size, args.staleness),
        )
        t0 = time.perf_counter()
        history = run_simulation(config, dataset=dataset)
        rounds = history["rounds"]
        bans = history["summary"].get("bans") or {}
        refused: dict[str, int] = {}
        for r in rounds:
            for k, v in (r.get("admission") or {}).items():
                refused[k] = refused.get(k, 0) + int(v)
        out["runs"][mode] = {
            "final": history["summary"]["final_test_accuracy"],
            "best": history["summary"]["best_test_accuracy"],
            "sim_seconds": history["summary"]["sim_seconds"],
            "series": [(r["sim_time"], r["test_accuracy"]) for r in rounds],
            "rounds": len(rounds),
            "honest_banned": bans.get("honest_ever_banned"),
            "admission": refused,
            "real_seconds": time.perf_counter() - t0,
        }
        print(
            f"  {label}, {mode}: final {100 * out['runs'][mode]['final']:.2f}%, simulated "
            f"{out['runs'][mode]['sim_seconds']:.0f} s ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    target = out["runs"]["sync"]["final"]
    out["target"] = target
    for run in out["runs"].values():
        series = {"rounds": [{"sim_time": t, "test_accuracy": a} for t, a in run["series"]]}
        run["time_to_sync_final"] = time_to(series, target)
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _secs(x: float | None) -> str:
    return "never" if x is None else f"{x:,.0f} s"


def format_table(cells: list[dict[str, Any]]) -> str:
    """One row per cell and mode."""
    lines = [
        "| cell | mode | final | best | simulated time | reaches sync's final at | "
        "÷ sync's time | honest banned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in cells:
        sync_time = cell["runs"]["sync"]["sim_seconds"]
        for mode in [m for m in MODES if m in cell["runs"]]:
            run = cell["runs"][mode]
            reach = run["time_to_sync_final"]
            ratio = "—" if reach is None else f"{reach / sync_time:.2f}"
            banned = run["honest_banned"]
            lines.append(
                f"| {cell['cell']} | {mode} | {_pct(run['final'])} | {_pct(run['best'])} | "
                f"{_secs(run['sim_seconds'])} | {_secs(reach)} | {ratio} | "
                f"{'—' if banned is None else len(banned)} |"
            )
    return "\n".join(lines)


def checks(cells: list[dict[str, Any]]) -> list[str]:
    """The issue's criteria, as measured."""
    out = []
    for cell in cells:
        runs = cell["runs"]
        if cell["cell"].startswith("no attack"):
            reach = runs["async"]["time_to_sync_final"]
            sync = runs["sync"]["sim_seconds"]
            ok = reach is not None and reach <= 0.5 * sync
            ratio = "never" if reach is None else f"{reach / sync:.2f} of"
            out.append(
                f"- {cell['cell']}: async reaches the synchronous final accuracy "
                f"({_pct(runs['sync']['final'])}) at {ratio} the synchronous simulated time "
                f"(criterion: at most 0.5) — {'met' if ok else 'not met'}."
            )
        elif cell["cell"].endswith("FedAvg"):
            finals = ", ".join(f"{mode} {_pct(run['final'])}" for mode, run in runs.items())
            out.append(f"- {cell['cell']}: FedAvg collapses in every mode ({finals}).")
        else:
            for mode in [m for m in ("async", "async-latest") if m in runs]:
                gap = 100 * (runs[mode]["final"] - runs["sync"]["final"])
                ok = abs(gap) <= 3.0 or gap > 0
                out.append(
                    f"- {cell['cell']}: {mode} {_pct(runs[mode]['final'])} against sync "
                    f"{_pct(runs['sync']['final'])} ({gap:+.2f} points; criterion for SIREN or "
                    f"the median: within 3 points) — {'within' if ok else 'not within'}."
                )
    return out


def plot(cells: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against simulated time, one panel per cell, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cells)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    for ax, cell in zip(axes.flat, cells):
        for mode in [m for m in MODES if m in cell["runs"]]:
            series = cell["runs"][mode]["series"]
            ax.plot(
                [t for t, _ in series],
                [100 * a for _, a in series],
                marker="o" if mode != "async" else None,
                markersize=2,
                label=mode,
            )
        ax.axhline(100 * cell["target"], color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(cell["cell"], fontsize=8)
        ax.set_xlabel("simulated time (s)", fontsize=7)
        ax.set_ylabel("test accuracy (%)", fontsize=7)
        ax.set_ylim(0, 100)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_compare(args: argparse.Namespace) -> int:
    """The ``compare`` benchmark (module docstring)."""
    from models.datasets import load_dataset

    args.cell_list = [int(c) for c in args.cells.split(",") if c.strip()]
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "sync" not in args.mode_list or set(args.mode_list) - set(MODES):
        raise SystemExit(f"--modes must include sync and be among {', '.join(MODES)}")
    started = time.perf_counter()
    out = Path(args.out)
    sections: list[str] = []
    raw: dict[str, Any] = {}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        dataset = load_dataset(name)
        args.calibrated = args.nominal_compute or calibrate(dataset, args)
        print(f"{dataset.name}: {1e6 * args.calibrated:.1f} µs per training sample", flush=True)
        cells = [run_cell(dataset, CELLS[i], args) for i in args.cell_list]
        per_board = int(0.9 * len(dataset.y_train) / args.clients)
        raw[dataset.name] = cells
        png = out.with_name(f"{out.stem}-{dataset.name}.png")
        plot(cells, png, f"{dataset.name}, {args.clients} boards, mixed fleet (seed {args.seed})")
        sections += [
            f"## {dataset.name}",
            "",
            f"Compute measured on this machine: {1e6 * args.calibrated:.1f} µs per training "
            "sample and epoch (a Pi 4-class board with its factor 6 then needs "
            f"{6 * args.calibrated * per_board:.2f} s for a local epoch of its {per_board} "
            "samples).",
            "",
            format_table(cells),
            "",
            *checks(cells),
            "",
            f"![accuracy against simulated time]({png.name})",
            "",
        ]
        print(format_table(cells), flush=True)
    command = "siren bench participation compare " + " ".join(args.argv)
    text = [
        "# Partial participation on an uneven fleet",
        "",
        f"`{command.strip()}` — {args.clients} boards with the `{args.profile}` device "
        "profiles (20% Pi Zero 2-class boards with compute factor 48, 8x a Pi 4-class board's; "
        "60% Pi 4-class, factor 6, dropout 5%; 20% Jetson-class, factor 2, dropout 2%; Pi Zero "
        f"2-class dropout 10%), seed {args.seed}, one local epoch, equal training work per "
        f"mode: sync = {args.rounds} rounds of every board, sampled = {2 * args.rounds} rounds "
        f"of half of them, async = {args.rounds * args.clients // args.buffer_size} versions "
        f"of B = {args.buffer_size} updates with staleness bound S = {args.staleness} and "
        "weight (1+τ)^-1/2, the rule on the buffer (async) or on every board's latest update "
        "of staleness at most S (async-latest). Times are simulated board times (compute "
        "factor × compute measured on this machine + latency; a synchronous round lasts as "
        "long as its slowest reporting board, the dropped ones not waited for), so they "
        "compare across modes on a 2-core machine. *Reaches sync's final*: the first simulated "
        "time at which the run's test accuracy is at least the synchronous run's final "
        "accuracy of the same cell.",
        "",
        *sections,
        "## Environment",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, Python "
        f"{platform.python_version()}; whole benchmark {(time.perf_counter() - started) / 60:.0f} "
        "min (real time).",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``compare`` options."""
    p.add_argument(
        "--datasets",
        default="digits,fashion-mnist",
        help="comma-separated datasets (default: digits,fashion-mnist)",
    )
    p.add_argument("--clients", type=int, default=50, help="boards (default: 50)")
    p.add_argument("--rounds", type=int, default=10, help="synchronous rounds T (default: 10)")
    p.add_argument("--buffer-size", type=int, default=25, help="async buffer B (default: 25)")
    p.add_argument(
        "--staleness", type=int, default=10, help="async staleness bound S (default: 10)"
    )
    p.add_argument("--profile", default="mixed", help="device profile mix (default: mixed)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument(
        "--cells",
        default=",".join(str(i) for i in range(len(CELLS))),
        help="cells to run, by number: "
        + "; ".join(f"{i} {c[0]}" for i, c in enumerate(CELLS)).replace("%", "%%")  # argparse
        + " (default: all)",
    )
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"modes to run (default: {','.join(MODES)})"
    )
    p.add_argument(
        "--nominal-compute",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds of training per sample on this machine (default: measured before the runs)",
    )
    p.add_argument(
        "--out",
        default=str(RESULTS / "participation.md"),
        help="Markdown output (default: benchmarks/results/participation.md; plots and raw "
        "JSON next to it)",
    )


def run_transports(args: argparse.Namespace) -> int:
    """``siren bench participation transports``: buffered asynchronous mode in process and over
    MQTT, same seeds, side by side (how far apart arrival order takes them)."""
    import tempfile

    from firmware_sim.engine import SimConfig, run_simulation
    from firmware_sim.fleet import run_fleet
    from firmware_sim.fleet_spec import FleetOptions
    from models.datasets import load_dataset

    rows = []
    started = time.perf_counter()
    dataset = load_dataset(args.dataset)
    probe = SimConfig(dataset=dataset.name, clients=args.clients, profile=args.profile)
    slowdown = args.slowdown or worker_slowdown(probe)
    measured = calibrate(dataset, argparse.Namespace(clients=args.clients, seed=0))
    nominal = args.nominal_compute or slowdown * measured
    print(
        f"{dataset.name}: {1e6 * measured:.1f} µs per training sample measured; simulated "
        f"boards at {1e6 * nominal:.1f} µs (slowdown {nominal / measured:.1f})",
        flush=True,
    )
    for seed in range(args.seeds):
        config = SimConfig(
            dataset=dataset.name,
            clients=args.clients,
            rounds=args.rounds,
            seed=seed,
            profile=args.profile,
            mode="async",
            buffer_size=args.buffer_size,
            staleness_bound=args.staleness,
            nominal_compute=nominal,
        )
        engine = run_simulation(config, dataset=dataset)
        with tempfile.TemporaryDirectory(prefix="siren-bench-transports-") as tmp:
            fleet = run_fleet(
                config, FleetOptions(broker=args.broker), Path(tmp) / "f", timeout=1800
            )
        row: dict[str, Any] = {"seed": seed}
        for name, history in (("engine", engine), ("mqtt", fleet)):
            taken = [
                t
                for r in history["rounds"]
                for t in (r.get("staleness") or r["decision"].get("staleness") or {}).values()
            ]
            row[name] = {
                "final": history["rounds"][-1]["test_accuracy"],
                "best": max(r["test_accuracy"] for r in history["rounds"]),
                "mean_staleness": sum(taken) / max(1, len(taken)),
            }
        row["gap"] = row["mqtt"]["final"] - row["engine"]["final"]
        row["lag"] = max(
            (r.get("timing") or {}).get("async_start_lag_max", 0.0) for r in fleet["rounds"]
        )
        rows.append(row)
        print(
            f"seed {seed}: in process {_pct(row['engine']['final'])}, MQTT "
            f"{_pct(row['mqtt']['final'])} ({100 * row['gap']:+.2f} points)",
            flush=True,
        )
    lines = [
        "# Buffered asynchronous mode: in process and over MQTT",
        "",
        f"`siren bench participation transports {' '.join(args.argv)}` — {args.dataset}, "
        f"{args.clients} boards with the `{args.profile}` profiles, {args.rounds} versions of "
        f"B = {args.buffer_size} updates, S = {args.staleness}, FedAvg, no attack. In process "
        "the simulated clock orders the updates; over MQTT the real clock "
        "does, with the coordinator's evaluation, signing and commits and the worker's serial "
        "training in it. Both sides give a board the same simulated compute time "
        f"(`--nominal-compute`): {1e6 * nominal:.1f} µs per training sample and epoch, "
        f"{nominal / measured:.1f}× the {1e6 * measured:.1f} µs measured here, times the "
        "board's compute factor. The slowdown lets one worker process keep every simulated "
        "device at its profile's speed: it needs Σ 1/(slowdown × compute factor) of a core. "
        "*Start lag*: how long after a board was free (it had received the model, or its "
        "previous update had left) the worker, busy with its other boards, started its "
        "training; it stays near zero while the worker keeps up.",
        "",
        "| seed | final, in process | final, MQTT | difference | mean staleness, in process | "
        "mean staleness, MQTT | worker's largest start lag |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['seed']} | {_pct(row['engine']['final'])} | {_pct(row['mqtt']['final'])} | "
            f"{100 * row['gap']:+.2f} | {row['engine']['mean_staleness']:.2f} | "
            f"{row['mqtt']['mean_staleness']:.2f} | {row['lag']:.2f} s |"
        )
    gaps = [abs(r["gap"]) for r in rows]
    lines += [
        "",
        f"Largest difference in final accuracy: {100 * max(gaps):.2f} points; mean "
        f"{100 * sum(gaps) / len(gaps):.2f}. Whole benchmark "
        f"{(time.perf_counter() - started) / 60:.0f} min on {platform.machine()}, "
        f"{os.cpu_count()} shared cores.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


def worker_slowdown(config: Any, share: float = 0.5) -> float:
    """How much slower than this machine a fleet's simulated boards must be for one worker
    process training them one after the other on ``share`` of a core to keep every board at
    its profile's speed: ``Σ 1/compute factor / share`` (at least 1)."""
    need = sum(1.0 / max(p.compute_factor, 1e-9) for p in config.device_profiles())
    return max(1.0, need / share)


def add_transport_arguments(p: argparse.ArgumentParser) -> None:
    """The ``transports`` options."""
    p.add_argument("--dataset", default="digits", help="dataset (default: digits)")
    p.add_argument("--clients", type=int, default=20, help="boards (default: 20)")
    p.add_argument("--rounds", type=int, default=20, help="versions (default: 20)")
    p.add_argument("--buffer-size", type=int, default=5, help="B (default: 5)")
    p.add_argument("--staleness", type=int, default=4, help="S (default: 4)")
    p.add_argument("--profile", default="mixed", help="device profiles (default: mixed)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    p.add_argument("--broker", default="mosquitto", help="broker (default: mosquitto)")
    p.add_argument(
        "--slowdown",
        type=float,
        default=None,
        help="simulated boards this many times slower than the measured compute, before "
        "their compute factor (default: enough for one worker to keep up, Σ 1/factor / 0.5)",
    )
    p.add_argument(
        "--nominal-compute",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds of training per sample on both sides (default: measured × slowdown)",
    )
    p.add_argument(
        "--out",
        default=str(RESULTS / "participation-transports.md"),
        help="Markdown output (default: benchmarks/results/participation-transports.md)",
    )
