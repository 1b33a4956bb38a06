"""From ``siren sim`` options to a run: parse them, build the run's configuration, check it,
and the one line printed per round. Shared by ``siren sim run`` and ``siren sim fleet``."""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from typing import Any

from siren_cli.errors import CommandError, message_of

logger = logging.getLogger(__name__)


def parse_key_values(items: list[str] | None, option: str) -> dict[str, Any]:
    """Parse repeated ``KEY=VALUE`` options; values are Python literals when they parse as one.

    ``f=2`` gives ``{"f": 2}``, ``beta=0.1`` a float, ``mode=full`` the string ``"full"``; a key
    given twice is refused.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        name = key.strip().replace("-", "_")
        if name in out:
            raise CommandError(f"{option} gives {key.strip()} twice; give each key once")
        out[name] = value
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    """Build a :class:`firmware_sim.engine.SimConfig` from parsed options (user errors raise)."""
    from firmware_sim.engine import SimConfig

    if args.seed < 0:
        raise CommandError(f"--seed must be >= 0, got {args.seed}")
    ids = None
    if args.malicious_ids:
        try:
            ids = tuple(int(x) for x in args.malicious_ids.split(",") if x.strip())
        except ValueError as exc:
            raise CommandError(f"--malicious-ids must be comma-separated integers: {exc}") from exc
        bad = [i for i in ids if not 0 <= i < args.clients]
        if bad:
            raise CommandError(f"--malicious-ids {bad} outside 0..{args.clients - 1}")
    malicious = args.malicious
    if args.attack in (None, "", "none"):
        chosen = malicious > 0 and malicious != getattr(args, "malicious_default", 0.0)
        if args.malicious_ids or chosen:
            raise CommandError(
                "--malicious and --malicious-ids choose the boards of an attack: give --attack "
                "(siren sim attacks lists them), or leave them out for an honest fleet"
            )
        malicious = 0.0
    try:
        return SimConfig(
            dataset=args.dataset,
            model=args.model,
            clients=args.clients,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            optimizer=args.optimizer,
            client_fraction=args.client_fraction,
            clients_per_round=args.clients_per_round,
            partition=args.partition,
            noniid_p=args.noniid_p,
            dirichlet_alpha=args.dirichlet_alpha,
            classes_per_board=args.classes_per_board,
            root_size=args.root_size,
            local_test_fraction=args.local_test_fraction,
            train_samples=args.train_samples,
            test_samples=args.test_samples,
            aggregator=args.aggregator,
            aggregator_params=parse_key_values(args.agg_param, "--agg-param"),
            device=getattr(args, "device", "numpy"),
            alarm=args.alarm,
            siren_profile=args.siren_profile,
            alarm_rule=args.alarm_rule,
            alarm_threshold=args.alarm_threshold,
            alarm_backend=args.alarm_backend,
            train_backend=args.train_backend,
            attack=args.attack,
            malicious=malicious,
            malicious_ids=ids,
            attack_params=parse_key_values(args.attack_param, "--attack-param"),
            seed=args.seed,
            defense_start_round=args.defense_start_round,
            guard_factor=args.guard_factor,
            guard_max_abs=args.guard_max_abs,
            profile=args.profile,
            compute_factor=args.compute_factor,
            latency_ms=args.latency_ms,
            dropout=args.dropout,
            nominal_compute=args.nominal_compute,
            mode=args.mode,
            staleness_bound=args.staleness_bound,
            buffer_size=args.buffer_size,
            staleness_weight=args.staleness_weight,
            async_pool=args.async_pool,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def check_config(config: Any) -> None:
    """Check everything about a run that can be checked without loading anything.

    Run before TensorFlow, the dataset or any process starts, so a mistake costs a second, not
    the 10-30 s of loading: the aggregator and its parameters (the strategy is built as the run
    would build it, and a rule is tried once on a few random updates of the round's size, which
    checks Byzantine bounds such as Krum's K >= 2f+3), the attack, its parameters and its boards,
    the model against the dataset's image size, and the local training settings.

    Raises
    ------
    CommandError
        Saying what is wrong and what is expected.
    """
    from coordinator.rounds import strategy_names

    names = strategy_names()
    if config.aggregator not in names:
        raise CommandError(f"unknown aggregator {config.aggregator!r}; valid: {', '.join(names)}")
    _check_numbers(config)
    _check_model(config)
    _check_training(config)
    _check_partition(config)
    _check_strategy(config)
    _check_attack(config)


def _check_numbers(config: Any) -> None:
    for option, value in (
        ("--train-samples", config.train_samples),
        ("--test-samples", config.test_samples),
    ):
        if value is not None and value < 1:
            raise CommandError(f"{option} must be >= 1 (leave it out for the whole split)")


def _check_model(config: Any) -> None:
    from models.datasets import INPUT_SHAPES, resolve_dataset_name
    from models.errors import ModelsError
    from models.zoo import DEFAULT_MODEL, check_model_input

    dataset = resolve_dataset_name(config.dataset)
    model = config.model or DEFAULT_MODEL[dataset]
    try:
        check_model_input(model, INPUT_SHAPES[dataset], dataset=dataset)
    except ModelsError as exc:
        raise CommandError(str(exc)) from exc


def _check_training(config: Any) -> None:
    from models.training import TrainConfig

    try:
        TrainConfig(
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            learning_rate=config.resolved_lr(),
            optimizer=config.optimizer,
        )
    except ValueError as exc:
        raise CommandError(f"local training: {exc}") from exc


def _check_partition(config: Any) -> None:
    # Both datasets have ten classes (Fashion-MNIST and scikit-learn's digits).
    if config.partition == "classes" and not 1 <= config.classes_per_board <= 10:
        raise CommandError(
            f"--classes-per-board must be in [1, 10] ({config.dataset} has 10 classes), "
            f"got {config.classes_per_board}"
        )


class _NoRootSet:
    """Stands in for the server's root set while a strategy is only being checked."""

    def accuracy(self, weights: Any) -> float:
        return 0.0

    def server_update(self, global_weights: Any, round_index: int) -> Any:
        import numpy as np

        return np.ones_like(global_weights)


def _check_strategy(config: Any) -> None:
    """Build the run's strategy and try a rule once on random updates of the round's size."""
    import numpy as np

    from coordinator.aggregators.devices import resolve_device
    from coordinator.errors import CoordinatorError, DeviceUnavailableError, InvalidParameterError
    from coordinator.rounds import REFUSALS, make_strategy
    from coordinator.strategy import Submission

    device = getattr(config, "device", "numpy")
    try:
        resolve_device(device)
    except (InvalidParameterError, DeviceUnavailableError) as exc:
        raise CommandError(f"--device {device}: {message_of(exc)}") from exc

    asynchronous = getattr(config, "mode", "sync") == "async"
    participants = config.buffer_size if asynchronous else config.sampling.per_round(config.clients)
    try:
        strategy = make_strategy(
            config.aggregator,
            dict(config.aggregator_params),
            oracle=_NoRootSet(),
            num_clients=config.clients,
            num_rounds=config.rounds,
            profile=config.siren_profile,
            seed=config.seed,
            device=device,
        )
    except (CoordinatorError, ValueError, KeyError, TypeError) as exc:
        raise CommandError(message_of(exc)) from exc
    if config.aggregator == "siren":
        return  # its parameters are checked when it is built; it has no Byzantine bound
    rng = np.random.default_rng(config.seed)
    dim = 8
    submissions = [
        Submission(i, rng.standard_normal(dim).astype(np.float32), 10) for i in range(participants)
    ]
    refusals: tuple[type[Exception], ...] = (*REFUSALS, TypeError)
    try:
        strategy.step(1, np.zeros(dim, dtype=np.float32), submissions)
    except refusals as exc:
        message = message_of(exc)
        where = "" if participants == config.clients else f" ({participants} boards per round)"
        if asynchronous:
            where = f" (a buffer of {participants} updates, --buffer-size)"
        if where or not message.startswith(config.aggregator):
            message = f"--aggregator {config.aggregator}{where}: {message}"
        raise CommandError(message) from exc
    except Exception as exc:
        # Anything else (a rule that fails on random numbers) is for the real run to report.
        logger.debug("checking %s on random updates: %s", config.aggregator, exc)


def _check_attack(config: Any) -> None:
    if config.attack in (None, "", "none"):
        return
    from firmware_sim.attacks import AttackError, get_attack, resolve_params
    from firmware_sim.attacks.adversary import select_malicious_ids
    from models.errors import ModelsError

    try:
        cls = get_attack(str(config.attack))
        values = resolve_params(cls.name, cls.PARAMS, dict(config.attack_params or {}))
        select_malicious_ids(config.clients, config.malicious, config.malicious_ids, config.seed)
        if values["holding_class"] is not None:
            # The boards are drawn by their data: build the adversary as the run will (this
            # loads the dataset's labels and partitions them, a second at most).
            from firmware_sim.attacks import make_adversary
            from firmware_sim.engine import federated_split
            from models.datasets import load_dataset

            ds = load_dataset(config.dataset)
            if config.train_samples is not None or config.test_samples is not None:
                ds = ds.subset(config.train_samples, config.test_samples)
            labels = [ds.y_train[s.train_idx] for s in federated_split(config, ds).shards]
            make_adversary(config, ds, labels)
    except AttackError as exc:
        raise CommandError(str(exc)) from exc
    except ModelsError as exc:
        raise CommandError(str(exc)) from exc


def describe_attack(config: Any) -> str:
    """``attack sign_flip by 4 of 10 boards`` (or ``attack none``), for a run's header."""
    if config.attack in (None, "", "none"):
        return "attack none"
    from firmware_sim.attacks.adversary import select_malicious_ids

    ids, _ = select_malicious_ids(
        config.clients, config.malicious, config.malicious_ids, config.seed
    )
    return f"attack {config.attack} by {len(ids)} of {config.clients} boards"


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, with an ``s`` unless ``n`` is 1 (``1 round``, ``3 rounds``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_sampling(config: Any) -> str:
    """``", 5 of 10 boards drawn per round"`` with client sampling, ``", buffered async
    (B=10, S=4, poly:0.5)"`` in buffered asynchronous mode, else ``""``."""
    if getattr(config, "mode", "sync") == "async":
        return (
            f", buffered async (a version every B={config.buffer_size} updates, staleness "
            f"S<={config.staleness_bound}, weight {config.staleness_weight}, rule on the "
            f"{'buffer' if config.async_pool == 'buffer' else 'latest update of every board'})"
        )
    sampling = config.sampling
    if not sampling.active:
        return ""
    return f", {sampling.per_round(config.clients)} of {config.clients} boards drawn per round"


def describe_siren_threshold(config: Any) -> str:
    """SIREN's penalty threshold for a run's header, ``" (ban above C_p = 4 penalties)"``
    (``int(0.45·T)`` in the default profile, so a short run bans early), else ``""``.

    Call it after :func:`check_config`, which refuses SIREN parameters it cannot use.
    """
    c_p = siren_c_p(config)
    if c_p is None:
        return ""
    return f" (ban above C_p = {c_p:g} {'penalty' if c_p == 1 else 'penalties'})"


def siren_c_p(config: Any) -> float | None:
    """The run's SIREN penalty threshold C_p (``None`` for another rule)."""
    if config.aggregator != "siren":
        return None
    from coordinator.rounds import make_strategy

    strategy = make_strategy(
        "siren",
        dict(config.aggregator_params),
        oracle=_NoRootSet(),
        num_clients=config.clients,
        num_rounds=config.rounds,
        profile=config.siren_profile,
        seed=config.seed,
    )
    return float(getattr(strategy, "c_p", 0.0))


#: Local test images per board below which :func:`siren_notes` warns (an alarm compares two
#: accuracies on them: one image moves an accuracy by 1/n).
FEW_TEST_IMAGES = 30


def siren_notes(config: Any, c_p: float | None = None) -> list[str]:
    """Warnings for a SIREN run whose settings make its bans unreliable: boards with only a
    handful of local test images (their alarms are noise, so honest boards are misjudged),
    and a penalty threshold so low that a few misjudged rounds ban a board."""
    if config.aggregator != "siren" or config.alarm is False:
        return []
    from models.datasets import TRAIN_SIZES, resolve_dataset_name

    notes = []
    dataset = resolve_dataset_name(config.dataset)
    train = config.train_samples or TRAIN_SIZES.get(dataset, 0)
    per_board = max(train - config.root_size, 0) * config.local_test_fraction / config.clients
    if train and per_board < FEW_TEST_IMAGES:
        notes.append(
            f"each board tests the global model on about {per_board:.0f} local images "
            f"({dataset}, {config.clients} boards): alarms this noisy misjudge honest boards; "
            "more data per board (fewer boards, Fashion-MNIST) makes them meaningful"
        )
    if c_p is not None and c_p < 3:
        notes.append(
            f"C_p = {c_p:g}: a board judged malicious {c_p + 1:g} times is banned, so a few "
            "misjudged rounds ban an honest board (the default profile's int(0.45·T) is 18 in "
            "the paper's 40-round runs)"
        )
    return notes


def describe_device(config: Any) -> str:
    """Where the heavy aggregators run, for a run's header: ``""`` on the numpy default,
    ``", device cpu"``, ``", device auto: numpy"`` (what ``auto`` picked), or ``", device cpu
    unused (siren has no device path)"`` for a rule that runs numpy whatever the device.

    Call it after :func:`check_config`, which refuses a device this machine cannot provide.
    """
    device = getattr(config, "device", "numpy") or "numpy"
    if device == "numpy":
        return ""
    from coordinator.aggregators.devices import DEVICE_RULES, resolve_device

    if config.aggregator not in DEVICE_RULES:
        return f", device {device} unused ({config.aggregator} has no device path)"
    resolved = resolve_device(device)
    return f", device {device}" + (f": {resolved}" if resolved != device else "")


def warn_about_data_dir(config: Any) -> None:
    """Print a warning when ``$SIREN_DATA_DIR`` is set but cannot be used and the run may need
    Fashion-MNIST (the search then goes on without it)."""
    from models.datasets import data_dir_problem

    problem = data_dir_problem() if config.dataset != "digits" else None
    if problem is not None:
        print(f"warning: {problem}", file=sys.stderr, flush=True)


def format_round(record: dict[str, Any], total: int) -> str:
    """One progress line per round."""
    alarms = sum(bool(v) for v in record.get("alarms", {}).values())
    line = (
        f"round {record['round']:>3}/{total}  acc {100 * record['test_accuracy']:6.2f}%  "
        f"loss {record['test_loss']:.4f}  {record['seconds']:6.1f}s"
    )
    if alarms:
        line += f"  alarms {alarms}"
    decision = record.get("decision", {})
    case = decision.get("case")
    if case is not None:
        line += f"  case {case}"
    if decision.get("rollback"):
        line += " rollback"
    if decision.get("banned"):
        line += f"  banned {decision['banned']}"
    if record.get("mode") == "async":
        staleness = record.get("staleness") or {}
        line += f"  staleness <= {max(staleness.values(), default=0)}"
        line += f"  sim {record.get('sim_time', 0.0):.1f}s"
    if "attack_success_rate" in record:
        line += f"  ASR {100 * record['attack_success_rate']:.1f}%"
    return line
