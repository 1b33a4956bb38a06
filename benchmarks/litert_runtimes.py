"""The training artifact under both LiteRT runtimes (``siren bench litert-runtimes``).

A board trains with :class:`models.litert_trainer.LiteRTTrainer`, which takes the interpreter of
``ai-edge-litert`` or, when that wheel is missing, of ``tflite-runtime``. This benchmark checks
the second path for real: it makes a virtual environment with ``tflite-runtime`` and NumPy only
(no TensorFlow, no ``ai-edge-litert``; ``tflite-runtime``'s last release, 2.14.0, needs NumPy
< 2), exports the training artifact of each model here, and trains the same seeded batch for one
epoch in both environments. It reports the interpreter each one used, whether TensorFlow was
imported (it must not be), the training time, and the largest difference between the weights
the two runtimes produce.

Needs PyPI (or a mirror) for the virtual environment. Results:
``benchmarks/results/litert-runtimes.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
#: What the ``tflite-runtime`` environment gets.
TFLITE_REQUIREMENTS = ("tflite-runtime", "numpy<2")
#: zoo model -> image side.
MODELS = {"digits-mlp": 8, "siren-cnn": 28}


def train_once(artifact: str, side: int, out: str, images: int = 256) -> dict[str, Any]:
    """One epoch on seeded random images with the artifact; weights to ``out`` (``.npy``)."""
    import numpy as np

    from models.litert import interpreter_class
    from models.litert_trainer import LiteRTTrainer
    from models.training import TrainConfig

    rng = np.random.default_rng(0)
    x = rng.random((images, side, side, 1), dtype=np.float32)
    y = rng.integers(0, 10, images)
    trainer = LiteRTTrainer(artifact, TrainConfig(epochs=1, batch_size=32, learning_rate=0.001))
    start = time.perf_counter()
    weights, _ = trainer.train(trainer.initial_weights, x, y, np.random.default_rng(1))
    seconds = time.perf_counter() - start
    np.save(out, weights)
    return {
        "interpreter": interpreter_class().__module__,
        "tensorflow_imported": "tensorflow" in sys.modules,
        "seconds": seconds,
        "numpy": np.__version__,
    }


def _child(python: str, artifact: Path, side: int, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        python,
        "-m",
        "benchmarks.litert_runtimes",
        "--child",
        str(artifact),
        str(side),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _make_venv(path: Path) -> dict[str, str]:
    """A virtual environment with :data:`TFLITE_REQUIREMENTS`; returns their versions."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", *TFLITE_REQUIREMENTS], check=True)
    listing = subprocess.run(
        [*pip, "list", "--format", "json"], capture_output=True, text=True, check=True
    )
    return {p["name"]: p["version"] for p in json.loads(listing.stdout)}


def run(args: argparse.Namespace) -> int:
    """Export, train under both runtimes, compare, write the table."""
    import numpy as np

    from models.litert_training import export_litert_training
    from models.zoo import build_model

    work = Path(tempfile.mkdtemp(prefix="siren-litert-runtimes-"))
    print(
        f"[litert-runtimes] virtual environment with {', '.join(TFLITE_REQUIREMENTS)}", flush=True
    )
    packages = _make_venv(work / "venv")
    versions = {
        k: v for k, v in packages.items() if k in ("tflite-runtime", "tflite_runtime", "numpy")
    }
    bad = [k for k in packages if k.lower().startswith(("tensorflow", "ai-edge-litert", "keras"))]
    rows = []
    for name, side in MODELS.items():
        artifact = work / f"{name}.zip"
        model = build_model(name, (side, side, 1), 10, seed=0)
        export_litert_training(model, optimizer="adam", model_name=name).save(artifact)
        here = _child(sys.executable, artifact, side, work / f"{name}-litert.npy")
        there = _child(
            str(work / "venv" / "bin" / "python"), artifact, side, work / f"{name}-tflite.npy"
        )
        a = np.load(work / f"{name}-litert.npy")
        b = np.load(work / f"{name}-tflite.npy")
        diff = float(np.abs(a - b).max())
        rows.append((name, here, there, diff, diff / float(np.abs(a).max())))
        print(f"[litert-runtimes] {name}: largest weight difference {diff:.2e}", flush=True)
    from importlib.metadata import version

    others = ", ".join(sorted(packages)) or "none"
    lines = [
        "# The training artifact under ai-edge-litert and tflite-runtime",
        "",
        f"`siren bench litert-runtimes` on {platform.machine()}, Python "
        f"{platform.python_version()}. One epoch (batch 32, Adam, learning rate 0.001) on the "
        "same 256 seeded random images, from the same initial weights, in this environment "
        f"(ai-edge-litert {version('ai-edge-litert')}) and in a fresh virtual environment holding "
        f"only {', '.join(f'`{r}`' for r in TFLITE_REQUIREMENTS)} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}; all its packages: "
        f"{others}).",
        "",
        "| model | runtime | interpreter module | TensorFlow imported | NumPy | training time "
        "| largest weight difference (relative) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, here, there, diff, rel in rows:
        for label, r, d in (
            ("ai-edge-litert", here, "—"),
            ("tflite-runtime", there, f"{diff:.2e} ({rel:.1e})"),
        ):
            imported = "yes" if r["tensorflow_imported"] else "no"
            lines.append(
                f"| {name} | {label} | `{r['interpreter']}` | {imported} | {r['numpy']} "
                f"| {1000 * r['seconds']:.1f} ms | {d} |"
            )
    ok = not bad and all(
        not h["tensorflow_imported"]
        and not t["tensorflow_imported"]
        and t["interpreter"].startswith("tflite_runtime")
        and rel < 1e-4
        for _, h, t, _, rel in rows
    )
    lines += [
        "",
        f"Outcome: **{'both runtimes train every artifact alike' if ok else 'FAILED'}** "
        "(criteria: the tflite-runtime environment has no TensorFlow, Keras or ai-edge-litert, "
        "neither run imports TensorFlow, the second uses `tflite_runtime`, and the weights agree "
        "within 1e-4 relative; float32 kernels of two builds differ in rounding).",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``siren bench litert-runtimes``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        artifact, side, out = argv[1], int(argv[2]), argv[3]
        print(json.dumps(train_once(artifact, side, out)))
        return 0
    p = argparse.ArgumentParser(
        prog="siren bench litert-runtimes", description=help_description(__doc__)
    )
    p.add_argument(
        "--out",
        default=str(RESULTS / "litert-runtimes.md"),
        help="Markdown output (default: benchmarks/results/litert-runtimes.md)",
    )
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
