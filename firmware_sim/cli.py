"""``siren sim ...``: run simulated fleets on this machine."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from models.zoo import MODEL_BUILDERS
from protocol.siren_profiles import ALARM_RULES, DEFAULT_PROFILE, profile_names
from siren_cli.errors import CommandError, message_of


def add_run_options(
    p: argparse.ArgumentParser,
    *,
    aggregator: str = "fedavg",
    attack: str | None = None,
    malicious: float = 0.0,
) -> None:
    """Options shared by ``siren sim run`` and ``siren sim fleet`` (what defines an FL run).

    ``aggregator``, ``attack`` and ``malicious`` are the command's defaults (``siren sim fleet``
    runs the demo: SIREN against 40% sign flippers); the help shows them as they are.
    """
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "fashion-mnist", "digits"],
        help="training data; auto = Fashion-MNIST when installed, else the bundled digits "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--model",
        default=None,
        help="zoo model (default: siren-cnn for Fashion-MNIST, "
        f"digits-mlp for digits); one of {', '.join(MODEL_BUILDERS)}",
    )
    g.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="use only the first N training samples (faster runs)",
    )
    g.add_argument(
        "--test-samples",
        type=int,
        default=None,
        help="evaluate the global model on the first N test samples",
    )
    g.add_argument(
        "--partition",
        default="iid",
        choices=["iid", "noniid", "dirichlet", "classes", "overlap"],
        help="how data is split across boards; overlap: windows that may share samples, for "
        "fleets larger than the data set (default: %(default)s)",
    )
    g.add_argument(
        "--noniid-p",
        type=float,
        default=0.5,
        help="non-IID degree p for --partition noniid (SIREN uses 0.5)",
    )
    g.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=0.5,
        help="concentration for --partition dirichlet (default: %(default)s)",
    )
    g.add_argument(
        "--classes-per-board",
        type=int,
        default=2,
        help="classes each board holds with --partition classes (default: %(default)s)",
    )
    g.add_argument(
        "--root-size",
        type=int,
        default=100,
        help="server root test set drawn from the training data (default: %(default)s)",
    )
    g.add_argument(
        "--local-test-fraction",
        type=float,
        default=0.1,
        help="share of each board's data kept as its local test split (default: 0.1)",
    )
    t = p.add_argument_group("federated training")
    t.add_argument("--clients", type=int, default=10, help="number of boards K (default: 10)")
    t.add_argument("--rounds", type=int, default=10, help="communication rounds T (default: 10)")
    t.add_argument("--local-epochs", type=int, default=1, help="local epochs E (default: 1)")
    t.add_argument("--batch-size", type=int, default=64, help="local batch size B (default: 64)")
    t.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help=(
            "local learning rate (default: 0.001 for adam, 0.05 for sgd; "
            "0.01 for adam on the digits models)"
        ),
    )
    t.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="local optimizer, reset every round (default: adam)",
    )
    t.add_argument(
        "--client-fraction",
        type=float,
        default=1.0,
        help="fraction of boards drawn to take part in each round, a seeded draw per round "
        "(the same in siren sim run and siren sim fleet; default: 1.0, every board)",
    )
    t.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        metavar="M",
        help="draw M boards per round instead of a fraction (default: --client-fraction)",
    )
    t.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    e = p.add_argument_group("boards' devices and participation")
    e.add_argument(
        "--profile",
        default="ideal",
        help="device profile mix, e.g. pi4 or pi4:0.5,pi5:0.3,jetson:0.2; profiles: ideal, "
        "desktop, jetson, pi5, pi4, flaky, pizero2; or a whole fleet: mixed (20%% pizero2 8x "
        "slower than the 60%% pi4, 20%% jetson, with dropouts) (default: ideal)",
    )
    e.add_argument("--compute-factor", type=float, default=None, help="override compute factor")
    e.add_argument("--latency-ms", type=float, default=None, help="override network latency")
    e.add_argument(
        "--dropout", type=float, default=None, help="override per-round dropout probability"
    )
    e.add_argument(
        "--nominal-compute",
        type=float,
        default=None,
        metavar="SECONDS",
        help="simulated board time: this many seconds per training sample and epoch, times "
        "the profile's compute factor (reproducible), instead of the measured compute time",
    )
    e.add_argument(
        "--mode",
        default="sync",
        choices=["sync", "async"],
        help="sync: rounds that wait for their boards; async: buffered asynchronous (boards "
        "train continuously, a new global model every --buffer-size updates) (default: sync)",
    )
    e.add_argument(
        "--staleness-bound",
        type=int,
        default=4,
        metavar="S",
        help="async: admit updates trained on the last S global versions (default: 4)",
    )
    e.add_argument(
        "--buffer-size",
        type=int,
        default=10,
        metavar="B",
        help="async: a new global model whenever B updates are buffered (default: 10)",
    )
    e.add_argument(
        "--staleness-weight",
        default="poly:0.5",
        help="async: weight of an update of staleness t: poly:a = (1+t)^-a, or constant "
        "(default: poly:0.5)",
    )
    e.add_argument(
        "--async-pool",
        default="buffer",
        choices=["buffer", "latest"],
        help="async: the rule runs on the B buffered updates (buffer) or on every board's "
        "latest update of staleness <= S (latest: attackers hold their share of the boards, "
        "not of the fast ones) (default: buffer)",
    )
    d = p.add_argument_group("defense")
    d.add_argument(
        "--aggregator",
        default=aggregator,
        help="server rule: fedavg, krum, median, ..., or siren (see `siren sim "
        "aggregators`; default: %(default)s)",
    )
    d.add_argument(
        "--agg-param",
        action="append",
        metavar="KEY=VALUE",
        help="aggregator parameter, repeatable (e.g. --agg-param f=4)",
    )
    d.add_argument(
        "--device",
        default="numpy",
        help="where the heavy aggregators (Krum, Bulyan, median, trimmed mean, geometric "
        "median, FLTrust, FoolsGold, residual reweighting) run: numpy, cpu or cuda[:N] "
        "(PyTorch: pip install 'siren-edge[torch]'), auto = cuda if PyTorch sees a GPU, else "
        "numpy (default: %(default)s)",
    )
    d.add_argument(
        "--alarm",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="boards run the SIREN alarm (default: only with --aggregator siren)",
    )
    d.add_argument(
        "--siren-profile",
        default=DEFAULT_PROFILE,
        choices=profile_names(),
        help="SIREN reading: authors = the authors' public code (relative alarm rule, relative "
        "C_s, ban after int(0.45*T) penalties); paper-text = Alg. 1 / Table 2 as printed "
        "(default: %(default)s; --alarm-rule and --agg-param server_threshold=..., "
        "penalty_basis=... override one part)",
    )
    d.add_argument(
        "--alarm-rule",
        default=None,
        choices=list(ALARM_RULES),
        help="paper: alarm unless acc(global)-acc(local) >= C_c; relative: alarm when "
        "acc(local) > acc(global) + C_c*acc(local) (default: the profile's)",
    )
    d.add_argument(
        "--alarm-threshold", type=float, default=0.04, help="client threshold C_c (default: 0.04)"
    )
    d.add_argument(
        "--alarm-backend",
        default="litert",
        choices=["litert", "keras"],
        help="runtime of the alarm's evaluations (default: litert)",
    )
    d.add_argument(
        "--train-backend",
        default="keras",
        choices=["keras", "litert"],
        help="boards' local training: keras (TensorFlow) or litert (the model's builtin-only "
        "LiteRT training artifact, as a board without TensorFlow; default: keras)",
    )
    d.add_argument(
        "--defense-start-round",
        type=int,
        default=1,
        metavar="N",
        help="the server runs plain fedavg before round N, then --aggregator (SIREN §5.9 "
        "recovery; boards keep their alarm throughout; default: 1)",
    )
    d.add_argument(
        "--guard-factor",
        type=float,
        default=100.0,
        metavar="F",
        help="global-model guard: a round may move the model at most F times the median "
        "update norm, else it is re-aggregated without the outsized updates (inf: only "
        "refuse non-finite models; default: 100)",
    )
    d.add_argument(
        "--guard-max-abs",
        type=float,
        default=1e6,
        metavar="M",
        help="global-model guard: no weight of the global model may grow beyond M in "
        "magnitude (updates with larger values are left out; inf: no bound; default: 1e6)",
    )
    a = p.add_argument_group("attack")
    a.add_argument(
        "--attack",
        default=attack,
        help="attack of the malicious boards (see `siren sim attacks`; none for an honest "
        f"fleet; default: {attack or 'none'})",
    )
    a.add_argument(
        "--malicious",
        type=float,
        default=malicious,
        help="fraction of malicious boards (default: %(default)g)",
    )
    p.set_defaults(malicious_default=malicious)
    a.add_argument(
        "--malicious-ids",
        default=None,
        help="comma-separated board ids to make malicious (overrides --malicious)",
    )
    a.add_argument(
        "--attack-param",
        action="append",
        metavar="KEY=VALUE",
        help="attack parameter, repeatable (e.g. --attack-param boost=-4)",
    )


def add_fleet_options(p: argparse.ArgumentParser) -> None:
    """Options of ``siren sim fleet`` beyond the run options of ``siren sim run``."""
    g = p.add_argument_group("fleet transport")
    g.add_argument(
        "--workers", type=int, default=1, help="worker processes hosting the boards (default: 1)"
    )
    g.add_argument(
        "--broker",
        default="auto",
        help="auto (private Mosquitto, else amqtt), mosquitto, amqtt, or HOST:PORT of a "
        "running anonymous broker (default: auto)",
    )
    g.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        help="close a round after this many seconds with a quorum (default: 0 = wait for "
        "every board; 30 when boards can drop out)",
    )
    g.add_argument(
        "--quorum",
        type=float,
        default=0.5,
        help="fraction of boards needed to close at the deadline (default: 0.5)",
    )
    g.add_argument(
        "--broker-host",
        default=None,
        metavar="HOST",
        help="address of this machine the private broker listens on and the boards connect "
        "to (default: 127.0.0.1; with --ray and nodes on other hosts, this host's address "
        "in the Ray cluster)",
    )
    g.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="place the worker processes as Ray actors on the nodes of a Ray cluster: auto, "
        "HOST:PORT of its head, ray://HOST:PORT, or local (a throwaway local instance); the "
        "broker and the coordinator stay here (needs the 'ray' extra; docs/scaling.md)",
    )
    g.add_argument(
        "--ray-worker-cpus",
        type=float,
        default=1.0,
        metavar="CPUS",
        help="logical CPUs each worker actor reserves on its node (default: 1)",
    )
    g.add_argument("--persist-boards", action="store_true", help="keep each board's state on disk")
    g.add_argument(
        "--no-telemetry",
        dest="telemetry",
        action="store_false",
        help="boards send no telemetry figures in their status (default: each round's CPU and "
        "wall times, the worker's shared peak RSS and this machine's sensors, if any)",
    )
    g.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    g.add_argument(
        "--api-port",
        type=int,
        default=None,
        help="serve the coordinator's HTTP API and live dashboard on this loopback port "
        "(0 = a free port; admin token from $SIREN_API_TOKEN; default: no API)",
    )
    g.add_argument(
        "--linger",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep serving the dashboard (read-only) this long after the run; inf = until "
        "Ctrl-C (default: until Ctrl-C when the output is a terminal and --api-port is given, "
        "else 0: exit when the run ends)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        default=None,
        help="output folder: keys, coordinator database, logs, history.json, accuracy.png "
        "(default: runs/fleet, or runs/fleet-2, -3, ... when it holds an earlier run)",
    )
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in --out (without it, a folder holding a run is refused)",
    )


@contextlib.contextmanager
def _stop_after_round() -> Iterator[threading.Event]:
    """An event the first Ctrl-C sets while the block runs (the run then ends after its
    current round and keeps the finished ones); a second Ctrl-C stops at once. A
    KeyboardInterrupt raised inside TensorFlow's own calls can surface as another error, so
    the first one is not raised. The previous handler is restored afterwards."""
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield stop  # ignored (a background job) or handled by the caller
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("siren: stopping after this round (Ctrl-C again: at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


#: Where ``siren sim run`` writes when ``--out`` is not given (then ``runs/sim-2``, ...).
SIM_OUT = Path("runs/sim")


def _run(args: argparse.Namespace) -> int:
    from firmware_sim.fleet_command import SIM_RUN_FILES, run_out_dir
    from models.errors import ModelsError

    config = config_from_args(args)
    check_config(config)
    where = {"overwrite": args.overwrite, "default": SIM_OUT, "files": SIM_RUN_FILES}
    run_out_dir(args.out, remove=False, **where)
    out, note = run_out_dir(args.out, **where)
    from firmware_sim.engine import run_simulation
    from firmware_sim.report import (
        format_ban_outcome,
        plot_accuracy,
        plot_malicious_index,
        write_history,
    )
    from models.datasets import describe_dataset

    warn_about_data_dir(config)
    print(
        f"siren sim run: {config.clients} boards, {count(config.rounds, 'round')}"
        f"{describe_sampling(config)}, "
        f"aggregator {config.aggregator}{describe_siren_threshold(config)}"
        f"{describe_device(config)}, {describe_attack(config)}, "
        f"dataset {describe_dataset(config.dataset)}",
        flush=True,
    )
    print(f"output: {out}" + (f" ({note})" if note else ""), flush=True)
    for line in siren_notes(config, siren_c_p(config)):
        print(f"note: {line}", flush=True)
    started = time.perf_counter()
    try:
        with _stop_after_round() as stop:
            history = run_simulation(
                config,
                progress=lambda r: print(format_round(r, config.rounds), flush=True),
                stop=stop,
            )
    except ModelsError as exc:
        raise CommandError(str(exc)) from exc
    except (ValueError, KeyError) as exc:
        # Bad aggregator/attack parameters surface here with the rule's own message.
        raise CommandError(message_of(exc)) from exc
    path = write_history(history, out)
    label = f"{config.aggregator}" + (f" / {config.attack}" if config.attack else "")
    plot_accuracy({label: history}, out / "accuracy.png", title=f"{history['fleet']['dataset']}")
    index_png = plot_malicious_index(history, out / "malicious_index.png", title=label)
    s = history["summary"]
    print(
        f"final test accuracy {100 * s['final_test_accuracy']:.2f}% "
        f"(best {100 * s['best_test_accuracy']:.2f}%) in {time.perf_counter() - started:.0f}s; "
        f"wrote {path} and {out / 'accuracy.png'}"
    )
    if history["fleet"].get("malicious_ids"):
        print(f"malicious boards: {history['fleet']['malicious_ids']}")
    bans = format_ban_outcome(s.get("bans"))
    if bans is not None:
        print(bans)
    if index_png is not None:
        print(f"malicious index per board: {index_png}")
    if s.get("interrupted"):
        print(
            f"interrupted after {len(history['rounds'])} of {config.rounds} rounds: the history "
            "holds the finished rounds",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    return 0


def _fleet(args: argparse.Namespace) -> int:
    from firmware_sim.fleet_command import fleet_command

    return fleet_command(args)


def _aggregators(args: argparse.Namespace) -> int:
    from coordinator.aggregators import REGISTRY

    for name in sorted(REGISTRY):
        print(REGISTRY[name].describe())
    from coordinator.siren_params import describe_parameters

    print(
        f"siren({describe_parameters()}): SIREN decision process (alarms, root-set accuracy, "
        "weight analysis, penalty and award); c_p=None: 0.45·K or int(0.45·T), "
        "as the profile says"
    )
    return 0


def _attacks(args: argparse.Namespace) -> int:
    from firmware_sim.attacks import describe_attacks

    print(describe_attacks())
    return 0


def register(sub: Any) -> None:
    """Add the ``sim`` command group."""
    p = sub.add_parser("sim", help="simulate a fleet of boards on this machine")
    p.set_defaults(group_parser=p)
    s = p.add_subparsers(dest="sim_command", metavar="ACTION")
    run = s.add_parser(
        "run",
        help="in-process simulation (boards and coordinator in one process)",
        description="Run K simulated boards and the coordinator in one process for T rounds; "
        "print progress per round and write <out>/history.json and <out>/accuracy.png.",
    )
    add_run_options(run)
    run.add_argument(
        "--out",
        default=None,
        help="output folder: history.json, accuracy.png (default: runs/sim, or runs/sim-2, -3, "
        "... when it holds an earlier run)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in --out (without it, a folder holding a run is refused)",
    )
    run.set_defaults(func=_run)
    fleet = s.add_parser(
        "fleet",
        help="the same run over real MQTT: private broker, coordinator service, board workers",
        description="Start a private MQTT broker, the coordinator service and worker processes "
        "hosting K simulated boards (one MQTT connection per board, one TensorFlow runtime per "
        "worker); print progress per round and write <out>/history.json (with per-round "
        "network bytes and timings) and <out>/accuracy.png. Without options it runs the demo: "
        "10 boards, 4 of them sign-flipping (--attack sign_flip --malicious 0.4), SIREN on the "
        "server and the alarm on the boards (--aggregator siren).",
    )
    add_run_options(fleet, aggregator="siren", attack="sign_flip", malicious=0.4)
    add_fleet_options(fleet)
    fleet.set_defaults(func=_fleet)
    agg = s.add_parser("aggregators", help="list the server rules and their parameters")
    agg.set_defaults(func=_aggregators)
    atk = s.add_parser(
        "attacks", help="list the attacks of malicious boards, their parameters and sources"
    )
    atk.set_defaults(func=_attacks)


if __name__ == "__main__":  # pragma: no cover
    from siren_cli.main import main

    sys.exit(main(["sim", *sys.argv[1:]]))
