"""On-device cost of the SIREN alarm next to local training (``siren bench alarm``).

For each model, one board's round is replayed several times in a fresh worker process, pinned to
one core (a Raspberry-Pi-like budget: one CPU, one TensorFlow/LiteRT thread) and unpinned:

* the alarm — two evaluations on the local test split (global model and the board's previous local
  model), with LiteRT (weights loaded through the ``set_weights`` signature) and with Keras;
* local training (E epochs, batch B) with TensorFlow;
* encoding and signing the update envelope (Ed25519 over the header, SHA-256 over the payload).

Each phase's time is the median over rounds (after one untimed warm-up) and its memory is the peak
increase of the process's resident set size during the phase (sampled every 2 ms). The worker runs
in a subprocess so pinning and memory are isolated; the parent prints a table and writes
``benchmarks/results/alarm.md``.

Next to the timings it records what the board's hardware exposes (:mod:`edge_client.telemetry`):
the CPU time of each phase (median, all threads), the worker's peak RSS (``VmHWM``), the highest
SoC temperature and the mean input power during each phase, and the Raspberry Pi throttling word
before and after. A sensor the machine does not have is written as "absent", never estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import help_description
from benchmarks.board_data import MODELS, load_npz

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling RSS in a thread; ``.increase`` is the peak minus the start."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def increase(self) -> int:
        """Peak RSS during the block minus RSS at its start, in bytes."""
        return max(0, self.peak - self.start)


def _timed(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    seconds, memory, _, _, out = _measured(fn, None)
    return seconds, memory, out


def _measured(fn: Callable[[], Any], sensors: Any) -> tuple[float, int, float, Any, Any]:
    """``(wall seconds, peak RSS increase, CPU seconds, SampledRound or None, result)``."""
    from edge_client.telemetry import sampled

    with PeakRSS() as mem, sampled(sensors, interval=0.25) as seen:
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
    return seconds, mem.increase, cpu, seen, out


class _PhaseSensors:
    """Per phase: the highest SoC temperature and the input power samples seen (absent: none)."""

    def __init__(self) -> None:
        self.temperature: dict[str, float] = {}
        self.power: dict[str, list[float]] = {}

    def add(self, phase: str, seen: Any) -> None:
        from edge_client.telemetry import input_power, soc_zones

        if seen is None:
            return
        soc = soc_zones(seen.temperatures)
        if soc:
            self.temperature[phase] = max(self.temperature.get(phase, -1e9), max(soc.values()))
        total = input_power(seen.power)
        if total is not None:
            self.power.setdefault(phase, []).append(total)

    def figures(self, phases: Sequence[str]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for phase in phases:
            out[f"{phase}_soc_temp_c"] = self.temperature.get(phase)
            samples = self.power.get(phase)
            out[f"{phase}_power_mw"] = float(np.mean(samples)) if samples else None
        return out


def model_for_input(shape: tuple[int, ...]) -> str:
    """The zoo model for images of ``shape`` (8x8 digits or 28x28 Fashion-MNIST)."""
    return "digits-mlp" if tuple(shape[:2]) == (8, 8) else "siren-cnn"


def available_models() -> list[str]:
    """The models of :data:`MODELS` whose dataset is on this machine (nothing is downloaded)."""
    import importlib.util

    from models.datasets import find_fashion_mnist
    from models.errors import ModelsError

    out = []
    for model, (dataset, _) in MODELS.items():
        if dataset == "digits" and importlib.util.find_spec("sklearn") is not None:
            out.append(model)
        elif dataset == "fashion-mnist":
            try:
                find_fashion_mnist()
            except (ModelsError, OSError):
                continue
            out.append(model)
    return out


def worker(
    model_name: str,
    pinned: bool,
    rounds: int,
    epochs: int,
    batch_size: int,
    data: Path | None = None,
    sensors: Any = None,
) -> dict:
    """Measure one configuration in this process; return a JSON-serializable dict.

    ``data``: a board's ``data.npz`` (its own training data and local test split) instead of a
    shard drawn from the model's dataset. ``sensors``: where the telemetry comes from
    (:class:`edge_client.telemetry.Sensors`; default: this machine's).
    """
    from edge_client.telemetry import Sensors

    sensors = sensors if sensors is not None else Sensors()
    throttled_before = sensors.throttled()
    if pinned:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
    from models.tf_setup import quiet_tensorflow

    quiet_tensorflow()
    import tensorflow as tf

    if pinned:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from edge_client.alarm import AlarmConfig, run_alarm
    from models.datasets import load_dataset
    from models.litert import KerasEvaluator, litert_evaluator
    from models.training import TrainConfig, Trainer
    from protocol.envelope import encode_update
    from protocol.keys import generate_signing_key
    from protocol.layout import TensorLayout, weights_sha256

    dataset_name, shard = MODELS[model_name]
    rng = np.random.default_rng(0)
    if data is not None:
        x_train, y_train, x_test, y_test = load_npz(data)
        dataset_name = f"{data.name} (the board's data)"
        input_shape, num_classes = tuple(x_train.shape[1:]), 10
    else:
        ds = load_dataset(dataset_name)
        idx = rng.permutation(len(ds.y_train))[: min(shard, len(ds.y_train))]
        n_test = round(0.1 * idx.size)
        x_test, y_test = ds.x_train[idx[:n_test]], ds.y_train[idx[:n_test]]
        x_train, y_train = ds.x_train[idx[n_test:]], ds.y_train[idx[n_test:]]
        input_shape, num_classes = ds.input_shape, ds.num_classes
    trainer = Trainer(
        model_name, input_shape, num_classes, TrainConfig(epochs, batch_size, 0.001, "adam")
    )
    threads = 1 if pinned else (os.cpu_count() or 1)
    lite = litert_evaluator(trainer.model, num_threads=threads)
    keras_eval = KerasEvaluator(trainer.model)
    layout = TensorLayout.from_entries(trainer.layout.as_list())
    key = generate_signing_key()
    alarm_cfg = AlarmConfig()
    global_w = trainer.initial_weights
    local_w, _ = trainer.train(global_w, x_train, y_train, rng, epochs=1)  # a "previous" model
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "alarm_litert_s",
            "alarm_keras_s",
            "train_s",
            "encode_sign_s",
            "alarm_litert_mem",
            "alarm_keras_mem",
            "train_mem",
            "alarm_litert_cpu_s",
            "alarm_keras_cpu_s",
            "train_cpu_s",
            "encode_sign_cpu_s",
        )
    }
    phase_sensors = _PhaseSensors()
    upload_bytes = 0
    for r in range(rounds + 1):  # round 0 is the untimed warm-up
        t_lite, m_lite, c_lite, seen_lite, _ = _measured(
            partial(run_alarm, lite, global_w, local_w, x_test, y_test, alarm_cfg), sensors
        )
        t_keras, m_keras, c_keras, seen_keras, _ = _measured(
            partial(run_alarm, keras_eval, global_w, local_w, x_test, y_test, alarm_cfg), sensors
        )
        t_train, m_train, c_train, seen_train, (new_local, _) = _measured(
            partial(trainer.train, global_w, x_train, y_train, np.random.default_rng(r)), sensors
        )
        t_enc, _, c_enc, _, envelope = _measured(
            partial(
                encode_update,
                run="bench",
                round=r + 1,
                client="board-0",
                signing_key=key,
                delta=new_local - global_w,
                layout=layout,
                base_sha256=weights_sha256(global_w),
                samples=len(y_train),
                alarm=False,
            ),
            None,
        )
        upload_bytes = len(envelope)
        if r == 0:
            continue
        measured: tuple[float, ...] = (t_lite, t_keras, t_train, t_enc, m_lite, m_keras)
        measured = (*measured, m_train, c_lite, c_keras, c_train, c_enc)
        for k, v in zip(rows, measured):
            rows[k].append(float(v))
        for phase, seen in (
            ("alarm_litert", seen_lite),
            ("alarm_keras", seen_keras),
            ("train", seen_train),
        ):
            phase_sensors.add(phase, seen)
        local_w = new_local
    med = {k: float(np.median(v)) for k, v in rows.items()}
    telemetry: dict[str, Any] = {
        "peak_rss_mib": sensors.peak_rss_mib(),
        "throttled_before": throttled_before,
        "throttled_after": sensors.throttled(),
        **phase_sensors.figures(("alarm_litert", "alarm_keras", "train")),
        "sensors": sensors.describe(),
    }
    sensors.close()
    return {
        "model": model_name,
        "dataset": dataset_name,
        "pinned": pinned,
        "threads": threads,
        "litert_evaluator": type(lite).__name__,
        "parameters": trainer.layout.size,
        "train_samples": len(y_train),
        "test_samples": len(y_test),
        "epochs": epochs,
        "batch_size": batch_size,
        "rounds": rounds,
        "upload_bytes": upload_bytes,
        **med,
        **telemetry,
    }


def default_output() -> Path:
    """``benchmarks/results/alarm.md`` of a source checkout, else ``alarm.md`` in the current
    folder (an installed package's folder is not the place for results)."""
    if RESULTS.is_dir() and os.access(RESULTS, os.W_OK) and "site-packages" not in RESULTS.parts:
        return RESULTS / "alarm.md"
    return Path.cwd() / "alarm.md"


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written (checked before measuring), or None."""
    folder = path.parent if path.parent != Path("") else Path.cwd()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def _run_worker(model: str, pinned: bool, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.alarm",
        "--worker",
        "--models",
        model,
        "--rounds",
        str(args.rounds),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
    ]
    if pinned:
        cmd.append("--pinned")
    if args.data:
        cmd += ["--data", str(args.data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {model} pinned={pinned} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: How each LiteRT evaluator holds the weights it is given.
WEIGHT_MODES = {
    "FrozenLiteRTEvaluator": "constants (patched per load)",
    "LiteRTEvaluator": "resource variables",
}


def format_table(results: list[dict]) -> str:
    """Markdown table: alarm vs training time and memory, per model and CPU budget."""
    head = (
        "| model | CPU budget | train samples / local test | local training (E={e}) | "
        "alarm LiteRT | alarm Keras | LiteRT alarm / training | Keras alarm / training | "
        "LiteRT alarm / round | peak RSS +: train / LiteRT alarm / Keras alarm | "
        "upload per round | encode+sign | LiteRT weights |"
    ).format(e=results[0]["epochs"] if results else "?")
    lines = [head, "|" + "---|" * 13]
    for r in results:
        round_s = r["alarm_litert_s"] + r["train_s"] + r["encode_sign_s"]
        budget = "1 core, 1 thread" if r["pinned"] else f"{r['threads']} cores"
        lines.append(
            f"| {r['model']} | {budget} | {r['train_samples']} / {r['test_samples']} | "
            f"{r['train_s']:.2f} s | {1000 * r['alarm_litert_s']:.1f} ms | "
            f"{1000 * r['alarm_keras_s']:.1f} ms | "
            f"{100 * r['alarm_litert_s'] / r['train_s']:.2f}% | "
            f"{100 * r['alarm_keras_s'] / r['train_s']:.2f}% | "
            f"{100 * r['alarm_litert_s'] / round_s:.2f}% | "
            f"{r['train_mem'] / 2**20:.1f} / {r['alarm_litert_mem'] / 2**20:.1f} / "
            f"{r['alarm_keras_mem'] / 2**20:.1f} MiB | "
            f"{r['upload_bytes'] / 1024:.0f} KiB | {1000 * r['encode_sign_s']:.1f} ms | "
            f"{WEIGHT_MODES.get(r.get('litert_evaluator', ''), '?')} |"
        )
    return "\n".join(lines)


def _absent(value: Any, text: str) -> str:
    return "absent" if value is None else text


def _throttling(before: Any, after: Any) -> str:
    from protocol.telemetry import throttled_conditions

    if after is None:
        return "absent"
    conditions = throttled_conditions(int(after))
    text = f"0x{int(after):x}" + (f" ({', '.join(conditions)})" if conditions else " (none)")
    return text if before is None or before == after else f"0x{int(before):x} -> {text}"


def format_telemetry(results: list[dict]) -> str:
    """Markdown table of what the hardware exposed per configuration ("absent" where nothing).

    Rows written before telemetry was recorded (no ``train_cpu_s``) are left out.
    """
    head = (
        "| model | CPU budget | CPU time: training / LiteRT alarm / Keras alarm | "
        "peak RSS of the process | SoC temperature, highest: training / LiteRT alarm | "
        "input power, mean: training / LiteRT alarm | throttling (Raspberry Pi) |"
    )
    lines = [head, "|" + "---|" * 7]
    for r in results:
        if "train_cpu_s" not in r:
            continue
        budget = "1 core, 1 thread" if r["pinned"] else f"{r['threads']} cores"
        rss = r.get("peak_rss_mib")
        temps = [r.get("train_soc_temp_c"), r.get("alarm_litert_soc_temp_c")]
        power = [r.get("train_power_mw"), r.get("alarm_litert_power_mw")]
        lines.append(
            f"| {r['model']} | {budget} | {r['train_cpu_s']:.2f} s / "
            f"{1000 * r['alarm_litert_cpu_s']:.1f} ms / {1000 * r['alarm_keras_cpu_s']:.1f} ms | "
            f"{_absent(rss, f'{rss or 0:.0f} MiB')} | "
            + " / ".join(_absent(t, f"{t or 0:.1f} °C") for t in temps)
            + " | "
            + " / ".join(_absent(p, f"{(p or 0) / 1000:.2f} W") for p in power)
            + f" | {_throttling(r.get('throttled_before'), r.get('throttled_after'))} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one measurement) and write the results."""
    p = argparse.ArgumentParser(prog="siren bench alarm", description=help_description(__doc__))
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated zoo models (default: those whose dataset is installed; with "
        "--data, the model for its image size)",
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration")
    p.add_argument("--epochs", type=int, default=5, help="local epochs E (SIREN: 5)")
    p.add_argument("--batch-size", type=int, default=64, help="local batch size B (SIREN: 64)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a board's data.npz (x_train, y_train, x_test, y_test): measure on the board's "
        "own data (no dataset needed)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Markdown output file (default: benchmarks/results/alarm.md in a source checkout, "
        "else ./alarm.md)",
    )
    p.add_argument("--note", default="", help="a line written above the table (e.g. 'emulated')")
    p.add_argument(
        "--backends",
        default=None,
        help="board mode: compare the board's training backends (comma-separated: keras, "
        "litert): installed size, import time, peak RSS, training per epoch and alarm time on "
        "one core (writes board-backends.md)",
    )
    p.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="board mode: the model's LiteRT training artifact (default: converted here, which "
        "needs TensorFlow; pass it on a board without TensorFlow)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="board mode: measure each backend in this many fresh workers, the backends "
        "alternating, and report the medians (for a shared machine; default 1)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.data is not None and not args.data.exists():
        p.error(f"--data {args.data} does not exist")
    if args.models:
        models = [m for m in args.models.split(",") if m]
    elif args.data is not None:
        models = [model_for_input(tuple(load_npz(args.data)[0].shape[1:]))]
    else:
        models = available_models()
        if not models:
            p.error(
                "no dataset for any model is installed (Fashion-MNIST: Debian package "
                "dataset-fashion-mnist; digits: scikit-learn): pass --data with a board's "
                "data.npz"
            )
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {', '.join(MODELS)}")
    if args.backends is not None:
        from benchmarks.board_backends import BACKENDS, run

        backends = [b for b in args.backends.split(",") if b]
        if not backends or any(b not in BACKENDS for b in backends):
            p.error(f"--backends takes {', '.join(BACKENDS)}, got {args.backends!r}")
        if args.artifact is not None and not args.artifact.exists():
            p.error(f"--artifact {args.artifact} does not exist")
        out = args.out or default_output().with_name("board-backends.md")
        problem = unwritable(out)
        if problem:
            p.error(f"cannot write {out}: {problem}; pass --out")
        return run(models, backends, args, out)
    if args.worker:
        measured = worker(
            models[0], args.pinned, args.rounds, args.epochs, args.batch_size, args.data
        )
        print(json.dumps(measured))
        return 0
    out = args.out or default_output()
    problem = unwritable(out)
    if problem:  # say so now, not after minutes of measuring
        p.error(f"cannot write {out}: {problem}; pass --out")
    load_before = os.getloadavg()
    results = []
    for model in models:
        for pinned in (True, False):
            print(
                f"measuring {model}, {'pinned to 1 core' if pinned else 'unpinned'} ...", flush=True
            )
            results.append(_run_worker(model, pinned, args))
    table = format_table(results)
    print(table)
    telemetry = format_telemetry(results)
    sensors = results[0].get("sensors", {}) if results else {}
    present = "; ".join(f"{what}: {value}" for what, value in sensors.items())
    print(telemetry)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_arg = f" --data {args.data.name}" if args.data else ""
    out.write_text(
        "# SIREN alarm overhead on one board\n\n"
        + (f"**{args.note}**\n\n" if args.note else "")
        + f"Command: `siren bench alarm --models {','.join(models)} --rounds {args.rounds} "
        f"--epochs {args.epochs} --batch-size {args.batch_size}{data_arg}`  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; "
        f"median of {args.rounds} rounds after a warm-up; load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.2f}' for v in load_before)} at the start and "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} at the end.\n\n"
        "The alarm is two evaluations on the board's local test split (10% of its shard). "
        "'Round' = LiteRT alarm + local training + encode/sign. Peak RSS + is the increase of "
        "the resident set during the phase.\n\n"
        f"{table}\n\n"
        "## What the hardware exposed\n\n"
        f"Sensors of this machine: {present or 'not recorded'}. CPU time is user + system time "
        "of the worker process (every thread) during the phase, median over the rounds; peak "
        "RSS is the process's `VmHWM` at the end; temperatures and power are sampled every "
        "0.25 s during each phase (highest SoC zone, mean of the input rail). What the machine "
        "does not expose is written as absent.\n\n"
        f"{telemetry}\n\n```json\n{json.dumps(results, indent=1)}\n```\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
