"""``siren sim fleet``: run a simulated fleet over MQTT from the command line.

Before anything is loaded or started, every option is checked
(:func:`firmware_sim.options.check_config`) and the run gets a folder of its own
(:func:`run_out_dir`): a fleet's folder holds its keys, its coordinator database and its
logs, which no second run may reuse. The header says what ``auto`` picked (dataset, broker)
and how many boards attack. Each round is reported when it closes; the history and the
accuracy plot are written at the end. With the dashboard on, :func:`linger` keeps serving it
from the finished run's database for as long as ``--linger`` says (by default until Ctrl-C
when the output is a terminal, not at all otherwise).
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from firmware_sim.errors import FleetError
from firmware_sim.fleet import run_fleet
from firmware_sim.fleet_spec import FleetOptions
from firmware_sim.options import (
    check_config,
    config_from_args,
    count,
    describe_attack,
    describe_device,
    describe_sampling,
    describe_siren_threshold,
    format_round,
    siren_c_p,
    siren_notes,
    warn_about_data_dir,
)
from siren_cli.errors import CommandError

#: Where a fleet run goes when ``--out`` is not given (then ``runs/fleet-2``, ``-3``, ...).
DEFAULT_OUT = Path("runs/fleet")
#: What a fleet run writes into its folder (``--overwrite`` removes exactly these).
RUN_FILES = ("fleet", "history.json", "accuracy.png", "malicious_index.png")
#: What ``siren sim run`` writes into its folder.
SIM_RUN_FILES = (
    "history.json",
    "accuracy.png",
    "malicious_index.png",
    "global.npy",
    "strategy_state.json",
)


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a fleet run, finished or not (its history or its ``fleet``
    folder of keys, database and logs)."""
    fleet = folder / "fleet"
    return (folder / "history.json").exists() or (fleet.is_dir() and any(fleet.iterdir()))


def run_out_dir(
    requested: str | None,
    *,
    overwrite: bool = False,
    remove: bool = True,
    default: Path = DEFAULT_OUT,
    files: Sequence[str] = RUN_FILES,
) -> tuple[Path, str | None]:
    """The folder of a new run (``siren sim fleet``, ``siren sim run``), and a note for the user
    when it is not the one asked for.

    Two runs never share a folder. Without ``--out`` (``requested`` is ``None``) the run goes to
    ``default`` (``runs/fleet``), or, when that holds a run, to the first of ``runs/fleet-2``,
    ``runs/fleet-3``, ... that does not, so the same command can be run again and again. A
    folder given with ``--out`` that holds a run is refused unless ``overwrite``, which removes
    that run's ``files`` (:data:`RUN_FILES`, nothing else) first; with ``remove`` false nothing
    is removed yet (check every other option first, then call again). A command whose
    ``files`` do not include a fleet's folder never replaces a fleet run. The folder is created
    (so that one that cannot be is refused before any work).

    Raises
    ------
    CommandError
        ``--out`` names a file, a folder that cannot be created, or a folder holding a run
        while ``overwrite`` is false.
    """
    if requested is None:
        out, n = default, 1
        while holds_run(out):
            n += 1
            out = default.with_name(f"{default.name}-{n}")
        note = None if n == 1 else f"{default} holds an earlier run"
        _make_folder(out)
        return out, note
    out = Path(requested)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a folder")
    if not holds_run(out):
        _make_folder(out)
        return out, None
    fleet = out / "fleet"
    if "fleet" not in files and fleet.is_dir() and any(fleet.iterdir()):
        raise CommandError(
            f"--out {out} holds a fleet run (its keys, coordinator database and round log): "
            "give another --out"
        )
    if not overwrite:
        raise CommandError(
            f"--out {out} holds an earlier run (a fleet run's keys and coordinator database "
            "cannot be reused): pass --overwrite to replace it, or give another --out"
        )
    if not remove:
        return out, None
    for name in files:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return out, f"removed the earlier run in {out} (--overwrite)"


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create the output folder {out}: {exc.strerror}") from None


def _announce_dashboard(port: int, wait: float = 900.0) -> threading.Thread:
    """Print the dashboard's URL once it answers (the coordinator starts it after the broker
    and its own set-up, some seconds into the run), from a daemon thread."""
    from firmware_sim.broker import wait_for_port

    def announce() -> None:
        if wait_for_port("127.0.0.1", port, timeout=wait):
            print(f"coordinator dashboard: http://127.0.0.1:{port}/", flush=True)

    thread = threading.Thread(target=announce, name="dashboard-url", daemon=True)
    thread.start()
    return thread


def _check_run_limits(options: FleetOptions, timeout: float | None) -> None:
    """Refuse a quorum outside (0, 1], a negative round deadline or a non-positive overall
    ``--timeout`` before anything is written.

    Raises
    ------
    CommandError
        One of them is out of range.
    """
    if not 0.0 < options.quorum <= 1.0:
        raise CommandError(f"--quorum must be in (0, 1], got {options.quorum}")
    if not options.round_timeout >= 0.0:
        raise CommandError(
            f"--round-timeout must be >= 0 seconds (0: wait for every board), "
            f"got {options.round_timeout}"
        )
    if timeout is not None and not timeout > 0.0:
        raise CommandError(f"--timeout must be > 0 seconds, got {timeout}")


def _api_port(requested: int | None) -> int | None:
    """The dashboard port: ``None`` stays off, 0 becomes a free loopback port (known here, so
    the URL can be printed before the coordinator starts)."""
    if requested is None:
        return None
    if not 0 <= requested <= 65535:
        raise CommandError(f"--api-port must be in 0..65535, got {requested}")
    if requested:
        return requested
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def linger_seconds(requested: float | None, api_port: int | None, interactive: bool) -> float:
    """How long the dashboard stays up after the run: ``--linger`` when given (``inf``: until
    Ctrl-C), else until Ctrl-C for a terminal and not at all for a script or a pipe.

    Raises
    ------
    CommandError
        A negative or NaN ``--linger``, or ``--linger`` without the dashboard (``--api-port``).
    """
    if requested is not None:
        if math.isnan(requested) or requested < 0:
            raise CommandError(
                f"--linger must be >= 0 seconds (inf: until Ctrl-C), got {requested}"
            )
        if requested > 0 and api_port is None:
            raise CommandError("--linger keeps the dashboard up after the run: give --api-port")
        return requested
    return math.inf if api_port is not None and interactive else 0.0


def _check_broker(broker: str) -> None:
    if broker in ("auto", "mosquitto", "amqtt"):
        return
    host, sep, port = broker.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(
            f"--broker {broker!r}: expected auto, mosquitto, amqtt, or HOST:PORT of a running "
            "broker with a port in 1..65535"
        )


def _describe_broker(broker: str) -> str:
    from firmware_sim.broker import find_mosquitto

    if ":" in broker:
        return f"{broker} (running broker)"
    binary = find_mosquitto()
    if broker == "amqtt" or (broker == "auto" and binary is None):
        why = "auto: no mosquitto binary found; " if broker == "auto" else ""
        return f"amqtt ({why}embedded, MQTT 3.1.1)"
    return f"mosquitto ({'auto: ' if broker == 'auto' else ''}{binary or 'not found'})"


def describe_rejections(rejected: Mapping[str, int]) -> str:
    """The refused messages of a round's ``network.rejected`` counts for its progress line,
    by reason (``"  rejected 3 (buffered 2, stale_round 1)"``), or ``""`` when none were."""
    counts = {reason: n for reason, n in sorted(rejected.items()) if n}
    if not counts:
        return ""
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts.items())
    return f"  rejected {sum(counts.values())} ({reasons})"


def fleet_command(args: argparse.Namespace) -> int:
    """Handler of ``siren sim fleet``."""
    from firmware_sim.attacks import AttackError
    from firmware_sim.broker import BrokerError
    from firmware_sim.report import format_ban_outcome, plot_accuracy, write_history
    from models.datasets import describe_dataset

    config = config_from_args(args)
    check_config(config)
    if args.workers < 1:
        raise CommandError(f"--workers must be >= 1, got {args.workers}")
    _check_broker(args.broker)
    ray = getattr(args, "ray", None)
    ray_cpus = getattr(args, "ray_worker_cpus", 1.0)
    if ray is not None and not (ray_cpus >= 0 and math.isfinite(ray_cpus)):
        raise CommandError(f"--ray-worker-cpus must be a number >= 0, got {ray_cpus}")
    api_port = _api_port(args.api_port)
    linger = linger_seconds(args.linger, api_port, sys.stdout.isatty())
    dropout_possible = any(p.dropout > 0 for p in config.device_profiles())
    dropout_possible = dropout_possible and config.mode == "sync"  # async waits for no one
    timeout = args.round_timeout
    if timeout is None:
        timeout = 30.0 if dropout_possible else 0.0
    options = FleetOptions(
        workers=args.workers,
        broker=args.broker,
        round_timeout=timeout,
        quorum=args.quorum,
        persist_boards=args.persist_boards,
        api_port=api_port,
        telemetry=args.telemetry,
        ray=ray,
        ray_worker_cpus=ray_cpus,
        broker_host=getattr(args, "broker_host", None),
    )
    _check_run_limits(options, args.timeout)
    run_out_dir(args.out, overwrite=args.overwrite, remove=False)  # refuse before any work
    if ray is not None:
        from firmware_sim.ray_fleet import import_ray

        try:
            import_ray()
        except FleetError as exc:
            raise CommandError(str(exc)) from exc
    out, note = run_out_dir(args.out, overwrite=args.overwrite)
    warn_about_data_dir(config)
    if options.api_port is not None:
        _announce_dashboard(options.api_port)
    print(
        f"siren sim fleet: {config.clients} boards on {options.workers} worker(s)"
        + (f" as Ray actors (--ray {ray})" if ray is not None else "")
        + ", "
        f"{count(config.rounds, 'round')}{describe_sampling(config)}, "
        f"aggregator {config.aggregator}{describe_siren_threshold(config)}"
        f"{describe_device(config)}, {describe_attack(config)}, "
        f"dataset {describe_dataset(config.dataset)}, broker {_describe_broker(options.broker)}",
        flush=True,
    )
    print(f"output: {out}" + (f" ({note})" if note else ""), flush=True)
    for line in siren_notes(config, siren_c_p(config)):
        print(f"note: {line}", flush=True)

    def show(record: dict[str, Any]) -> None:
        net = record.get("network", {})
        line = format_round(record, config.rounds)
        line += f"  {net.get('bytes_total', 0) / 1e6:.2f} MB"
        line += describe_rejections(net.get("rejected", {}))
        if record.get("dropped"):
            line += f"  dropped {len(record['dropped'])}"
        if record.get("sat_out"):
            line += f"  sat out {len(record['sat_out'])}"
        print(line, flush=True)

    def terminate(signum: int, frame: Any) -> None:
        # Unwind through run_fleet's cleanup: its processes and broker are stopped too.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        history = run_fleet(config, options, out / "fleet", progress=show, timeout=args.timeout)
    except (FleetError, BrokerError, AttackError) as exc:
        raise CommandError(str(exc)) from exc
    except KeyboardInterrupt:
        db = out / "fleet" / "coordinator" / "coordinator.sqlite"
        if db.exists():
            print(
                f"interrupted: the rounds closed so far are in {db} "
                f"(siren audit verify {out} checks their log)",
                file=sys.stderr,
                flush=True,
            )
        raise
    path = write_history(history, out)
    label = f"{config.aggregator}" + (f" / {config.attack}" if config.attack else "") + " (MQTT)"
    plot_accuracy({label: history}, out / "accuracy.png", title=history["fleet"]["dataset"])
    s = history["summary"]
    print(
        f"final test accuracy {100 * s['final_test_accuracy']:.2f}% "
        f"(best {100 * s['best_test_accuracy']:.2f}%); mean round {s['round_seconds_mean']:.2f}s, "
        f"{s['bytes_per_round_mean'] / 1e6:.2f} MB per round; "
        f"wall {s['wall_seconds']:.0f}s; wrote {path} and {out / 'accuracy.png'}",
        flush=True,
    )
    if history["fleet"].get("malicious_ids"):
        print(f"malicious boards: {history['fleet']['malicious_ids']}", flush=True)
    bans = format_ban_outcome(s.get("bans"))
    if bans is not None:
        print(bans, flush=True)
    if options.api_port is not None and linger > 0:
        linger_dashboard(out / "fleet", options.api_port, linger)
    return 0


def linger_dashboard(
    workdir: Path, port: int, seconds: float, stop: threading.Event | None = None
) -> None:
    """Serve the dashboard of the finished run in ``workdir`` on ``port`` for ``seconds``
    (``inf``: until Ctrl-C or ``stop``), read-only from its coordinator database.

    The admin actions answer 409: there is no running coordinator to act on any more.
    """
    from coordinator.api import create_app, start_api_server
    from coordinator.config import ConfigError, CoordinatorConfig

    try:
        config = CoordinatorConfig.load(workdir / "coordinator" / "coord.toml")
        app = create_app(config, config.db, token=config.api.token())
        server = start_api_server(app, port=port)
    except (ConfigError, ValueError, OSError) as exc:
        raise CommandError(f"cannot keep serving the dashboard: {exc}") from exc
    until = "until Ctrl-C" if math.isinf(seconds) else f"for {seconds:g} s (or until Ctrl-C)"
    print(f"the dashboard of the finished run stays at {server.url} {until}", flush=True)
    stop = stop or threading.Event()
    # Ctrl-C must end the linger even when this process started with SIGINT ignored (as
    # commands started in the background by a non-interactive shell are).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop.wait(None if math.isinf(seconds) else seconds)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a lingering dashboard is meant to end
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        server.stop()
