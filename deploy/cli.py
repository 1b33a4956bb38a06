"""``siren deploy ...``: create a deployment folder, add boards, check the running broker."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from siren_cli.errors import CommandError


def _init(args: argparse.Namespace) -> int:
    from deploy.errors import DeployError
    from deploy.folder import (
        Deployment,
        board_ids,
        default_broker_user,
        default_coordinator_user,
        init_deployment,
    )

    broker_user = default_broker_user() if args.broker_user is None else args.broker_user
    coordinator_user = (
        default_coordinator_user() if args.coordinator_user is None else args.coordinator_user
    )
    try:
        deployment = Deployment(
            run=args.run,
            broker_host=args.broker_host,
            broker_port=args.broker_port,
            bind=args.bind,
            auth=args.auth,
            boards=board_ids(args.board_prefix, 0, args.boards),
            hostnames=tuple(args.hostname or ()),
            coordinator_host=args.coordinator_host or "",
            coordinator_user=coordinator_user,
            broker_user=broker_user,
            rounds=args.rounds,
            seed=args.seed,
            aggregator=args.aggregator,
            dataset=args.dataset,
            demo_data=args.demo_data,
            partition=args.partition,
            install_dir=args.install_dir,
            service_user=args.user,
            venv=args.venv,
            alarm=args.alarm,
            api_port=args.api_port,
            round_timeout=args.round_timeout,
            train_backend=args.train_backend,
        )
        paths = init_deployment(
            args.dir, deployment, force=args.force, progress=lambda m: print(f"  {m}", flush=True)
        )
    except DeployError as exc:
        raise CommandError(str(exc)) from exc
    print(f"wrote deployment {paths.root} for run {deployment.run!r}; next steps:")
    print(f"  {paths.root / 'README.md'}")
    return 0


def _add_board(args: argparse.Namespace) -> int:
    from deploy.errors import DeployError
    from deploy.folder import add_boards

    try:
        new = add_boards(
            args.dir,
            count=args.count,
            ids=tuple(args.id or ()),
            progress=lambda m: print(f"  {m}", flush=True),
        )
    except DeployError as exc:
        raise CommandError(str(exc)) from exc
    print(
        f"added {', '.join(new)}: reload the broker (siren deploy reload-broker {args.dir}) and "
        "restart the coordinator (the new boards join the run from its open round); the new "
        f"bundles are in {args.dir / 'boards'}"
    )
    return 0


def _board_action(name: str) -> Any:
    """The handler of a key-lifecycle command: ``deploy.folder.<name>(dir, board)``."""

    def handler(args: argparse.Namespace) -> int:
        from deploy import folder
        from deploy.errors import DeployError

        try:
            getattr(folder, name)(args.dir, args.board, progress=lambda m: print(m, flush=True))
        except DeployError as exc:
            raise CommandError(str(exc)) from exc
        return 0

    return handler


def _reload(args: argparse.Namespace) -> int:
    from deploy.errors import DeployError
    from deploy.folder import Deployment, Paths, reload_broker

    try:
        Deployment.load(args.dir)
    except DeployError as exc:
        raise CommandError(str(exc)) from exc
    pids = reload_broker(Paths(args.dir))
    if not pids:
        raise CommandError(
            f"no running Mosquitto was started with {args.dir / 'broker' / 'mosquitto.conf'}"
        )
    print(f"Mosquitto (pid {', '.join(map(str, pids))}) reloads its password file and ACLs")
    return 0


def _check(args: argparse.Namespace) -> int:
    from deploy.checks import check_broker
    from deploy.errors import DeployError
    from deploy.folder import Deployment, Paths

    try:
        deployment = Deployment.load(args.dir)
    except DeployError as exc:
        raise CommandError(str(exc)) from exc
    paths = Paths(args.dir)
    host = args.host or deployment.coordinator_host or deployment.broker_host
    findings = check_broker(
        (paths.broker / "mosquitto.conf").resolve(),
        host,
        deployment.broker_port,
        paths.coordinator / "ca.crt",
    )
    for finding in findings:
        print(f"{'ok  ' if finding.ok else 'FAIL'}  {finding.what}")
    return 0 if all(f.ok for f in findings) else 1


def register(sub: Any) -> None:
    """Add the ``deploy`` command group."""
    p = sub.add_parser(
        "deploy",
        help="create a deployment (coordinator, TLS-only broker, board bundles); add boards",
        description="A whole deployment in one folder, written in the order that works: keys, "
        "a private CA, the broker's TLS-only configuration with per-board credentials and "
        "ACLs, the coordinator's commented coord.toml, and one self-installing bundle per board.",
    )
    p.set_defaults(group_parser=p)
    s = p.add_subparsers(dest="deploy_command", metavar="ACTION")
    init = s.add_parser(
        "init",
        help="create a deployment folder",
        description="Write DIR: ca/ (private CA), broker/ (mosquitto.conf, passwd, acl, "
        "certificates), coordinator/ (coord.toml, keys, allow-list, credentials), boards/<id>/ "
        "(one bundle per board with install.sh), dist/ (the lean board wheel), README.md (the "
        "next commands). Refuses a folder that already holds a deployment unless --force.",
    )
    init.add_argument("dir", type=Path, help="deployment folder (created)")
    init.add_argument("--run", required=True, help="run id (names the MQTT topics)")
    init.add_argument("--boards", type=int, required=True, metavar="N", help="number of boards")
    init.add_argument(
        "--broker-host",
        required=True,
        help="host name or address the boards reach the broker at (in its certificate)",
    )
    init.add_argument("--broker-port", type=int, default=8883, help="TLS port (default: 8883)")
    init.add_argument(
        "--bind", default="0.0.0.0", help="address the broker listens on (default: 0.0.0.0)"
    )
    init.add_argument(
        "--hostname",
        action="append",
        help="another name or address for the broker's certificate (repeatable)",
    )
    init.add_argument(
        "--coordinator-host",
        default=None,
        help="how the coordinator reaches the broker (default: --broker-host)",
    )
    init.add_argument(
        "--auth",
        choices=["password", "mtls"],
        default="password",
        help="board authentication: per-board passwords over TLS, or client certificates "
        "signed by the deployment's CA (default: password)",
    )
    init.add_argument(
        "--broker-user",
        default=None,
        help="account Mosquitto runs as, which gets the broker files (default: 'mosquitto' "
        "when run as root, else yours; '' = leave files to whoever writes them)",
    )
    init.add_argument(
        "--coordinator-user",
        default=None,
        help="account that runs the coordinator, which gets the coordinator's files (default: "
        "the account that ran sudo; '' = leave them to whoever writes them)",
    )
    init.add_argument("--board-prefix", default="board-", help="board ids (default: board-000...)")
    init.add_argument("--rounds", type=int, default=10, help="rounds T (default: 10)")
    init.add_argument(
        "--round-timeout",
        type=float,
        default=300.0,
        help="seconds before a round closes with a quorum of boards (0: wait for every board; "
        "default: 300)",
    )
    init.add_argument("--seed", type=int, default=0, help="run seed (default: 0)")
    init.add_argument(
        "--aggregator", default="siren", help="server rule: siren or an aggregator (default: siren)"
    )
    init.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "fashion-mnist"],
        help="the data's dataset (default: digits)",
    )
    init.add_argument(
        "--demo-data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give every bundle its shard of a seeded split of --dataset as data.npz, and the "
        "coordinator the root set and test split (default: on; --no-demo-data: boards bring "
        "their own data.npz)",
    )
    init.add_argument(
        "--partition", default="iid", choices=["iid", "noniid", "dirichlet", "classes"]
    )
    init.add_argument(
        "--alarm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="boards run the SIREN alarm (default: on)",
    )
    init.add_argument(
        "--api-port",
        type=int,
        default=8080,
        help="loopback port of the coordinator's HTTP API and dashboard, which revoke-board "
        "and rotate-board use (default: 8080)",
    )
    init.add_argument(
        "--train-backend",
        default="keras",
        choices=["keras", "litert"],
        help="boards' training runtime: keras (TensorFlow on every board) or litert (the "
        "model's LiteRT training artifact, built here once and carried by every bundle; no "
        "TensorFlow on boards; default: keras)",
    )
    init.add_argument("--install-dir", default="/opt/siren", help="bundle location on boards")
    init.add_argument("--user", default="siren", help="service account on boards")
    init.add_argument("--venv", default="/opt/siren/venv", help="virtual environment on boards")
    init.add_argument("--force", action="store_true", help="replace an existing deployment's keys")
    init.set_defaults(func=_init)
    add = s.add_parser(
        "add-board",
        help="add boards to a deployment",
        description="Write bundles for new boards, register their keys in the coordinator's "
        "allow-list and coord.toml, and add them to the broker's password file and ACLs "
        "(existing boards keep their credentials). Then reload the broker.",
    )
    add.add_argument("dir", type=Path, help="deployment folder")
    add.add_argument("--count", type=int, default=0, help="number of boards to add")
    add.add_argument("--id", action="append", help="a board id to add (repeatable)")
    add.set_defaults(func=_add_board)
    revoke = s.add_parser(
        "revoke-board",
        help="revoke a board now: broker credentials and ACL, and its key in the coordinator",
        description="Take a board out of a running fleet at once: the broker's password file "
        "and ACLs lose it and Mosquitto reloads them (the board's session ends; no other "
        "client is disconnected), and the coordinator, through its admin API, drops its key "
        "(its updates are refused as 'revoked'). Recorded in deployment.toml and in the "
        "coordinator's round log. Re-admit it later with readmit-board.",
    )
    revoke.add_argument("dir", type=Path, help="deployment folder")
    revoke.add_argument("board", help="board id")
    revoke.set_defaults(func=_board_action("revoke_board"))
    for name, summary in (
        ("rotate-board", "give a board a new key pair and new broker credentials"),
        ("readmit-board", "re-admit a revoked board with a new key pair and credentials"),
    ):
        renew = s.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}: its bundle is rewritten in place "
            "(copy it to the board and run install.sh again), the broker gets the new "
            "credentials (reloaded: the old session ends), and the running coordinator "
            "registers the new key through its admin API (the old key stops verifying).",
        )
        renew.add_argument("dir", type=Path, help="deployment folder")
        renew.add_argument("board", help="board id")
        renew.set_defaults(func=_board_action("renew_board"))
    reload = s.add_parser(
        "reload-broker",
        help="make the deployment's running Mosquitto reload its password file and ACLs",
        description="Send SIGHUP to the Mosquitto started with DIR/broker/mosquitto.conf (and "
        "to no other Mosquitto on the machine). Sessions whose credentials are gone end; no "
        "other client is disconnected.",
    )
    reload.add_argument("dir", type=Path, help="deployment folder")
    reload.set_defaults(func=_reload)
    check = s.add_parser(
        "check",
        help="check the running broker: only the TLS port, verified handshake, no plain text",
        description="Find the Mosquitto process started with DIR/broker/mosquitto.conf and check "
        "that it listens on the TLS port only, that a TLS handshake verifies with the "
        "deployment's CA and host name, and that plain-text MQTT gets no CONNACK.",
    )
    check.add_argument("dir", type=Path, help="deployment folder")
    check.add_argument("--host", default=None, help="connect to this host instead")
    check.set_defaults(func=_check)
