"""A deployment folder: everything a fleet needs, written in the order that works.

Layout of ``siren deploy init DIR``::

    DIR/deployment.toml        what was asked (no secrets); ``add-board`` reads it
    DIR/README.md              the next commands, exactly
    DIR/ca/ca.key, ca.crt      the deployment's private CA (ca.key 0600: keep it offline)
    DIR/broker/                mosquitto.conf, passwd, acl, server.crt/.key, ca.crt,
                               siren-broker.service; owned by the account Mosquitto runs as
    DIR/coordinator/           coord.toml (every key commented), keys/, allow-list.txt,
                               mqtt.password or client.crt/.key, ca.crt, siren-coordinator.service
    DIR/boards/<id>/           one self-installing bundle per board (edge_client.provision)
    DIR/dist/                  the lean board wheel the bundles carry, and with
                               ``--train-backend litert`` the model's LiteRT training artifact

Order: coordinator key pair, CA and server certificate, the boards' keys, credentials and
bundles (each with the CA and the pinned coordinator key), then the broker's password file and
ACLs for exactly those boards, then ownership. Nothing that holds a key is ever overwritten
without ``force``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from coordinator.broker import (
    AUTH_MODES,
    COORDINATOR_USER,
    BrokerConfigError,
    TlsFiles,
    account_ids,
    generate_ca,
    issue_certificate,
    unreachable_for,
    write_broker_config,
    write_private,
)
from deploy.errors import DeployError
from deploy.wheel import build_board_wheel
from protocol.topics import is_valid_id

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DEPLOYMENT_FILE = "deployment.toml"
#: Datasets a deployment can hand out as demo shards (one data.npz per bundle).
DEMO_DATASETS = ("digits", "fashion-mnist")


_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


def _valid_host(host: str) -> bool:
    """Whether ``host`` is an IP address or a DNS host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # all digits and dots: meant as an IPv4 address, and not a valid one
        return not re.fullmatch(r"[\d.]+", host) and bool(_HOST_NAME.match(host))
    return True


@dataclass(frozen=True)
class Deployment:
    """What a deployment folder was made for (``deployment.toml``; no secrets in it).

    Attributes
    ----------
    run : str
        Run id (topic level; boards and coordinator must agree).
    broker_host : str
        Host name or address boards connect to; the broker's certificate is issued for it
        (and for ``hostnames``).
    broker_port, bind : int, str
        The TLS listener.
    auth : str
        ``password`` (per-board passwords over TLS) or ``mtls`` (per-board client certificates).
    boards : tuple of str
        Board ids, in index order.
    hostnames : tuple of str
        More names and addresses in the broker's certificate.
    coordinator_host : str
        How the coordinator reaches the broker ("" = ``broker_host``).
    broker_user : str
        Account Mosquitto runs as ("" = whoever starts it; Mosquitto started as root switches to
        ``mosquitto``).
    rounds, seed : int
        Run length and seed.
    aggregator : str
        Server rule (``siren`` or a registered aggregator).
    dataset : str
        The data's dataset name (root set and accuracy reporting on the coordinator).
    demo_data : bool
        Give every bundle its shard of a seeded split of ``dataset`` as ``data.npz``.
    partition : str
        The demo split's partition.
    install_dir, service_user, venv : str
        Where bundles go on boards, the account they run as, their virtual environment.
    alarm : bool
        Boards run the SIREN alarm.
    train_backend : str
        ``keras`` (boards install TensorFlow) or ``litert`` (boards train with the model's
        LiteRT training artifact, built once into ``dist/`` and carried by every bundle).
    """

    run: str
    broker_host: str
    broker_port: int = 8883
    bind: str = "0.0.0.0"
    auth: str = "password"
    boards: tuple[str, ...] = ()
    hostnames: tuple[str, ...] = ()
    coordinator_host: str = ""
    coordinator_user: str = ""
    broker_user: str = ""
    rounds: int = 10
    seed: int = 0
    aggregator: str = "siren"
    dataset: str = "digits"
    demo_data: bool = True
    partition: str = "iid"
    install_dir: str = "/opt/siren"
    service_user: str = "siren"
    venv: str = "/opt/siren/venv"
    alarm: bool = True
    api_port: int = 8080
    round_timeout: float = 300.0
    revoked: tuple[str, ...] = ()
    train_backend: str = "keras"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def active_boards(self) -> tuple[str, ...]:
        """The boards whose credentials the broker accepts (all but the revoked)."""
        return tuple(b for b in self.boards if b not in self.revoked)

    def __post_init__(self) -> None:
        if not is_valid_id(self.run):
            raise DeployError(
                f"invalid run id {self.run!r}: use 1-64 characters from [A-Za-z0-9_.-], "
                "starting with a letter or digit"
            )
        if self.auth not in AUTH_MODES:
            raise DeployError(f"--auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        if not 0 < self.broker_port < 65536:
            raise DeployError(f"--broker-port must be in 1..65535, got {self.broker_port}")
        if not self.broker_host or any(c.isspace() for c in self.broker_host):
            raise DeployError(f"invalid broker host {self.broker_host!r}")
        if not 0 < self.api_port < 65536:
            raise DeployError(f"--api-port must be in 1..65535, got {self.api_port}")
        if self.api_port == self.broker_port:
            raise DeployError(
                f"--api-port and --broker-port are both {self.api_port}: give them different ports"
            )
        if not self.round_timeout >= 0:
            raise DeployError(
                f"--round-timeout must be >= 0 seconds (0: wait for every board), "
                f"got {self.round_timeout}"
            )
        bad = [b for b in self.boards if not is_valid_id(b) or b == COORDINATOR_USER]
        if bad:
            raise DeployError(f"invalid board id(s) {bad}")
        if len(set(self.boards)) != len(self.boards):
            raise DeployError("a board id is listed twice")
        if self.rounds < 1:
            raise DeployError(f"--rounds must be >= 1, got {self.rounds}")
        if self.train_backend not in ("keras", "litert"):
            raise DeployError(
                f"--train-backend must be keras or litert, got {self.train_backend!r}"
            )
        if self.demo_data and self.dataset not in DEMO_DATASETS:
            raise DeployError(
                f"demo data comes from {', '.join(DEMO_DATASETS)}, not {self.dataset!r}"
            )

    def to_toml(self) -> str:
        """The ``deployment.toml`` text."""
        from coordinator.config import dumps_toml

        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        values.pop("extra")
        return dumps_toml(
            {"deployment": values},
            header="siren-edge deployment: what `siren deploy init` was asked (no secrets).\n"
            "`siren deploy add-board` reads it; edit it only through those commands.",
        )

    @classmethod
    def load(cls, directory: Path) -> Deployment:
        """Read ``directory/deployment.toml``.

        Raises
        ------
        DeployError
            If the folder holds no deployment or the file is invalid.
        """
        path = directory / DEPLOYMENT_FILE
        if not path.exists():
            raise DeployError(
                f"{directory} holds no deployment ({DEPLOYMENT_FILE} is missing): create one "
                "with `siren deploy init`"
            )
        try:
            raw = dict(tomllib.loads(path.read_text(encoding="utf-8"))["deployment"])
            for key in ("boards", "hostnames", "revoked"):
                raw[key] = tuple(raw.get(key, ()))
            return cls(**raw)
        except (KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise DeployError(f"{path} is not a valid deployment file: {exc}") from None


@dataclass(frozen=True)
class Paths:
    """The files of a deployment folder."""

    root: Path

    @property
    def ca(self) -> Path:
        """The CA's folder."""
        return self.root / "ca"

    @property
    def broker(self) -> Path:
        """The broker's folder."""
        return self.root / "broker"

    @property
    def coordinator(self) -> Path:
        """The coordinator's folder."""
        return self.root / "coordinator"

    @property
    def boards(self) -> Path:
        """The folder of the board bundles."""
        return self.root / "boards"

    @property
    def dist(self) -> Path:
        """The board wheel's folder."""
        return self.root / "dist"

    @property
    def allow_list(self) -> Path:
        """The coordinator's allow-list of board keys."""
        return self.coordinator / "allow-list.txt"

    @property
    def coord_toml(self) -> Path:
        """The coordinator's configuration."""
        return self.coordinator / "coord.toml"

    def tls(self) -> TlsFiles:
        """The broker listener's certificate files."""
        return TlsFiles(
            self.broker / "ca.crt", self.broker / "server.crt", self.broker / "server.key"
        )


def board_ids(prefix: str, first: int, count: int) -> tuple[str, ...]:
    """``prefix000``, ``prefix001``, ... (three digits at least)."""
    return tuple(f"{prefix}{i:03d}" for i in range(first, first + count))


def _chown_tree(path: Path, owner: tuple[int, int]) -> None:
    os.chown(path, *owner)
    for child in path.rglob("*"):
        os.chown(child, *owner, follow_symlinks=False)


def _broker_owner(deployment: Deployment) -> tuple[int, int] | None:
    if not deployment.broker_user:
        return None
    ids = account_ids(deployment.broker_user)
    if ids is None:
        raise DeployError(
            f"--broker-user {deployment.broker_user!r} is not an account on this machine "
            "(install Mosquitto first: it creates the 'mosquitto' account)"
        )
    return ids


def default_coordinator_user() -> str:
    """The account that ran ``sudo`` (``$SUDO_USER``) when running as root through sudo, else ""
    (the coordinator's files stay the writer's)."""
    user = os.environ.get("SUDO_USER", "")
    if os.geteuid() == 0 and user and user != "root" and account_ids(user) is not None:
        return user
    return ""


def default_broker_user() -> str:
    """``mosquitto`` when running as root and that account exists, else "" (the writer)."""
    if os.geteuid() == 0 and account_ids("mosquitto") is not None:
        return "mosquitto"
    return ""


def _board_data(deployment: Deployment) -> list[Any]:
    from edge_client.client import split_shards
    from edge_client.config import DataSettings

    split = DataSettings(
        dataset=deployment.dataset,
        clients=len(deployment.boards),
        partition=deployment.partition,
        split_seed=deployment.seed,
    )
    return split_shards(split)


#: Images of each dataset a deployment trains on (shape of one sample).
_INPUT_SHAPES = {"digits": (8, 8, 1), "fashion-mnist": (28, 28, 1)}


def board_artifact(deployment: Deployment, paths: Paths, progress: Any = print) -> Path | None:
    """The LiteRT training artifact of a ``litert`` deployment's model (``dist/``), built once
    (TensorFlow, here) and reused by later bundles; None for a ``keras`` deployment."""
    if deployment.train_backend != "litert":
        return None
    from models.litert_artifact import ARTIFACT_FILE

    path = paths.dist / ARTIFACT_FILE
    if path.exists():
        return path
    if deployment.dataset not in _INPUT_SHAPES:
        raise DeployError(f"no LiteRT training artifact for dataset {deployment.dataset!r}")
    from edge_client.config import TrainingSettings
    from models.errors import ModelsError
    from models.litert_training import export_litert_training
    from models.zoo import DEFAULT_MODEL, build_model

    training = TrainingSettings()
    model_name = DEFAULT_MODEL[deployment.dataset]
    progress(f"LiteRT training artifact of {model_name} ({training.optimizer} in the graph)")
    model = build_model(model_name, _INPUT_SHAPES[deployment.dataset], 10, seed=deployment.seed)
    try:
        artifact = export_litert_training(
            model, model_name=model_name, optimizer=training.optimizer
        )
    except ModelsError as exc:
        raise DeployError(str(exc)) from exc
    return artifact.save(path)


def _write_bundles(
    deployment: Deployment,
    paths: Paths,
    ids: Sequence[str],
    *,
    wheel: Path,
    force: bool,
    data: Sequence[Any] | None,
    boards_dir: Path | None = None,
    register: bool = True,
) -> dict[str, str]:
    """Write the bundles of ``ids`` (into ``boards_dir``, default the deployment's); register
    their keys in the coordinator's allow-list unless ``register`` is False; return
    ``{id: password}`` (password auth only)."""
    import numpy as np

    from edge_client.config import AlarmSettings, DataSettings, TrainingSettings
    from edge_client.errors import EdgeClientError
    from edge_client.provision import Placement, provision_board

    passwords: dict[str, str] = {}
    place = Placement(deployment.install_dir, deployment.service_user, deployment.venv)
    artifact = board_artifact(deployment, paths)
    for board in ids:
        index = deployment.boards.index(board)
        out = (boards_dir or paths.boards) / board
        client_cert = None
        if deployment.auth == "mtls":
            cert_dir = paths.ca / "issued"
            issue_certificate(
                paths.ca / "ca.key", paths.ca / "ca.crt", cert_dir / f"{board}.key",
                cert_dir / f"{board}.crt", common_name=board, client=True,
            )  # fmt: skip
            client_cert = (cert_dir / f"{board}.crt", cert_dir / f"{board}.key")
        else:
            passwords[board] = secrets.token_urlsafe(24)
        try:
            provision_board(
                out,
                client_id=board,
                run=deployment.run,
                index=index,
                broker_host=deployment.broker_host,
                broker_port=deployment.broker_port,
                coordinator_key=paths.coordinator / "keys",
                ca_cert=paths.ca / "ca.crt",
                allow_list=paths.allow_list if register else None,
                rounds=deployment.rounds,
                seed=deployment.seed,
                training=TrainingSettings(backend=deployment.train_backend),
                alarm=AlarmSettings(enabled=deployment.alarm),
                data=DataSettings(
                    source="npz",
                    path=out / "data.npz",
                    dataset=deployment.dataset,
                    clients=len(deployment.boards),
                ),
                place=place,
                password=passwords.get(board),
                client_cert=client_cert,
                wheel=wheel,
                artifact=artifact,
                force=force,
            )
        except EdgeClientError as exc:
            raise DeployError(str(exc)) from exc
        if client_cert is not None:
            client_cert[1].unlink()  # the board's key lives in its bundle only
        if data is not None and index < len(data):
            shard = data[index]
            np.savez(
                out / "data.npz",
                x_train=shard.x_train, y_train=shard.y_train,
                x_test=shard.x_test, y_test=shard.y_test,
            )  # fmt: skip
    return passwords


def _coordinator_config(deployment: Deployment, paths: Paths) -> str:
    from coordinator.config import (
        AggregatorSettings,
        ApiSettings,
        BrokerSettings,
        CoordinatorConfig,
        DataSettings,
    )

    coord = paths.coordinator
    mtls = deployment.auth == "mtls"
    config = CoordinatorConfig(
        run=deployment.run,
        key_dir=coord / "keys",
        allow_list=paths.allow_list,
        db=coord / "coordinator.sqlite",
        clients=deployment.boards,
        rounds=deployment.rounds,
        seed=deployment.seed,
        round_timeout=deployment.round_timeout,
        broker=BrokerSettings(
            host=deployment.coordinator_host or deployment.broker_host,
            port=deployment.broker_port,
            username=COORDINATOR_USER,
            tls=True,
            ca_file=coord / "ca.crt",
            cert_file=coord / "client.crt" if mtls else None,
            key_file=coord / "client.key" if mtls else None,
        ),
        aggregator=AggregatorSettings(deployment.aggregator),
        data=DataSettings(
            dataset=deployment.dataset,
            clients=len(deployment.boards),
            partition=deployment.partition,
            split_seed=deployment.seed,
            root="split" if deployment.demo_data else "none",
            evaluate=deployment.demo_data,
        ),
        api=ApiSettings(
            enabled=True, host="127.0.0.1", port=deployment.api_port, token_file=coord / "api.token"
        ),
    )
    header = (
        f"siren-edge coordinator of run {deployment.run} (written by `siren deploy`).\n"
        "Start: siren coordinator run --config coord.toml"
    )
    if not deployment.demo_data:
        header += (
            '\n[data] root = "none": SIREN and FLTrust need a root set (set root = "npz" '
            "with root_path), and accuracy is reported only with evaluate = true."
        )
    return config.to_toml(
        relative_to=coord,
        password_file=None if mtls else "mqtt.password",
        commented=True,
        header=header,
    )


def _unit(description: str, exec_start: str, user: str, workdir: Path) -> str:
    return "\n".join(
        [
            "[Unit]",
            f"Description={description}",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            *([f"User={user}"] if user else []),
            f"WorkingDirectory={workdir}",
            f"ExecStart={exec_start}",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "RestartSec=5",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def _write_broker(
    deployment: Deployment,
    paths: Paths,
    coordinator_password: str,
    board_passwords: dict[str, str],
) -> None:
    owner = _broker_owner(deployment)
    try:
        write_broker_config(
            paths.broker,
            run=deployment.run,
            tls=paths.tls(),
            port=deployment.broker_port,
            bind=deployment.bind,
            boards=board_passwords,
            all_boards=deployment.active_boards,
            coordinator_password=coordinator_password,
            coordinator_password_file=paths.coordinator / "mqtt.password",
            run_as=deployment.broker_user or None,
            auth=deployment.auth,
            owner=owner,
        )
    except BrokerConfigError as exc:
        raise DeployError(str(exc)) from exc
    conf = paths.broker.resolve() / "mosquitto.conf"
    (paths.broker / "siren-broker.service").write_text(
        _unit(f"Mosquitto broker of siren-edge run {deployment.run}",
              f"/usr/sbin/mosquitto -c {conf}", "", paths.broker.resolve())
    )  # fmt: skip
    if owner is not None and os.geteuid() == 0:
        _chown_tree(paths.broker, owner)


def _next_steps(deployment: Deployment, paths: Paths) -> str:
    root = paths.root.resolve()
    conf = root / "broker" / "mosquitto.conf"
    user = deployment.broker_user
    start_as = f" (it switches to the '{user}' account, which owns broker/)" if user else ""
    lines = [
        f"# Deployment of run `{deployment.run}`",
        "",
        f"{len(deployment.boards)} boards ({', '.join(deployment.boards)}), broker "
        f"`{deployment.broker_host}:{deployment.broker_port}` (TLS only, "
        f"{'client certificates' if deployment.auth == 'mtls' else 'per-board passwords'}), "
        f"aggregator `{deployment.aggregator}`, {deployment.rounds} rounds.",
        "",
        "## 1. Broker (on the coordinator host)",
        "",
        "```bash",
        f"sudo mosquitto -c {conf}" + f"   # as root{start_as}",
        f"# or as a service: sudo cp {root}/broker/siren-broker.service /etc/systemd/system/ && "
        "sudo systemctl enable --now siren-broker",
        "```",
        "",
        f"Check it, as root: `siren deploy check {root}` (only the TLS port listens, the handshake "
        "verifies with the deployment's CA, plain-text MQTT is refused).",
        "",
        "## 2. Coordinator",
        "",
        "```bash",
        f"siren coordinator run --config {root}/coordinator/coord.toml",
        "```",
        "",
        "## 3. Boards",
        "",
        "Copy each bundle to its board (it holds the board's private key: use a trusted "
        "channel) and run its installer as root:",
        "",
        "```bash",
        f"scp -r {root}/boards/{deployment.boards[0] if deployment.boards else '<id>'} "
        "pi@<board>:bundle",
        "ssh pi@<board> sudo sh bundle/install.sh",
        "```",
        "",
        "## Later",
        "",
        f"- more boards: `siren deploy add-board {root} --count N`, then "
        f"`siren deploy reload-broker {root}` and restart the coordinator (it resumes the run, "
        "and the new boards join it from its open round);",
        "- `ca/ca.key` signs broker and board certificates: keep it off the network once the "
        "fleet is set up.",
        "",
    ]
    return "\n".join(lines)


def init_deployment(
    directory: Path, deployment: Deployment, *, force: bool = False, progress: Any = print
) -> Paths:
    """Write a whole deployment folder (see the module docstring).

    Raises
    ------
    DeployError
        If the folder already holds a deployment (without ``force``), a name is invalid, a
        tool is missing, or the demo data cannot be loaded.
    """
    from protocol.keys import generate_signing_key, save_key_pair

    paths = Paths(directory)
    if directory.exists() and not directory.is_dir():
        raise DeployError(f"{directory} is a file; give a folder for the deployment")
    existing = (directory / DEPLOYMENT_FILE).exists()
    if existing and not force:
        raise DeployError(
            f"{directory} already holds a deployment: add boards with `siren deploy add-board "
            f"{directory}`, or pass --force to replace every key and certificate in it (its "
            "run's database is kept aside in archive/)"
        )
    if not deployment.boards:
        raise DeployError("a deployment needs at least one board (--boards N)")
    _check_before_writing(deployment)
    if existing:
        _refuse_if_in_use(paths)
    owner = _broker_owner(deployment)
    data = None
    if deployment.demo_data:
        progress(f"splitting {deployment.dataset} over {len(deployment.boards)} boards")
        data = _board_data(deployment)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeployError(f"cannot create {directory}: {exc.strerror}") from None
    if force:
        kept = _archive_run(paths)
        if kept is not None:
            progress(f"the earlier run's database and round log kept in {kept}")
        for sub in ("ca", "broker", "coordinator", "boards", "dist"):
            shutil.rmtree(directory / sub, ignore_errors=True)
    for folder in (paths.ca, paths.broker, paths.coordinator, paths.boards):
        folder.mkdir(exist_ok=True)
    paths.ca.chmod(0o700)
    progress("coordinator key pair")
    save_key_pair(paths.coordinator / "keys", generate_signing_key(), client_id=COORDINATOR_USER)
    progress(f"certificate authority and broker certificate for {deployment.broker_host}")
    try:
        generate_ca(paths.ca, name=f"siren-edge {deployment.run} CA")
        names = list(dict.fromkeys([deployment.broker_host, *deployment.hostnames]))
        issue_certificate(
            paths.ca / "ca.key", paths.ca / "ca.crt", paths.broker / "server.key",
            paths.broker / "server.crt", common_name=names[0], hostnames=names,
        )  # fmt: skip
        shutil.copyfile(paths.ca / "ca.crt", paths.broker / "ca.crt")
        shutil.copyfile(paths.ca / "ca.crt", paths.coordinator / "ca.crt")
        coordinator_password = secrets.token_urlsafe(24)
        if deployment.auth == "mtls":
            issue_certificate(
                paths.ca / "ca.key", paths.ca / "ca.crt", paths.coordinator / "client.key",
                paths.coordinator / "client.crt", common_name=COORDINATOR_USER, client=True,
            )  # fmt: skip
    except BrokerConfigError as exc:
        raise DeployError(str(exc)) from exc
    wheel = build_board_wheel(paths.dist)
    progress(f"{len(deployment.boards)} board bundles with {wheel.name}")
    passwords = _write_bundles(
        deployment, paths, deployment.boards, wheel=wheel, force=True, data=data
    )
    progress("coordinator configuration")
    paths.coord_toml.write_text(_coordinator_config(deployment, paths))
    write_private(paths.coordinator / "api.token", secrets.token_urlsafe(32) + "\n", 0o600)
    siren = Path(shutil.which("siren") or "siren").resolve()
    (paths.coordinator / "siren-coordinator.service").write_text(
        _unit(f"siren-edge coordinator of run {deployment.run}",
              f"{siren} coordinator run --config {paths.coord_toml.resolve()}",
              deployment.coordinator_user, paths.coordinator.resolve())
    )  # fmt: skip
    progress("broker configuration: TLS listener, passwords, ACLs")
    _write_broker(deployment, paths, coordinator_password, passwords)
    (directory / DEPLOYMENT_FILE).write_text(deployment.to_toml())
    (directory / "README.md").write_text(_next_steps(deployment, paths))
    if deployment.coordinator_user:
        # Made with sudo: the coordinator's files belong to whoever runs the coordinator.
        ids = account_ids(deployment.coordinator_user)
        assert ids is not None  # checked before anything was written
        if os.geteuid() == 0:
            _chown_tree(paths.coordinator, ids)
    if owner is not None:
        blocked = unreachable_for(paths.broker, owner)
        if blocked is not None:
            progress(
                f"warning: account {deployment.broker_user!r} cannot enter {blocked}, so "
                f"Mosquitto cannot read {paths.broker}: move the deployment (e.g. under /srv) "
                "or pass --broker-user with an account that can"
            )
    return paths


def _check_before_writing(deployment: Deployment) -> None:
    """What a new deployment must get right before anything is written: host names and
    addresses (checked here, not on every load, so that a folder made before still loads), the
    coordinator's account and rule."""
    from coordinator.rounds import strategy_names

    hosts = [("--broker-host", deployment.broker_host), ("--bind", deployment.bind)]
    hosts += [("--hostname", h) for h in deployment.hostnames]
    if deployment.coordinator_host:
        hosts.append(("--coordinator-host", deployment.coordinator_host))
    for option, host in hosts:
        if not _valid_host(host):
            raise DeployError(
                f"{option} {host!r} is neither a host name ([A-Za-z0-9.-_], '*.' for a "
                "wildcard) nor an IP address"
            )

    if deployment.coordinator_user and account_ids(deployment.coordinator_user) is None:
        raise DeployError(
            f"no account {deployment.coordinator_user!r} for the coordinator (--coordinator-user)"
        )
    names = sorted({*strategy_names(), "siren"})
    if deployment.aggregator not in names:
        raise DeployError(
            f"unknown aggregator {deployment.aggregator!r}; valid: {', '.join(names)}"
        )


def _refuse_if_in_use(paths: Paths) -> None:
    """Refuse to replace a deployment whose broker or coordinator is running."""
    from deploy.checks import processes_with_argument

    users = {
        "broker": processes_with_argument(str((paths.broker / "mosquitto.conf").resolve())),
        "coordinator": processes_with_argument(str(paths.coord_toml.resolve())),
    }
    running = [f"{what} (pid {', '.join(map(str, pids))})" for what, pids in users.items() if pids]
    if running:
        raise DeployError(
            f"the deployment in {paths.root} is in use: {' and '.join(running)} run with its "
            "files; stop them before replacing its keys (--force), nothing was changed"
        )


def _archive_run(paths: Paths) -> Path | None:
    """Move the coordinator's database (its rounds and signed round log) to
    ``archive/<run>-<time>/`` before a ``--force`` re-init; return that folder (None: no run)."""
    databases = sorted(paths.coordinator.glob("coordinator.sqlite*"))
    if not databases:
        return None
    run = "run"
    with contextlib.suppress(DeployError, OSError, KeyError, ValueError):
        run = Deployment.load(paths.root).run
    target = paths.root / "archive" / f"{run}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(parents=True, exist_ok=True)
    for db in databases:
        shutil.move(str(db), target / db.name)
    for name in ("keys/public.key", "coord.toml"):
        if (paths.coordinator / name).exists():
            shutil.copyfile(paths.coordinator / name, target / Path(name).name)
    return target


def add_boards(
    directory: Path,
    *,
    count: int = 0,
    ids: Sequence[str] = (),
    progress: Any = print,
) -> tuple[str, ...]:
    """Add boards to a deployment: bundles, allow-list, broker password file and ACLs, and
    the coordinator's list of expected boards. Returns the new ids.

    A deployment with demo data has no shard for a new board: its bundle expects the
    operator's ``data.npz``.

    Raises
    ------
    DeployError
        On an id already in the deployment, an invalid id, or nothing to add.
    """
    from coordinator.config import CoordinatorConfig

    deployment = Deployment.load(directory)
    paths = Paths(directory)
    new = list(ids)
    if count:
        prefix = _common_prefix(deployment.boards)
        used = {b for b in deployment.boards}
        i = len(deployment.boards)
        while len(new) < len(ids) + count:
            candidate = f"{prefix}{i:03d}"
            if candidate not in used and candidate not in new:
                new.append(candidate)
            i += 1
    if not new:
        raise DeployError("nothing to add: give --count N or --id ID")
    taken = sorted(set(new) & set(deployment.boards))
    if taken:
        raise DeployError(f"{taken} already in the deployment")
    updated = replace(deployment, boards=(*deployment.boards, *new))
    wheel = next(iter(sorted(paths.dist.glob("*.whl"))), None) or build_board_wheel(paths.dist)
    progress(f"{len(new)} new board bundle(s): {', '.join(new)}")
    passwords = _write_bundles(updated, paths, new, wheel=wheel, force=False, data=None)
    if deployment.demo_data:
        progress(
            f"note: the demo data is a split made for the first {len(deployment.boards)} boards; "
            f"the new bundles have no data.npz: put each new board's own data (arrays x_train, "
            f"y_train, x_test, y_test) at boards/<id>/data.npz before installing it"
        )
    config = CoordinatorConfig.load(paths.coord_toml)
    coordinator_password = config.broker.password or ""
    _write_broker(updated, paths, coordinator_password, passwords)
    text = paths.coord_toml.read_text(encoding="utf-8")
    old_line = "clients = [" + ", ".join(f'"{b}"' for b in deployment.boards) + "]"
    new_line = "clients = [" + ", ".join(f'"{b}"' for b in updated.boards) + "]"
    if old_line not in text:
        raise DeployError(f"cannot find the list of boards in {paths.coord_toml}: add {new}")
    write_private(paths.coord_toml, text.replace(old_line, new_line), 0o644)
    (directory / DEPLOYMENT_FILE).write_text(updated.to_toml())
    (directory / "README.md").write_text(_next_steps(updated, paths))
    return tuple(new)


def _common_prefix(boards: Sequence[str]) -> str:
    if not boards:
        return "board-"
    first = boards[0]
    return first.rstrip("0123456789") or "board-"


# -- key lifecycle: revoke, rotate, re-admit a board of a running fleet ---------------------------


class CoordinatorOfflineError(DeployError):
    """The coordinator's admin API does not answer."""


def coordinator_api(
    paths: Paths, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """Call the running coordinator's admin API (loopback, bearer token of ``coord.toml``).

    Raises
    ------
    CoordinatorOfflineError
        If nothing answers at the configured address.
    DeployError
        If the API answers with an error (its detail is in the message).
    """
    import json
    import urllib.error
    import urllib.request

    from coordinator.config import ConfigError, CoordinatorConfig

    try:
        config = CoordinatorConfig.load(paths.coord_toml)
        token = config.api.token()
    except ConfigError as exc:
        raise DeployError(str(exc)) from exc
    if not config.api.enabled or not token:
        raise CoordinatorOfflineError(
            f"{paths.coord_toml} has no admin API ([api] enabled, token_file)"
        )
    url = f"http://{config.api.host}:{config.api.port}{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        raise DeployError(f"the coordinator refused {method} {path}: {exc.code} {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CoordinatorOfflineError(f"no coordinator answers at {url}: {exc}") from exc


def reload_broker(paths: Paths) -> list[int]:
    """Send SIGHUP to every Mosquitto started with this deployment's configuration (it reloads
    the password file and ACLs, and disconnects sessions whose credentials are gone); return
    their pids (empty: none is running, nothing to reload)."""
    import signal

    from deploy.checks import processes_with_argument

    pids = processes_with_argument(str((paths.broker / "mosquitto.conf").resolve()))
    for pid in pids:
        os.kill(pid, signal.SIGHUP)
    return pids


def _run_state(paths: Paths) -> str:
    """``not started``, ``running`` (started, not finished) or ``finished``."""
    from coordinator.config import CoordinatorConfig

    db = Path(CoordinatorConfig.load(paths.coord_toml).db)
    if not db.exists():
        return "not started"
    rows = _read_meta(db, "finished")
    return "finished" if rows == "1" else "running"


def _read_meta(db: Path, key: str) -> str | None:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])


def _apply_broker_change(
    directory: Path, updated: Deployment, passwords: dict[str, str]
) -> list[int]:
    """Rewrite the broker's files for ``updated`` (new ``passwords`` where given), record the
    deployment, and reload the running broker; return the reloaded pids."""
    from coordinator.config import CoordinatorConfig

    paths = Paths(directory)
    coordinator_password = CoordinatorConfig.load(paths.coord_toml).broker.password or ""
    _write_broker(updated, paths, coordinator_password, passwords)
    (directory / DEPLOYMENT_FILE).write_text(updated.to_toml())
    return reload_broker(paths)


def revoke_board(directory: Path, board: str, *, progress: Any = print) -> dict[str, Any]:
    """Revoke a board now: the broker forgets its credentials and ACL block (reloaded: its
    session ends, others stay; under mutual TLS the session is ended by a takeover,
    :func:`end_board_session`), the running coordinator drops its key (admin API) and any
    update the board sent in the open round; recorded in ``deployment.toml`` and the
    coordinator's round log. Returns what was done.

    Raises
    ------
    DeployError
        For an unknown or already revoked board, or when a started run's coordinator does not
        answer (a run in progress is revoked through its admin API).
    """
    from protocol.keys import AllowList

    deployment = Deployment.load(directory)
    paths = Paths(directory)
    if board not in deployment.boards:
        raise DeployError(f"{board!r} is not a board of this deployment: {deployment.boards}")
    if board in deployment.revoked:
        raise DeployError(f"{board} is already revoked; re-admit it with readmit-board")
    done: dict[str, Any] = {"board": board}
    try:
        answer = coordinator_api(paths, "POST", f"/api/admin/clients/{board}/revoke")
        done["coordinator"] = "revoked" if answer.get("changed") else "already revoked"
    except CoordinatorOfflineError as exc:
        state = _run_state(paths)
        if state == "running":
            raise DeployError(
                f"{exc}; the run is in progress, so its coordinator must revoke the key itself: "
                "start it (siren coordinator run) and run this again; nothing was changed"
            ) from exc
        allow = AllowList.load(paths.allow_list, missing_ok=True)
        if board in allow:
            allow.remove(board)
            allow.save(paths.allow_list)
        done["coordinator"] = f"run {state}: key removed from its allow-list"
    updated = replace(deployment, revoked=(*deployment.revoked, board))
    done["broker_reloaded"] = _apply_broker_change(directory, updated, {})
    ended = ""
    if done["broker_reloaded"] and deployment.auth == "mtls":
        done["session_ended"] = end_board_session(paths, board)
        ended = (
            "; its open session taken over and closed"
            if done["session_ended"]
            else "; could not reach the broker to close its open session"
        )
    progress(
        f"{board}: coordinator {done['coordinator']}; broker credentials and ACL removed"
        + (
            f", Mosquitto reloaded (pid {', '.join(map(str, done['broker_reloaded']))})"
            if done["broker_reloaded"]
            else " (no running Mosquitto to reload)"
        )
        + ended
    )
    return done


def end_board_session(paths: Paths, board: str, timeout: float = 10.0) -> bool:
    """End a board's open MQTT session by taking it over: connect once with the board's own
    certificate and client id (the broker closes the older session with that id), then leave.

    Under mutual TLS Mosquitto 2.0 keeps the session of a certificate that is still valid open
    across a reload, with the rights it had at connect; the session that replaces it starts
    under the reloaded ACL, where a revoked board has none. Returns whether the broker
    accepted the connection.
    """
    import threading

    from edge_client.config import BoardConfig, ConfigError
    from protocol.mqtt import make_mqtt_client

    try:
        settings = BoardConfig.load(paths.boards / board / "board.toml").broker
        # This machine reaches the broker as the coordinator does (coordinator_host).
        deployment = Deployment.load(paths.root)
        if deployment.coordinator_host:
            settings = replace(settings, host=deployment.coordinator_host)
        client = make_mqtt_client(settings, board)
    except (ConfigError, DeployError, OSError, ValueError):
        return False  # no bundle left to connect with
    done = threading.Event()
    accepted: list[bool] = []

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        accepted.append(not reason.is_failure)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect_async(settings.host, settings.port, keepalive=10)
        client.loop_start()
        done.wait(timeout)
        client.disconnect()
    except OSError:
        return False
    finally:
        client.loop_stop()
    return bool(accepted and accepted[0])


def renew_board(directory: Path, board: str, *, progress: Any = print) -> dict[str, Any]:
    """Give a board a new key pair and new broker credentials (a rotation, or the re-admission
    of a revoked board): its bundle is rewritten in place (copy it to the board again), the
    broker gets the new credentials (reloaded: the old session ends), the running coordinator
    registers the new key (admin API). Returns what was done.

    Raises
    ------
    DeployError
        For an unknown board, or when a started run's coordinator does not answer.
    """
    from protocol.keys import AllowList, load_verify_key

    deployment = Deployment.load(directory)
    paths = Paths(directory)
    if board not in deployment.boards:
        raise DeployError(f"{board!r} is not a board of this deployment: {deployment.boards}")
    readmit = board in deployment.revoked
    wheel = next(iter(sorted(paths.dist.glob("*.whl"))), None) or build_board_wheel(paths.dist)
    # The new bundle is made aside and takes the old one's place only once the coordinator
    # has the new key: a refusal changes nothing.
    staging = Path(tempfile.mkdtemp(prefix=f".renew-{board}-", dir=paths.boards))
    try:
        passwords = _write_bundles(
            deployment, paths, [board], wheel=wheel, force=True, data=None,
            boards_dir=staging, register=False,
        )  # fmt: skip
        new_key = load_verify_key(staging / board / "keys")
        done: dict[str, Any] = {"board": board, "readmitted": readmit}
        try:
            registration = {"client_id": board, "public_key": bytes(new_key).hex()}
            coordinator_api(paths, "POST", "/api/admin/keys", registration)
            done["coordinator"] = "re-admitted with the new key" if readmit else "has the new key"
        except CoordinatorOfflineError as exc:
            state = _run_state(paths)
            if state == "running":
                raise DeployError(
                    f"{exc}; the run is in progress, so its coordinator must register the new "
                    "key: start it (siren coordinator run) and run this again; nothing was "
                    "changed"
                ) from exc
            allow = AllowList.load(paths.allow_list, missing_ok=True)
            allow.add(board, new_key, replace=True)
            allow.save(paths.allow_list)
            done["coordinator"] = f"run {state}: new key in its allow-list"
        old = paths.boards / board
        if (old / "data.npz").exists():
            shutil.copyfile(old / "data.npz", staging / board / "data.npz")
        shutil.rmtree(old, ignore_errors=True)
        (staging / board).rename(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    updated = replace(deployment, revoked=tuple(b for b in deployment.revoked if b != board))
    done["broker_reloaded"] = _apply_broker_change(directory, updated, passwords)
    progress(
        f"{board}: new key and credentials in {paths.boards / board}; coordinator "
        f"{done['coordinator']}"
        + (
            ", Mosquitto reloaded (the board's old session ended)"
            if done["broker_reloaded"]
            else ""
        )
        + ". Copy the bundle to the board and run its install.sh again: it restarts the board "
        "with the new credentials"
    )
    return done
