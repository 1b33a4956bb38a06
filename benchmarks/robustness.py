"""Robustness grid: aggregator x attack x malicious fraction x data distribution.

``siren bench robustness``: every cell is one ``siren sim run`` in a subprocess writing
``<results>/<preset>/<cell>/history.json``.
A finished cell is never run again, so an interrupted grid resumes where it stopped. After the
cells, a Markdown table like the SIREN paper's (final accuracy; attack success rate and
misclassification confidence for the targeted attack; the paper's reported number where it gives
one) and accuracy-per-round plots are written next to them.

Presets (SIREN Table 2 settings):

* ``paper`` — Fashion-MNIST, SIREN CNN, K=10, T=40, E=5, B=64, IID and non-IID p=0.5;
* ``quick`` — the same grid with E=1, T=10 and a quarter of the training data;
* ``k50``   — 50 boards (SIREN's scalability setting), otherwise ``paper``;
* ``smoke`` — digits, 5 boards, 2 rounds: checks the runner in seconds;
* ``dspo``  — DSPO's own Table 2 setting: Fashion-MNIST, its 256-unit MLP, k=20, 100 rounds,
  E=2, B=64, SGD at 0.2, untargeted random label flipping by 8 of 20 boards, data split with
  p=0.1 and p=0.9 (distributions ``noniid-p0.1`` / ``noniid-p0.9``), beside DSPO's numbers;
* ``pdrr``  — PDRR's setting: k=50, 20 compromised, partial-knowledge Fang attacks, each rule
  against its own attack, 100 rounds, with the detection rates PDRR reports (FAR / MAR).

``siren`` and ``siren_no_wa`` run SIREN's default profile, ``authors``
(:mod:`protocol.siren_profiles`), named explicitly on every cell's command line. Besides the
default defenses, ``siren_paper_text`` and ``siren_paper_text_no_wa`` run the profile
``paper-text`` (Alg. 1 / Table 2 as printed), and ``siren_relative`` the printed server
thresholds with the authors' relative alarm rule (``--defenses siren_paper_text,...``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "dataset": "fashion-mnist",
        "model": "siren-cnn",
        "clients": 10,
        "rounds": 40,
        "local_epochs": 5,
        "batch_size": 64,
    },
    "quick": {
        "dataset": "fashion-mnist",
        "model": "siren-cnn",
        "clients": 10,
        "rounds": 10,
        "local_epochs": 1,
        "batch_size": 64,
        "train_samples": 15000,
    },
    # A seconds-long grid on the bundled digits, for checking the runner itself.
    "smoke": {"dataset": "digits", "clients": 5, "rounds": 2, "local_epochs": 1, "batch_size": 32},
    "k50": {
        "dataset": "fashion-mnist",
        "model": "siren-cnn",
        "clients": 50,
        "rounds": 40,
        "local_epochs": 5,
        "batch_size": 64,
    },
    # DSPO's Table 2 (Fashion-MNIST): k=20, MLP with 256 hidden units, e=2, b=64, plain SGD at
    # 0.2, 100 rounds, untargeted random label flipping, data split by Fang's grouping with
    # p=0.1 (which the paper calls closest to IID) and p=0.9.
    "dspo": {
        "dataset": "fashion-mnist",
        "model": "dspo-mlp",
        "clients": 20,
        "rounds": 100,
        "local_epochs": 2,
        "batch_size": 64,
        "optimizer": "sgd",
        "learning_rate": 0.2,
    },
    # PDRR §5.1: k=50 with c=20 compromised (40%), partial-knowledge Fang attacks (Krum: lambda
    # search down to 1e-9, others within 1e-7), trimmed mean with 2*beta = 20, detection measured
    # at rounds 1, 20, 50 and 100. Stand-ins for what this machine lacks: Fashion-MNIST for
    # FEMNIST (split non-IID with p=0.5 for LEAF's writers) and the SIREN CNN for PDRR's CNN;
    # the paper states no local epochs or batch size (one epoch of 64 here).
    "pdrr": {
        "dataset": "fashion-mnist",
        "model": "siren-cnn",
        "clients": 50,
        "rounds": 100,
        "local_epochs": 1,
        "batch_size": 64,
        "attack_params": {
            "fang_krum": {"knowledge": "partial", "epsilon": 1e-7, "lambda_min": 1e-9},
            "fang_trim": {"knowledge": "partial"},
        },
        "agg_params": {"trimmed_mean": {"beta": 10}, "pdrr_trimmed_mean": {"beta": 10}},
        "detection_rounds": (1, 20, 50, 100),
    },
    # Residual-based reweighting §4.4 / Table 4 and A.3: 100 participants of two classes each
    # (300 images of each), 10 of them corrupted by multiplicative Gaussian noise, the paper's
    # small MNIST CNN (Table 5), SGD at 0.01 with batches of 128, 5 local epochs, 200 rounds,
    # delta = 0.01 for non-IID data. Fashion-MNIST stands in for MNIST.
    "residual": {
        "dataset": "fashion-mnist",
        "model": "rr-cnn",
        "clients": 100,
        "rounds": 200,
        "local_epochs": 5,
        "batch_size": 128,
        "optimizer": "sgd",
        "learning_rate": 0.01,
        "agg_params": {
            "residual_reweighting": {"delta": 0.01},
            "residual_reweighting_authors": {"delta": 0.01},
        },
    },
}
#: The cells a preset runs when ``--defenses``, ``--attacks``, ``--fractions`` or
#: ``--distributions`` is not given (every other preset: the default grid).
PRESET_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "dspo": {
        "defenses": ("fedavg", "krum", "median", "trimmed_mean", "dspo_score", "dspo_vote"),
        "attacks": ("random_label_flip",),
        "fractions": (0.4,),
        "distributions": ("noniid-p0.1", "noniid-p0.9"),
    },
    "residual": {
        "defenses": ("residual_reweighting", "fedavg", "median", "trimmed_mean", "foolsgold"),
        "attacks": ("gaussian_std1", "gaussian_std2", "gaussian_std3"),
        "fractions": (0.1,),
        "distributions": ("classes2",),
    },
    "pdrr": {
        "defenses": ("pdrr_krum", "krum", "pdrr_trimmed_mean", "pdrr_trimmed_mean_q0.5",
                     "trimmed_mean", "pdrr_median", "median"),
        "attacks": ("fang_krum", "fang_trim"),
        "fractions": (0.4,),
        "distributions": ("noniid",),
        # Each rule against the attack made for it (Fang's trimmed-mean attack is also PDRR's
        # median attack, §3.3).
        "pairs": (("pdrr_krum", "fang_krum"), ("krum", "fang_krum"),
                  ("pdrr_trimmed_mean", "fang_trim"), ("pdrr_trimmed_mean_q0.5", "fang_trim"),
                  ("trimmed_mean", "fang_trim"),
                  ("pdrr_median", "fang_trim"), ("median", "fang_trim")),
    },
}  # fmt: skip

#: label -> (strategy name, extra aggregator parameters)
DEFENSES: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "krum": ("krum", {}),
    "median": ("median", {}),
    "trimmed_mean": ("trimmed_mean", {}),
    "fltrust": ("fltrust", {}),
    "residual_reweighting": ("residual_reweighting", {}),
    "dspo_vote": ("dspo_vote", {}),
    "pdrr_krum": ("pdrr_krum", {}),
    "pdrr_trimmed_mean": ("pdrr_trimmed_mean", {}),
    "pdrr_median": ("pdrr_median", {}),
    "siren": ("siren", {}),
    "siren_no_wa": ("siren", {"weight_analysis": False}),
}
#: Defenses outside the default grid (``--defenses`` names them): SIREN as printed (profile
#: ``paper-text``), with and without weight analysis, and the printed server thresholds with the
#: relative alarm rule of the authors' public code; residual reweighting as in its authors'
#: released code, with only that code's squared weights, and with the extreme-value correction
#: at the paper's near-IID delta = 0.1 or switched off (delta = 0); PDRR with the safeguard
#: that keeps the pre-aggregate when more boards are flagged than the rule's budget
#: (``fallback=True``);
#: geometric median, FoolsGold and DSPO's score policy (measured under ``huge_values``).
OPTIONAL_DEFENSES: dict[str, tuple[str, dict[str, Any]]] = {
    "geometric_median": ("geometric_median", {}),
    "foolsgold": ("foolsgold", {}),
    "dspo_score": ("dspo_score", {}),
    "siren_paper_text": ("siren", {}),
    "siren_paper_text_no_wa": ("siren", {"weight_analysis": False}),
    "siren_relative": ("siren", {}),
    "residual_reweighting_authors": ("residual_reweighting", {"variant": "authors"}),
    "residual_reweighting_squared": ("residual_reweighting", {"square_weights": True}),
    "residual_reweighting_delta0.1": ("residual_reweighting", {"delta": 0.1}),
    "residual_reweighting_delta0": ("residual_reweighting", {"delta": 0.0}),
    "pdrr_krum_fallback": ("pdrr_krum", {"fallback": True}),
    "pdrr_trimmed_mean_q0.5": ("pdrr_trimmed_mean", {"q": 0.5}),
    "pdrr_trimmed_mean_fallback": ("pdrr_trimmed_mean", {"fallback": True}),
    "pdrr_trimmed_mean_fallback_q0.5": ("pdrr_trimmed_mean", {"fallback": True, "q": 0.5}),
    "pdrr_median_fallback": ("pdrr_median", {"fallback": True}),
}
#: Extra ``siren sim run`` options of a defense. Every SIREN cell names its profile, so that a
#: finished cell keeps meaning what it ran if the default profile changes.
DEFENSE_SIM_ARGS: dict[str, list[str]] = {
    "siren": ["--siren-profile", "authors"],
    "siren_no_wa": ["--siren-profile", "authors"],
    "siren_paper_text": ["--siren-profile", "paper-text"],
    "siren_paper_text_no_wa": ["--siren-profile", "paper-text"],
    "siren_relative": ["--siren-profile", "paper-text", "--alarm-rule", "relative"],
}
ALL_DEFENSES = {**DEFENSES, **OPTIONAL_DEFENSES}
#: Defenses whose paper number is another defense's: every SIREN variant stands next to the
#: paper's SIREN numbers.
PAPER_ALIASES = {
    "siren_paper_text": "siren",
    "siren_paper_text_no_wa": "siren_no_wa",
    "siren_relative": "siren",
}
#: Rules that select with Krum's scores (their ``f`` is the one Fang's Krum attack simulates).
KRUM_RULES = frozenset({"krum", "multi_krum", "bulyan", "pdrr_krum"})
ATTACKS = ("sign_flip", "label_flip", "targeted_poison", "fang_trim", "fang_krum", "huge_values")
FRACTIONS = (0.4, 0.8)
#: Attack labels that stand for an attack with fixed parameters: label -> (attack, parameters).
ATTACK_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{
        f"gaussian_std{std}": ("gaussian_noise", {"mode": "multiplicative", "std": float(std)})
        for std in (1, 2, 3)
    },
    # Residual-based reweighting §4.2: the attackers hold class 1 (and another), train it as
    # class 7, and train 5 epochs more than the honest boards.
    "label_flip_1to7": (
        "targeted_label_flip",
        {"source": 1, "target": 7, "holding_class": 1, "extra_epochs": 5},
    ),
}
#: Attacks run at their own malicious fractions whatever ``--fractions`` says: one board of ten
#: with a stolen key sending huge finite values (the threat the global-model guard answers).
ATTACK_FRACTIONS: dict[str, tuple[float, ...]] = {"huge_values": (0.1,)}
#: Threads of every cell (TensorFlow's intra- and inter-op pools, OpenMP): results are bit for bit
#: reproducible only at a fixed thread count, and one thread per cell is what ``--jobs`` can keep.
CELL_THREADS = 1
CELL_THREAD_ENV = {
    "TF_NUM_INTRAOP_THREADS": str(CELL_THREADS),
    "TF_NUM_INTEROP_THREADS": str(CELL_THREADS),
    "OMP_NUM_THREADS": str(CELL_THREADS),
}
DISTRIBUTIONS = ("iid", "noniid")

#: SIREN paper §5 (K=10): (defense, attack, malicious %, distribution) -> accuracy in %.
SIREN_NUMBERS: dict[tuple[str, str, int, str], float] = {
    ("fedavg", "none", 0, "iid"): 91.46,
    ("siren", "sign_flip", 40, "iid"): 90.94,
    ("siren", "label_flip", 40, "iid"): 90.64,
    ("krum", "sign_flip", 40, "iid"): 88.18,
    ("krum", "label_flip", 40, "iid"): 87.81,
    ("median", "sign_flip", 40, "iid"): 68.8,
    ("median", "label_flip", 40, "iid"): 79.09,
    ("fedavg", "none", 0, "noniid"): 90.53,
    ("siren", "sign_flip", 40, "noniid"): 88.88,
    ("siren", "label_flip", 40, "noniid"): 89.89,
    ("krum", "sign_flip", 40, "noniid"): 84.66,
    ("krum", "label_flip", 40, "noniid"): 85.14,
}
#: DSPO Table 2 (Fashion-MNIST, k=20; m = 2, 4, 8 adversaries are 10%, 20%, 40%; the mean of
#: three runs), untargeted label flipping.
_DSPO_ROWS = {
    # defense: (p=0.1: m=0, 2, 4, 8), (p=0.9: m=0, 2, 4, 8)
    "fedavg": ((89.43, 88.92, 87.73, 81.73), (86.00, 84.94, 84.70, 81.00)),
    "krum": ((83.40, 84.56, 84.77, 16.48), (74.98, 75.59, 12.66, 16.52)),
    "median": ((89.33, 89.09, 88.44, 85.49), (86.35, 85.34, 85.25, 82.48)),
    "trimmed_mean": ((89.33, 89.22, 88.21, 83.03), (85.57, 85.60, 85.04, 83.12)),
    "dspo_score": ((88.86, 88.69, 88.60, 87.18), (85.54, 84.94, 84.52, 83.63)),
    "dspo_vote": ((88.71, 88.76, 88.57, 87.98), (85.43, 83.65, 83.96, 82.69)),
}
DSPO_NUMBERS: dict[tuple[str, str, int, str], float] = {
    (defense, "none" if pct == 0 else "random_label_flip", pct, dist): value
    for defense, rows in _DSPO_ROWS.items()
    for dist, row in zip(("noniid-p0.1", "noniid-p0.9"), rows, strict=True)
    for pct, value in zip((0, 10, 20, 40), row, strict=True)
}
#: Residual-based reweighting Table 4 (MNIST, 100 participants, 10 corrupted by multiplicative
#: Gaussian noise of standard deviation 0%, 100%, 200%, 300%; the mean of three runs).
_RESIDUAL_ROWS = {
    "fedavg": (93.17, 78.80, 53.74, 9.26),
    "median": (73.92, 64.35, 71.54, 63.24),
    "trimmed_mean": (87.59, 74.87, 73.76, 75.74),
    "foolsgold": (86.72, 90.31, 86.96, 89.94),
    "residual_reweighting": (90.06, 90.91, 89.06, 92.28),
}
RESIDUAL_NUMBERS: dict[tuple[str, str, int, str], float] = {
    (defense, attack, pct, "classes2"): value
    for defense, row in _RESIDUAL_ROWS.items()
    for (attack, pct), value in zip(
        (("none", 0), ("gaussian_std1", 10), ("gaussian_std2", 10), ("gaussian_std3", 10)),
        row,
        strict=True,
    )
}
#: Each preset's paper numbers and what the table's 'paper' column means.
PAPER_TABLES: dict[str, tuple[dict[tuple[str, str, int, str], float], str]] = {
    "paper": (SIREN_NUMBERS, "the SIREN paper's reported accuracy for that cell (K=10, T=40)"),
    "quick": (
        SIREN_NUMBERS,
        "the SIREN paper's accuracy at T=40, E=5 (this preset trains far less: compare the "
        "defenses with each other)",
    ),
    "dspo": (DSPO_NUMBERS, "DSPO's Table 2 (Fashion-MNIST, k=20, mean of three runs)"),
    "residual": (
        RESIDUAL_NUMBERS,
        "residual-based reweighting's Table 4 on MNIST (Fashion-MNIST here, a harder dataset: "
        "compare the defenses with each other), mean of three runs; its 0% column, 10 boards "
        "with noise of standard deviation 0, is the no-attack row",
    ),
    "pdrr": (
        {},
        "none: PDRR reports detection, not accuracy (FAR 0 and MAR 0 at rounds 1, 20, 50 and "
        "100 against the Krum and trimmed-mean attacks, its Tables 1-2)",
    ),
}


@dataclass(frozen=True)
class Cell:
    """One grid cell."""

    defense: str
    attack: str
    fraction: float
    distribution: str

    @property
    def key(self) -> str:
        """Directory name of the cell."""
        return f"{self.defense}__{self.attack}__{round(100 * self.fraction)}__{self.distribution}"

    def byzantine_count(self, clients: int) -> int:
        """Number of malicious boards."""
        return round(self.fraction * clients)


def finished_cells(root: Path) -> list[Cell]:
    """The cells of a preset's folder that have finished (their ``history.json`` exists)."""
    found: list[Cell] = []
    if not root.is_dir():
        return found
    for folder in sorted(root.iterdir()):
        parts = folder.name.split("__")
        if len(parts) != 4 or not parts[2].isdigit() or parts[0] not in ALL_DEFENSES:
            continue
        if load_history(folder) is not None:
            found.append(Cell(parts[0], parts[1], int(parts[2]) / 100, parts[3]))
    return found


def with_finished(cells: Sequence[Cell], root: Path) -> list[Cell]:
    """``cells`` and every other finished cell of ``root``, in grid order: the summary of a run
    of a few cells still lists what earlier runs in the same folder finished."""
    extra = [c for c in finished_cells(root) if c not in cells]
    if not extra:
        return list(cells)
    every = [*cells, *extra]

    def axis(values: Iterable[Any]) -> list[Any]:
        return list(dict.fromkeys(values))

    order = grid(
        axis(c.defense for c in every),
        axis(c.attack for c in every if c.attack != "none"),
        axis(c.fraction for c in every if c.attack != "none" and c.attack not in ATTACK_FRACTIONS),
        axis(c.distribution for c in every),
    )
    wanted = set(every)
    ordered = [c for c in order if c in wanted]
    placed = set(ordered)
    return ordered + [c for c in every if c not in placed]


def grid(
    defenses: Sequence[str],
    attacks: Sequence[str],
    fractions: Sequence[float],
    distributions: Sequence[str],
) -> list[Cell]:
    """All cells: one no-attack baseline per defense and distribution, then every attack cell
    (attacks of :data:`ATTACK_FRACTIONS` at their own fractions), each cell once (``--attacks
    none`` names the baselines again)."""
    cells = [Cell(d, "none", 0.0, dist) for dist in distributions for d in defenses]
    cells += [
        Cell(d, a, f, dist)
        for dist in distributions
        for f in fractions
        for a in attacks
        if a not in ATTACK_FRACTIONS
        for d in defenses
    ]
    cells += [
        Cell(d, a, f, dist)
        for dist in distributions
        for a in attacks
        if a in ATTACK_FRACTIONS
        for f in ATTACK_FRACTIONS[a]
        for d in defenses
    ]
    return list(dict.fromkeys(cells))


def aggregator_params(cell: Cell, clients: int) -> dict[str, Any] | None:
    """Parameters for the cell's rule, or None when the rule cannot run at all.

    Rules that need the number of Byzantine boards get ``f`` = the number of malicious boards
    (the defender is told the true count, as in the papers' comparisons). When the rule's bound
    fails for that ``f`` (Krum needs K >= 2f + 3, so K=10 tolerates f <= 3), the defender gets the
    largest ``f`` the rule accepts instead, as the papers do when they report Krum at 40% of ten
    boards; :func:`defender_budget` tells the table so. Only a rule that fails even at ``f`` = 0
    is not applicable.
    """
    from coordinator.aggregators import get_rule

    name, extra = ALL_DEFENSES[cell.defense]
    if name == "siren":
        return dict(extra)
    spec = get_rule(name)
    for f in range(cell.byzantine_count(clients), -1, -1):
        params = dict(extra)
        if "f" in spec.params:
            params["f"] = f
        if "beta" in spec.params and name in ("trimmed_mean", "pdrr_trimmed_mean"):
            params["beta"] = max(f, 1)
        accepted = _probe(name, params, clients)
        if accepted is not None:
            return accepted
    return None


def _probe(name: str, params: dict[str, Any], clients: int) -> dict[str, Any] | None:
    """``params`` if the rule runs with them on ``clients`` updates, else None."""
    import numpy as np

    from coordinator.aggregators import aggregate, get_rule
    from coordinator.errors import ByzantineBoundError

    probe_params = dict(params)
    if "server_update" in get_rule(name).params:
        probe_params["server_update"] = np.ones(4, dtype=np.float32)
    try:
        aggregate(name, np.random.default_rng(0).random((clients, 4)), **probe_params)
    except ByzantineBoundError:
        return None
    except (ValueError, KeyError):
        # Parameters the rule spells differently: let it run with its defaults.
        return {k: v for k, v in params.items() if k != "beta"}
    return params


def defender_budget(cell: Cell, clients: int) -> int | None:
    """The Byzantine count the cell's rule was given, when lower than the true count."""
    params = aggregator_params(cell, clients)
    if not params:
        return None
    given = params.get("f", params.get("beta"))
    true_f = cell.byzantine_count(clients)
    if given is None or cell.attack == "none" or given >= true_f:
        return None
    return int(given)


def cell_command(cell: Cell, preset: dict[str, Any], out: Path, seed: int) -> list[str] | None:
    """The ``siren sim run`` command of a cell (None if the rule cannot run at all)."""
    params = aggregator_params(cell, preset["clients"])
    if params is None:
        return None
    params.update(preset.get("agg_params", {}).get(cell.defense, {}))
    name, _ = ALL_DEFENSES[cell.defense]
    partition, noniid_p = parse_distribution(cell.distribution)
    classes = None
    if partition.startswith("classes"):
        partition, classes = "classes", int(partition.removeprefix("classes"))
    cmd = [
        sys.executable,
        "-m",
        "siren_cli.main",
        "sim",
        "run",
        "--aggregator",
        name,
        "--partition",
        partition,
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    if noniid_p is not None:
        cmd += ["--noniid-p", str(noniid_p)]
    for key in (
        "dataset",
        "model",
        "clients",
        "rounds",
        "local_epochs",
        "batch_size",
        "train_samples",
        "optimizer",
        "learning_rate",
    ):
        if key in preset:
            cmd += [f"--{key.replace('_', '-')}", str(preset[key])]
    for key, value in params.items():
        cmd += ["--agg-param", f"{key}={value!r}"]
    cmd += DEFENSE_SIM_ARGS.get(cell.defense, [])
    if classes is not None:
        cmd += ["--classes-per-board", str(classes)]
    if cell.attack != "none":
        attack, fixed = ATTACK_VARIANTS.get(cell.attack, (cell.attack, {}))
        cmd += ["--attack", attack, "--malicious", str(cell.fraction)]
        chosen = {**fixed, **preset.get("attack_params", {}).get(cell.attack, {})}
        chosen.update(attack_knowledge(cell, params))
        for key, value in chosen.items():
            cmd += ["--attack-param", f"{key}={value}"]
    return cmd


def parse_distribution(name: str) -> tuple[str, float | None]:
    """``(partition, p)`` of a distribution name: ``iid``, ``noniid`` (SIREN's p = 0.5, the
    simulator's default), ``noniid-pP`` (the same grouping with p = P, e.g. ``noniid-p0.9``) or
    ``classesC`` (every board holds C classes, e.g. ``classes2``; returned as ``("classes2",
    None)``).

    Raises
    ------
    ValueError
        For any other name, or a p outside [0, 1].
    """
    if name in ("iid", "noniid"):
        return name, None
    count = name.removeprefix("classes")
    if name.startswith("classes") and count.isdigit() and int(count) >= 1:
        return name, None
    if name.startswith("noniid-p"):
        try:
            p = float(name.removeprefix("noniid-p"))
        except ValueError:
            p = -1.0
        if 0.0 <= p <= 1.0:
            return "noniid", p
    raise ValueError(
        f"unknown distribution {name!r}: use iid, noniid, noniid-pP with P in [0, 1] or "
        "classesC with C >= 1"
    )


def attack_knowledge(cell: Cell, params: dict[str, Any]) -> dict[str, Any]:
    """Attack parameters that a full-knowledge attacker takes from the defender's rule.

    Fang et al.'s attack on Krum simulates Krum to find its largest ``lambda``; with full
    knowledge it runs Krum with the ``f`` the server uses. Without this it would assume ``f`` =
    the number of malicious boards, which differs whenever the defender's ``f`` is capped (Krum
    with ten boards runs with f <= 3 against four attackers): the crafted update is then tuned
    for a neighbour count the server does not use and is never selected.
    """
    name, _ = ALL_DEFENSES[cell.defense]
    if cell.attack == "fang_krum" and name in KRUM_RULES and "f" in params:
        return {"krum_f": int(params["f"])}
    return {}


def run_cell(
    cell: Cell,
    preset: dict[str, Any],
    root: Path,
    seed: int,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    """Run a cell unless its history exists; return its status row.

    ``cpus`` pins the cell's process to those cores (TensorFlow then sizes its thread pools to
    them), so that parallel cells do not fight over the same cores.
    """
    out = root / cell.key
    if load_history(out) is not None:
        return {"cell": cell, "status": "done", "dir": out}
    # A run stopped by Ctrl-C keeps its finished rounds: not a finished cell, run it again.
    for name in ("history.json", "accuracy.png", "malicious_index.png"):
        (out / name).unlink(missing_ok=True)
    if (out / "not_applicable").exists():
        return {"cell": cell, "status": "n/a", "dir": out}
    cmd = cell_command(cell, preset, out, seed)
    out.mkdir(parents=True, exist_ok=True)
    if cmd is None:
        (out / "not_applicable").write_text("the rule's Byzantine bound fails even for f=0\n")
        return {"cell": cell, "status": "n/a", "dir": out}
    started = time.perf_counter()
    env = {**os.environ, **CELL_THREAD_ENV}
    # The output folder is recorded relative to the results root (``{results}``), so the file
    # names no folder of the machine that ran it.
    recorded = [f"{{results}}/{root.name}/{cell.key}" if a == str(out) else a for a in cmd[1:]]
    (out / "cell.json").write_text(
        json.dumps(
            {"command": recorded, "cpus": sorted(cpus) if cpus else None, "threads": CELL_THREADS},
            indent=1,
        )
        + "\n"
    )
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if cpus:
            # Before the child has imported anything, so every thread it starts inherits it.
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, cpus)
        returncode = proc.wait()
    seconds = time.perf_counter() - started
    status = "done" if returncode == 0 and load_history(out) is not None else "failed"
    (out / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return {"cell": cell, "status": status, "dir": out, "seconds": seconds}


def core_groups(jobs: int) -> list[set[int] | None]:
    """One core per job, from the cores this process may use (None: no pinning possible).

    Every cell runs on exactly one core, whatever ``jobs`` is: TensorFlow's reductions depend on
    its thread count (a cell on two cores drifts by about a point from the same cell on one), so
    a cell's result must not depend on how many cells ran beside it.
    """
    if not hasattr(os, "sched_getaffinity"):
        return [None] * max(jobs, 1)
    cores = sorted(os.sched_getaffinity(0))
    return [{cores[i % len(cores)]} for i in range(max(jobs, 1))]


def run_cells(
    cells: list[Cell], preset: dict[str, Any], root: Path, seed: int, jobs: int
) -> list[dict[str, Any]]:
    """Run every unfinished cell, ``jobs`` at a time, printing one line per finished cell."""
    free: queue.Queue[set[int] | None] = queue.Queue()
    for group in core_groups(jobs):
        free.put(group)
    done = 0
    lock = threading.Lock()

    def work(cell: Cell) -> dict[str, Any]:
        nonlocal done
        cpus = free.get()
        try:
            row = run_cell(cell, preset, root, seed, cpus)
        finally:
            free.put(cpus)
        hist = load_history(row["dir"])
        acc = f"{100 * hist['summary']['final_test_accuracy']:.2f}%" if hist else ""
        took = f" in {row['seconds'] / 60:.1f} min" if "seconds" in row else ""
        with lock:
            done += 1
            print(f"[{done}/{len(cells)}] {cell.key}: {row['status']} {acc}{took}", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return list(pool.map(work, cells))


def load_history(cell_dir: Path) -> dict[str, Any] | None:
    """A finished cell's history, if any (a run interrupted by Ctrl-C is not finished)."""
    path = cell_dir / "history.json"
    if not path.exists():
        return None
    history: dict[str, Any] = json.loads(path.read_text())
    return None if history.get("summary", {}).get("interrupted") else history


def cell_bans(hist: dict[str, Any]) -> dict[str, Any] | None:
    """The run's ban outcome (:func:`firmware_sim.report.ban_outcome`), from its summary or, for
    histories written before summaries carried it, from its rounds."""
    from firmware_sim.report import ban_outcome

    summary = hist.get("summary", {})
    if "bans" in summary:
        return summary["bans"]  # type: ignore[no-any-return]
    malicious = summary.get("malicious_ids", hist.get("fleet", {}).get("malicious_ids"))
    return ban_outcome(hist.get("rounds", []), malicious)


def _ban_columns(bans: dict[str, Any] | None) -> tuple[str, str]:
    """``honest banned`` and ``attackers missed`` cells (empty for rules that never ban)."""
    if bans is None or "honest_banned" not in bans:
        return "", ""
    honest = bans["honest_banned"]
    missed = bans["attackers_missed"]
    attackers = len(missed) + len(bans["banned"]) - len(honest)
    honest_s = f"{len(honest)}" + (f" ({', '.join(map(str, honest))})" if honest else "")
    missed_s = f"{len(missed)} of {attackers}" + (
        f" ({', '.join(map(str, missed))})" if missed else ""
    )
    return honest_s, missed_s


def detection_rates(hist: dict[str, Any], rounds: Sequence[int]) -> str:
    """``FAR/MAR`` at each of ``rounds`` (``r1 0.00/0.00, ...``) from the boards a rule flagged
    (``decision["flagged"]``); ``-`` for a round the run did not reach or that flagged nothing
    on record. Empty when the run does not know its attackers."""
    summary = hist.get("summary", {})
    malicious = summary.get("malicious_ids", hist.get("fleet", {}).get("malicious_ids"))
    if malicious is None:
        return ""
    attackers = {int(m) for m in malicious}
    by_round = {r.get("round"): r for r in hist.get("rounds", [])}
    out = []
    for t in rounds:
        record = by_round.get(t)
        decision = (record or {}).get("decision") or {}
        if record is None or "flagged" not in decision:
            out.append(f"r{t} -")
            continue
        flagged = {int(c) for c in decision["flagged"]}
        boards = {int(c) for c in record.get("verdicts", {})} or flagged | attackers
        honest = boards - attackers
        far = len(flagged & honest) / len(honest) if honest else 0.0
        mar = len(attackers - flagged) / len(attackers) if attackers else 0.0
        out.append(f"r{t} {far:.2f}/{mar:.2f}")
    return ", ".join(out)


#: Rounds at the end of a run whose accuracy range the tables show.
TAIL_ROUNDS = 10


def tail_range(hist: dict[str, Any], rounds: int = TAIL_ROUNDS) -> str:
    """``"min–max%, mean m%"`` of the test accuracy over a run's last ``rounds`` evaluated
    rounds, in percent; empty when no round was evaluated. The mean tells where a run that
    oscillates between rounds sits, whichever round it happens to stop at."""
    accs = [r["test_accuracy"] for r in hist["rounds"] if r.get("test_accuracy") is not None]
    tail = accs[-rounds:]
    if not tail:
        return ""
    mean = sum(tail) / len(tail)
    return f"{100 * min(tail):.1f}–{100 * max(tail):.1f}%, mean {100 * mean:.1f}%"


def shown_command(argv: Sequence[str]) -> list[str]:
    """The arguments of a run as its README quotes them: those that choose the cells, without
    ``--summary-only`` and the machine's own ``--results`` folder and ``--jobs`` count."""
    shown: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--summary-only" or a.startswith(("--results=", "--jobs=")):
            continue
        if a in ("--results", "--jobs"):
            skip = True
            continue
        shown.append(a)
    return shown


def summarize(
    cells: list[Cell],
    root: Path,
    clients: int,
    paper_numbers: dict[tuple[str, str, int, str], float] | None = None,
    detection_rounds: Sequence[int] = (),
) -> str:
    """Markdown table of every cell's outcome.

    A defense given fewer Byzantine boards than there are (its bound caps ``f``) reads
    ``krum (f=3)``. For rules that ban boards (SIREN), ``honest banned`` counts the honest boards
    banned after the last round (their ids in brackets) and ``attackers missed`` the malicious
    boards still admitted then, of all malicious boards. ``last rounds`` is the range of the
    test accuracy over the last :data:`TAIL_ROUNDS` rounds: a wide range marks a run that
    oscillates, whose final accuracy depends on the round it stops at. With
    ``detection_rounds``, a ``FAR / MAR`` column gives, at each of those rounds, the false alarm
    rate (honest boards flagged, of all honest boards) and the missing alarm rate (attackers not
    flagged, of all attackers) of a rule that flags boards (PDRR).
    """
    detection = (
        f" FAR / MAR at rounds {', '.join(map(str, detection_rounds))} |"
        if detection_rounds
        else ""
    )
    lines = [
        "| distribution | attack | malicious | defense | final acc. | best acc. | "
        f"last {TAIL_ROUNDS} rounds | ASR | miscl. conf. | honest banned | attackers missed |"
        f"{detection} paper | difference | wall time |",
        "|" + "---|" * (14 + bool(detection_rounds)),
    ]
    for cell in cells:
        d = root / cell.key
        hist = load_history(d)
        budget = defender_budget(cell, clients)
        defense = cell.defense if budget is None else f"{cell.defense} (f={budget})"
        paper = (paper_numbers or {}).get(
            (
                PAPER_ALIASES.get(cell.defense, cell.defense),
                cell.attack,
                round(100 * cell.fraction),
                cell.distribution,
            )
        )
        paper_s = f"{paper:.2f}%" if paper is not None else ""
        if hist is None:
            state = "n/a" if (d / "not_applicable").exists() else "not run"
            lines.append(
                f"| {cell.distribution} | {cell.attack} | {int(100 * cell.fraction)}% | "
                f"{defense} | {state} | | | | | | |{' |' if detection_rounds else ''} "
                f"{paper_s} | | |"
            )
            continue
        last = hist["rounds"][-1]
        asr = last.get("attack_success_rate")
        conf = last.get("misclassification_confidence")
        wall = hist["summary"].get("wall_seconds", 0.0)
        honest, missed = _ban_columns(cell_bans(hist))
        final = 100 * hist["summary"]["final_test_accuracy"]
        diff = f"{final - paper:+.2f}" if paper_s and paper is not None else ""
        lines.append(
            f"| {cell.distribution} | {cell.attack} | {int(100 * cell.fraction)}% | "
            f"{defense} | {100 * hist['summary']['final_test_accuracy']:.2f}% | "
            f"{100 * hist['summary']['best_test_accuracy']:.2f}% | {tail_range(hist)} | "
            f"{'' if asr is None else f'{100 * asr:.1f}%'} | "
            f"{'' if conf is None else f'{conf:.3f}'} | {honest} | {missed} | "
            + (f"{detection_rates(hist, detection_rounds)} | " if detection_rounds else "")
            + f"{paper_s} | "
            f"{diff} | {wall / 60:.1f} min |"
        )
    return "\n".join(lines)


def overview(cells: list[Cell], root: Path) -> str:
    """Markdown table: per defense, the no-attack accuracy and the worst attacked accuracy.

    One column per distribution and malicious fraction; an attacked entry is the lowest final
    accuracy over the attacks that finished, with that attack's name (``n`` of ``m`` attacks
    finished is noted when some are missing). Empty when no attacked cell has finished.
    """
    dists = list(dict.fromkeys(cell.distribution for cell in cells))
    columns = sorted(
        {(cell.distribution, cell.fraction) for cell in cells},
        key=lambda col: (dists.index(col[0]), col[1]),
    )
    defenses = list(dict.fromkeys(cell.defense for cell in cells))
    entries: dict[tuple[str, str, float], list[tuple[float, str]]] = {}
    expected: dict[tuple[str, str, float], int] = {}
    for cell in cells:
        key = (cell.defense, cell.distribution, cell.fraction)
        expected[key] = expected.get(key, 0) + 1
        hist = load_history(root / cell.key)
        if hist is not None:
            acc = 100 * float(hist["summary"]["final_test_accuracy"])
            entries.setdefault(key, []).append((acc, cell.attack))
    if not any(frac > 0 for _, _, frac in entries):
        return ""

    def title(dist: str, frac: float) -> str:
        return f"{dist}, no attack" if frac == 0 else f"{dist}, {round(100 * frac)}%: worst"

    lines = [
        "| defense | " + " | ".join(title(d, f) for d, f in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for defense in defenses:
        row = []
        for dist, frac in columns:
            key = (defense, dist, frac)
            got = entries.get(key)
            if not got:
                row.append("")
                continue
            acc, attack = min(got)
            text = f"{acc:.2f}%" if frac == 0 else f"{acc:.2f}% ({attack})"
            if len(got) < expected.get(key, 0):
                text += f", {len(got)} of {expected[key]} run"
            row.append(text)
        lines.append(f"| {defense} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_groups(cells: list[Cell], root: Path, preset_name: str) -> list[Path]:
    """One accuracy-per-round figure per (attack, fraction, distribution), like SIREN Figs. 5-10."""
    from firmware_sim.report import plot_accuracy

    groups: dict[tuple[str, float, str], dict[str, Any]] = {}
    for cell in cells:
        hist = load_history(root / cell.key)
        if hist is not None:
            groups.setdefault((cell.attack, cell.fraction, cell.distribution), {})[cell.defense] = (
                hist
            )
    paths = []
    for (attack, fraction, dist), hists in groups.items():
        name = f"{preset_name}_{attack}_{int(100 * fraction)}_{dist}.png"
        title = f"{attack}, {int(100 * fraction)}% malicious, {dist} ({preset_name})"
        paths.append(plot_accuracy(hists, root / "plots" / name, title=title))
    return paths


def malicious_index_links(cells: list[Cell], root: Path) -> str:
    """Markdown section linking the malicious-index plot of every finished SIREN cell."""
    links = [
        f"- [{cell.key}]({cell.key}/malicious_index.png)"
        for cell in cells
        if (root / cell.key / "malicious_index.png").exists() and load_history(root / cell.key)
    ]
    if not links:
        return ""
    return (
        "\n## Malicious index of the SIREN cells\n\n"
        "Per board and round: penalty count, ban and probe outcomes (SIREN Figs. 11-14).\n\n"
        + "\n".join(links)
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) a grid and write its summary."""
    p = argparse.ArgumentParser(
        prog="siren bench robustness", description=help_description(__doc__)
    )
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument(
        "--defenses",
        help="comma-separated defenses (default: the preset's, else all but "
        f"{', '.join(OPTIONAL_DEFENSES)})",
    )
    p.add_argument(
        "--attacks", help=f"comma-separated attacks (default: the preset's, else {ATTACKS})"
    )
    p.add_argument(
        "--fractions",
        help="comma-separated malicious fractions; the no-attack baseline is always in "
        f"(default: the preset's, else {FRACTIONS})",
    )
    p.add_argument(
        "--distributions",
        help="comma-separated: iid, noniid (p=0.5) or noniid-pP (default: the preset's, else "
        "iid,noniid)",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip the no-attack cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells run at once, each pinned to its own share of the cores (default 1)",
    )
    p.add_argument("--results", default=str(RESULTS / "robustness"), help="results root")
    p.add_argument("--summary-only", action="store_true", help="only rewrite table and plots")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv_list)

    own = PRESET_GRIDS.get(args.preset, {})

    def listed(value: str | None, key: str, fallback: Sequence[Any]) -> list[str]:
        if value is None:
            return [str(v) for v in own.get(key, fallback)]
        return [v for v in value.split(",") if v]

    defenses = listed(args.defenses, "defenses", tuple(DEFENSES))
    bad = [d for d in defenses if d not in ALL_DEFENSES]
    if bad:
        p.error(f"unknown defense(s) {bad}; valid: {', '.join(ALL_DEFENSES)}")
    attacks = listed(args.attacks, "attacks", ATTACKS)
    try:
        fractions = [float(f) for f in listed(args.fractions, "fractions", FRACTIONS)]
    except ValueError as exc:
        p.error(f"--fractions: {exc}")
    dists = listed(args.distributions, "distributions", DISTRIBUTIONS)
    for dist in dists:
        try:
            parse_distribution(dist)
        except ValueError as exc:
            p.error(str(exc))
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    cells = grid(defenses, attacks, fractions, dists)
    pairs = own.get("pairs")
    if pairs is not None and args.defenses is None and args.attacks is None:
        cells = [c for c in cells if c.attack == "none" or (c.defense, c.attack) in pairs]
    if args.no_baselines:
        cells = [c for c in cells if c.attack != "none"]
    preset = PRESETS[args.preset]
    root = Path(args.results) / args.preset
    root.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        run_cells(cells, preset, root, args.seed, args.jobs)
    cells = with_finished(cells, root)
    defenses = list(dict.fromkeys(c.defense for c in cells))
    paper_numbers, paper_meaning = PAPER_TABLES.get(args.preset, ({}, "no published number"))
    table = summarize(
        cells, root, preset["clients"], paper_numbers, preset.get("detection_rounds", ())
    )
    worst = overview(cells, root)
    plots = plot_groups(cells, root, args.preset)
    index_plots = malicious_index_links(cells, root)
    settings = ", ".join(f"{k}={v}" for k, v in preset.items() if k != "detection_rounds")
    command = " ".join(shlex.quote(a) for a in shown_command(argv_list))
    (root / "README.md").write_text(
        f"# Robustness grid, preset `{args.preset}`\n\n"
        f"Command: `siren bench robustness {command}` "
        "(resumable); the tables also list every cell finished earlier in this folder.  \n"
        f"Settings: {settings}"
        + (
            "; SIREN thresholds C_c=4%, C_s=10%, C_a=0.5, with the "
            "`authors` profile (relative C_c and C_s, C_p=int(0.45T)) for `siren` and "
            "`siren_no_wa` and the `paper-text` profile (absolute, C_p=0.45K) for "
            "`siren_paper_text*` (docs/reproducing.md)"
            if any(d.startswith("siren") for d in defenses)
            else ""
        )
        + f"; seed {args.seed}. 'paper' = {paper_meaning}. "
        "'honest banned' and 'attackers missed' count SIREN's bans after the last round.\n\n"
        + (
            "## Overview\n\nFinal test accuracy without attack, and the lowest final accuracy "
            "over the attacks at each malicious fraction (the attack in brackets).\n\n"
            f"{worst}\n\n## Every cell\n\n"
            if worst
            else ""
        )
        + f"{table}\n\n"
        + "\n".join(f"![{q.stem}](plots/{q.name})" for q in plots)
        + "\n"
        + index_plots
    )
    print(table)
    print(f"wrote {root / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
