"""One label-flipping round of residual-based reweighting, taken apart.

The ``residual`` preset's ``label_flip_1to7`` cell (residual-based reweighting §4.2: 10 of 100
boards hold class 1 and train it as class 7, five epochs more than the honest boards) goes
against the paper on Fashion-MNIST. This script replays that cell (the configuration of its
committed ``history.json``) with the cell's own rule, keeps the boards' updates of chosen rounds
and, for each, shows

* per group of boards (the attackers, the honest boards holding the source class, those holding
  the target class, the rest): the mean model weight the rule gives them (x K, so 1 is an equal
  share) and the share of their values the rule replaces by its regression line (Eq. 9), in the
  output layer's column of the source class, of the target class, the rest of the output layer
  and the other layers;
* the same updates aggregated by other rules and variants (FedAvg, the rule without the
  correction, ``delta = 0.1``, the authors' variant, the coordinate median): the test accuracy and
  attack success rate of the model each would make from the same global model.

The counterfactuals differ only in the aggregation of one round's updates, so they measure what
each part of the rule does to the attack, without the run-to-run drift of whole cells.

Usage::

    siren bench residual-anatomy --rounds 1,10,30,60,100 \
        --out benchmarks/results/residual-anatomy.md

Takes about 9 s per round replayed on one core (a 30-round replay: ~5 min).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import help_description

CELL = Path(
    "benchmarks/results/robustness/residual/residual_reweighting__label_flip_1to7__10__classes2"
)

#: label -> (rule, parameters): the aggregations compared on the same updates.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "residual, delta 0.01 (the cell)": ("residual_reweighting", {"delta": 0.01}),
    "residual, no correction (delta 0)": ("residual_reweighting", {"delta": 0.0}),
    "residual, delta 0.1": ("residual_reweighting", {"delta": 0.1}),
    "residual, authors' variant": ("residual_reweighting", {"variant": "authors"}),
    "median": ("median", {}),
}


class _Recorder:
    """Stands in the engine's place of the strategy: keeps the updates of chosen rounds and
    hands every call to the real strategy."""

    def __init__(self, strategy: Any, rounds: set[int]) -> None:
        self._strategy = strategy
        self._rounds = rounds
        self.kept: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}

    def step(self, round_index: int, global_weights: np.ndarray, submissions: Sequence[Any]) -> Any:
        """Record the round's updates (when asked for) and aggregate them as the run does."""
        if round_index in self._rounds:
            matrix = np.stack([np.asarray(s.delta, dtype=np.float32) for s in submissions])
            ids = [int(s.client_id) for s in submissions]
            self.kept[round_index] = (global_weights.copy(), matrix, ids)
        return self._strategy.step(round_index, global_weights, submissions)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)


def _output_columns(layout: Any, d: int, source: int, target: int) -> dict[str, np.ndarray]:
    """Masks over the d parameters: the output layer's source-class column (kernel column and
    bias), its target-class column, the rest of the output layer, every other layer."""
    _, kernel_shape = layout.entries[-2]
    fan_in, classes = kernel_shape
    out_start = d - fan_in * classes - classes
    masks = {name: np.zeros(d, dtype=bool) for name in ("source", "target", "output")}
    for name, c in (("source", source), ("target", target)):
        masks[name][out_start + np.arange(fan_in) * classes + c] = True
        masks[name][d - classes + c] = True
    masks["output"][out_start:] = True
    masks["output"] &= ~(masks["source"] | masks["target"])
    masks["other layers"] = np.zeros(d, dtype=bool)
    masks["other layers"][:out_start] = True
    return masks


def analyse(cell: Path, rounds: list[int], progress: bool = True) -> dict[str, Any]:
    """Replay ``cell`` up to the last of ``rounds`` and take each of those rounds apart."""
    from coordinator.aggregators import aggregate
    from coordinator.aggregators.residual import residual_confidences
    from firmware_sim.engine import SimConfig, build_fleet, play_round

    history = json.loads((cell / "history.json").read_text())
    fields = {f.name for f in dataclasses.fields(SimConfig)}
    config = SimConfig(**{k: v for k, v in history["config"].items() if k in fields})
    config = dataclasses.replace(config, rounds=max(rounds))
    params = history["fleet"]["attack_params"]
    source, target = int(params["source"]), int(params["target"])
    fleet = build_fleet(config)
    malicious = set(history["fleet"]["malicious_ids"])
    held = [set(np.unique(fleet.dataset.y_train[s.train_idx]).tolist()) for s in fleet.split.shards]
    honest = [i for i in range(config.clients) if i not in malicious]
    groups = {
        "attackers": sorted(malicious),
        f"honest, holding {source}": [i for i in honest if source in held[i]],
        f"honest, holding {target}": [i for i in honest if target in held[i]],
        "the rest": [i for i in honest if not {source, target} & held[i]],
    }
    recorder = _Recorder(fleet.strategy, set(rounds))
    fleet.strategy = recorder
    weights = fleet.trainer.initial_weights.copy()
    replayed: dict[int, dict[str, Any]] = {}
    for t in range(1, max(rounds) + 1):
        record = play_round(fleet, t, weights)
        weights = record.pop("global")
        replayed[t] = record
        if progress:
            print(
                f"round {t:3d}/{max(rounds)}  acc {100 * record['test_accuracy']:6.2f}%  "
                f"ASR {100 * record.get('attack_success_rate', 0.0):5.1f}%  "
                f"(committed run: {100 * history['rounds'][t - 1]['test_accuracy']:6.2f}%)",
                file=sys.stderr,
                flush=True,
            )
    rule_params = dict(config.aggregator_params or {})
    out: dict[str, Any] = {"cell": str(cell), "groups": {g: len(v) for g, v in groups.items()}}
    out["rounds"] = {}
    for t in rounds:
        g, matrix, ids = recorder.kept[t]
        rows = {cid: r for r, cid in enumerate(ids)}
        masks = _output_columns(fleet.trainer.layout, matrix.shape[1], source, target)
        conf, replaced = residual_confidences(matrix, **rule_params)
        own = aggregate(config.aggregator, matrix, **rule_params)
        share = np.array([v.weight for v in own.verdicts])
        per_group = {}
        for name, members in groups.items():
            idx = np.array([rows[c] for c in members], dtype=np.intp)
            per_group[name] = {
                "weight_x_k": float(share[idx].mean() * len(ids)),
                "mean_confidence": float(conf[idx].mean()),
                **{
                    f"replaced {part}": float(replaced[np.ix_(idx, np.flatnonzero(mask))].mean())
                    for part, mask in masks.items()
                },
            }
        outcomes = {}
        for label, (rule, extra) in VARIANTS.items():
            result = aggregate(rule, matrix, **extra)
            new = g + result.vector.astype(g.dtype)
            _, acc = fleet.trainer.evaluate(new, fleet.x_test, fleet.y_test)
            asr = fleet.adversary.round_metrics(fleet.trainer, new).get("attack_success_rate")
            outcomes[label] = {"accuracy": float(acc), "asr": asr}
        _, before_acc = fleet.trainer.evaluate(g, fleet.x_test, fleet.y_test)
        before_asr = fleet.adversary.round_metrics(fleet.trainer, g).get("attack_success_rate")
        out["rounds"][t] = {
            "run": {
                "accuracy": replayed[t]["test_accuracy"],
                "asr": replayed[t].get("attack_success_rate"),
            },
            "before": {"accuracy": float(before_acc), "asr": before_asr},
            "groups": per_group,
            "variants": outcomes,
        }
    return out


def render(result: dict[str, Any], command: str) -> str:
    """The analysis as Markdown."""
    lines = [
        "# Residual-based reweighting under label flipping, one round at a time",
        "",
        f"Command: `{command}` (replays `{result['cell']}`, one core; figures from this machine).",
        "",
        "Groups: " + ", ".join(f"{g} ({n} boards)" for g, n in result["groups"].items()) + ".",
        "",
    ]
    for t, entry in result["rounds"].items():
        groups = entry["groups"]
        parts = [k for k in next(iter(groups.values())) if k.startswith("replaced ")]
        lines += [
            f"## Round {t}",
            "",
            f"Global model before the round: {100 * entry['before']['accuracy']:.2f}% accuracy, "
            f"ASR {100 * (entry['before']['asr'] or 0):.1f}%.",
            "",
            "| group | weight × K | mean confidence | "
            + " | ".join(p.replace("replaced ", "replaced: ") for p in parts)
            + " |",
            "|---|---|---|" + "---|" * len(parts),
        ]
        for name, row in groups.items():
            cells = " | ".join(f"{100 * row[p]:.1f}%" for p in parts)
            lines.append(
                f"| {name} | {row['weight_x_k']:.3f} | {row['mean_confidence']:.3f} | {cells} |"
            )
        lines += ["", "| the same updates aggregated by | accuracy | ASR |", "|---|---|---|"]
        for label, row in entry["variants"].items():
            asr = "" if row["asr"] is None else f"{100 * row['asr']:.1f}%"
            lines.append(f"| {label} | {100 * row['accuracy']:.2f}% | {asr} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="siren bench residual-anatomy", description=help_description(__doc__)
    )
    parser.add_argument("--cell", type=Path, default=CELL, help="a finished cell's folder")
    parser.add_argument(
        "--rounds", default="1,10,30", help="comma-separated rounds to take apart (default 1,10,30)"
    )
    parser.add_argument("--out", type=Path, help="write the Markdown here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        rounds = sorted({int(r) for r in args.rounds.split(",") if r.strip()})
    except ValueError:
        parser.error(f"--rounds must be comma-separated round numbers, got {args.rounds!r}")
    if not rounds or rounds[0] < 1:
        parser.error("--rounds needs round numbers from 1 on")
    if not (args.cell / "history.json").is_file():
        parser.error(f"{args.cell} holds no finished cell (history.json)")
    result = analyse(args.cell, rounds)
    command = "siren bench residual-anatomy " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    text = render(result, command.strip())
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
