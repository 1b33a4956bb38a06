"""Board settings: one typed object loaded once from ``board.toml`` and passed explicitly.

Example (every key shown; relative paths are relative to the file's directory)::

    [board]
    client_id = "board-007"        # MQTT client id, topic level and signed header client
    index = 7                      # position in the fleet (seeds this board's randomness)
    run = "demo"                   # run id (topic level)
    key_dir = "keys"               # private.key / public.key of this board
    coordinator_key = "coordinator.pub"
    state_dir = "state"            # persisted model, round and pending update
    rounds = 10                    # stop after the global model of round rounds+1 (0: never)
    seed = 0
    max_message_bytes = 0          # 0: the protocol's default limit for the model

    [broker]
    host = "coordinator.local"
    port = 8883
    protocol = 5                   # 5, or 311 for MQTT 3.1.1 brokers
    username = "board-007"
    password_file = "mqtt.password"
    tls = true
    ca_file = "ca.crt"
    keepalive = 30
    reconnect_min = 1
    reconnect_max = 30

    [training]
    model = "digits-mlp"           # zoo name ("" = the dataset's default)
    epochs = 1
    batch_size = 64
    learning_rate = 0.0            # 0: default (adam 0.001, sgd 0.05; adam 0.01 for digits)
    optimizer = "adam"
    num_classes = 10
    backend = "keras"              # "keras" (TensorFlow) or "litert" (no TensorFlow needed)
    artifact = ""                  # the model's LiteRT training artifact (backend = litert)

    [alarm]
    enabled = true
    profile = "authors"            # SIREN profile: "authors" or "paper-text" (as the coordinator's)
    rule = ""                      # "": the profile's rule; "paper" or "relative" override it
    threshold = 0.04
    backend = "litert"

    [data]
    source = "split"               # "split": shard `index` of a seeded split; "npz": a file
    path = ""                      # npz with x_train, y_train, x_test, y_test (source = npz)
    dataset = "digits"
    clients = 10
    partition = "iid"
    noniid_p = 0.5
    dirichlet_alpha = 0.5
    classes_per_board = 2
    root_size = 100
    local_test_fraction = 0.1
    train_samples = 0              # 0: all
    test_samples = 0
    split_seed = 0
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edge_client.errors import EdgeClientError
from models.settings import SPLIT_COMMENTS, SplitSettings
from models.training import DEFAULT_LR, default_learning_rate
from protocol import mqtt
from protocol import settings as toml_settings
from protocol.settings import load_toml
from protocol.settings import relative_path as _rel
from protocol.settings import resolve_path as _path
from protocol.settings import section_values as _section
from protocol.siren_profiles import ALARM_RULES, DEFAULT_PROFILE, get_profile

__all__ = [
    "DEFAULT_LR",
    "TRAIN_BACKENDS",
    "AlarmSettings",
    "BoardConfig",
    "BrokerSettings",
    "ConfigError",
    "DataSettings",
    "TrainingSettings",
    "dumps_toml",
]


class ConfigError(EdgeClientError):
    """The board configuration is missing, malformed or inconsistent."""


#: What each key of ``board.toml`` means: written above it by ``to_toml(commented=True)`` (the
#: file in every bundle ``siren deploy`` and ``siren client provision`` write).
COMMENTS: dict[str, dict[str, str]] = {
    "board": {
        "": "Who this board is. Relative paths are relative to this file's folder.",
        "client_id": "MQTT client id and user, topic level, and the signer in its headers",
        "index": "position in the fleet (seeds this board's randomness; its shard of a split)",
        "run": "run id (topic level); must be the coordinator's",
        "key_dir": "this board's private.key (0600) / public.key",
        "coordinator_key": "the coordinator's public key: only globals it signed are accepted",
        "state_dir": "persisted model, round and pending update (survives restarts)",
        "rounds": "stop after the global model of round rounds+1 (0: never)",
        "seed": "the run's seed",
        "max_message_bytes": "largest global model message (0: 4x the model plus header room)",
    },
    "broker": mqtt.BROKER_COMMENTS,
    "training": {
        "": "Local training (the run's hyper-parameters, identical on every board).",
        "model": 'zoo model ("" = the dataset\'s default: digits-mlp, siren-cnn)',
        "epochs": "local epochs E",
        "batch_size": "local batch size B",
        "learning_rate": "0: default (adam 0.001, sgd 0.05; adam 0.01 for the digits models)",
        "optimizer": "adam or sgd",
        "num_classes": "number of classes",
        "backend": "keras (TensorFlow trains) or litert (the model's LiteRT training artifact "
        "trains: no TensorFlow on the board)",
        "artifact": "the LiteRT training artifact (backend = litert; model-litert.zip in "
        "bundles made for litert boards)",
    },
    "alarm": {
        "": "SIREN's local-test alarm (Algorithm 1).",
        "enabled": "run the alarm every round",
        "profile": "SIREN profile: authors (the authors' code, default) or paper-text "
        "(Alg. 1 as printed); must match the coordinator's [aggregator] profile",
        "rule": 'paper (Alg. 1 as printed) or relative (the authors\' code); "" = the '
        "profile's rule",
        "threshold": "client threshold C_c",
        "backend": "litert (on-device inference) or keras",
    },
    "data": {
        "": "The board's private data.",
        "source": "npz: arrays x_train, y_train, x_test, y_test in `path`; split: shard `index` "
        "of a seeded split of `dataset` (demos)",
        "path": "the npz file (source = npz)",
        **SPLIT_COMMENTS,
    },
}


@dataclass(frozen=True)
class BrokerSettings(mqtt.BrokerSettings):
    """How the board reaches the MQTT broker (:class:`protocol.mqtt.BrokerSettings`).

    Invalid values raise :class:`ConfigError`.
    """

    error: ClassVar[type[Exception]] = ConfigError


#: Training runtimes of a board.
TRAIN_BACKENDS = ("keras", "litert")


@dataclass(frozen=True)
class TrainingSettings:
    """Local training hyper-parameters (the run's, identical on every board) and its runtime.

    ``backend = "litert"`` trains with the model's LiteRT training artifact
    (:mod:`models.litert_trainer`) and never imports TensorFlow; ``artifact`` is its file
    (required by :class:`BoardConfig` with that backend).
    """

    model: str | None = None
    epochs: int = 1
    batch_size: int = 64
    learning_rate: float | None = None
    optimizer: str = "adam"
    num_classes: int = 10
    backend: str = "keras"
    artifact: Path | None = None

    def __post_init__(self) -> None:
        if self.backend not in TRAIN_BACKENDS:
            raise ConfigError(
                f"training.backend must be one of {', '.join(TRAIN_BACKENDS)}, got {self.backend!r}"
            )

    def resolved_lr(self, model: str | None = None) -> float:
        """The learning rate, defaulting per optimizer and model (``model`` or ``self.model``)."""
        if self.learning_rate:
            return self.learning_rate
        if self.optimizer not in DEFAULT_LR:
            raise ConfigError(f"training.optimizer must be adam or sgd, got {self.optimizer!r}")
        return default_learning_rate(self.optimizer, model or self.model)


@dataclass(frozen=True)
class AlarmSettings:
    """SIREN client alarm (Algorithm 1): profile, rule, threshold C_c and inference runtime.

    ``rule`` left unset (None, or ``""`` in TOML) takes the rule of ``profile``
    (:mod:`protocol.siren_profiles`) and is stored resolved.
    """

    enabled: bool = False
    profile: str = DEFAULT_PROFILE
    rule: str | None = None
    threshold: float = 0.04
    backend: str = "litert"

    def __post_init__(self) -> None:
        try:
            chosen = get_profile(self.profile)
        except ValueError as exc:
            raise ConfigError(f"alarm.profile: {exc}") from None
        if self.rule is None:
            object.__setattr__(self, "rule", chosen.alarm_rule)
        elif self.rule not in ALARM_RULES:
            raise ConfigError(
                f"alarm.rule must be one of {ALARM_RULES} or empty, got {self.rule!r}"
            )


@dataclass(frozen=True)
class DataSettings(SplitSettings):
    """Where the board's private data comes from.

    ``source = "split"`` rebuilds the seeded federated split of a dataset (as the simulator
    does; the split fields are :class:`models.settings.SplitSettings`) and takes shard
    ``index``; ``source = "npz"`` reads ``x_train``, ``y_train``, ``x_test``, ``y_test`` from
    ``path`` (loaded without pickle).
    """

    source: str = "split"
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.source not in ("split", "npz"):
            raise ConfigError(f"data.source must be 'split' or 'npz', got {self.source!r}")
        if self.source == "npz" and self.path is None:
            raise ConfigError("data.source = 'npz' needs data.path")


@dataclass(frozen=True)
class BoardConfig:
    """Everything one board program needs (see the module docstring for the file format)."""

    client_id: str
    run: str
    key_dir: Path
    coordinator_key: Path
    state_dir: Path
    index: int = 0
    rounds: int = 0
    seed: int = 0
    max_message_bytes: int | None = None
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    alarm: AlarmSettings = field(default_factory=AlarmSettings)
    data: DataSettings = field(default_factory=DataSettings)

    def __post_init__(self) -> None:
        from protocol.topics import is_valid_id

        for name in ("client_id", "run"):
            if not is_valid_id(getattr(self, name)):
                raise ConfigError(
                    f"board.{name} {getattr(self, name)!r} must be 1-64 characters from "
                    "[A-Za-z0-9_.-] starting with a letter or digit"
                )
        if self.index < 0 or self.rounds < 0:
            raise ConfigError("board.index and board.rounds must be >= 0")
        if self.training.backend == "litert" and self.training.artifact is None:
            raise ConfigError(
                "training.backend = 'litert' needs training.artifact: the model's LiteRT "
                "training artifact (`siren client export-litert` writes one; bundles for litert "
                "boards carry model-litert.zip)"
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BoardConfig:
        """Read ``board.toml``; relative paths are resolved against its directory.

        Raises
        ------
        ConfigError
            If the file is missing, not TOML, or a value is invalid.
        """
        raw, base_dir = load_toml(path, "board config", ConfigError)
        return cls.from_dict(raw, base_dir=base_dir)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: Path) -> BoardConfig:
        """Build the settings from parsed TOML (sections ``board``, ``broker``, ...)."""
        unknown = set(raw) - {"board", "broker", "training", "alarm", "data"}
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)} in board config")
        board = dict(raw.get("board", {}))
        for key in ("client_id", "run", "key_dir", "coordinator_key", "state_dir"):
            if key not in board:
                raise ConfigError(f"board config needs board.{key}")
        broker = mqtt.read_password_file(raw.get("broker", {}), base_dir, ConfigError)
        try:
            values = {
                "client_id": board.pop("client_id"),
                "run": board.pop("run"),
                "key_dir": _path(board.pop("key_dir"), base_dir),
                "coordinator_key": _path(board.pop("coordinator_key"), base_dir),
                "state_dir": _path(board.pop("state_dir"), base_dir),
                "index": int(board.pop("index", 0)),
                "rounds": int(board.pop("rounds", 0)),
                "seed": int(board.pop("seed", 0)),
                "max_message_bytes": int(board.pop("max_message_bytes", 0)) or None,
            }
            if board:
                raise ConfigError(f"unknown key(s) {sorted(board)} in [board]")
            return cls(
                **values,
                broker=_build(BrokerSettings, broker, "broker", base_dir),
                training=_build(
                    TrainingSettings, dict(raw.get("training", {})), "training", base_dir
                ),
                alarm=_build(AlarmSettings, dict(raw.get("alarm", {})), "alarm"),
                data=_build(DataSettings, dict(raw.get("data", {})), "data", base_dir),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid board config: {exc}") from None

    def to_toml(
        self,
        *,
        relative_to: Path | None = None,
        password_file: str | None = None,
        commented: bool = False,
        header: str = "",
    ) -> str:
        """Serialise to TOML (paths relative to ``relative_to`` when below it).

        The broker password is never written inline: pass ``password_file`` to reference a
        separate file (written by the caller with permissions 0600). ``commented`` writes what
        each key means above it (:data:`COMMENTS`), ``header`` on top.
        """
        board = {
            "client_id": self.client_id,
            "index": self.index,
            "run": self.run,
            "key_dir": _rel(self.key_dir, relative_to),
            "coordinator_key": _rel(self.coordinator_key, relative_to),
            "state_dir": _rel(self.state_dir, relative_to),
            "rounds": self.rounds,
            "seed": self.seed,
            "max_message_bytes": self.max_message_bytes or 0,
        }
        broker = mqtt.broker_to_toml(self.broker, relative_to, password_file)
        sections = {
            "board": board,
            "broker": broker,
            "training": _section(self.training, relative_to),
            "alarm": _section(self.alarm, relative_to),
            "data": _section(self.data, relative_to),
        }
        return dumps_toml(sections, comments=COMMENTS if commented else None, header=header)


_OPTIONAL_ZERO = {"learning_rate", "train_samples", "test_samples"}


def _build(cls: Any, values: dict[str, Any], section: str, base_dir: Path | None = None) -> Any:
    return toml_settings.build_section(
        cls, values, section, ConfigError, base_dir, optional_zero=_OPTIONAL_ZERO
    )


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
        For a value TOML cannot hold (see :func:`protocol.settings.dumps_toml`).
    """
    return toml_settings.dumps_toml(sections, ConfigError, comments=comments, header=header)
