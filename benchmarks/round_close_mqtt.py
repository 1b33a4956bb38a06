"""Admission over a real broker: the coordinator service against the load generator.

:func:`measure_admission` spawns a private Mosquitto on loopback, builds a coordinator (the real
:class:`coordinator.service.CoordinatorService` with a streaming or batch engine, its SQLite
store, ``shards`` admission processes when asked), starts the load generator
(:mod:`firmware_sim.loadgen`) in another process, lets it sign one update per board before the
clock starts, then times one round: from the first publish to the last update admitted (the
round record's ``wait_seconds``), and the close (``aggregate_seconds``).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from nacl.signing import SigningKey


def _loadgen(
    host: str,
    port: int,
    run: str,
    coordinator_pub: bytes,
    k: int,
    seed: int,
    attackers: int,
    connections: int,
    duplicate: bool,
    pipe: Any,
) -> None:
    """The load generator's process: sign, report ready, publish on "go", report."""
    from nacl.signing import VerifyKey

    from firmware_sim.loadgen import board_keys, presign_updates, publish, read_global
    from protocol.mqtt import BrokerSettings

    settings = BrokerSettings(host=host, port=port)
    glob = read_global(settings, run, VerifyKey(coordinator_pub))
    messages = presign_updates(
        run=run,
        round_index=glob.round,
        base_sha256=glob.header.payload_sha256,
        signers=board_keys(k, seed),
        layout=glob.layout,
        attackers=attackers,
        seed=seed,
    )
    if duplicate:
        messages = messages + messages
    pipe.send(("ready", len(messages)))
    pipe.recv()
    report = publish(settings, messages, connections=connections)
    pipe.send(("done", report.started, report.seconds, report.messages))


def measure_admission(
    *,
    k: int,
    d: int,
    rule: str = "krum",
    params: dict[str, Any] | None = None,
    streaming: bool = True,
    shards: int = 0,
    connections: int = 4,
    seed: int = 0,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """One round of ``k`` boards with ``d``-value updates through the broker; returns the rate
    of admission and the close time (see the module docstring)."""
    from coordinator.config import AdmissionSettings, AggregatorSettings, CoordinatorConfig
    from coordinator.config import BrokerSettings as CoordBroker
    from coordinator.rounds import make_strategy
    from coordinator.runtime import CoordinatorRuntime
    from coordinator.shard_service import engine_class, service_class
    from coordinator.store import CoordinatorStore
    from firmware_sim.broker import start_mosquitto
    from firmware_sim.loadgen import board_keys
    from protocol.layout import TensorLayout

    if params is None:  # the Krum family's f; every other rule's defaults
        params = {"f": max(1, k // 10)} if rule in ("krum", "multi_krum", "bulyan") else {}
    params = dict(params)
    with tempfile.TemporaryDirectory(prefix="round-close-") as tmp:
        work = Path(tmp)
        broker = start_mosquitto(work / "broker", persistence=False)
        try:
            signers = board_keys(k, seed)
            coordinator_key = SigningKey(bytes(range(32)))
            config = CoordinatorConfig(
                run="bench",
                key_dir=work / "keys",
                allow_list=work / "allow-list.txt",
                db=work / "coordinator.sqlite",
                clients=tuple(signers),
                rounds=1,
                round_timeout=0,
                resend_interval=0,
                exit_when_done=True,
                broker=CoordBroker(host=broker.host, port=broker.port),
                aggregator=AggregatorSettings(name=rule, params=params),
                admission=AdmissionSettings(streaming=streaming, shards=shards),
            )
            layout = TensorLayout.flat(d)
            strategy = make_strategy(rule, params, num_clients=k, num_rounds=1, seed=seed)
            runtime = CoordinatorRuntime(layout, np.zeros(d, np.float32), strategy)
            keys = {c: s.verify_key for c, s in signers.items()}
            engine_cls = engine_class(streaming, shards)
            stop = threading.Event()
            failures: list[BaseException] = []

            def serve() -> None:
                # SQLite connections belong to the thread that opened them.
                store = CoordinatorStore(config.db)
                try:
                    engine = engine_cls(config, runtime, store, coordinator_key, keys)
                    service_class(shards)(config, engine).run(stop)
                except BaseException as exc:
                    failures.append(exc)
                finally:
                    store.close()

            runner = threading.Thread(target=serve, daemon=True)
            runner.start()
            ctx = multiprocessing.get_context("spawn")
            here, there = ctx.Pipe()
            gen = ctx.Process(
                target=_loadgen,
                args=(
                    broker.host,
                    broker.port,
                    config.run,
                    bytes(coordinator_key.verify_key),
                    k,
                    seed,
                    max(0, k // 10),
                    connections,
                    False,
                    there,
                ),
            )
            gen.start()
            try:
                if not here.poll(timeout):
                    raise TimeoutError("the load generator did not get ready")
                here.recv()
                here.send("go")
                if not here.poll(timeout):
                    raise TimeoutError("the load generator did not finish publishing")
                _, started, publish_seconds, published = here.recv()
                deadline = time.monotonic() + timeout
                while runner.is_alive() and time.monotonic() < deadline:
                    runner.join(0.2)
                stop.set()
                runner.join(30)
                if failures:
                    raise RuntimeError("the coordinator failed") from failures[0]
                store = CoordinatorStore(config.db)
                try:
                    row = store.round_row(1)
                finally:
                    store.close()
                if row is None or row.status != "closed" or row.record is None:
                    raise RuntimeError("the round did not close")
                record = row.record
                opened = row.opened_at
                admitted_at = opened + float(record["timing"]["wait_seconds"])
                admit_seconds = admitted_at - started
                return {
                    "k": k,
                    "d": d,
                    "rule": rule,
                    "engine": "streaming" if streaming else "batch",
                    "shards": shards,
                    "published": published,
                    "publish_seconds": publish_seconds,
                    "admit_seconds": admit_seconds,
                    "rate": k / admit_seconds if admit_seconds > 0 else float("inf"),
                    "close_seconds": float(record["timing"]["aggregate_seconds"]),
                    "close_how": record["decision"].get("close", "batch engine"),
                    "admitted": record["network"]["updates"],
                    "duplicates": record["network"]["duplicates"],
                }
            finally:
                stop.set()
                gen.join(30)
                if gen.is_alive():
                    gen.kill()
        finally:
            broker.stop()


def _cli() -> None:  # pragma: no cover - manual runs
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--d", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=0)
    p.add_argument("--batch", action="store_true")
    p.add_argument("--rule", default="krum")
    a = p.parse_args()
    out = measure_admission(k=a.k, d=a.d, shards=a.shards, streaming=not a.batch, rule=a.rule)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":  # pragma: no cover
    _cli()
