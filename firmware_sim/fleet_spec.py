"""What a simulated fleet is made of, and writing it to disk before anything starts.

:class:`FleetOptions` says how ``siren sim fleet`` runs a fleet (workers, broker, device
profiles, deadlines); :func:`prepare_fleet` writes, for a :class:`~firmware_sim.engine.SimConfig`
and those options, every board's keys, the coordinator's keys, allow-list and ``coord.toml``,
and one :class:`WorkerSpec` per worker process. Boards are named by :func:`client_name`.
:func:`board_config_for` gives one board of a prepared fleet as a standalone board
configuration, and :func:`fleet_broker_auth` the broker accounts of a prepared fleet.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from firmware_sim.broker import BrokerAuth, mqtt_password_for

logger = logging.getLogger(__name__)

#: Prefix of simulated board client ids: ``board-000``, ``board-001``, ...
BOARD_PREFIX = "board-"


def client_name(index: int) -> str:
    """The client id of simulated board ``index`` (``board-007``)."""
    return f"{BOARD_PREFIX}{index:03d}"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (written as JSON by the orchestrator).

    Attributes
    ----------
    sim : dict
        The :class:`~firmware_sim.engine.SimConfig` as a dict.
    run : str
        Run id.
    host, port, protocol : str, int, int
        Broker address and MQTT version (5, or 311 for amqtt).
    keys_dir : str
        Directory with one key directory per board (``<keys_dir>/board-007/private.key``).
    coordinator_key : str
        The coordinator's public key file.
    boards : list of int
        Board indices hosted by this worker.
    profiles : list of dict
        One :class:`~firmware_sim.profiles.DeviceProfile` (as a dict) per board of the fleet.
    stats_path : str
        JSON-lines file of per-round worker statistics.
    state_dir : str
        Persist board states under this directory ("" = in memory).
    worker : int
        This worker's number.
    broker_auth : bool
        The broker has accounts (each board's password derives from its key,
        :func:`firmware_sim.broker.mqtt_password_for`); False: anonymous.
    telemetry : bool
        Each board publishes its round's figures in its status (see :class:`FleetWorker`).
    """

    sim: dict[str, Any]
    run: str
    host: str
    port: int
    protocol: int
    keys_dir: str
    coordinator_key: str
    boards: list[int]
    profiles: list[dict[str, Any]]
    stats_path: str
    state_dir: str = ""
    worker: int = 0
    broker_auth: bool = False
    telemetry: bool = True

    def to_json(self) -> str:
        """The spec as JSON text."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Parse :meth:`to_json` output."""
        return cls(**json.loads(text))


def sim_config_from_dict(values: dict[str, Any]) -> Any:
    """Rebuild a :class:`~firmware_sim.engine.SimConfig` from ``asdict`` output."""
    from firmware_sim.engine import SimConfig

    known = set(SimConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in values.items() if k in known}
    if kwargs.get("malicious_ids") is not None:
        kwargs["malicious_ids"] = tuple(kwargs["malicious_ids"])
    return SimConfig(**kwargs)


@dataclass(frozen=True)
class FleetOptions:
    """How ``siren sim fleet`` runs the fleet (what the run computes is the ``SimConfig``, the
    boards' device profiles included).

    Attributes
    ----------
    workers : int
        Worker processes hosting the boards.
    broker : str
        ``auto`` / ``mosquitto`` / ``amqtt`` (a private broker), or ``HOST:PORT`` of a running
        broker (anonymous, MQTT v5).
    round_timeout : float
        Coordinator deadline per round in seconds (0 = wait for every board).
    quorum : float
        Fraction of boards needed to close a round at the deadline.
    resend_interval : float
        Seconds without progress after which the coordinator re-announces a round's model.
    persist_boards : bool
        Keep every board's state on disk (as a physical board does).
    run_id : str, optional
        Run id (default ``fleet-<seed>-<6 random hex digits>``).
    api_port : int, optional
        Serve the coordinator's HTTP API and dashboard on this loopback port (``None``: no
        API). The admin token comes from ``$SIREN_API_TOKEN``, inherited by the coordinator.
    telemetry : bool
        Boards publish their rounds' telemetry figures (:class:`FleetWorker`).
    ray : str, optional
        Place the workers as Ray actors on the nodes of this cluster (``auto``, ``HOST:PORT``,
        ``ray://HOST:PORT``, or ``local`` for a throwaway local instance;
        :mod:`firmware_sim.ray_fleet`); ``None``: local worker processes.
    ray_worker_cpus : float
        Logical CPUs each worker actor reserves on its node.
    broker_host : str, optional
        Address the private broker listens on and the boards connect to (default: loopback;
        with ``ray`` and nodes on other hosts, this host's address in the cluster).
    """

    workers: int = 1
    broker: str = "auto"
    round_timeout: float = 0.0
    quorum: float = 0.5
    resend_interval: float = 30.0
    persist_boards: bool = False
    run_id: str | None = None
    api_port: int | None = None
    telemetry: bool = True
    ray: str | None = None
    ray_worker_cpus: float = 1.0
    broker_host: str | None = None


def resolve_dataset(name: str) -> str:
    """``auto`` becomes ``fashion-mnist`` when its files are installed, else ``digits``."""
    from models.datasets import resolve_dataset_name

    return resolve_dataset_name(name)


def prepare_fleet(
    config: Any,
    options: FleetOptions,
    workdir: Path,
    *,
    host: str,
    port: int,
    protocol: int,
    broker_auth: bool = False,
) -> tuple[Path, list[Path]]:
    """Write keys, the allow-list, the coordinator config and the worker specs into ``workdir``.

    With ``broker_auth`` the coordinator and the boards log in to the broker with passwords
    derived from their keys (:func:`fleet_broker_auth` gives the broker the same accounts).
    Returns the coordinator config path and one worker spec path per worker.
    """
    from coordinator.config import (
        AggregatorSettings,
        ApiSettings,
        CoordinatorConfig,
        DataSettings,
        ModelSettings,
        SimulationSettings,
        TrainingSettings,
    )
    from coordinator.config import BrokerSettings as CoordinatorBroker
    from protocol.keys import AllowList, generate_signing_key, save_key_pair

    # A fresh run id per fleet: nothing retained or queued on a shared broker by an earlier
    # run can reach this one.
    run_id = options.run_id or f"fleet-{config.seed}-{secrets.token_hex(3)}"
    workdir.mkdir(parents=True, exist_ok=True)
    keys_dir = workdir / "keys"
    coord_dir = workdir / "coordinator"
    coordinator_key = generate_signing_key()
    save_key_pair(coord_dir / "keys", coordinator_key, overwrite=True)
    allow = AllowList()
    names = [client_name(i) for i in range(config.clients)]
    for name in names:
        key = generate_signing_key()
        save_key_pair(keys_dir / name, key, client_id=name, overwrite=True)
        allow.add(name, key.verify_key)
    allow.save(coord_dir / "allow-list.txt")
    dataset = resolve_dataset(config.dataset)
    malicious: tuple[int, ...] = ()
    if config.attack not in (None, "", "none"):
        from firmware_sim.engine import malicious_board_ids

        malicious = malicious_board_ids(config)
    coord = CoordinatorConfig(
        run=run_id,
        key_dir=coord_dir / "keys",
        allow_list=coord_dir / "allow-list.txt",
        db=coord_dir / "coordinator.sqlite",
        clients=tuple(names),
        rounds=config.rounds,
        seed=config.seed,
        round_timeout=options.round_timeout,
        quorum=options.quorum,
        client_fraction=config.client_fraction,
        clients_per_round=getattr(config, "clients_per_round", None),
        mode=getattr(config, "mode", "sync"),
        staleness_bound=getattr(config, "staleness_bound", 4),
        buffer_size=getattr(config, "buffer_size", 10),
        staleness_weight=getattr(config, "staleness_weight", "poly:0.5"),
        async_pool=getattr(config, "async_pool", "buffer"),
        resend_interval=options.resend_interval,
        defense_start_round=getattr(config, "defense_start_round", 1),
        broker=CoordinatorBroker(
            host=host,
            port=port,
            protocol=protocol,
            username="coordinator" if broker_auth else None,
            password=mqtt_password_for(bytes(coordinator_key)) if broker_auth else None,
        ),
        model=ModelSettings(name=config.model),
        training=TrainingSettings(
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            learning_rate=config.resolved_lr(),
            optimizer=config.optimizer,
        ),
        aggregator=AggregatorSettings(
            config.aggregator,
            dict(config.aggregator_params),
            guard_factor=getattr(config, "guard_factor", 100.0),
            guard_max_abs=getattr(config, "guard_max_abs", 1e6),
            profile=config.siren_profile,
            device=getattr(config, "device", "numpy"),
        ),
        data=DataSettings(
            dataset=dataset,
            root="split",
            evaluate=True,
            clients=config.clients,
            partition=config.partition,
            noniid_p=config.noniid_p,
            dirichlet_alpha=config.dirichlet_alpha,
            classes_per_board=config.classes_per_board,
            root_size=config.root_size,
            local_test_fraction=config.local_test_fraction,
            train_samples=config.train_samples,
            test_samples=config.test_samples,
            split_seed=config.seed,
        ),
        api=ApiSettings(enabled=options.api_port is not None, port=options.api_port or 0),
        # The simulator's ground truth, for the dashboard's counts of bans (never for decisions).
        simulation=SimulationSettings(tuple(client_name(i) for i in malicious)),
    )
    coord_toml = coord_dir / "coord.toml"
    password_file = None
    if broker_auth:
        password_file = "mqtt.password"
        pw = coord_dir / password_file
        pw.write_text(mqtt_password_for(bytes(coordinator_key)) + "\n")
        pw.chmod(0o600)
    coord_toml.write_text(coord.to_toml(relative_to=coord_dir, password_file=password_file))
    (coord_dir / "public.key").write_text(bytes(coordinator_key.verify_key).hex() + "\n")
    profiles = config.device_profiles()
    sim = asdict(config)
    sim["dataset"] = dataset
    workers = max(1, min(options.workers, config.clients))
    specs = []
    for w in range(workers):
        spec = WorkerSpec(
            sim=sim,
            run=run_id,
            host=host,
            port=port,
            protocol=protocol,
            keys_dir=str(keys_dir),
            coordinator_key=str(coord_dir / "public.key"),
            boards=list(range(w, config.clients, workers)),
            profiles=[asdict(p) for p in profiles],
            stats_path=str(workdir / f"worker-{w}.jsonl"),
            state_dir=str(workdir / "boards") if options.persist_boards else "",
            worker=w,
            broker_auth=broker_auth,
            telemetry=options.telemetry,
        )
        path = workdir / f"worker-{w}.json"
        path.write_text(spec.to_json())
        specs.append(path)
    return coord_toml, specs


def board_broker(spec: WorkerSpec, name: str, key: Any) -> Any:
    """How board ``name`` of a fleet reaches its broker (with its account when the broker has
    accounts)."""
    from edge_client.config import BrokerSettings

    if not spec.broker_auth:
        return BrokerSettings(host=spec.host, port=spec.port, protocol=spec.protocol)
    return BrokerSettings(
        host=spec.host,
        port=spec.port,
        protocol=spec.protocol,
        username=name,
        password=mqtt_password_for(bytes(key)),
    )


def fleet_broker_auth(workdir: Path, run: str, names: list[str]) -> BrokerAuth:
    """The broker accounts of a prepared fleet: the coordinator's and every board's, with the
    passwords derived from their keys, and the run's ACLs."""
    from protocol.keys import load_signing_key

    passwords = {
        "coordinator": mqtt_password_for(bytes(load_signing_key(workdir / "coordinator" / "keys")))
    }
    for name in names:
        passwords[name] = mqtt_password_for(bytes(load_signing_key(workdir / "keys" / name)))
    return BrokerAuth(run, passwords)


def board_config_for(spec: WorkerSpec, index: int, state_dir: Path) -> Any:
    """A standalone :class:`~edge_client.config.BoardConfig` for board ``index`` of a fleet.

    The board trains on the same shard with the same seeds as inside a worker, so
    ``siren client run`` with this configuration can stand in for one board of the fleet.
    An attacked board's poisoning is not applied (it is the simulator's, not the board's).
    """
    from edge_client.config import (
        AlarmSettings,
        BoardConfig,
        DataSettings,
        TrainingSettings,
    )
    from protocol.keys import load_signing_key

    cfg = sim_config_from_dict(spec.sim)
    name = client_name(index)
    return BoardConfig(
        client_id=name,
        run=spec.run,
        key_dir=Path(spec.keys_dir) / name,
        coordinator_key=Path(spec.coordinator_key),
        state_dir=state_dir,
        index=index,
        rounds=cfg.rounds,
        seed=cfg.seed,
        broker=board_broker(spec, name, load_signing_key(Path(spec.keys_dir) / name)),
        training=TrainingSettings(
            model=cfg.model,
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.resolved_lr(),
            optimizer=cfg.optimizer,
        ),
        alarm=AlarmSettings(
            enabled=cfg.alarm_enabled,
            profile=cfg.siren_profile,
            rule=cfg.alarm_rule,
            threshold=cfg.alarm_threshold,
            backend=cfg.alarm_backend,
        ),
        data=DataSettings(
            source="split",
            dataset=cfg.dataset,
            clients=cfg.clients,
            partition=cfg.partition,
            noniid_p=cfg.noniid_p,
            dirichlet_alpha=cfg.dirichlet_alpha,
            classes_per_board=cfg.classes_per_board,
            root_size=cfg.root_size,
            local_test_fraction=cfg.local_test_fraction,
            train_samples=cfg.train_samples,
            test_samples=cfg.test_samples,
            split_seed=cfg.seed,
        ),
    )
