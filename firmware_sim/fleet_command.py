"""``siren sim fleet``: run a simulated fleet over MQTT from the command line, report each round,
write the run's history and plot.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Any

from firmware_sim.errors import FleetError
from firmware_sim.fleet import run_fleet
from firmware_sim.fleet_spec import FleetOptions
from firmware_sim.options import config_from_args, format_round, validate_names

logger = logging.getLogger(__name__)


def _api_port(requested: int | None) -> int | None:
    """The dashboard port: ``None`` stays off, 0 becomes a free loopback port (known here, so
    the URL can be printed before the coordinator starts)."""
    from siren_cli.errors import CommandError

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


def fleet_command(args: argparse.Namespace) -> int:
    """Handler of ``siren sim fleet``."""
    from firmware_sim.broker import BrokerError
    from firmware_sim.profiles import parse_mix
    from firmware_sim.report import format_ban_outcome, plot_accuracy, write_history
    from siren_cli.errors import CommandError

    config = config_from_args(args)
    validate_names(config)
    try:
        parse_mix(args.profile)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if args.workers < 1:
        raise CommandError(f"--workers must be >= 1, got {args.workers}")
    dropout_possible = (args.dropout or 0) > 0 or "flaky" in args.profile
    timeout = args.round_timeout
    if timeout is None:
        timeout = 30.0 if dropout_possible else 0.0
    options = FleetOptions(
        workers=args.workers,
        broker=args.broker,
        profiles=args.profile,
        compute_factor=args.compute_factor,
        latency_ms=args.latency_ms,
        dropout=args.dropout,
        round_timeout=timeout,
        quorum=args.quorum,
        persist_boards=args.persist_boards,
        api_port=_api_port(args.api_port),
        telemetry=args.telemetry,
    )
    out = Path(args.out)
    if options.api_port is not None:
        print(f"coordinator dashboard: http://127.0.0.1:{options.api_port}/", flush=True)
    print(
        f"siren sim fleet: {config.clients} boards on {options.workers} worker(s), "
        f"{config.rounds} rounds, aggregator {config.aggregator}, "
        f"attack {config.attack or 'none'}, dataset {config.dataset}, broker {options.broker}",
        flush=True,
    )

    def show(record: dict[str, Any]) -> None:
        net = record.get("network", {})
        line = format_round(record, config.rounds)
        line += f"  {net.get('bytes_total', 0) / 1e6:.2f} MB"
        rejected = sum(net.get("rejected", {}).values())
        if rejected:
            line += f"  rejected {rejected}"
        if record.get("dropped"):
            line += f"  dropped {len(record['dropped'])}"
        print(line, flush=True)

    def terminate(signum: int, frame: Any) -> None:
        # Unwind through run_fleet's cleanup: its processes and broker are stopped too.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        history = run_fleet(config, options, out / "fleet", progress=show, timeout=args.timeout)
    except (FleetError, BrokerError) as exc:
        raise CommandError(str(exc)) from exc
    path = write_history(history, out)
    label = f"{config.aggregator}" + (f" / {config.attack}" if config.attack else "") + " (MQTT)"
    plot_accuracy({label: history}, out / "accuracy.png", title=history["fleet"]["dataset"])
    s = history["summary"]
    print(
        f"final test accuracy {100 * s['final_test_accuracy']:.2f}% "
        f"(best {100 * s['best_test_accuracy']:.2f}%); mean round {s['round_seconds_mean']:.2f}s, "
        f"{s['bytes_per_round_mean'] / 1e6:.2f} MB per round; "
        f"wall {s['wall_seconds']:.0f}s; wrote {path} and {out / 'accuracy.png'}"
    )
    if history["fleet"].get("malicious_ids"):
        print(f"malicious boards: {history['fleet']['malicious_ids']}")
    bans = format_ban_outcome(s.get("bans"))
    if bans is not None:
        print(bans)
    return 0
