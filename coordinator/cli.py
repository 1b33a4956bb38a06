"""``siren coordinator ...``: run the coordinator service, write a deployment broker config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from siren_cli.errors import CommandError, message_of
from siren_cli.signals import stop_on_signals


def _run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from coordinator.async_engine import make_engine
    from coordinator.boards import expected_clients, revoked_keys
    from coordinator.config import ConfigError, CoordinatorConfig
    from coordinator.errors import CoordinatorError
    from coordinator.runtime import build_runtime
    from coordinator.shard_service import service_class
    from coordinator.store import CoordinatorStore
    from models.errors import ModelsError
    from protocol.errors import AllowListError, KeyFileError
    from protocol.keys import AllowList, load_signing_key

    try:
        config = CoordinatorConfig.load(args.config)
        if args.device is not None:
            try:
                config = dataclasses.replace(
                    config, aggregator=dataclasses.replace(config.aggregator, device=args.device)
                )
                config.aggregator.resolved_device()  # PyTorch and its GPU, before TensorFlow
            except ConfigError as exc:
                raise ConfigError(f"--device {args.device}: {exc}") from None
        else:
            config.aggregator.resolved_device()
        signing_key = load_signing_key(config.key_dir)
        store = CoordinatorStore(config.db)
        store.check_run(config.run)  # before TensorFlow loads: a mistake costs a second
        keys = expected_clients(config, AllowList.load(config.allow_list), revoked_keys(store))
        logging.getLogger("coordinator").info(
            "run %s: loading the model and the root set (TensorFlow; a few seconds)", config.run
        )
        runtime = build_runtime(config, len(keys))
        engine = make_engine(config, runtime, store, signing_key, keys)
    except (ConfigError, KeyFileError, AllowListError, CoordinatorError, ModelsError) as exc:
        raise CommandError(str(exc)) from exc
    except (ValueError, KeyError) as exc:
        raise CommandError(message_of(exc)) from exc
    service = service_class(config.admission.shards)(config, engine)
    api_server = None
    try:
        if config.api.enabled:
            api_server = _start_api(config, service)
        try:
            code = service.run(stop_on_signals())
        except CoordinatorError as exc:  # a database of another run, a reordered board list
            raise CommandError(str(exc)) from exc
        if engine.finished:
            print(run_summary(store, config.run), flush=True)
        return code
    finally:
        if api_server is not None:
            api_server.stop()
        store.close()


def run_summary(store: Any, run: str) -> str:
    """One line on a finished run: rounds, final accuracy, updates admitted and refused."""
    rows = [r for r in store.round_rows() if r.status == "closed" and r.record]
    counts = store.decision_counts()
    refused = {k: v for k, v in counts.items() if k not in ("accepted", "stale", "duplicate") and v}
    acc = rows[-1].record.get("test_accuracy") if rows else None
    parts = [
        f"run {run} finished: {len(rows)} round(s)",
        "final test accuracy " + (f"{100 * acc:.2f}%" if acc is not None else "not measured"),
        f"{counts.get('accepted', 0)} update(s) admitted",
        f"{counts.get('duplicate', 0)} duplicate(s)",
        "refused: "
        + (", ".join(f"{k} {v}" for k, v in sorted(refused.items())) if refused else "none"),
    ]
    last = (rows[-1].record.get("decision") or {}) if rows else {}
    if "banned" in last:  # SIREN
        rollbacks = sum(1 for r in rows if (r.record.get("decision") or {}).get("rollback"))
        import json

        boards = json.loads(store.get_meta("config") or "{}").get("clients", [])
        names = [boards[i] if 0 <= int(i) < len(boards) else str(i) for i in last["banned"]]
        parts.append(
            f"banned by SIREN: {', '.join(names) or 'none'}; {rollbacks} rollback round(s)"
        )
    guarded = sum(1 for r in rows if (r.record.get("decision") or {}).get("guard"))
    failed = sum(1 for r in rows if r.record.get("failure"))
    if guarded or failed:
        parts.append(f"guarded rounds {guarded}, failed rounds {failed}")
    return "; ".join(parts)


def _start_api(config: Any, service: Any) -> Any:
    """Serve the HTTP API and dashboard on the configured loopback port."""
    import logging

    from coordinator.api import create_app, start_api_server
    from coordinator.config import ConfigError
    from coordinator.controls import ServiceControls

    try:
        app = create_app(config, config.db, ServiceControls(service), token=config.api.token())
        server = start_api_server(app, host=config.api.host, port=config.api.port)
    except (ConfigError, ValueError, OSError) as exc:
        where = f"{config.api.host}:{config.api.port}"
        raise CommandError(
            f"cannot start the HTTP API on {where}: {exc} ([api] port in coord.toml)"
        ) from exc
    logging.getLogger("coordinator").info("HTTP API and dashboard at %s", server.url)
    print(f"coordinator dashboard: {server.url}", flush=True)
    return server


def _broker_config(args: argparse.Namespace) -> int:
    import os

    from coordinator.broker import (
        BrokerConfigError,
        TlsFiles,
        account_ids,
        generate_self_signed,
        hand_over,
        read_bundle_credentials,
        unreachable_for,
        write_broker_config,
    )

    out: Path = args.out
    run_as = args.run_as
    if run_as is None and os.geteuid() == 0 and account_ids("mosquitto") is not None:
        run_as = "mosquitto"  # what Mosquitto started as root switches to anyway
    try:
        if args.self_signed:
            tls = generate_self_signed(out / "tls", args.hostname or ["localhost"])
        elif args.cafile and args.certfile and args.keyfile:
            tls = TlsFiles(args.cafile, args.certfile, args.keyfile)
        else:
            raise CommandError("give --cafile, --certfile and --keyfile, or --self-signed")
        boards = read_bundle_credentials(args.bundles) if args.bundles else {}
        files = write_broker_config(
            out,
            run=args.run,
            tls=tls,
            port=args.port,
            bind=args.bind,
            boards=boards,
            coordinator_user=args.coordinator_user,
            run_as=run_as,
        )
        owner = account_ids(run_as) if run_as else None
        if owner is not None and os.geteuid() == 0:
            pw = files.coordinator_password
            hand_over(out, owner)
            os.chown(pw, 0, 0)  # the coordinator's secret is not the broker's
    except BrokerConfigError as exc:
        raise CommandError(str(exc)) from exc
    blocked = unreachable_for(out, owner) if owner is not None else None
    if blocked is not None:
        print(
            f"warning: account {run_as!r} cannot enter {blocked}, so Mosquitto will not read "
            f"{out}: put it elsewhere (e.g. under /srv) or pass --run-as"
        )
    print(
        f"wrote {files.conf}, {files.passwd} ({len(files.users)} users: "
        f"{', '.join(files.users)}), {files.acl} and {files.coordinator_password}"
    )
    if args.self_signed:
        print(f"CA certificate for the boards: {tls.cafile}")
    as_whom = f" (as root it switches to {run_as!r}, which owns {out})" if run_as else ""
    print(f"start: mosquitto -c {files.conf}{as_whom}; reload after changes: kill -HUP <its pid>")
    return 0


def _config_template(args: argparse.Namespace) -> int:
    from coordinator.config import AggregatorSettings, CoordinatorConfig, DataSettings

    config = CoordinatorConfig(
        run=args.run,
        key_dir=Path("keys"),
        allow_list=Path("allow-list.txt"),
        db=Path("coordinator.sqlite"),
        aggregator=AggregatorSettings("siren"),
        data=DataSettings(dataset="digits", root="split", evaluate=True),
    )
    print(
        config.to_toml(
            password_file="mqtt.password",
            commented=True,
            header="siren-edge coordinator configuration (every key with its default meaning).\n"
            "Paths are relative to this file. `siren deploy init` writes a complete one.",
        ),
        end="",
    )
    return 0


def _find_database(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.rglob("coordinator.sqlite"))
        if not found:
            raise CommandError(
                f"{path} holds no coordinator database (coordinator.sqlite): `siren sim fleet` "
                "runs and deployments have one; `siren sim run` plays its rounds in one process "
                "and keeps no round log"
            )
        if len(found) != 1:
            raise CommandError(
                f"{path} holds {len(found)} coordinator databases; name one: "
                + ", ".join(map(str, found))
            )
        return found[0]
    return path


def _audit_source(args: argparse.Namespace) -> tuple[Any, Path, str]:
    """The audit entries, the file they came from, and the default key location."""
    from coordinator.audit import read_log
    from coordinator.store import CoordinatorStore, StoreError

    path: Path = args.path
    if not path.exists():
        raise CommandError(f"{path} does not exist")
    if path.is_file() and path.suffix in (".jsonl", ".log", ".json"):
        return list(read_log(path)), path, str(path.parent / "public.key")
    db = _find_database(path)
    try:
        store = CoordinatorStore(db)
    except (StoreError, OSError) as exc:
        raise CommandError(f"cannot open {db}: {exc}") from exc
    try:
        return store.audit_entries(), db, str(db.parent / "keys")
    finally:
        store.close()


def _audit_verify(args: argparse.Namespace) -> int:
    from coordinator.audit import verify_chain
    from protocol.errors import KeyFileError
    from protocol.keys import resolve_verify_key

    entries, source, default_key = _audit_source(args)
    try:
        key = resolve_verify_key(args.key or default_key)
    except (KeyFileError, ValueError, OSError) as exc:
        where = "" if args.key else f" (looked for {default_key})"
        raise CommandError(
            f"the coordinator's public key is needed{where}: pass --key with its public.key, "
            f"key folder or 64 hex digits ({exc})"
        ) from exc
    report = verify_chain(entries, key)
    if not entries:
        print(f"{source}: the audit log is empty")
        return 1
    if report.ok:
        last = report.last or {}
        body = last.get("body") or {}
        print(
            f"ok: {report.records} record(s) of run {last.get('run')!r} verify and chain "
            f"(last: seq {last.get('seq')}, {last.get('kind')}"
            + (f", round {body['round']}" if "round" in body else "")
            + ")"
        )
        return 0
    print(f"FAILED after {report.records} good record(s): {report.problem}")
    return 1


def _audit_export(args: argparse.Namespace) -> int:
    from coordinator.audit import AuditEntry

    entries, source, _ = _audit_source(args)
    out: Path = args.out
    with open(out, "w", encoding="ascii") as fh:
        for seq, (data, digest, sig) in enumerate(entries):
            fh.write(AuditEntry(seq, data, digest, sig).to_json() + "\n")
    print(f"wrote {len(entries)} record(s) of {source} to {out}")
    return 0


def register(sub: Any) -> None:
    """Add the ``coordinator`` and ``audit`` command groups."""
    audit = sub.add_parser(
        "audit",
        help="check a run's tamper-evident round log with the coordinator's public key",
        description="Every closed round and key change is a record signed by the coordinator "
        "and chained by SHA-256 to the one before (docs/protocol.md, section 15).",
    )
    audit.set_defaults(group_parser=audit)
    a = audit.add_subparsers(dest="audit_command", metavar="ACTION")
    verify = a.add_parser(
        "verify",
        help="verify the whole chain; name the first record that fails",
        description="Check every record of the log in a coordinator database (a .sqlite file "
        "or a folder holding one, e.g. a run folder) or an exported .jsonl log: canonical "
        "form, hash, signature, sequence and chaining. Exit 0 when all verify, 1 otherwise.",
    )
    verify.add_argument("path", type=Path, help="coordinator.sqlite, a run folder, or a .jsonl")
    verify.add_argument(
        "--key",
        default=None,
        help="the coordinator's public key (file, key folder or hex; default: keys/ next to "
        "the database, public.key next to a log)",
    )
    verify.set_defaults(func=_audit_verify)
    export = a.add_parser(
        "export",
        help="write the log as JSON lines (to keep a copy elsewhere)",
        description="Write the audit log of a coordinator database as one JSON object per line.",
    )
    export.add_argument("path", type=Path, help="coordinator.sqlite or a run folder")
    export.add_argument("--out", required=True, type=Path, help="output .jsonl file")
    export.set_defaults(func=_audit_export)

    p = sub.add_parser(
        "coordinator",
        help="run the coordinator service; write the deployment broker configuration",
        description="The coordinator: admits signed board updates, runs the rounds with the "
        "configured aggregator or SIREN, publishes the signed global model, stores everything "
        "in SQLite.",
    )
    p.set_defaults(group_parser=p)
    s = p.add_subparsers(dest="coordinator_command", metavar="ACTION")
    run = s.add_parser(
        "run",
        help="serve rounds over MQTT until the run is finished",
        description="Connect to the broker, start (or resume from the database) the run of "
        "coord.toml and serve its rounds. Safe to kill at any moment: restarted, it resumes "
        "from the last committed update or round.",
    )
    run.add_argument("--config", required=True, type=Path, help="coordinator TOML file")
    run.add_argument(
        "--device",
        default=None,
        help="where the heavy aggregators run, overriding [aggregator] device: numpy, cpu, "
        "cuda, cuda:N or auto (cpu/cuda need PyTorch: pip install 'siren-edge[torch]')",
    )
    run.set_defaults(func=_run)
    tpl = s.add_parser(
        "config-template",
        help="print a commented coord.toml",
        description="Print a coord.toml with every key and what it means (SIREN on digits, "
        "root set from the seeded split). `siren deploy init` writes a complete one.",
    )
    tpl.add_argument("--run", default="demo", help="run id to put in (default: demo)")
    tpl.set_defaults(func=_config_template)
    bc = s.add_parser(
        "broker-config",
        help="write the deployment's Mosquitto config: TLS listener, passwords, topic ACLs",
        description="Write mosquitto.conf (one TLS listener, anonymous access off), passwd "
        "(the coordinator and every provisioned board) and acl (a board may publish only its "
        "own update and status topics; only the coordinator may publish the global model).",
    )
    bc.add_argument("--out", required=True, type=Path, help="output directory")
    bc.add_argument("--run", required=True, help="run id the ACLs are written for")
    bc.add_argument("--port", type=int, default=8883, help="TLS listener port (default: 8883)")
    bc.add_argument("--bind", default="0.0.0.0", help="listener address (default: 0.0.0.0)")
    bc.add_argument(
        "--bundles",
        type=Path,
        default=None,
        help="directory of board bundles from `siren client provision`",
    )
    bc.add_argument("--coordinator-user", default="coordinator", help="coordinator MQTT user")
    bc.add_argument(
        "--run-as",
        default=None,
        help="account Mosquitto keeps when started as root (its 'user' option; default: "
        "Mosquitto's own, 'mosquitto')",
    )
    bc.add_argument("--cafile", type=Path, help="CA certificate")
    bc.add_argument("--certfile", type=Path, help="server certificate")
    bc.add_argument("--keyfile", type=Path, help="server private key")
    bc.add_argument(
        "--self-signed",
        action="store_true",
        help="generate a private CA and server certificate with openssl",
    )
    bc.add_argument(
        "--hostname", action="append", help="broker host name or IP for --self-signed (repeatable)"
    )
    bc.set_defaults(func=_broker_config)
