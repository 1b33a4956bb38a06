"""The in-process federated learning engine: K simulated boards and the coordinator in one process.

Every round the engine picks the participating boards, runs the board step
(:func:`edge_client.board.board_step`) for each, lets the adversary tamper with the malicious
boards' output, runs the coordinator's strategy (:mod:`coordinator.rounds`) and evaluates the new
global model on the dataset's test split. The same seed gives the same history.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from coordinator.oracle import RootSetOracle
from coordinator.rounds import RuleStrategy, Submission, guarded_step, make_strategy
from coordinator.selection import Sampling
from edge_client.alarm import AlarmConfig
from edge_client.board import BoardData, BoardState, BoardUpdate, board_step
from firmware_sim.adversary import Adversary
from firmware_sim.async_engine import check_async, run_buffered
from firmware_sim.profiles import DeviceProfile, assign_profiles, compute_seconds, parse_mix
from firmware_sim.report import ban_outcome
from models.datasets import Dataset, load_dataset
from models.partition import FederatedSplit, make_federated_split
from models.tf_setup import seed_everything
from models.training import TrainConfig, Trainer, default_learning_rate
from models.zoo import DEFAULT_MODEL
from protocol.siren_profiles import DEFAULT_PROFILE, get_profile


@dataclass(frozen=True)
class SimConfig:
    """Everything that defines a simulated run (recorded verbatim in ``history.json``).

    Attributes mirror the ``siren sim run`` options; see ``siren sim run --help``.
    ``siren_profile`` (:mod:`protocol.siren_profiles`) sets the boards' alarm rule and the SIREN
    server's thresholds; ``alarm_rule`` left at None takes the profile's rule (and is recorded
    resolved), server parameters in ``aggregator_params`` override the profile's.
    """

    dataset: str = "auto"
    model: str | None = None
    clients: int = 10
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float | None = None
    optimizer: str = "adam"
    client_fraction: float = 1.0
    clients_per_round: int | None = None
    partition: str = "iid"
    noniid_p: float = 0.5
    dirichlet_alpha: float = 0.5
    classes_per_board: int = 2
    root_size: int = 100
    local_test_fraction: float = 0.1
    train_samples: int | None = None
    test_samples: int | None = None
    aggregator: str = "fedavg"
    aggregator_params: dict[str, Any] = field(default_factory=dict)
    device: str = "numpy"
    alarm: bool | None = None
    siren_profile: str = DEFAULT_PROFILE
    alarm_rule: str | None = None
    alarm_threshold: float = 0.04
    alarm_backend: str = "litert"
    train_backend: str = "keras"
    attack: str | None = None
    malicious: float = 0.0
    malicious_ids: tuple[int, ...] | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    defense_start_round: int = 1
    guard_factor: float = 100.0
    guard_max_abs: float = 1e6
    profile: str = "ideal"
    compute_factor: float | None = None
    latency_ms: float | None = None
    dropout: float | None = None
    nominal_compute: float | None = None
    mode: str = "sync"
    staleness_bound: int = 4
    buffer_size: int = 10
    staleness_weight: str = "poly:0.5"
    async_pool: str = "buffer"

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"--client-fraction must be in (0, 1], got {self.client_fraction}")
        if self.clients_per_round is not None:
            if not 1 <= self.clients_per_round <= self.clients:
                raise ValueError(
                    f"--clients-per-round must be in 1..{self.clients} (--clients), got "
                    f"{self.clients_per_round}"
                )
            if self.client_fraction != 1.0:
                raise ValueError("give --client-fraction or --clients-per-round, not both")
        if not 0.0 <= self.malicious <= 1.0:
            raise ValueError(f"--malicious must be a fraction in [0, 1], got {self.malicious}")
        if self.alarm_backend not in ("litert", "keras"):
            raise ValueError(f"--alarm-backend must be litert or keras, got {self.alarm_backend!r}")
        if self.train_backend not in ("litert", "keras"):
            raise ValueError(f"--train-backend must be litert or keras, got {self.train_backend!r}")
        if self.defense_start_round < 1:
            raise ValueError(f"--defense-start-round must be >= 1, got {self.defense_start_round}")
        if not self.guard_factor > 0 or not self.guard_max_abs > 0:
            raise ValueError(
                f"--guard-factor and --guard-max-abs must be positive (inf: no bound), got "
                f"{self.guard_factor} and {self.guard_max_abs}"
            )
        self.device_profiles()  # raises on an unknown profile or a bad override
        if self.nominal_compute is not None and not self.nominal_compute > 0:
            raise ValueError(f"--nominal-compute must be > 0 s, got {self.nominal_compute}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"--mode must be sync or async, got {self.mode!r}")
        if self.mode == "async":
            check_async(self)
        profile = get_profile(self.siren_profile)  # raises with the valid names
        if self.alarm_rule is None:
            object.__setattr__(self, "alarm_rule", profile.alarm_rule)

    def device_profiles(self) -> list[DeviceProfile]:
        """Each board's device profile (:mod:`firmware_sim.profiles`): the ``profile`` mix
        assigned by the seed, with the overrides applied."""
        return assign_profiles(
            parse_mix(self.profile),
            self.clients,
            self.seed,
            compute_factor=self.compute_factor,
            latency_ms=self.latency_ms,
            dropout=self.dropout,
        )

    @property
    def sampling(self) -> Sampling:
        """The run's client sampling (:mod:`coordinator.selection`)."""
        return Sampling(self.client_fraction, self.clients_per_round)

    @property
    def alarm_enabled(self) -> bool:
        """Boards run the SIREN alarm: by default exactly when the server runs SIREN."""
        return self.alarm if self.alarm is not None else self.aggregator == "siren"

    def resolved_lr(self) -> float:
        """The learning rate, defaulting per optimizer and model (the dataset's default model)."""
        if self.learning_rate is not None:
            return self.learning_rate
        from models.datasets import resolve_dataset_name
        from models.zoo import DEFAULT_MODEL

        model = self.model or DEFAULT_MODEL.get(resolve_dataset_name(self.dataset))
        return default_learning_rate(self.optimizer, model)


@dataclass
class Fleet:
    """The materialized run: data, boards, trainer, strategy and adversary.

    ``trainer`` (Keras) serves the coordinator's side: test accuracy, root-set evaluations and
    training, attack metrics. ``board_trainer`` is what the boards train with: the same trainer
    (``--train-backend keras``) or a :class:`~models.litert_trainer.LiteRTTrainer` running the
    model's LiteRT training artifact (``--train-backend litert``, as a board without TensorFlow).
    """

    config: SimConfig
    dataset: Dataset
    split: FederatedSplit
    boards: list[BoardData]
    states: list[BoardState]
    trainer: Trainer
    evaluator: Any
    strategy: Any
    adversary: Adversary
    x_test: np.ndarray
    y_test: np.ndarray
    undefended: Any = None
    profiles: list[DeviceProfile] = field(default_factory=list)
    board_trainer: Any = None

    def __post_init__(self) -> None:
        if self.board_trainer is None:
            self.board_trainer = self.trainer


def build_adversary(
    config: SimConfig, dataset: Dataset, board_labels: list[np.ndarray] | None = None
) -> Adversary:
    """The adversary of ``config`` (honest fleet when no attack is configured);
    ``board_labels``, each board's training labels, let it choose its boards by class."""
    if config.attack in (None, "", "none"):
        return Adversary()
    from firmware_sim.attacks import make_adversary

    return make_adversary(config, dataset, board_labels)


def federated_split(config: SimConfig, ds: Dataset) -> FederatedSplit:
    """``config``'s partition of ``ds`` over the boards (with the root set)."""
    return make_federated_split(
        ds.y_train,
        config.clients,
        config.partition,
        p=config.noniid_p,
        alpha=config.dirichlet_alpha,
        classes=config.classes_per_board,
        root_size=config.root_size,
        local_test_fraction=config.local_test_fraction,
        seed=config.seed,
    )


def malicious_board_ids(config: SimConfig) -> tuple[int, ...]:
    """The boards ``config``'s attack controls, chosen as :func:`build_fleet` chooses them
    (the data is loaded and partitioned only when the choice depends on the boards' classes)."""
    if config.attack in (None, "", "none"):
        return ()
    from firmware_sim.attacks import select_malicious_ids

    params = {str(k).replace("-", "_"): v for k, v in (config.attack_params or {}).items()}
    labels = None
    if params.get("holding_class") is not None:
        ds = load_dataset(config.dataset)
        if config.train_samples is not None or config.test_samples is not None:
            ds = ds.subset(config.train_samples, config.test_samples)
        labels = [ds.y_train[s.train_idx] for s in federated_split(config, ds).shards]
    ids, _ = select_malicious_ids(
        config.clients,
        config.malicious,
        config.malicious_ids,
        config.seed,
        holding_class=params.get("holding_class"),
        board_labels=labels,
    )
    return ids


def build_fleet(config: SimConfig, dataset: Dataset | None = None) -> Fleet:
    """Load data, partition it, build the shared trainer, evaluator, strategy and adversary."""
    seed_everything(config.seed)
    ds = dataset if dataset is not None else load_dataset(config.dataset)
    if config.train_samples is not None or config.test_samples is not None:
        ds = ds.subset(config.train_samples, config.test_samples)
    model_name = config.model or DEFAULT_MODEL[ds.name]
    split = federated_split(config, ds)
    train_cfg = TrainConfig(
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=config.resolved_lr(),
        optimizer=config.optimizer,
    )
    trainer = Trainer(model_name, ds.input_shape, ds.num_classes, train_cfg, seed=config.seed)
    board_trainer: Any = trainer
    artifact = None
    if config.train_backend == "litert":
        from models.litert_trainer import LiteRTTrainer
        from models.litert_training import export_litert_training

        artifact = export_litert_training(
            trainer.model, model_name=model_name, optimizer=train_cfg.optimizer
        )
        board_trainer = LiteRTTrainer(artifact, train_cfg)
    evaluator = None
    if config.alarm_enabled:
        if artifact is not None and config.alarm_backend == "litert":
            from models.litert_trainer import artifact_evaluator

            evaluator = artifact_evaluator(artifact)  # what a board without TensorFlow runs
        else:
            from models.litert import make_evaluator

            evaluator = make_evaluator(trainer.model, prefer=config.alarm_backend)
    oracle = RootSetOracle(
        trainer, ds.x_train[split.root_idx], ds.y_train[split.root_idx], seed=config.seed
    )
    if config.aggregator == "siren":
        oracle.warm_up()
    strategy = make_strategy(
        config.aggregator,
        config.aggregator_params,
        oracle=oracle,
        num_clients=config.clients,
        num_rounds=config.rounds,
        profile=config.siren_profile,
        seed=config.seed,
        device=config.device,
    )
    # Before --defense-start-round the server runs plain FedAvg (SIREN §5.9); boards keep their
    # alarm, so a defense that starts late sees boards that have been alarming all along.
    undefended = None
    if config.defense_start_round > 1:
        undefended = RuleStrategy("fedavg", seed=config.seed)
    adversary = build_adversary(config, ds, [ds.y_train[s.train_idx] for s in split.shards])
    boards = []
    for shard in split.shards:
        data = BoardData(
            ds.x_train[shard.train_idx],
            ds.y_train[shard.train_idx],
            ds.x_train[shard.test_idx],
            ds.y_train[shard.test_idx],
        )
        if adversary.is_malicious(shard.client_id):
            rng = np.random.default_rng([config.seed, shard.client_id, 104729])
            data = adversary.board_data(shard.client_id, data, rng)
        boards.append(data)
    states = [BoardState(i) for i in range(config.clients)]
    return Fleet(
        config,
        ds,
        split,
        boards,
        states,
        trainer,
        evaluator,
        strategy,
        adversary,
        ds.x_test,
        ds.y_test,
        undefended,
        config.device_profiles(),
        board_trainer,
    )


def select_clients(config: SimConfig, round_index: int) -> list[int]:
    """Boards taking part in ``round_index``: a seeded uniform sample of ``fraction · K`` (or
    ``clients_per_round``) boards, drawn by the coordinator's own function
    (:func:`coordinator.selection.select_participants`), so ``siren sim fleet`` draws the same."""
    return config.sampling.select(config.clients, round_index, config.seed)


def play_round(fleet: Fleet, round_index: int, global_weights: np.ndarray) -> dict[str, Any]:
    """Run one full round; return the new global model under ``"global"`` plus the record."""
    cfg = fleet.config
    t0 = time.perf_counter()
    selected = select_clients(cfg, round_index)
    alarm_cfg = (
        AlarmConfig.for_profile(cfg.siren_profile, cfg.alarm_threshold, cfg.alarm_rule)
        if cfg.alarm_enabled
        else None
    )
    updates: list[BoardUpdate] = []
    # A board whose device profile drops it this round sits it out (as in a fleet worker).
    dropped = [c for c in selected if fleet.profiles[c].drops(cfg.seed, round_index, c)]
    for cid in selected:
        if cid in dropped:
            continue
        data = fleet.boards[cid]
        if fleet.adversary.is_malicious(cid):
            data = fleet.adversary.round_data(cid, round_index, data)
        rng = np.random.default_rng([cfg.seed, round_index, cid])
        update, fleet.states[cid] = board_step(
            fleet.states[cid],
            global_weights,
            round_index,
            data,
            fleet.board_trainer,
            rng,
            evaluator=fleet.evaluator,
            alarm=alarm_cfg,
            epochs=fleet.adversary.round_epochs(cid, round_index),
        )
        updates.append(update)
    board_seconds = time.perf_counter() - t0
    tamper_rng = np.random.default_rng([cfg.seed, round_index, 65537])
    updates = fleet.adversary.tamper_round(round_index, global_weights, updates, tamper_rng)
    submissions = [Submission(u.client_id, u.delta, u.num_samples, u.alarm) for u in updates]
    defended = round_index >= cfg.defense_start_round or fleet.undefended is None
    strategy = fleet.strategy if defended else fleet.undefended
    t1 = time.perf_counter()
    result = guarded_step(
        strategy,
        round_index,
        global_weights,
        submissions,
        factor=cfg.guard_factor,
        max_abs=cfg.guard_max_abs,
    )
    server_seconds = time.perf_counter() - t1
    new_global = result.new_global
    # Simulated board time: the round ends when its last reporting board's update arrives.
    board_times = {
        u.client_id: fleet.profiles[u.client_id].board_seconds(
            compute_seconds(cfg, u, fleet.boards[u.client_id].num_train),
            cfg.seed,
            round_index,
            u.client_id,
        )
        for u in updates
    }
    test_loss, test_acc = fleet.trainer.evaluate(new_global, fleet.x_test, fleet.y_test)
    record: dict[str, Any] = {
        "round": round_index,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "seconds": time.perf_counter() - t0,
        "board_seconds": board_seconds,
        "server_seconds": server_seconds,
        "selected": [u.client_id for u in updates],
        **({"sampled": selected} if cfg.sampling.active else {}),
        **({"dropped": dropped} if dropped else {}),
        "sim_seconds": max(board_times.values(), default=0.0) + server_seconds,
        "sample_counts": {str(u.client_id): u.num_samples for u in updates},
        "alarms": {str(u.client_id): bool(u.alarm) for u in updates},
        "alarm_ms_mean": 1000 * float(np.mean([u.alarm_seconds for u in updates]))
        if updates
        else 0.0,
        "train_ms_mean": 1000 * float(np.mean([u.train_seconds for u in updates]))
        if updates
        else 0.0,
        "boards": {
            str(u.client_id): {
                "global_accuracy": u.global_accuracy,
                "local_accuracy": u.local_accuracy,
                "alarm_ms": 1000 * u.alarm_seconds,
                "train_ms": 1000 * u.train_seconds,
                "sim_seconds": board_times[u.client_id],
            }
            for u in updates
        },
        "defense_active": defended,
        "verdicts": {str(k): v for k, v in result.verdicts.items()},
        "decision": result.record,
    }
    record.update(fleet.adversary.round_metrics(fleet.trainer, new_global))
    record["global"] = new_global
    return record


def run_simulation(
    config: SimConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    dataset: Dataset | None = None,
    stop: Any = None,
) -> dict[str, Any]:
    """Run a whole simulation; return the history (``config``, ``fleet``, ``rounds``, ``summary``).

    ``progress`` is called with every round's record as soon as the round ends. A synchronous
    run ends after the round in which ``stop`` (a :class:`threading.Event`) is set, or at a
    ``KeyboardInterrupt`` after its first round: the history holds the finished rounds and
    ``summary.interrupted`` is true.
    """
    started = time.perf_counter()
    fleet = build_fleet(config, dataset)
    global_weights = fleet.trainer.initial_weights.copy()
    rounds: list[dict[str, Any]] = []
    interrupted = False
    if config.mode == "async":
        global_weights = run_buffered(fleet, global_weights, rounds, progress)
    else:
        clock = 0.0
        try:
            for t in range(1, config.rounds + 1):
                record = play_round(fleet, t, global_weights)
                clock += record["sim_seconds"]
                record["sim_time"] = clock
                global_weights = record.pop("global")
                rounds.append(record)
                if progress is not None:
                    progress(record)
                if stop is not None and stop.is_set() and t < config.rounds:
                    interrupted = True
                    break
        except KeyboardInterrupt:
            if not rounds:
                raise
            interrupted = True
    final = rounds[-1]
    malicious = sorted(fleet.adversary.malicious_ids)
    return {
        "config": asdict(config),
        "fleet": {
            "dataset": fleet.dataset.name,
            "model": fleet.trainer.model_name,
            "parameters": fleet.trainer.layout.size,
            "clients": config.clients,
            "train_samples_per_client": [b.num_train for b in fleet.boards],
            "local_test_samples_per_client": [len(b.y_test) for b in fleet.boards],
            "root_samples": int(fleet.split.root_idx.size),
            "test_samples": len(fleet.y_test),
            "alarm_backend": getattr(fleet.evaluator, "backend", None),
            "train_backend": fleet.board_trainer.backend,
            **fleet.adversary.describe(),
        },
        "rounds": rounds,
        "summary": {
            "final_test_accuracy": final["test_accuracy"],
            "final_test_loss": final["test_loss"],
            "best_test_accuracy": max(r["test_accuracy"] for r in rounds),
            "sim_seconds": rounds[-1]["sim_time"],
            "wall_seconds": time.perf_counter() - started,
            "malicious_ids": malicious,
            "bans": ban_outcome(rounds, malicious),
            "interrupted": interrupted,
        },
        "strategy_state": fleet.strategy.state_dict(),
        "final_global": global_weights,
    }
