"""Coordinator settings: one typed object loaded once from ``coord.toml`` and passed explicitly.

Example (relative paths are relative to the file's directory)::

    [coordinator]
    run = "demo"
    key_dir = "keys"                  # the coordinator's private.key / public.key
    allow_list = "allow-list.txt"     # board public keys
    clients = ["board-000", "board-001", "board-002"]   # expected boards, in index order
                                      # ([] = every allow-listed id, sorted)
    db = "coordinator.sqlite"
    rounds = 10
    seed = 0
    round_timeout = 300.0             # s; then close with a quorum (0 = wait for every board)
    quorum = 0.5                      # fraction of expected boards needed at the deadline
    client_fraction = 1.0             # fraction of the boards drawn for each round (1: all)
    clients_per_round = 0             # or this many boards per round (0: client_fraction)
    mode = "sync"                     # "async": buffered asynchronous (rounds = versions)
    staleness_bound = 4               # async: admit updates trained on the last S versions
    buffer_size = 10                  # async: a new version every B buffered updates
    staleness_weight = "poly:0.5"     # async: (1+t)^-0.5 per update of staleness t
    async_pool = "buffer"             # async: the rule on the buffer, or "latest": on every
                                      # board's latest update of staleness <= S
    resend_interval = 30.0            # s without progress before re-announcing the global
                                      # model of a round (then doubling, up to 8x)
    max_message_bytes = 0             # 0: the protocol's default limit for the model
    max_samples = 0                   # largest sample count one update may report
                                      # (0: 1,000,000,000; bounds the weight attack)
    exit_when_done = true
    defense_start_round = 1           # plain FedAvg before this round, then the aggregator

    [broker]
    host = "127.0.0.1"
    port = 1883
    protocol = 5
    username = "coordinator"
    password_file = "coordinator.password"
    tls = false
    ca_file = ""
    keepalive = 30
    reconnect_min = 1
    reconnect_max = 30
    session_expiry = 604800           # s the broker keeps our session (queued updates)

    [model]
    name = "digits-mlp"               # zoo model ("" = the dataset's default)
    initial = ""                      # npz with "weights" and "layout" (skips TensorFlow when
                                      # nothing else needs it)
    num_classes = 10

    [training]                        # server-side training (FLTrust's server update)
    epochs = 1
    batch_size = 64
    learning_rate = 0.0
    optimizer = "adam"

    [aggregator]
    name = "fedavg"                   # a rule of `siren sim aggregators`, or "siren"
    params = {}                       # e.g. { f = 2 }
    guard_factor = 100.0              # a round may move the global model at most this many
                                      # times the median update norm (else it is re-aggregated
                                      # without the outsized updates); inf: no norm bound
    guard_max_abs = 1000000.0         # nor make any weight larger than this (inf: no bound)
    profile = "authors"               # SIREN profile: "authors" or "paper-text" (the boards'
                                      # [alarm] profile should match; see docs/reproducing.md)
    device = "numpy"                  # where the heavy rules run: numpy, cpu, cuda[:N] (PyTorch,
                                      # the torch extra) or auto (cuda if PyTorch sees a GPU,
                                      # else numpy); see docs/gpu-coordinator.md

    [api]                             # HTTP API and dashboard (coordinator.api)
    enabled = false
    host = "127.0.0.1"                # loopback only
    port = 8080                       # 0 = a free port (the URL is printed)
    token_file = ""                   # bearer token of the admin actions ("" = disabled);
                                      # the SIREN_API_TOKEN environment variable overrides it

    [admission]                       # how updates are admitted (docs/streaming.md)
    streaming = true                  # prepare each update's share of the close on admission
    shards = 0                        # admission processes on a shared subscription (0: none)
    share_group = ""                  # the shared subscription's group ("" = siren-<run>)

    [data]                            # root test set and test split
    dataset = "digits"
    root = "split"                    # "split": the seeded split's root set; "npz"; "none"
    root_path = ""
    evaluate = false                  # evaluate every global model on the dataset's test split
    clients = 10                      # the split's parameters (as in `siren sim run`)
    partition = "iid"
    noniid_p = 0.5
    dirichlet_alpha = 0.5
    classes_per_board = 2
    root_size = 100
    local_test_fraction = 0.1
    train_samples = 0
    test_samples = 0
    split_seed = 0

    [simulation]                      # only in files written by `siren sim fleet`
    malicious = ["board-002"]         # the boards the simulator made malicious: reported by the
                                      # API and dashboard (honest boards banned, attackers
                                      # missed), never used to admit or aggregate
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from coordinator.async_rounds import AsyncSettings
from coordinator.errors import CoordinatorError
from coordinator.selection import Sampling
from models.settings import SPLIT_COMMENTS, SplitSettings
from models.training import DEFAULT_LR, default_learning_rate
from protocol import mqtt
from protocol import settings as toml_settings
from protocol.settings import load_toml
from protocol.settings import relative_path as _rel
from protocol.settings import resolve_path as _path
from protocol.settings import section_values as _section
from protocol.siren_profiles import DEFAULT_PROFILE, get_profile

__all__ = [
    "API_TOKEN_ENV",
    "DEFAULT_LR",
    "AdmissionSettings",
    "AggregatorSettings",
    "ApiSettings",
    "BrokerSettings",
    "ConfigError",
    "CoordinatorConfig",
    "DataSettings",
    "ModelSettings",
    "SimulationSettings",
    "TrainingSettings",
    "dumps_toml",
]


class ConfigError(CoordinatorError):
    """The coordinator configuration is missing, malformed or inconsistent."""


#: What each key of ``coord.toml`` means: written above it by ``to_toml(commented=True)`` (the
#: file ``siren deploy init`` and ``siren coordinator config-template`` produce).
COMMENTS: dict[str, dict[str, str]] = {
    "coordinator": {
        "": "The run the coordinator serves.",
        "run": "run id: names the MQTT topics (siren/v1/<run>/...); boards must use the same",
        "key_dir": "the coordinator's private.key / public.key (boards pin public.key)",
        "allow_list": "board public keys, one '<client id> <hex>' per line",
        "db": "SQLite database of the run (resumes from it after any restart)",
        "clients": "expected boards in index order ([] = every allow-listed id, sorted)",
        "rounds": "number of rounds T; the coordinator exits after the last one",
        "seed": "seed of the initial model and of every random choice",
        "round_timeout": "seconds before a round closes with a quorum (0 = wait for every board)",
        "quorum": "fraction of expected boards needed to close at the deadline",
        "client_fraction": "fraction of the boards drawn (seeded) to take part in each round; "
        "1: every board, every round",
        "clients_per_round": "draw this many boards per round instead (0: client_fraction)",
        "mode": "sync (rounds wait for their boards) or async (buffered asynchronous: boards "
        "train continuously, a new global version every buffer_size updates; rounds counts "
        "versions)",
        "staleness_bound": "async: admit an update trained on any of the last S versions",
        "buffer_size": "async: a new global version whenever this many updates are buffered",
        "staleness_weight": "async: poly:a = (1+t)^-a for an update t versions stale, or constant",
        "async_pool": "async: the rule runs on the buffer's updates (buffer) or on every "
        "board's latest update at most staleness_bound versions old (latest)",
        "resend_interval": "seconds without progress before the global model is announced "
        "again (then doubling, up to 8x)",
        "max_message_bytes": "largest update message (0: 4x the model plus header room)",
        "max_samples": "largest sample count one update may report (0: 1,000,000,000)",
        "exit_when_done": "exit once the final global model is published",
        "defense_start_round": "plain FedAvg before this round, then the aggregator",
    },
    "broker": mqtt.BROKER_COMMENTS,
    "model": {
        "": "The model boards train.",
        "name": 'zoo model ("" = the dataset\'s default: digits-mlp, siren-cnn)',
        "initial": 'npz with initial weights and layout ("" = built from seed)',
        "num_classes": "number of classes",
    },
    "training": {
        "": "Server-side training on the root set (FLTrust's server update).",
        "epochs": "local epochs",
        "batch_size": "batch size",
        "learning_rate": "0: the optimizer's default for the model",
        "optimizer": "adam or sgd",
    },
    "aggregator": {
        "": "The server rule.",
        "name": "a rule of `siren sim aggregators` (fedavg, krum, median, ...) or siren",
        "params": "the rule's parameters, e.g. { f = 2 }",
        "guard_factor": "a round may move the global model at most this many times the median "
        "update norm (else it is re-aggregated without the outsized updates); inf: no bound",
        "guard_max_abs": "no weight of the global model may exceed this (inf: no bound)",
        "profile": "SIREN profile: authors (the authors' code, default) or paper-text (the "
        "paper as printed); boards' [alarm] profile should match (docs/reproducing.md)",
        "device": "where the heavy rules (Krum, Bulyan, median, trimmed mean, geometric median, "
        "FLTrust, FoolsGold, residual reweighting) run: numpy (default), cpu or cuda[:N] "
        "(PyTorch, the torch extra), auto (cuda if PyTorch sees a GPU, else numpy); "
        "docs/gpu-coordinator.md",
    },
    "admission": {
        "": "How updates are admitted and rounds closed (docs/streaming.md).",
        "streaming": "copy each admitted update into the round's buffer and prepare its share "
        "of the close (Gram rows, server-update dots); false: the batch rules at close. "
        "Synchronous rounds only: an asynchronous buffer of B updates runs the batch rules",
        "shards": "processes that verify and decode updates, sharing the update topic through "
        "an MQTT v5 shared subscription (0: the coordinator's own process does it); "
        "synchronous rounds only: 0 with mode = async",
        "share_group": 'group of the shared subscription ("" = siren-<run>)',
    },
    "simulation": {
        "": "Written by the simulator only: which boards it made malicious (for reporting).",
        "malicious": "client ids of the simulated attackers",
    },
    "data": {
        "": "Root test set and accuracy reporting. The split keys must match the boards'.",
        "root": "root set for SIREN/FLTrust: split (the seeded split's root set), npz, or none",
        "root_path": "npz with arrays x, y when root = npz",
        "evaluate": "evaluate every global model on the dataset's test split (needs the data)",
        **SPLIT_COMMENTS,
    },
    "api": {
        "": "HTTP API and dashboard (loopback only).",
        "enabled": "serve the API and dashboard",
        "host": "loopback address",
        "port": "0 = a free port (the URL is printed)",
        "token_file": 'bearer token of the admin actions ("" = admin disabled); the '
        "SIREN_API_TOKEN environment variable overrides it",
    },
}


#: Environment variable holding the HTTP API's admin bearer token (overrides ``api.token_file``).
API_TOKEN_ENV = "SIREN_API_TOKEN"


@dataclass(frozen=True)
class BrokerSettings(mqtt.BrokerSettings):
    """How the coordinator reaches the broker (:class:`protocol.mqtt.BrokerSettings`).

    Invalid values raise :class:`ConfigError`. ``session_expiry`` is the MQTT v5 session
    expiry interval in seconds the coordinator asks for, so queued updates survive a restart.
    """

    error: ClassVar[type[Exception]] = ConfigError

    session_expiry: int = 7 * 24 * 3600


@dataclass(frozen=True)
class ModelSettings:
    """The model: a zoo name, or an npz with initial weights and layout."""

    name: str | None = None
    initial: Path | None = None
    num_classes: int = 10


@dataclass(frozen=True)
class TrainingSettings:
    """Server-side local training hyper-parameters (FLTrust's server update on the root set)."""

    epochs: int = 1
    batch_size: int = 64
    learning_rate: float | None = None
    optimizer: str = "adam"

    def resolved_lr(self, model: str | None = None) -> float:
        """The learning rate, defaulting per optimizer and ``model``."""
        if self.learning_rate:
            return self.learning_rate
        if self.optimizer not in DEFAULT_LR:
            raise ConfigError(f"training.optimizer must be adam or sgd, got {self.optimizer!r}")
        return default_learning_rate(self.optimizer, model)


@dataclass(frozen=True)
class AggregatorSettings:
    """The server rule (a registered aggregator or ``siren``), its parameters and, for SIREN, the
    profile (:mod:`protocol.siren_profiles`) whose thresholds it applies (``params`` such as
    ``server_threshold`` or ``penalty_basis`` override the profile's)."""

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    guard_factor: float = 100.0
    guard_max_abs: float = 1e6
    profile: str = DEFAULT_PROFILE
    device: str = "numpy"

    def __post_init__(self) -> None:
        if not self.guard_factor > 0 or not self.guard_max_abs > 0:
            raise ConfigError(
                "aggregator.guard_factor and guard_max_abs must be positive (inf: no bound), "
                f"got {self.guard_factor} and {self.guard_max_abs}"
            )
        try:
            get_profile(self.profile)
        except ValueError as exc:
            raise ConfigError(f"aggregator.profile: {exc}") from None
        from coordinator.aggregators.devices import DEVICES

        name = self.device.strip().lower() if isinstance(self.device, str) else None
        if name is None or not (name in DEVICES or _is_gpu_index(name)):
            raise ConfigError(
                f"aggregator.device must be one of {', '.join(DEVICES)} or cuda:N, "
                f"got {self.device!r}"
            )

    def resolved_device(self) -> str:
        """The device the rule runs on here (``numpy``, ``cpu``, ``cuda``, ``cuda:N``).

        Raises
        ------
        ConfigError
            PyTorch is not installed, or no GPU is visible, for the device asked for.
        """
        from coordinator.aggregators.devices import resolve_device

        try:
            return resolve_device(self.device)
        except CoordinatorError as exc:
            raise ConfigError(f"aggregator.device: {exc}") from None


def _is_gpu_index(name: str) -> bool:
    return name.startswith("cuda:") and name[5:].isdigit()


@dataclass(frozen=True)
class AdmissionSettings:
    """How updates are admitted and rounds closed (:mod:`coordinator.streaming_engine`,
    :mod:`coordinator.shards`)."""

    streaming: bool = True
    shards: int = 0
    share_group: str = ""

    def __post_init__(self) -> None:
        from protocol.topics import is_valid_id

        if not isinstance(self.shards, int) or isinstance(self.shards, bool) or self.shards < 0:
            raise ConfigError(f"admission.shards must be an integer >= 0, got {self.shards!r}")
        if self.share_group and not is_valid_id(self.share_group):
            raise ConfigError(
                f"admission.share_group {self.share_group!r} must be 1-64 characters from "
                "[A-Za-z0-9_.-]"
            )

    def group(self, run: str) -> str:
        """The shared subscription's group name."""
        return self.share_group or f"siren-{run}"


@dataclass(frozen=True)
class ApiSettings:
    """The HTTP API and dashboard served next to the service (loopback only)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    token_file: Path | None = None

    def token(self) -> str | None:
        """The admin bearer token: ``$SIREN_API_TOKEN`` if set, else read from ``token_file``
        (``None``: admin disabled). Never logged."""
        from_env = os.environ.get(API_TOKEN_ENV, "").strip()
        if from_env:
            return from_env
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"cannot read API token file {self.token_file}: {exc}") from None


@dataclass(frozen=True)
class DataSettings(SplitSettings):
    """Root test set and test split (see the module docstring).

    The split fields (:class:`models.settings.SplitSettings`) must match the boards' when
    ``root = "split"``: the root set is the part of that split set aside for the server.
    """

    root: str = "none"
    root_path: Path | None = None
    evaluate: bool = False

    def __post_init__(self) -> None:
        if self.root not in ("split", "npz", "none"):
            raise ConfigError(f"data.root must be split, npz or none, got {self.root!r}")
        if self.root == "npz" and self.root_path is None:
            raise ConfigError("data.root = 'npz' needs data.root_path")


@dataclass(frozen=True)
class SimulationSettings:
    """What only a simulator knows: which boards it made malicious.

    ``siren sim fleet`` writes it so that the API and the dashboard can count honest boards banned
    and attackers missed. A real deployment has no such table (the coordinator cannot know), and
    nothing in admission or aggregation reads it.
    """

    malicious: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from protocol.topics import is_valid_id

        object.__setattr__(self, "malicious", tuple(str(c) for c in self.malicious))
        bad = [c for c in self.malicious if not is_valid_id(c)]
        if bad:
            raise ConfigError(f"simulation.malicious holds invalid client ids {bad}")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator service needs (see the module docstring)."""

    run: str
    key_dir: Path
    allow_list: Path
    db: Path
    clients: tuple[str, ...] = ()
    rounds: int = 10
    seed: int = 0
    round_timeout: float = 300.0
    quorum: float = 0.5
    client_fraction: float = 1.0
    clients_per_round: int | None = None
    mode: str = "sync"
    staleness_bound: int = 4
    buffer_size: int = 10
    staleness_weight: str = "poly:0.5"
    async_pool: str = "buffer"
    resend_interval: float = 30.0
    max_message_bytes: int | None = None
    max_samples: int | None = None
    exit_when_done: bool = True
    defense_start_round: int = 1
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    aggregator: AggregatorSettings = field(default_factory=AggregatorSettings)
    data: DataSettings = field(default_factory=DataSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    simulation: SimulationSettings | None = None
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)

    def __post_init__(self) -> None:
        from protocol.topics import is_valid_id

        if not is_valid_id(self.run):
            raise ConfigError(
                f"coordinator.run {self.run!r} must be 1-64 characters from [A-Za-z0-9_.-]"
            )
        if not isinstance(self.exit_when_done, bool):
            raise ConfigError(
                f"coordinator.exit_when_done must be true or false, got {self.exit_when_done!r}"
            )
        bad = [c for c in self.clients if not is_valid_id(c)]
        if bad:
            raise ConfigError(f"coordinator.clients holds invalid client ids {bad}")
        if len(set(self.clients)) != len(self.clients):
            raise ConfigError("coordinator.clients lists a client twice")
        if self.rounds < 1:
            raise ConfigError(f"coordinator.rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.quorum <= 1.0:
            raise ConfigError(f"coordinator.quorum must be in (0, 1], got {self.quorum}")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ConfigError(
                f"coordinator.client_fraction must be in (0, 1], got {self.client_fraction}"
            )
        if self.clients_per_round is not None:
            if self.clients_per_round < 1:
                raise ConfigError(
                    f"coordinator.clients_per_round must be >= 1 (0: use client_fraction), "
                    f"got {self.clients_per_round}"
                )
            if self.client_fraction != 1.0:
                raise ConfigError(
                    "set coordinator.client_fraction or coordinator.clients_per_round, not both"
                )
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"coordinator.mode must be sync or async, got {self.mode!r}")
        if self.mode == "async":
            if self.sampling.active:
                raise ConfigError(
                    "coordinator.mode = async trains every board continuously: leave "
                    "client_fraction at 1 and clients_per_round at 0"
                )
            try:
                settings = self.asynchronous
            except ValueError as exc:
                raise ConfigError(f"coordinator: {exc}") from None
            if self.admission.shards > 0:
                raise ConfigError(
                    "coordinator.mode = async admits updates in the coordinator's own process: "
                    "leave admission.shards at 0"
                )
            if self.clients and settings.buffer_size > len(self.clients):
                raise ConfigError(
                    f"coordinator.buffer_size {settings.buffer_size} is more than the "
                    f"{len(self.clients)} boards (one update per board in a buffer)"
                )
        if self.defense_start_round < 1:
            raise ConfigError(
                f"coordinator.defense_start_round must be >= 1, got {self.defense_start_round}"
            )
        if self.round_timeout < 0 or self.resend_interval < 0:
            raise ConfigError("coordinator.round_timeout and resend_interval must be >= 0")
        if self.max_samples is not None and not 1 <= self.max_samples <= 2**53 - 1:
            raise ConfigError(
                f"coordinator.max_samples must be in [1, 2^53 - 1] (0: the default), "
                f"got {self.max_samples}"
            )

    @property
    def asynchronous(self) -> AsyncSettings:
        """The buffered asynchronous settings (:mod:`coordinator.async_rounds`); used only
        with ``mode = "async"``."""
        return AsyncSettings(
            self.staleness_bound, self.buffer_size, self.staleness_weight, self.async_pool
        )

    @property
    def sampling(self) -> Sampling:
        """The run's client sampling (:class:`coordinator.selection.Sampling`)."""
        return Sampling(self.client_fraction, self.clients_per_round)

    def quorum_count(self, expected: int) -> int:
        """Admitted updates needed to close a round at its deadline: ``ceil(quorum · K)``."""
        return max(1, math.ceil(self.quorum * expected - 1e-9))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CoordinatorConfig:
        """Read ``coord.toml``; relative paths are resolved against its directory.

        Raises
        ------
        ConfigError
            If the file is missing, not TOML, or a value is invalid.
        """
        raw, base_dir = load_toml(path, "coordinator config", ConfigError)
        return cls.from_dict(raw, base_dir=base_dir)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: Path) -> CoordinatorConfig:
        """Build the settings from parsed TOML."""
        sections = {
            "coordinator",
            "broker",
            "model",
            "training",
            "aggregator",
            "data",
            "api",
            "simulation",
            "admission",
        }
        unknown = set(raw) - sections
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)} in coordinator config")
        main = dict(raw.get("coordinator", {}))
        for key in ("run", "key_dir", "allow_list", "db"):
            if key not in main:
                raise ConfigError(f"coordinator config needs coordinator.{key}")
        broker = mqtt.read_password_file(raw.get("broker", {}), base_dir, ConfigError)
        try:
            values: dict[str, Any] = {
                "run": main.pop("run"),
                "key_dir": _path(main.pop("key_dir"), base_dir),
                "allow_list": _path(main.pop("allow_list"), base_dir),
                "db": _path(main.pop("db"), base_dir),
                "clients": tuple(str(c) for c in main.pop("clients", [])),
                "rounds": int(main.pop("rounds", 10)),
                "seed": int(main.pop("seed", 0)),
                "round_timeout": float(main.pop("round_timeout", 300.0)),
                "quorum": float(main.pop("quorum", 0.5)),
                "client_fraction": float(main.pop("client_fraction", 1.0)),
                "clients_per_round": int(main.pop("clients_per_round", 0)) or None,
                "mode": str(main.pop("mode", "sync")),
                "staleness_bound": int(main.pop("staleness_bound", 4)),
                "buffer_size": int(main.pop("buffer_size", 10)),
                "staleness_weight": str(main.pop("staleness_weight", "poly:0.5")),
                "async_pool": str(main.pop("async_pool", "buffer")),
                "resend_interval": float(main.pop("resend_interval", 30.0)),
                "max_message_bytes": int(main.pop("max_message_bytes", 0)) or None,
                "max_samples": int(main.pop("max_samples", 0)) or None,
                "exit_when_done": main.pop("exit_when_done", True),
                "defense_start_round": int(main.pop("defense_start_round", 1)),
            }
            if main:
                raise ConfigError(f"unknown key(s) {sorted(main)} in [coordinator]")
            return cls(
                **values,
                broker=_build(BrokerSettings, broker, "broker", base_dir),
                model=_build(ModelSettings, dict(raw.get("model", {})), "model", base_dir),
                training=_build(TrainingSettings, dict(raw.get("training", {})), "training"),
                aggregator=_build(
                    AggregatorSettings, dict(raw.get("aggregator", {})), "aggregator"
                ),
                data=_build(DataSettings, dict(raw.get("data", {})), "data", base_dir),
                api=_build(ApiSettings, dict(raw.get("api", {})), "api", base_dir),
                simulation=(
                    _build(SimulationSettings, dict(raw["simulation"]), "simulation")
                    if "simulation" in raw
                    else None
                ),
                admission=_build(AdmissionSettings, dict(raw.get("admission", {})), "admission"),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid coordinator config: {exc}") from None

    def to_toml(
        self,
        *,
        relative_to: Path | None = None,
        password_file: str | None = None,
        commented: bool = False,
        header: str = "",
    ) -> str:
        """Serialise to TOML; the broker password is referenced through ``password_file``.

        ``commented`` writes what each key means above it (:data:`COMMENTS`) and ``header`` on
        top; the file loads the same either way.
        """
        main = {
            "run": self.run,
            "key_dir": _rel(self.key_dir, relative_to),
            "allow_list": _rel(self.allow_list, relative_to),
            "db": _rel(self.db, relative_to),
            "clients": list(self.clients),
            "rounds": self.rounds,
            "seed": self.seed,
            "round_timeout": float(self.round_timeout),
            "quorum": float(self.quorum),
            "client_fraction": float(self.client_fraction),
            "clients_per_round": self.clients_per_round or 0,
            "mode": self.mode,
            "staleness_bound": self.staleness_bound,
            "buffer_size": self.buffer_size,
            "staleness_weight": self.staleness_weight,
            "async_pool": self.async_pool,
            "resend_interval": float(self.resend_interval),
            "max_message_bytes": self.max_message_bytes or 0,
            "max_samples": self.max_samples or 0,
            "exit_when_done": self.exit_when_done,
            "defense_start_round": self.defense_start_round,
        }
        broker = mqtt.broker_to_toml(self.broker, relative_to, password_file)
        sections: dict[str, Mapping[str, Any]] = {
            "coordinator": main,
            "broker": broker,
            "model": _section(self.model, relative_to),
            "training": _section(self.training, relative_to),
            "aggregator": _section(self.aggregator, relative_to),
            "data": _section(self.data, relative_to),
            "api": _section(self.api, relative_to),
            "admission": _section(self.admission, relative_to),
        }
        if self.simulation is not None:
            sections["simulation"] = {"malicious": list(self.simulation.malicious)}
        return dumps_toml(sections, comments=COMMENTS if commented else None, header=header)


def _build(cls: Any, values: dict[str, Any], section: str, base_dir: Path | None = None) -> Any:
    return toml_settings.build_section(cls, values, section, ConfigError, base_dir)


def dumps_toml(
    sections: Mapping[str, Mapping[str, Any]],
    *,
    comments: Mapping[str, Mapping[str, str]] | None = None,
    header: str = "",
) -> str:
    """Write one level of ``[section]`` tables as TOML (:func:`protocol.settings.dumps_toml`).

    Raises
    ------
    ConfigError
        For NaN or a value TOML cannot hold.
    """
    return toml_settings.dumps_toml(sections, ConfigError, comments=comments, header=header)
