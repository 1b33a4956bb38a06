"""From ``siren sim`` options to a run: parse them, build the run's configuration, check it,
and the one line printed per round. Shared by ``siren sim run`` and ``siren sim fleet``."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from siren_cli.errors import CommandError


def parse_key_values(items: list[str] | None, option: str) -> dict[str, Any]:
    """Parse repeated ``KEY=VALUE`` options; values are Python literals when they parse as one.

    ``f=2`` gives ``{"f": 2}``, ``beta=0.1`` a float, ``mode=full`` the string ``"full"``.
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
        out[key.strip().replace("-", "_")] = value
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    """Build a :class:`firmware_sim.engine.SimConfig` from parsed options (user errors raise)."""
    from firmware_sim.engine import SimConfig

    ids = None
    if args.malicious_ids:
        try:
            ids = tuple(int(x) for x in args.malicious_ids.split(",") if x.strip())
        except ValueError as exc:
            raise CommandError(f"--malicious-ids must be comma-separated integers: {exc}") from exc
        bad = [i for i in ids if not 0 <= i < args.clients]
        if bad:
            raise CommandError(f"--malicious-ids {bad} outside 0..{args.clients - 1}")
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
            partition=args.partition,
            noniid_p=args.noniid_p,
            dirichlet_alpha=args.dirichlet_alpha,
            root_size=args.root_size,
            local_test_fraction=args.local_test_fraction,
            train_samples=args.train_samples,
            test_samples=args.test_samples,
            aggregator=args.aggregator,
            aggregator_params=parse_key_values(args.agg_param, "--agg-param"),
            alarm=args.alarm,
            siren_profile=args.siren_profile,
            alarm_rule=args.alarm_rule,
            alarm_threshold=args.alarm_threshold,
            alarm_backend=args.alarm_backend,
            attack=args.attack,
            malicious=args.malicious,
            malicious_ids=ids,
            attack_params=parse_key_values(args.attack_param, "--attack-param"),
            seed=args.seed,
            defense_start_round=args.defense_start_round,
            guard_factor=args.guard_factor,
            guard_max_abs=args.guard_max_abs,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def validate_names(config: Any) -> None:
    """Fail early, with the valid choices, on an unknown aggregator or parameter."""
    from coordinator.rounds import strategy_names

    names = strategy_names()
    if config.aggregator not in names:
        raise CommandError(f"unknown aggregator {config.aggregator!r}; valid: {', '.join(names)}")
    if config.attack not in (None, "", "none"):
        from firmware_sim.attacks import attack_names

        attacks = attack_names()
        if config.attack not in attacks:
            raise CommandError(f"unknown attack {config.attack!r}; valid: {', '.join(attacks)}")


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
    if "attack_success_rate" in record:
        line += f"  ASR {100 * record['attack_success_rate']:.1f}%"
    return line
