"""Board mode of ``siren bench alarm``: the two training backends of a board side by side.

``siren bench alarm --backends keras,litert`` measures, for each model and each backend, one
board's work in a fresh worker process pinned to one core (one interpreter/TensorFlow thread):

* installed size -- the distributions the backend's board requirements pull in (the closure of
  ``requirements-board.txt`` over what is installed here, TensorFlow's dependencies included);
* import time -- the board program and its backend's libraries, in the fresh process;
* start-up -- building the trainer and the alarm's evaluator (``keras``: the Keras model and a
  LiteRT export of it; ``litert``: the training artifact's interpreters);
* training time per epoch (median over rounds of E local epochs, divided by E);
* alarm time -- the SIREN alarm's two evaluations on the local test split (median);
* peak RSS -- the worker's ``VmHWM`` at the end.

A ``litert`` worker never imports TensorFlow (checked: the result records the TensorFlow
modules it found loaded, which must be none). The artifact is built by the parent (which has
TensorFlow) unless ``--artifact`` names one -- the way to run it on a board without TensorFlow.
Results: ``benchmarks/results/board-backends.md`` (or ``--out``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("keras", "litert")


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _dist_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return match.group(1) if match else ""


def installed_size(requirements: Sequence[str]) -> tuple[int, list[tuple[str, int]]]:
    """Bytes on disk of the installed distributions ``requirements`` pull in, and the largest.

    Follows every ``Requires-Dist`` without an ``extra ==`` marker, through what is installed
    here (a requirement that is not installed, e.g. for another platform, counts nothing).
    Sizes are of each distribution's recorded files.
    """
    import importlib.metadata as md

    seen: dict[str, int] = {}
    todo = [_dist_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if not key or key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            seen[key] = 0
            continue
        size = 0
        for f in dist.files or ():
            try:
                size += Path(f.locate()).stat().st_size
            except OSError:
                continue
        seen[key] = size
        for req in dist.requires or ():
            if not re.search(r"extra\s*==", req):
                todo.append(_dist_name(req))
    largest = sorted(((k, v) for k, v in seen.items() if v), key=lambda kv: -kv[1])
    return sum(seen.values()), largest[:5]


def worker(
    backend: str,
    model_name: str,
    rounds: int,
    epochs: int,
    batch_size: int,
    data: Path | None,
    artifact: Path | None,
) -> dict[str, Any]:
    """One backend's board measurements in this (fresh, pinned) process."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    t0 = time.perf_counter()
    from edge_client.alarm import AlarmConfig, run_alarm
    from edge_client.client import BoardClient  # noqa: F401  (the board program's imports)
    from edge_client.provision import BOARD_REQUIREMENTS, LITERT_BOARD_REQUIREMENTS
    from models.training import TrainConfig

    if backend == "keras":
        from models.tf_setup import quiet_tensorflow

        quiet_tensorflow()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from models.litert import litert_evaluator
        from models.training import Trainer
    else:
        from models.litert_artifact import TrainingArtifact
        from models.litert_trainer import LiteRTTrainer, artifact_evaluator
    import_s = time.perf_counter() - t0

    from benchmarks.board_data import load_npz

    rng = np.random.default_rng(0)
    assert data is not None  # the parent hands every worker a board's data.npz
    x_train, y_train, x_test, y_test = load_npz(data)
    config = TrainConfig(epochs, batch_size, 0.001, "adam")
    t1 = time.perf_counter()
    if backend == "keras":
        trainer: Any = Trainer(model_name, tuple(x_train.shape[1:]), 10, config)
        evaluator = litert_evaluator(trainer.model, num_threads=1)
    else:
        assert artifact is not None
        art = TrainingArtifact.load(artifact)
        trainer = LiteRTTrainer(art, config, model_name=model_name)
        evaluator = artifact_evaluator(art)
    startup_s = time.perf_counter() - t1
    global_w = trainer.initial_weights
    local_w, _ = trainer.train(global_w, x_train, y_train, rng, epochs=1)  # warm-up, "previous"
    run_alarm(evaluator, global_w, local_w, x_test, y_test, AlarmConfig())  # warm-up
    train_s, train_cpu_s, alarm_s = [], [], []
    for r in range(rounds):
        a0 = time.perf_counter()
        run_alarm(evaluator, global_w, local_w, x_test, y_test, AlarmConfig())
        alarm_s.append(time.perf_counter() - a0)
        c0, w0 = time.process_time(), time.perf_counter()
        new_local, _ = trainer.train(global_w, x_train, y_train, np.random.default_rng(r + 1))
        train_s.append(time.perf_counter() - w0)
        train_cpu_s.append(time.process_time() - c0)
        local_w = new_local
    requirements = BOARD_REQUIREMENTS if backend == "keras" else LITERT_BOARD_REQUIREMENTS
    size, largest = installed_size(requirements)
    return {
        "backend": backend,
        "model": model_name,
        "machine": platform.machine(),
        "train_samples": len(y_train),
        "test_samples": len(y_test),
        "epochs": epochs,
        "batch_size": batch_size,
        "rounds": rounds,
        "import_s": import_s,
        "startup_s": startup_s,
        "train_epoch_s": float(np.median(train_s)) / epochs,
        "train_epoch_cpu_s": float(np.median(train_cpu_s)) / epochs,
        "alarm_s": float(np.median(alarm_s)),
        "peak_rss_mib": _peak_rss_mib(),
        "installed_bytes": size,
        "installed_largest": largest,
        "evaluator": type(evaluator).__name__,
        "tensorflow_loaded": sorted(
            m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")
        )[:3],
    }


def _run_worker(
    backend: str, model: str, args: Any, data: Path, artifact: Path | None
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "benchmarks.board_backends", "--worker", backend, model,
        str(args.rounds), str(args.epochs), str(args.batch_size), str(data), str(artifact or ""),
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {backend} {model} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def board_data(model: str, folder: Path) -> Path:
    """A board's ``data.npz`` for ``model``: a shard of its dataset (as ``siren bench alarm``
    draws it), 10% of it as the local test split. Workers load only this, as a board does."""
    from benchmarks.board_data import MODELS
    from models.datasets import load_dataset

    dataset, shard = MODELS[model]
    ds = load_dataset(dataset)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ds.y_train))[: min(shard, len(ds.y_train))]
    n_test = round(0.1 * idx.size)
    path = folder / f"{model}-data.npz"
    np.savez(
        path,
        x_train=ds.x_train[idx[n_test:]],
        y_train=ds.y_train[idx[n_test:]],
        x_test=ds.x_train[idx[:n_test]],
        y_test=ds.y_train[idx[:n_test]],
    )
    return path


def _build_artifact(model: str, data: Path, folder: Path) -> Path:
    """The model's training artifact, converted here (needs TensorFlow)."""
    from benchmarks.board_data import load_npz
    from models.litert_training import export_litert_training
    from models.zoo import build_model

    shape = tuple(load_npz(data)[0].shape[1:])
    path = folder / f"{model}-litert.zip"
    export_litert_training(build_model(model, shape, 10), model_name=model).save(path)
    return path


#: Timings of a worker's result that :func:`merge_runs` takes the median of.
TIMINGS = ("import_s", "startup_s", "train_epoch_s", "train_epoch_cpu_s", "alarm_s")


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a backend: the median of each timing, the largest peak
    RSS, and every run's training time per epoch (wall and CPU) in ``runs``."""
    merged = dict(runs[0])
    for key in TIMINGS:
        merged[key] = float(np.median([r[key] for r in runs]))
    merged["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    merged["runs"] = [
        {"train_epoch_s": r["train_epoch_s"], "train_epoch_cpu_s": r["train_epoch_cpu_s"]}
        for r in runs
    ]
    return merged


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{1000 * value:.1f} ms"


def format_table(results: list[dict[str, Any]], note: str) -> str:
    """Markdown table, one row per model and backend; ``note`` marks every timing."""
    mib = 1024 * 1024
    mark = f" ({note})" if note else ""
    lines = [
        "| model | backend | installed size | import time | start-up | training per epoch "
        "(wall / CPU) | alarm (2 evaluations) | peak RSS | alarm evaluator | TensorFlow loaded |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} ({r['train_samples']} / {r['test_samples']} images) | "
            f"{r['backend']} | {r['installed_bytes'] / mib:.0f} MiB | {_seconds(r['import_s'])}"
            f"{mark} | {_seconds(r['startup_s'])}{mark} | {_seconds(r['train_epoch_s'])} / "
            f"{_seconds(r['train_epoch_cpu_s'])}{mark} | {_seconds(r['alarm_s'])}{mark} | "
            f"{r['peak_rss_mib']:.0f} MiB | {r['evaluator']} | "
            f"{', '.join(r['tensorflow_loaded']) or 'no'} |"
        )
    return "\n".join(lines)


def run(
    models: Sequence[str],
    backends: Sequence[str],
    args: Any,
    out: Path,
) -> int:
    """Measure every model with every backend and write ``out`` (the parent's side)."""
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="siren-board-backends-") as tmp:
        for model in models:
            data = args.data or board_data(model, Path(tmp))
            artifact = args.artifact
            if "litert" in backends and artifact is None:
                print(f"converting {model}'s LiteRT training artifact ...", flush=True)
                artifact = _build_artifact(model, data, Path(tmp))
            repeat = max(1, int(getattr(args, "repeat", 1)))
            runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
            for r in range(repeat):  # the backends alternate: both see the machine's moods
                for backend in backends:
                    print(
                        f"measuring {model} with the {backend} backend, one core (run {r + 1} "
                        f"of {repeat}) ...",
                        flush=True,
                    )
                    runs[backend].append(_run_worker(backend, model, args, data, artifact))
            results.extend(merge_runs(runs[b]) for b in backends)
    write_results(results, models, backends, args, out)
    return 0


def write_results(
    results: list[dict[str, Any]],
    models: Sequence[str],
    backends: Sequence[str],
    args: Any,
    out: Path,
) -> None:
    """Print the table and write ``out`` (Markdown with the raw results as JSON)."""
    note = args.note or ""
    table = format_table(results, note)
    print(table)
    largest = "; ".join(
        f"{r['backend']}: "
        + ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in r["installed_largest"])
        for r in results
        if r["model"] == results[0]["model"]
    )
    shared = [r for r in results if r["train_epoch_s"] > 1.3 * r["train_epoch_cpu_s"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    data_arg = f" --data {args.data.name}" if args.data else ""
    repeat = max(1, int(getattr(args, "repeat", 1)))
    data_arg += f" --repeat {repeat}" if repeat > 1 else ""
    runs_note = (
        f"Each backend was measured in {repeat} fresh workers, the backends alternating (keras, "
        "litert, keras, ...); the table shows the medians. CPU time per epoch of every run, in "
        "run order: "
        + "; ".join(
            f"{r['model']} {r['backend']} "
            + ", ".join(_seconds(x["train_epoch_cpu_s"]) for x in r["runs"])
            for r in results
        )
        + ".\n\n"
        if repeat > 1
        else ""
    )
    out.write_text(
        "# A board's two training backends: keras (TensorFlow) and litert (LiteRT alone)\n\n"
        + (f"**{note}**\n\n" if note else "")
        + f"Command: `siren bench alarm --backends {','.join(backends)} --models "
        f"{','.join(models)} --rounds {args.rounds} --epochs {args.epochs} --batch-size "
        f"{args.batch_size}{data_arg}`  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (one used: each worker is pinned "
        f"to one core, one thread), Python {platform.python_version()}; load average at the end "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}.\n\n"
        "Each row is a fresh worker process that loads only a board's data (a shard of the "
        "dataset, 10% of it the local test split, from an npz file as on a board): import time "
        "is the board program with its backend's libraries; start-up builds the trainer and the "
        "alarm's evaluator; training and alarm times are medians over the rounds (after a "
        "warm-up epoch); peak RSS is the worker's `VmHWM`. Installed size is the closure of the "
        "backend's `requirements-board.txt` over the wheels installed on this machine. The "
        "litert rows run the model's builtin-only LiteRT training artifact and never import "
        "TensorFlow.\n\n"
        f"{table}\n\n"
        + runs_note
        + (
            "Training wall time well above its CPU time means the pinned core also ran other "
            "processes during the measurement (this machine was shared): compare the backends' "
            "CPU times.\n\n"
            if shared
            else ""
        )
        + f"Largest installed distributions: {largest}.\n\n"
        f"```json\n{json.dumps(results, indent=1)}\n```\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 9 and sys.argv[1] == "--worker":
        _, _, backend, model, rounds, epochs, batch, data, artifact = sys.argv
        result = worker(
            backend,
            model,
            int(rounds),
            int(epochs),
            int(batch),
            Path(data) if data else None,
            Path(artifact) if artifact else None,
        )
        print(json.dumps(result))
        sys.exit(0)
    sys.exit("run it as: siren bench alarm --backends keras,litert")
