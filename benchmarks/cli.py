"""``siren bench ...``: run a benchmark script; each writes results under benchmarks/results/."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from typing import Any

#: name -> (module with ``main(argv) -> int``, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "alarm": ("benchmarks.alarm", "on-device cost of the SIREN alarm vs local training"),
    "aggregators": ("benchmarks.aggregators", "speed of every aggregation rule (and peers)"),
    "aggregator-devices": (
        "benchmarks.aggregator_devices",
        "the heavy rules at K=100/1000, d=1e6/1e7 on numpy vs PyTorch cpu/cuda devices",
    ),
    "protocol": ("benchmarks.protocol_codec", "encode+sign / decode+verify time of envelopes"),
    "robustness": ("benchmarks.robustness", "aggregator x attack grid, like the SIREN paper"),
    "fleet": ("benchmarks.fleet", "round time breakdown of MQTT fleets of growing size"),
    "fleet-ray": (
        "benchmarks.fleet_ray",
        "largest fleet completing 3 rounds, workers local vs Ray actors on a 2-node cluster",
    ),
    "board-footprint": (
        "benchmarks.board_footprint",
        "a board's installed size, import time and peak memory (lean install vs desktop)",
    ),
    "board-aarch64": (
        "benchmarks.board_aarch64",
        "deployment end to end with boards in an arm64 userland (QEMU; root, ~30 min)",
    ),
    "litert-builtins": (
        "benchmarks.litert_builtins",
        "which zoo models train in LiteRT with builtin ops only (Keras step vs artifact)",
    ),
    "litert-runtimes": (
        "benchmarks.litert_runtimes",
        "the training artifact under ai-edge-litert and under tflite-runtime alone (PyPI)",
    ),
    "litert-runs": (
        "benchmarks.litert_runs",
        "whole federated runs with boards training in LiteRT vs Keras (accuracy, time)",
    ),
    "round-close": (
        "benchmarks.round_close",
        "round close at K=100..1000: batch rules vs streaming close; admission rate over MQTT",
    ),
    "residual-anatomy": (
        "benchmarks.residual_anatomy",
        "one label-flipping round of residual reweighting taken apart (weights, replaced values)",
    ),
    "soak": ("benchmarks.soak", "hostile messages against a live fleet: crashes, counts, models"),
    "participation": (
        "benchmarks.participation",
        "partial participation: sampling with SIREN in the demo; sync vs sampled vs async",
    ),
    "image-boot": (
        "benchmarks.image_boot",
        "the Raspberry Pi image booted under QEMU joins a fleet (root; builds the image first)",
    ),
}


def _runner(module_name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(module_name)
        return int(module.main(getattr(args, "bench_args", [])) or 0)

    return run


def register(sub: Any) -> None:
    """Add the ``bench`` command group (only benchmarks whose module exists are listed)."""
    p = sub.add_parser("bench", help="reproducible benchmarks (results in benchmarks/results/)")
    p.set_defaults(group_parser=p)
    s = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        b = s.add_parser(name, help=help_text, add_help=False)
        b.set_defaults(func=_runner(module_name), forward_args=True)
