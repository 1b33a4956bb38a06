"""``siren client ...``: run a board, provision a board bundle."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from protocol.siren_profiles import DEFAULT_PROFILE, profile_names
from siren_cli.errors import CommandError
from siren_cli.signals import stop_on_signals


def _run(args: argparse.Namespace) -> int:
    import logging

    from edge_client.client import BoardClient, finished_run
    from edge_client.config import BoardConfig
    from edge_client.errors import EdgeClientError
    from models.errors import ModelsError
    from protocol.errors import KeyFileError

    try:
        config = BoardConfig.load(args.config)
        # Before TensorFlow loads (tens of seconds on a board): a finished run needs nothing.
        done = finished_run(config)
        if done is not None:
            print(done, flush=True)
            return 0
        logging.getLogger("edge_client").info(
            "%s: loading its data and model (%s)",
            config.client_id,
            "LiteRT training artifact"
            if config.training.backend == "litert"
            else "TensorFlow: tens of seconds on a small board",
        )
        client = BoardClient(config)
    except (EdgeClientError, KeyFileError, ModelsError) as exc:
        raise CommandError(str(exc)) from exc
    return client.run(stop_on_signals())


def _reset(args: argparse.Namespace) -> int:
    from edge_client.client import archive_state
    from edge_client.config import BoardConfig
    from edge_client.errors import EdgeClientError

    try:
        config = BoardConfig.load(args.config)
        moved = archive_state(config)
    except EdgeClientError as exc:
        raise CommandError(str(exc)) from exc
    if moved is None:
        print(f"{config.state_dir} holds no state: nothing to reset")
    else:
        print(f"moved the state of {config.client_id} to {moved}; the board starts afresh")
    return 0


def _provision(args: argparse.Namespace) -> int:
    from edge_client.config import AlarmSettings, DataSettings, TrainingSettings
    from edge_client.errors import EdgeClientError
    from edge_client.provision import Placement, provision_board

    out = args.out or Path("bundles") / args.client_id
    if args.dataset:
        data = DataSettings(
            source="split", dataset=args.dataset, clients=args.clients, split_seed=args.seed
        )
    else:
        data = DataSettings(source="npz", path=out.resolve() / "data.npz")
    try:
        bundle = provision_board(
            out,
            client_id=args.client_id,
            run=args.run,
            index=args.index,
            broker_host=args.broker_host,
            broker_port=args.broker_port,
            coordinator_key=args.coordinator_key,
            ca_cert=args.ca_cert,
            system_ca=args.system_ca,
            allow_list=args.allow_list,
            rounds=args.rounds,
            seed=args.seed,
            training=TrainingSettings(
                model=args.model,
                backend=args.train_backend,
                artifact=args.artifact.resolve() if args.artifact else None,
            ),
            alarm=AlarmSettings(enabled=args.alarm, profile=args.siren_profile),
            data=data,
            place=Placement(args.install_dir, args.user, args.venv),
            artifact=args.artifact,
            force=args.force,
        )
    except EdgeClientError as exc:
        raise CommandError(str(exc)) from exc
    print(
        f"wrote bundle {bundle.directory} for {args.client_id} "
        f"(public key fingerprint {bundle.public_key_fingerprint[:16]})"
    )
    if bundle.allow_list is not None:
        print(f"registered {args.client_id} in {bundle.allow_list}")
    print(
        f"next: add its password to the broker (siren coordinator broker-config --bundles "
        f"{out.parent} --cafile ... with the same CA, then reload Mosquitto), copy the bundle "
        f"to the board and run its install.sh as root ({bundle.setup.name} has the steps)"
    )
    return 0


def _export_litert(args: argparse.Namespace) -> int:
    from models.errors import ModelsError
    from models.litert_training import export_litert_training
    from models.training import OPTIMIZERS
    from models.zoo import DEFAULT_MODEL, MODEL_BUILDERS, build_model

    shapes = {"digits": (8, 8, 1), "fashion-mnist": (28, 28, 1)}
    model_name = args.model or DEFAULT_MODEL[args.dataset]
    if model_name not in MODEL_BUILDERS:
        raise CommandError(
            f"unknown model {model_name!r}; valid: {', '.join(sorted(MODEL_BUILDERS))}"
        )
    if args.optimizer not in OPTIMIZERS:
        raise CommandError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    model = build_model(model_name, shapes[args.dataset], args.num_classes, seed=args.seed)
    try:
        artifact = export_litert_training(model, model_name=model_name, optimizer=args.optimizer)
    except ModelsError as exc:
        raise CommandError(str(exc)) from exc
    args.out.parent.mkdir(parents=True, exist_ok=True)
    artifact.save(args.out)
    print(
        f"wrote {args.out}: {model_name} ({artifact.layout.size:,} parameters, "
        f"{args.dataset} images {artifact.input_shape}), {args.optimizer} in the graph, "
        f"{args.out.stat().st_size / 1024:.0f} KiB; builtin LiteRT ops only"
    )
    return 0


def register(sub: Any) -> None:
    """Add the ``client`` command group."""
    p = sub.add_parser(
        "client",
        help="run a board; provision a board's bundle (keys, config, service unit)",
        description="The board program: receives the signed global model, runs the SIREN "
        "alarm and local training, publishes its signed update.",
    )
    p.set_defaults(group_parser=p)
    s = p.add_subparsers(dest="client_command", metavar="ACTION")
    run = s.add_parser(
        "run",
        help="run the board until the run's final global model arrives",
        description="Connect to the broker of board.toml and take part in the run; the state "
        "in board.state_dir lets a restarted board continue where it stopped.",
    )
    run.add_argument("--config", required=True, type=Path, help="board TOML file")
    run.set_defaults(func=_run)
    prov = s.add_parser(
        "provision",
        help="write a board's bundle: key pair, config, pinned keys, systemd unit, setup notes",
        description="Create a self-contained bundle for one board: a new Ed25519 key pair, "
        "board.toml (TLS to the broker with its own MQTT user), the coordinator's public key, "
        "the broker's CA certificate, an MQTT password, a systemd unit and SETUP.md (Raspberry "
        "Pi OS 64-bit and JetPack). Registers the board's key in the allow-list if given.",
    )
    prov.add_argument("--client-id", required=True, help="board id (also its MQTT user)")
    prov.add_argument("--run", required=True, help="run id")
    prov.add_argument("--index", type=int, default=0, help="board index in the fleet")
    prov.add_argument(
        "--out", type=Path, default=None, help="bundle directory (default: bundles/<client id>)"
    )
    prov.add_argument("--broker-host", required=True, help="broker host name boards connect to")
    prov.add_argument("--broker-port", type=int, default=8883, help="TLS port (default: 8883)")
    prov.add_argument(
        "--coordinator-key",
        required=True,
        metavar="FILE_OR_HEX",
        help="the coordinator's public key (file, key directory or hex)",
    )
    prov.add_argument("--ca-cert", type=Path, default=None, help="broker CA certificate (required)")
    prov.add_argument(
        "--system-ca",
        action="store_true",
        help="no --ca-cert: verify the broker against the board's system CA store (a broker "
        "certificate from a public CA)",
    )
    prov.add_argument(
        "--allow-list",
        type=Path,
        default=None,
        help="coordinator allow-list to register the board's key in",
    )
    prov.add_argument("--rounds", type=int, default=0, help="run length (0: until stopped)")
    prov.add_argument("--seed", type=int, default=0, help="run seed")
    prov.add_argument("--model", default=None, help="zoo model (default: the dataset's)")
    prov.add_argument(
        "--alarm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the SIREN alarm (default: on)",
    )
    prov.add_argument(
        "--siren-profile",
        default=DEFAULT_PROFILE,
        choices=profile_names(),
        help="SIREN profile of the alarm rule; must match the coordinator's aggregator.profile "
        "(default: %(default)s)",
    )
    prov.add_argument(
        "--dataset",
        default=None,
        choices=["digits", "fashion-mnist"],
        help="demo data: shard --index of a seeded split (default: the board's own data.npz)",
    )
    prov.add_argument("--clients", type=int, default=10, help="boards in the demo split")
    prov.add_argument("--install-dir", default="/opt/siren", help="bundle location on boards")
    prov.add_argument("--user", default="siren", help="service user on boards")
    prov.add_argument("--venv", default="/opt/siren/venv", help="virtual environment on boards")
    prov.add_argument(
        "--train-backend",
        default="keras",
        choices=["keras", "litert"],
        help="the board's training runtime: keras (TensorFlow) or litert (the model's LiteRT "
        "training artifact, no TensorFlow installed; needs --artifact; default: keras)",
    )
    prov.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="the model's LiteRT training artifact (siren client export-litert), copied into "
        "the bundle (--train-backend litert)",
    )
    prov.add_argument("--force", action="store_true", help="replace an existing bundle's key")
    prov.set_defaults(func=_provision)
    export = s.add_parser(
        "export-litert",
        help="write a model's LiteRT training artifact for boards without TensorFlow",
        description="Convert a zoo model's training step (train, infer, get/set weights, the "
        "optimizer) to LiteRT with builtin operators only, so a board with the stock "
        "ai-edge-litert (or tflite-runtime) wheel trains it without TensorFlow. Needs "
        "TensorFlow here (the coordinator or a build machine); boards get the file once, in "
        "their bundle, and only weights travel per round.",
    )
    export.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "fashion-mnist"],
        help="the images the model takes (digits: 8x8, fashion-mnist: 28x28; default: digits)",
    )
    export.add_argument("--model", default=None, help="zoo model (default: the dataset's)")
    export.add_argument(
        "--optimizer", default="adam", help="the boards' optimizer: adam or sgd (default: adam)"
    )
    export.add_argument("--num-classes", type=int, default=10, help="classes (default: 10)")
    export.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    export.add_argument(
        "--out",
        type=Path,
        default=Path("model-litert.zip"),
        help="artifact file (default: %(default)s)",
    )
    export.set_defaults(func=_export_litert)
    reset = s.add_parser(
        "reset",
        help="archive the board's state so that it starts afresh (to join a new run)",
        description="Move the board's state folder aside (to state.<time>) and leave an empty "
        "one: the board then joins the run of board.toml as a new board. Nothing is deleted.",
    )
    reset.add_argument("--config", required=True, type=Path, help="board TOML file")
    reset.set_defaults(func=_reset)
