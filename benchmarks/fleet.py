"""Round time of MQTT fleets of growing size, broken down, next to the in-process engine
(``siren bench fleet``).

For every fleet size N the benchmark runs :func:`firmware_sim.fleet.run_fleet` (a private
Mosquitto on a free loopback port, the coordinator service in its own process, the N boards in
one worker process with one MQTT connection each) and then the in-process engine
(:func:`firmware_sim.engine.run_simulation`) on the very same
:class:`~firmware_sim.engine.SimConfig`.
The default configuration is the SIREN system: the SIREN server with the boards' alarm on,
digits, no attack.

**Breakdown of a round.** The coordinator opens round t when it closes round t-1 and closes it
after aggregating; the fleet records wall-clock marks on both sides (one system clock), so the
round's wall time W splits exactly into consecutive intervals:

* *broadcast* — commit of round t-1, publishing g_t, delivery to the worker (``first received -
  opened``), the worker's verification of g_t (compute window minus board compute), and at the
  end of the round encoding + signing g_{t+1} (``closed - started - aggregation - evaluation``);
* *board compute* — the boards' :func:`~edge_client.board.board_step` time, split into the
  *alarm* (two LiteRT evaluations on the local test split) and *training*;
* *encode/sign* — sealing every update (tensor encoding, SHA-256, Ed25519, state save);
* *network* — hand-off to the MQTT client, broker, delivery to the coordinator (``last update
  arrival - trained - encode/sign``). Without round-level tampering (any fleet without a
  colluding attack) the worker seals and publishes each update as soon as its board is done,
  inside the compute window; network is then ``last update arrival - last board done`` and the
  coordinator admits earlier updates while later boards compute;
* *admission* — the coordinator's verification and storage backlog after the last arrival
  (``close started - last arrival``); admission of earlier updates overlaps the network share;
* *aggregation* — the SIREN decision (root-set evaluations, weight analysis, aggregation);
* *evaluation* — the coordinator's test-set accuracy of g_{t+1} (reporting only; the engine does
  it too).

With one worker these intervals tile the round, so their sum equals W up to clipping at zero
(the *residual* column). *Non-compute overhead* is ``(W - board compute) / W``; *transport
overhead* ``(broadcast + encode/sign + network + admission) / W`` is what the MQTT fleet adds to
the work the in-process engine also does. The table averages rounds 2..R (round 1 has no alarm:
no board has a previous local model yet).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"

#: Fleet sizes tried by default, smallest first; the run stops at the first size that fails.
DEFAULT_SIZES = (10, 50, 100, 200, 300, 500)

#: Components of a round, in timeline order (see the module docstring).
COMPONENTS = (
    "broadcast",
    "alarm",
    "train",
    "encode_sign",
    "network",
    "admission",
    "aggregation",
    "evaluation",
)

#: Components that are not board compute but that the in-process engine does as well.
SHARED_WORK = ("aggregation", "evaluation")


@dataclass(frozen=True)
class Breakdown:
    """One round's wall time and its consecutive parts, in seconds (module docstring)."""

    wall: float
    broadcast: float
    alarm: float
    train: float
    encode_sign: float
    network: float
    admission: float
    aggregation: float
    evaluation: float

    @property
    def compute(self) -> float:
        """Board compute: alarm + training."""
        return self.alarm + self.train

    @property
    def residual(self) -> float:
        """``wall`` minus the sum of the parts (non-zero only where an interval was clipped)."""
        return self.wall - sum(getattr(self, c) for c in COMPONENTS)

    @property
    def overhead_fraction(self) -> float:
        """Non-compute overhead ``(wall - compute) / wall``."""
        return (self.wall - self.compute) / self.wall if self.wall > 0 else 0.0

    @property
    def transport_fraction(self) -> float:
        """What the MQTT fleet adds: ``(broadcast + encode/sign + network + admission) / wall``."""
        extra = self.broadcast + self.encode_sign + self.network + self.admission
        return extra / self.wall if self.wall > 0 else 0.0


def round_breakdown(record: dict[str, Any]) -> Breakdown:
    """Split one fleet round record (``history["rounds"][i]`` of ``run_fleet``) into parts.

    Uses ``timing`` (``wall_seconds``, ``global_delivery_seconds``, ``train_and_tamper_seconds``,
    ``seal_seconds``, ``trained_at``, ``first_received_at``, ``collect_seconds``,
    ``wait_seconds``, ``aggregate_seconds``, ``evaluate_seconds``), ``board_seconds``,
    ``alarm_ms_mean`` and ``boards_reporting``. Every interval is clipped at zero.

    Parameters
    ----------
    record : dict
        A merged round record with the keys above.

    Returns
    -------
    Breakdown
        The round's parts; with one worker they sum to the wall time.
    """
    tm = record["timing"]
    wall = float(tm["wall_seconds"])
    delivery = float(tm.get("global_delivery_seconds", 0.0))
    window = float(tm.get("train_and_tamper_seconds", 0.0))
    board = float(record.get("board_seconds", 0.0))
    compute = min(board, window) if window > 0 else board
    alarm_sum = float(record.get("alarm_ms_mean", 0.0)) * int(record.get("boards_reporting", 0))
    alarm = compute * min(1.0, alarm_sum / 1000 / board) if board > 0 else 0.0
    seal = float(tm.get("seal_seconds", 0.0))
    opened = float(tm["first_received_at"]) - delivery
    last_arrival = opened + float(tm.get("collect_seconds", 0.0))
    pipelined = bool(tm.get("pipelined", False))
    # Pipelined rounds seal (and publish) each update inside the compute window.
    sealed_in_window = seal if pipelined else 0.0
    network = max(0.0, last_arrival - float(tm["trained_at"]) - (0.0 if pipelined else seal))
    wait = float(tm.get("wait_seconds", 0.0))
    admission = max(0.0, wait - float(tm.get("collect_seconds", 0.0)))
    aggregation = float(tm.get("aggregate_seconds", 0.0))
    evaluation = float(tm.get("evaluate_seconds", 0.0))
    close_tail = max(0.0, wall - wait - aggregation - evaluation)
    return Breakdown(
        wall=wall,
        broadcast=delivery + max(0.0, window - compute - sealed_in_window) + close_tail,
        alarm=alarm,
        train=compute - alarm,
        encode_sign=seal,
        network=network,
        admission=admission,
        aggregation=aggregation,
        evaluation=evaluation,
    )


def mean_breakdown(parts: Sequence[Breakdown]) -> Breakdown:
    """Component-wise mean of several rounds' breakdowns (precondition: at least one)."""
    if not parts:
        raise ValueError("mean_breakdown needs at least one round")
    n = len(parts)
    fields = ("wall", *COMPONENTS)
    return Breakdown(**{f: sum(getattr(p, f) for p in parts) / n for f in fields})


def steady_rounds(rounds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rounds 2..R (all rounds when there is only one)."""
    later = [r for r in rounds if int(r["round"]) >= 2]
    return later or list(rounds)


def summarize(n: int, fleet_history: dict[str, Any], engine_history: dict[str, Any] | None) -> dict:
    """One table row: mean steady-state breakdown of the fleet and the engine's round time."""
    rounds = fleet_history["rounds"]
    mean = mean_breakdown([round_breakdown(r) for r in steady_rounds(rounds)])
    row: dict[str, Any] = {
        "boards": n,
        "rounds": len(rounds),
        "breakdown": asdict(mean),
        "compute": mean.compute,
        "residual": mean.residual,
        "overhead_fraction": mean.overhead_fraction,
        "transport_fraction": mean.transport_fraction,
        "alarms": sum(sum(bool(v) for v in r.get("alarms", {}).values()) for r in rounds),
        "update_bytes_per_round": _mean([r["network"]["update_bytes_sent"] for r in rounds]),
        "global_bytes_per_round": _mean([r["network"]["global_bytes_delivered"] for r in rounds]),
        "rejected": sum(sum(r["network"].get("rejected", {}).values()) for r in rounds),
        "fleet_wall_seconds": fleet_history["summary"].get("wall_seconds"),
        "final_test_accuracy": fleet_history["summary"].get("final_test_accuracy"),
        "per_round": [{"round": r["round"], **asdict(round_breakdown(r))} for r in rounds],
    }
    if engine_history is not None:
        eng = steady_rounds(engine_history["rounds"])
        row["engine_round_seconds"] = _mean([r["seconds"] for r in eng])
        row["engine_board_seconds"] = _mean([r["board_seconds"] for r in eng])
        row["engine_final_test_accuracy"] = engine_history["summary"]["final_test_accuracy"]
        row["ratio"] = mean.wall / row["engine_round_seconds"]
    return row


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: per fleet size, the round's wall time, its parts and the engine ratio."""
    head = (
        "| boards | MQTT round | broadcast | board compute (alarm / train) | encode/sign | "
        "network | admission | aggregation | evaluation | non-compute overhead | "
        "transport overhead | engine round | MQTT / engine |"
    )
    lines = [head, "|" + "---|" * 13]
    for row in rows:
        b = row["breakdown"]
        engine = row.get("engine_round_seconds")
        ratio = row.get("ratio")
        lines.append(
            f"| {row['boards']} | {b['wall']:.2f} s | {_ms(b['broadcast'])} | "
            f"{_ms(row['compute'])} ({_ms(b['alarm'])} / {_ms(b['train'])}) | "
            f"{_ms(b['encode_sign'])} | {_ms(b['network'])} | {_ms(b['admission'])} | "
            f"{_ms(b['aggregation'])} | {_ms(b['evaluation'])} | "
            f"{100 * row['overhead_fraction']:.1f}% | {100 * row['transport_fraction']:.1f}% | "
            + (f"{engine:.2f} s | " if engine is not None else "- | ")
            + (f"{ratio:.2f}x |" if ratio is not None else "- |")
        )
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Round wall time vs fleet size: MQTT fleet, its board compute, and the engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["boards"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(n, [r["breakdown"]["wall"] for r in rows], "o-", label="MQTT fleet round")
    ax.plot(n, [r["compute"] for r in rows], "s--", label="board compute (alarm + train)")
    eng = [(r["boards"], r["engine_round_seconds"]) for r in rows if "engine_round_seconds" in r]
    if eng:
        ax.plot([e[0] for e in eng], [e[1] for e in eng], "^-", label="in-process engine round")
    ax.set_xlabel("boards N")
    ax.set_ylabel("seconds per round")
    ax.set_title("SIREN on digits: round time vs fleet size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_config(n: int, args: argparse.Namespace) -> Any:
    """The benchmark's :class:`~firmware_sim.engine.SimConfig` for ``n`` boards."""
    from firmware_sim.engine import SimConfig

    return SimConfig(
        dataset=args.dataset,
        clients=n,
        rounds=args.rounds,
        aggregator=args.aggregator,
        alarm=True,
        seed=args.seed,
    )


def measure(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run the MQTT fleet and then the engine for ``n`` boards; return the table row.

    Raises
    ------
    firmware_sim.errors.FleetError
        If the fleet fails or exceeds ``args.timeout``.
    """
    from firmware_sim.engine import run_simulation
    from firmware_sim.fleet import run_fleet
    from firmware_sim.fleet_spec import FleetOptions

    config = make_config(n, args)
    options = FleetOptions(workers=args.workers, broker=args.broker)
    t0 = time.perf_counter()
    history = run_fleet(config, options, workdir / f"n{n}", timeout=args.timeout)
    print(f"  MQTT fleet: {time.perf_counter() - t0:.0f} s", flush=True)
    engine = None
    if not args.no_engine:
        t0 = time.perf_counter()
        engine = run_simulation(config)
        print(f"  in-process engine: {time.perf_counter() - t0:.0f} s", flush=True)
    row = summarize(n, history, engine)
    row["broker"] = history["fleet"]["transport"]["broker"]
    return row


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def write_report(
    rows: Sequence[dict[str, Any]],
    failed: dict[str, Any] | None,
    args: argparse.Namespace,
    command: str,
    loads: tuple[str, str],
    out: Path,
) -> None:
    """Write the Markdown report (table, target check, settings, raw JSON) and the PNG."""
    table = format_table(rows)
    png = out.with_suffix(".png")
    plot(rows, png)
    largest = max((r["boards"] for r in rows), default=0)
    at50 = next((r for r in rows if r["boards"] == 50), None)
    done200 = any(r["boards"] >= 200 and r["rounds"] >= args.rounds for r in rows)
    check = [
        f"- 200 boards complete {args.rounds} rounds: **{'yes' if done200 else 'no'}**; "
        f"largest fleet that completed: **{largest} boards**"
        + (f" ({failed['boards']} boards failed: {failed['error']})" if failed else "")
        + ".",
    ]
    if at50 is not None:
        ok = at50["overhead_fraction"] < 0.15
        check.append(
            f"- Non-compute overhead at N=50: **{100 * at50['overhead_fraction']:.1f}%** of the "
            f"round (target < 15%: **{'met' if ok else 'not met'}**); transport overhead "
            f"{100 * at50['transport_fraction']:.1f}%."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Fleet scale: round time of MQTT fleets\n\n"
        f"Command: `{command}`  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average (1, 5, 15 min) {loads[0]} at the start and "
        f"{loads[1]} at the end (the machine was shared with other jobs).  \n"
        f"Settings: dataset {args.dataset}, aggregator {args.aggregator} with the boards' alarm "
        f"on (LiteRT), no attack, IID, E=1, B=64, {args.rounds} rounds, seed {args.seed}; "
        f"broker {rows[0]['broker'] if rows else args.broker} (private, loopback, MQTT 5, QoS 1), "
        f"{args.workers} worker process(es) hosting the boards, device profile `ideal` (no "
        "added delay). Each N runs the MQTT fleet, then the in-process engine on the same "
        "configuration. Times are means over rounds 2.."
        f"{args.rounds}.\n\n"
        f"{table}\n\n" + "\n".join(check) + "\n\n"
        "How the round splits (consecutive intervals of one round, measured on one clock):\n"
        "broadcast = commit of the previous round + publishing g_t + delivery + verification on "
        "the worker + encoding/signing g_{t+1}; board compute = the boards' `board_step` "
        "(alarm: two LiteRT evaluations on the local test split; train: local training), run "
        "one after the other in the worker; encode/sign = sealing every update (each update is "
        "sealed and published as soon as its board is done, so the coordinator admits it while "
        "the next boards compute); network = hand-off to MQTT, broker, delivery of the last "
        "update to the coordinator; admission = "
        "the coordinator's verification/storage backlog after the last arrival; aggregation = "
        "SIREN's decision; evaluation = the coordinator's test-set accuracy (the engine does it "
        "too). Non-compute overhead = (round - board compute) / round; transport overhead = "
        "(broadcast + encode/sign + network + admission) / round, i.e. what the MQTT transport "
        "adds to the engine's work.\n\n"
        f"![round time vs N]({png.name})\n\n"
        "```json\n" + json.dumps({"rows": list(rows), "failed": failed}, indent=1) + "\n```\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fleet benchmark for growing N; print the table and write the report."""
    p = argparse.ArgumentParser(prog="siren bench fleet", description=help_description(__doc__))
    p.add_argument(
        "--sizes",
        default=",".join(str(n) for n in DEFAULT_SIZES),
        help="comma-separated fleet sizes, tried in increasing order until one fails "
        f"(default: {','.join(str(n) for n in DEFAULT_SIZES)})",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per fleet (default: 3)")
    p.add_argument("--dataset", default="digits", help="dataset (default: digits)")
    p.add_argument("--aggregator", default="siren", help="server rule (default: siren)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument(
        "--broker", default="mosquitto", help="mosquitto, amqtt or auto (default: mosquitto)"
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="give up on a fleet after this many seconds"
    )
    p.add_argument("--no-engine", action="store_true", help="skip the in-process comparison")
    p.add_argument("--workdir", default=None, help="fleet files (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS / "fleet.md"), help="Markdown output file")
    args = p.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not sizes or sizes[0] < 1:
        p.error("--sizes needs at least one size >= 1")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")

    from firmware_sim.broker import BrokerError
    from firmware_sim.errors import FleetError

    command = "siren bench fleet " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = _load()
    rows: list[dict[str, Any]] = []
    failed: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="siren-bench-fleet-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        for n in sizes:
            print(f"N = {n} boards ...", flush=True)
            try:
                rows.append(measure(n, args, workdir))
            except (FleetError, BrokerError) as exc:
                failed = {"boards": n, "error": str(exc).splitlines()[0]}
                print(f"  failed: {failed['error']}", flush=True)
                break
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if not rows:
        print("no fleet completed", file=sys.stderr)
        return 1
    print(format_table(rows))
    out = Path(args.out)
    write_report(rows, failed, args, command.strip(), (load_start, _load()), out)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
