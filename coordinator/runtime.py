"""What the coordinator computes with: the model's layout and initial weights, the server
strategy (an aggregation rule or SIREN), the root set and the test-set evaluation.

:func:`build_runtime` builds a :class:`CoordinatorRuntime` from the coordinator's settings;
TensorFlow is imported only when something needs the model. :func:`load_initial_model` and
:func:`save_initial_model` read and write the optional ``[model] initial`` file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.rounds import RuleStrategy, Strategy, make_strategy
from protocol.layout import TensorLayout

logger = logging.getLogger(__name__)


@dataclass
class CoordinatorRuntime:
    """What the coordinator computes with.

    Attributes
    ----------
    layout : TensorLayout
        The model's tensor layout.
    initial_weights : ndarray of float32
        ``g_1``.
    strategy : Strategy
        The server rule (aggregator or SIREN).
    evaluate : callable or None
        ``weights -> (loss, accuracy)`` on a test split, or ``None``.
    model_name : str
        Zoo name, for records.
    undefended : Strategy or None
        Plain FedAvg used before ``defense_start_round`` (SIREN §5.9), else ``None``.
    """

    layout: TensorLayout
    initial_weights: np.ndarray
    strategy: Strategy
    evaluate: Callable[[np.ndarray], tuple[float, float]] | None = None
    model_name: str = ""
    undefended: Strategy | None = None


def _needs_oracle(name: str) -> bool:
    if name == "siren":
        return True
    from coordinator.aggregators import get_rule

    return "server_update" in get_rule(name).params


def load_initial_model(path: Any) -> tuple[np.ndarray, TensorLayout]:
    """Read an npz with ``weights`` (float32 vector) and ``layout`` (its JSON text).

    Raises
    ------
    ConfigError
        If the file is missing or inconsistent.
    """

    try:
        with np.load(path, allow_pickle=False) as data:
            weights = np.asarray(data["weights"], dtype=np.float32)
            layout = TensorLayout.from_json_value(json.loads(str(data["layout"])))
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot read the initial model {path}: {exc}") from None
    if weights.shape != (layout.size,):
        raise ConfigError(
            f"initial model {path}: {weights.shape[0]} weights, the layout needs {layout.size}"
        )
    return weights, layout


def save_initial_model(path: Any, weights: np.ndarray, layout: TensorLayout) -> None:
    """Write the npz read by :func:`load_initial_model`."""

    np.savez(
        path,
        weights=np.asarray(weights, dtype=np.float32),
        layout=np.array(json.dumps(layout.to_json_value())),
    )


def build_runtime(config: CoordinatorConfig, num_clients: int) -> CoordinatorRuntime:
    """Model, strategy and evaluation per ``config``.

    TensorFlow is imported only when something needs the model: no ``[model] initial`` file,
    a strategy that needs the root set (SIREN, FLTrust), or test-set evaluation. The root set
    with ``data.root = "split"`` is the one the seeded federated split sets aside (as in the
    in-process engine), drawn from the same dataset subset.
    """
    name = config.aggregator.name
    device = config.aggregator.resolved_device()  # before TensorFlow: a mistake costs a second
    needs_oracle = _needs_oracle(name)
    initial: np.ndarray | None = None
    layout: TensorLayout | None = None
    if config.model.initial is not None:
        initial, layout = load_initial_model(config.model.initial)
    needs_tf = needs_oracle or config.data.evaluate or initial is None
    oracle = None
    evaluate = None
    model_name = config.model.name or ""
    if needs_tf:
        from coordinator.oracle import RootSetOracle
        from models.datasets import load_dataset
        from models.partition import make_federated_split
        from models.tf_setup import seed_everything
        from models.training import TrainConfig, Trainer
        from models.zoo import DEFAULT_MODEL

        seed_everything(config.seed)
        data = config.data
        ds = load_dataset(data.dataset)
        if data.train_samples is not None or data.test_samples is not None:
            ds = ds.subset(data.train_samples, data.test_samples)
        model_name = config.model.name or DEFAULT_MODEL[ds.name]
        train_cfg = TrainConfig(
            epochs=config.training.epochs,
            batch_size=config.training.batch_size,
            learning_rate=config.training.resolved_lr(model_name),
            optimizer=config.training.optimizer,
        )
        trainer = Trainer(model_name, ds.input_shape, ds.num_classes, train_cfg, seed=config.seed)
        trainer_layout = TensorLayout(trainer.layout.as_list())
        if layout is not None and layout != trainer_layout:
            raise ConfigError(
                f"the initial model's layout differs from the layout of model {model_name!r}"
            )
        if initial is None:
            initial, layout = trainer.initial_weights.copy(), trainer_layout
        if data.root == "split":
            split = make_federated_split(
                ds.y_train,
                data.clients,
                data.partition,
                p=data.noniid_p,
                alpha=data.dirichlet_alpha,
                classes=data.classes_per_board,
                root_size=data.root_size,
                local_test_fraction=data.local_test_fraction,
                seed=data.split_seed,
            )
            oracle = RootSetOracle(
                trainer, ds.x_train[split.root_idx], ds.y_train[split.root_idx], seed=config.seed
            )
        elif data.root == "npz":
            assert data.root_path is not None
            with np.load(data.root_path, allow_pickle=False) as arrays:
                oracle = RootSetOracle(
                    trainer,
                    np.asarray(arrays["x"], dtype=np.float32),
                    np.asarray(arrays["y"], dtype=np.int64),
                    seed=config.seed,
                )
        if data.evaluate:
            x_test, y_test = ds.x_test, ds.y_test

            def evaluate(weights: np.ndarray) -> tuple[float, float]:
                return trainer.evaluate(weights, x_test, y_test)

    if needs_oracle and oracle is not None:
        oracle.warm_up()
    if needs_oracle and oracle is None:
        raise ConfigError(f"aggregator {name!r} needs a root set: set data.root to split or npz")
    assert initial is not None and layout is not None
    params = dict(config.aggregator.params)
    if name == "siren":
        params.setdefault("seed", config.seed)  # seeds SIREN's probes of banned boards
    strategy = make_strategy(
        name,
        params,
        oracle=oracle,
        num_clients=num_clients,
        num_rounds=config.rounds,
        profile=config.aggregator.profile,
        seed=config.seed,
        device=device,
    )
    if device != "numpy":
        from coordinator.aggregators.devices import DEVICE_RULES, device_description

        if name in DEVICE_RULES:
            logger.info("aggregator %s runs its heavy part on %s", name, device_description(device))
        else:
            logger.info("aggregator %s has no device path: it runs numpy (device %s)", name, device)
    undefended = None
    if config.defense_start_round > 1:
        undefended = RuleStrategy("fedavg", seed=config.seed)
    if evaluate is None:
        logger.info(
            "test accuracy is not reported: [data] evaluate = false (set it, with the dataset, "
            "to evaluate every global model)"
        )
    return CoordinatorRuntime(layout, initial, strategy, evaluate, model_name, undefended)
