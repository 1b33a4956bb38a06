"""What a board installs and how much memory its program needs (``siren bench board-footprint``).

Installs the lean board target -- the board wheel (:mod:`deploy.wheel`) plus
``requirements-board.txt`` -- into a fresh virtual environment, next to the desktop install
(``pip install .``) for comparison, and measures in the board's environment:

* the installed size (the venv on disk) and its largest packages;
* import times: the board program without TensorFlow, TensorFlow, LiteRT;
* the peak resident memory of one board's work: load its data, build the model, run the SIREN
  alarm (LiteRT) and one local training epoch, in a fresh process (``VmHWM``), for the digits
  MLP and the SIREN CNN (a 6,000-image Fashion-MNIST shard, when the dataset is installed).

Results: ``benchmarks/results/board-footprint.md``. Needs network access to PyPI (or pip's
configured index) for the fresh environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"

#: One board's round in a fresh process: prints the peak RSS and the phases' times as JSON.
_ROUND = r"""
import json, sys, time, resource
import numpy as np
t0 = time.perf_counter()
model, shard = sys.argv[1], int(sys.argv[2])
from edge_client.alarm import AlarmConfig, run_alarm
from models.litert import make_evaluator
from models.training import TrainConfig, Trainer
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
rng = np.random.default_rng(0)
if model == "digits-mlp":
    shape, n = (8, 8, 1), min(shard, 1400)
else:
    shape, n = (28, 28, 1), shard
x = rng.random((n, *shape), dtype=np.float32)
y = rng.integers(0, 10, n)
n_test = n // 10
t_import = time.perf_counter()
trainer = Trainer(model, shape, 10, TrainConfig(1, 64, 0.001, "adam"), seed=0)
evaluator = make_evaluator(trainer.model, prefer="litert")
t_build = time.perf_counter()
g = trainer.initial_weights
local, _ = trainer.train(g, x[n_test:], y[n_test:], rng, epochs=1)
run_alarm(evaluator, g, local, x[:n_test], y[:n_test], AlarmConfig())
t_round = time.perf_counter()
print(json.dumps({"model": model, "samples": n, "peak_kib": peak_kib(),
                  "evaluator": type(evaluator).__name__,
                  "startup_s": t_build - t0, "round_s": t_round - t_build}))
"""


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _largest(venv: Path, top: int = 6) -> list[tuple[str, int]]:
    site = next(iter(venv.glob("lib/python3*/site-packages")))
    sizes = [(p.name, _du(p)) for p in site.iterdir() if p.is_dir() and "dist-info" not in p.name]
    return sorted(sizes, key=lambda s: -s[1])[:top]


def _venv(path: Path, installs: Sequence[Sequence[str]]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    for args in installs:
        subprocess.run(
            [str(path / "bin" / "python"), "-m", "pip", "install", "-q", *args],
            check=True,
        )
    return time.perf_counter() - t0


def _timed_import(python: Path, code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(python), "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t0


def measure(workdir: Path, *, desktop: bool) -> dict[str, Any]:
    """Install and measure; returns the facts."""
    from deploy.wheel import NOT_ON_BOARDS, build_board_wheel
    from edge_client.provision import requirements_text

    facts: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version()}
    wheel = build_board_wheel(workdir / "dist")
    req = workdir / "requirements-board.txt"
    req.write_text(requirements_text())
    board = workdir / "board-venv"
    print("installing the board target into a fresh venv ...", flush=True)
    facts["board_install_s"] = _venv(board, [["-r", str(req)], ["--no-deps", str(wheel)]])
    facts["board_bytes"] = _du(board)
    facts["board_largest"] = _largest(board)
    facts["wheel_bytes"] = wheel.stat().st_size
    python = board / "bin" / "python"
    freeze = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True
    ).stdout
    names = sorted(p["name"].lower() for p in json.loads(freeze))
    facts["board_packages"] = names
    facts["desktop_only_found"] = [
        n for n in NOT_ON_BOARDS if n.replace("sklearn", "scikit-learn") in names
    ]
    facts["imports_s"] = {
        "board program (edge_client.client)": _timed_import(python, "import edge_client.client"),
        "TensorFlow": _timed_import(python, "import tensorflow"),
        "LiteRT": _timed_import(python, "from ai_edge_litert.interpreter import Interpreter"),
    }
    rounds = []
    for model, shard in (("digits-mlp", 180), ("siren-cnn", 6000)):
        print(f"one board round of {model} in a fresh process ...", flush=True)
        out = subprocess.run(
            [str(python), "-c", _ROUND, model, str(shard)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )  # fmt: skip
        rounds.append(json.loads(out.stdout.strip().splitlines()[-1]))
    facts["rounds"] = rounds
    if desktop:
        project = Path(__file__).resolve().parent.parent
        full = workdir / "desktop-venv"
        print("installing the desktop target (pip install .) for comparison ...", flush=True)
        facts["desktop_install_s"] = _venv(full, [[str(project)]])
        facts["desktop_bytes"] = _du(full)
        facts["desktop_largest"] = _largest(full)
    return facts


def format_results(facts: dict[str, Any], argv: Sequence[str]) -> str:
    """The Markdown result file."""
    mib = 1024 * 1024
    lines = [
        "# Board footprint: installed size, import time, peak memory",
        "",
        f"Command: `siren bench board-footprint {' '.join(argv)}`; {facts['machine']}, Python "
        f"{facts['python']}, a shared 2-core machine (times are this machine's, not a "
        "board's; sizes and memory carry over up to the platform's wheels).",
        "",
        "| install | size on disk | largest packages |",
        "|---|---|---|",
        f"| board (wheel {facts['wheel_bytes'] / 1024:.0f} KiB + requirements-board.txt) | "
        f"{facts['board_bytes'] / mib:.0f} MiB | "
        + ", ".join(f"{n} {b / mib:.0f} MiB" for n, b in facts["board_largest"])
        + " |",
    ]
    if "desktop_bytes" in facts:
        lines.append(
            f"| desktop (`pip install .`) | {facts['desktop_bytes'] / mib:.0f} MiB | "
            + ", ".join(f"{n} {b / mib:.0f} MiB" for n, b in facts["desktop_largest"])
            + " |"
        )
    lines += [
        "",
        f"Board packages: {', '.join(facts['board_packages'])}.",
        "Desktop-only libraries found in the board install: "
        + (", ".join(facts["desktop_only_found"]) or "none")
        + ".",
        "",
        "Import times (fresh interpreter, warm disk cache): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in facts["imports_s"].items())
        + ".",
        "",
        "| model | local data | peak RSS of the board's process | start-up (imports, model, "
        "LiteRT export) | one round (1 epoch + alarm) | alarm runtime |",
        "|---|---|---|---|---|---|",
    ]
    for r in facts["rounds"]:
        lines.append(
            f"| {r['model']} | {r['samples']} images | {r['peak_kib'] / 1024:.0f} MiB | "
            f"{r['startup_s']:.1f} s | {r['round_s']:.1f} s | {r['evaluator']} |"
        )
    lines += [
        "",
        "The board's memory is TensorFlow's: the board program itself, LiteRT and the data are a "
        "small share of it. Boards with 2 GB of RAM or more run it with room to spare; on 1 GB "
        "boards TensorFlow leaves little for the operating system.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write the result file."""
    p = argparse.ArgumentParser(
        prog="siren bench board-footprint", description=help_description(__doc__)
    )
    p.add_argument("--out", type=Path, default=RESULTS / "board-footprint.md")
    p.add_argument(
        "--no-desktop", action="store_true", help="skip the desktop install used for comparison"
    )
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv_list)
    workdir = Path(tempfile.mkdtemp(prefix="siren-footprint-"))
    try:
        facts = measure(workdir, desktop=not args.no_desktop)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = format_results(facts, argv_list)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
