"""The largest simulated fleet this machine completes, with the boards' workers as local
processes and as Ray actors on a two-node Ray cluster.

For each fleet size and mode (``local``: ``--workers`` worker processes; ``ray``: the same
number of workers as Ray actors, one per node of a cluster of ``--nodes`` raylets started here on
loopback by :class:`firmware_sim.ray_cluster.LocalRayCluster`, or the cluster given with
``--ray``) the fleet sizes are tried in increasing order, a mode dropping out at its first
failure; each run is :func:`firmware_sim.fleet.run_fleet` with a private Mosquitto (accounts and
ACLs, one MQTT connection per board) and the coordinator service here. A fleet *completes* when the
coordinator closes every round with an update from every board.

Digits has 1,437 training images, 1,337 of them for the boards once the coordinator's root set is
drawn: fleets beyond that need boards that share samples, so every size runs with the
``overlap`` partition (:func:`models.partition.partition_overlap`: each board a window of at
least two samples, one to train on and one for its alarm's local test split).

The round-time breakdown is :func:`benchmarks.fleet.round_breakdown` averaged over rounds 2..R.
With several workers the boards of different workers compute at the same time, so *board
compute* (the sum of every board's time, clipped to the compute window of the round) can exceed
the window's share of the wall time; the parts then no longer tile the round exactly.

A second, quick measurement (skipped with ``--no-probe``) finds what limits Mosquitto's
connections: the same private Mosquitto started with the open-files limit at 1,024 (a common
default) and at this process's hard limit, and raw MQTT v5 connections opened until it refuses
one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"

#: Fleet sizes tried by default, smallest first; each mode stops at the first that fails.
DEFAULT_SIZES = (500, 1000, 2000)

#: Connections the probe opens at most per broker.
PROBE_CONNECTIONS = 1500


def open_files_limits() -> tuple[int, int]:
    """This process's (soft, hard) limit on open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft), int(hard)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (the broker, the coordinator and the
    workers inherit it); return the limits now in force."""
    soft, hard = open_files_limits()
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return open_files_limits()


def _mqtt_connect_packet(client_id: str) -> bytes:
    """A minimal MQTT v5 CONNECT (clean start, keep-alive 600 s, no properties, anonymous)."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([5, 0x02]) + (600).to_bytes(2, "big") + b"\x00"
    payload = len(cid).to_bytes(2, "big") + cid
    body = variable + payload
    length = len(body)
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x10" + bytes(encoded) + body


def probe_connections(nofile: int, limit: int, workdir: Path) -> dict[str, Any]:
    """Start a private anonymous Mosquitto whose open-files soft limit is ``nofile`` and open
    up to ``limit`` MQTT v5 connections to it; count the accepted ones (CONNACK, reason 0).

    Returns
    -------
    dict
        ``nofile``, ``accepted``, ``attempted`` and the first failure (``None`` when all
        were accepted).
    """
    from firmware_sim.broker import start_mosquitto

    broker = start_mosquitto(workdir, persistence=False, open_files=nofile)
    sockets: list[socket.socket] = []
    accepted, failure = 0, None
    try:
        for i in range(limit):
            try:
                sock = socket.create_connection((broker.host, broker.port), timeout=5)
                sockets.append(sock)
                sock.sendall(_mqtt_connect_packet(f"probe-{i}"))
                ack = sock.recv(16)
            except OSError as exc:
                failure = f"connection {i + 1}: {type(exc).__name__}: {exc}"
                break
            if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
                failure = f"connection {i + 1}: no CONNACK (broker closed it)"
                break
            accepted += 1
        log = (workdir / "mosquitto.log").read_text(errors="replace") if failure else ""
    finally:
        for sock in sockets:
            sock.close()
        broker.stop()
    notes = [
        line for line in log.splitlines() if "limit" in line.lower() or "error" in line.lower()
    ]
    return {
        "nofile": nofile,
        "attempted": accepted + (1 if failure else 0),
        "accepted": accepted,
        "failure": failure,
        "broker_log": notes[-3:],
    }


def make_config(n: int, args: argparse.Namespace) -> Any:
    """The benchmark's :class:`~firmware_sim.engine.SimConfig` for ``n`` boards."""
    from firmware_sim.engine import SimConfig

    return SimConfig(
        dataset="digits",
        clients=n,
        rounds=args.rounds,
        aggregator=args.aggregator,
        alarm=True,
        partition="overlap",
        seed=args.seed,
    )


def measure(
    n: int, mode: str, address: str | None, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """Run one fleet; return its table row.

    Raises
    ------
    firmware_sim.errors.FleetError
        The fleet failed, or did not complete every round with every board.
    """
    from benchmarks.fleet import summarize
    from firmware_sim.errors import FleetError
    from firmware_sim.fleet import run_fleet
    from firmware_sim.fleet_spec import FleetOptions

    options = FleetOptions(
        workers=args.workers, broker="mosquitto", ray=address if mode == "ray" else None
    )
    load_start = _load()
    t0 = time.perf_counter()
    history = run_fleet(
        make_config(n, args), options, workdir / f"{mode}-{n}", timeout=args.timeout
    )
    wall = time.perf_counter() - t0
    rounds = history["rounds"]
    short = [r["round"] for r in rounds if r.get("boards_reporting") != n]
    if len(rounds) != args.rounds or short:
        raise FleetError(
            f"{len(rounds)} of {args.rounds} rounds closed; rounds without every board: {short}"
        )
    row = summarize(n, history, None)
    row["mode"] = mode
    row["load"] = (load_start, _load())
    row["wall_seconds"] = wall
    row["setup_seconds"] = wall - sum(r["timing"]["wall_seconds"] for r in rounds)
    row["accuracies"] = [r.get("test_accuracy") for r in rounds]
    ray = history["fleet"]["transport"].get("ray")
    if ray is not None:
        row["placement"] = [
            {"worker": w["worker"], "boards": w["boards"], "ip": w["ip"]} for w in ray["workers"]
        ]
    return row


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: per mode and fleet size, set-up time and the mean round, broken down."""
    head = (
        "| workers as | boards | set-up | round (2..R) | broadcast | board compute | "
        "encode/sign | network | admission | aggregation | evaluation | final accuracy | "
        "load (1 min) before / after |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        b = r["breakdown"]
        acc = r.get("final_test_accuracy")
        lines.append(
            f"| {r['mode']} | {r['boards']} | {r['setup_seconds']:.0f} s | {b['wall']:.2f} s | "
            f"{b['broadcast']:.2f} s | {r['compute']:.2f} s | {b['encode_sign']:.2f} s | "
            f"{b['network']:.2f} s | {b['admission']:.2f} s | {b['aggregation']:.2f} s | "
            f"{b['evaluation']:.2f} s | "
            + (f"{100 * acc:.2f}% | " if acc is not None else "- | ")
            + _loads(r)
        )
    return "\n".join(lines)


def _loads(row: dict[str, Any]) -> str:
    """The 1-minute load averages when a row's fleet started and ended ("-" if not recorded)."""
    if "load" not in row:
        return "- |"
    return " / ".join(str(x).split(",")[0] for x in row["load"]) + " |"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def write_report(result: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    """Write the Markdown report: largest fleets, breakdown table, probe, settings, raw JSON."""
    rows = result["rows"]
    lines = [
        "# Fleet scale on Ray: the largest fleet this machine completes",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other long-running "
        f"jobs, Python {platform.python_version()}, Ray {result.get('ray_version', '-')}; load "
        f"average (1, 5, 15 min) {result['load'][0]} at the start and {result['load'][1]} at "
        "the end.  ",
        f"Open files: soft/hard limit {result['nofile_before'][0]}/{result['nofile_before'][1]} "
        f"when started, raised to {result['nofile'][0]} for the broker, the coordinator and "
        "the workers.  ",
        f"Settings: digits, `overlap` partition, {args.aggregator} with the boards' alarm on, "
        f"no attack, E=1, B=64, {args.rounds} rounds, seed {args.seed}; a private Mosquitto "
        f"(loopback, MQTT 5, QoS 1, accounts and ACLs; one connection per board); "
        f"{args.workers} workers. Ray: {result['cluster']}. Set-up = the fleet's wall time "
        "minus its rounds (keys, broker, coordinator, workers and their connections; the Ray "
        "cluster is started once, before the first fleet, and not counted).",
        "",
        "| workers as | largest fleet that completed | first size that failed |",
        "|---|---|---|",
    ]
    for mode in result["modes"]:
        done = [r["boards"] for r in rows if r["mode"] == mode]
        failed = result["failed"].get(mode)
        stopped = result.get("interrupted") or {}
        if failed:
            tail = f"{failed['boards']} boards: {failed['error']} |"
        elif stopped.get("mode") == mode:
            tail = f"{stopped['boards']} boards: not finished (the run was stopped) |"
        else:
            tail = f"none up to {max(done)} boards |" if done else "none |"
        lines.append(f"| {mode} | {max(done) if done else 'none'} boards | " + tail)
    lines += ["", format_table(rows), ""]
    if result.get("probe"):
        lines += [
            "Mosquitto's connection limit (raw MQTT v5 connections to a private Mosquitto "
            "started with the given open-files soft limit):",
            "",
            "| open-files limit | connections accepted | first refusal |",
            "|---|---|---|",
        ]
        for p in result["probe"]:
            lines.append(f"| {p['nofile']} | {p['accepted']} | {p['failure'] or 'none'} |")
        lines.append("")
    lines += ["```json", json.dumps(result, indent=1, default=str), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def _save_partial(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Keep what has been measured so far next to the report (a long run may be cut short)."""
    path = Path(args.out).with_suffix(".partial.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fleets for growing sizes in each mode; print the table and write the report."""
    p = argparse.ArgumentParser(prog="siren bench fleet-ray", description=help_description(__doc__))
    p.add_argument(
        "--sizes",
        default=",".join(str(n) for n in DEFAULT_SIZES),
        help="comma-separated fleet sizes, tried in increasing order until one fails "
        f"(default: {','.join(str(n) for n in DEFAULT_SIZES)})",
    )
    p.add_argument(
        "--modes",
        default="ray,local",
        help="comma-separated: ray, local, or both as ray,local (default: ray,local)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per fleet (default: 3)")
    p.add_argument("--workers", type=int, default=2, help="workers hosting the boards (default: 2)")
    p.add_argument(
        "--nodes", type=int, default=2, help="nodes of the Ray cluster started here (default: 2)"
    )
    p.add_argument(
        "--ray",
        default=None,
        help="address of a running Ray cluster to use instead of starting one here "
        "(--nodes is then unused)",
    )
    p.add_argument("--aggregator", default="siren", help="server rule (default: siren)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="give up on a fleet after this many seconds (default: 3600)",
    )
    p.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="skip the connection probe (how many MQTT connections Mosquitto accepts with "
        "an open-files limit of 1,024 and of this process's hard limit)",
    )
    p.add_argument("--workdir", default=None, help="fleet files (default: a temporary directory)")
    p.add_argument(
        "--out",
        default=str(RESULTS / "fleet-ray.md"),
        help="Markdown report, overwritten (default: the repository's "
        "benchmarks/results/fleet-ray.md)",
    )
    args = p.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not sizes or sizes[0] < 1 or not modes or set(modes) - {"ray", "local"}:
        p.error("--sizes needs sizes >= 1 and --modes ray and/or local")

    from firmware_sim.broker import BrokerError
    from firmware_sim.errors import FleetError
    from firmware_sim.ray_cluster import LocalRayCluster

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    command = "siren bench fleet-ray " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "command": command.strip(),
        "nofile_before": open_files_limits(),
        "nofile": raise_open_files_limit(),
        "modes": modes,
        "rows": [],
        "failed": {},
    }
    load_start = _load()
    repo = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="siren-bench-fleet-ray-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.probe:
            result["probe"] = [
                probe_connections(n, PROBE_CONNECTIONS, workdir / f"probe-{n}")
                for n in (1024, result["nofile"][0])
            ]
            for probe in result["probe"]:
                print(f"probe: nofile {probe['nofile']}: {probe['accepted']} accepted", flush=True)
        cluster = None
        previous: dict[str, str | None] = {}
        address = args.ray
        if "ray" in modes and address is None:
            cluster = LocalRayCluster(workdir / "ray", nodes=args.nodes, pythonpath=repo)
            previous = cluster.client_env()
            cluster.start()
            address = cluster.address
            result["cluster"] = (
                f"{args.nodes} raylets started here (`ray start --head` + `ray start "
                f"--address`), 1 CPU each, on 127.0.0.2..{args.nodes + 1}"
            )
        else:
            result["cluster"] = f"--ray {address}" if address else "not used"
        try:
            for n, mode in [(n, mode) for n in sizes for mode in modes]:
                if mode in result["failed"]:
                    continue  # a smaller fleet already failed in this mode
                print(f"{mode}: N = {n} boards ...", flush=True)
                try:
                    row = measure(n, mode, address, args, workdir)
                except KeyboardInterrupt:
                    # Ctrl-C or SIGTERM: keep what was measured and say where it stopped.
                    result["interrupted"] = {"boards": n, "mode": mode}
                    print(f"  interrupted at {n} boards ({mode})", flush=True)
                    break
                except (FleetError, BrokerError) as exc:
                    error = str(exc).strip().splitlines()
                    result["failed"][mode] = {"boards": n, "error": error[0] if error else ""}
                    print(f"  failed: {result['failed'][mode]['error']}", flush=True)
                    continue
                result["rows"].append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
                _save_partial(result, args)
        finally:
            if cluster is not None:
                cluster.stop()
                cluster.restore_env(previous)
    try:
        import ray

        result["ray_version"] = ray.__version__
    except ImportError:
        pass
    result["load"] = (load_start, _load())
    print(format_table(result["rows"]))
    out = Path(args.out)
    write_report(result, args, out)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"wrote {out}")
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
