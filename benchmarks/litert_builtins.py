"""Which zoo models train in LiteRT with builtin operators only (``siren bench litert-builtins``).

For every zoo model, two conversions with ``TFLITE_BUILTINS`` only:

* the plain Keras training step (:class:`models.training.Trainer`'s: Keras cross-entropy,
  ``tf.GradientTape``, the Keras optimizer) -- the TensorFlow ops it needs beyond the builtins;
* the training artifact (:func:`models.litert_training.export_litert_training`) -- whether it
  converts, its size, the builtin operators it uses, and the largest relative error of its
  gradients against TensorFlow's on one batch.

Results: ``benchmarks/results/litert-builtins.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"

#: zoo model -> input shape of one sample.
INPUT_SHAPES = {
    "digits-mlp": (8, 8, 1),
    "digits-cnn": (8, 8, 1),
    "dspo-mlp": (28, 28, 1),
    "siren-cnn": (28, 28, 1),
}


def builtin_ops(flatbuffer: bytes) -> list[str]:
    """The operator names a flatbuffer uses, sorted (from TensorFlow's model analyzer)."""
    import tensorflow as tf

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tf.lite.experimental.Analyzer.analyze(model_content=flatbuffer)
    return sorted(set(re.findall(r"Op#\d+ (\w+)", buf.getvalue())))


def gradient_error(model: Any, artifact: Any, seed: int = 0, batch: int = 32) -> float:
    """Largest per-tensor relative error ``‖g_litert − g_tf‖ / ‖g_tf‖`` on one batch.

    The weights are moved off their initial values first (biases non-zero), and the images have
    an all-zero border, so max-pooling windows hold ties as in real images.
    """
    import keras
    import tensorflow as tf

    from models.litert_trainer import LiteRTTrainer
    from models.training import TrainConfig
    from models.weights import get_flat_weights, set_flat_weights, unflatten

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in model.input_shape[1:])
    x = np.zeros((batch, *shape), dtype=np.float32)
    x[:, 2:-2, 2:-2] = rng.random((batch, shape[0] - 4, shape[1] - 4, shape[2]))
    y = rng.integers(0, 10, batch)
    base = get_flat_weights(model)
    weights = base + rng.normal(0, 0.05, base.size).astype(np.float32)
    set_flat_weights(model, weights)
    try:
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        expected = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    finally:
        set_flat_weights(model, base)
    trainer = LiteRTTrainer(artifact, TrainConfig(optimizer=artifact.optimizer))
    flat, _ = trainer.gradient(weights, x, y)
    got = unflatten(flat, artifact.layout)
    return max(
        float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        for a, b in zip(got, expected, strict=True)
    )


def measure(name: str) -> dict[str, Any]:
    """Both conversions of zoo model ``name`` (see the module docstring)."""
    from models.litert_training import export_litert_training, flex_ops_of_keras_step
    from models.zoo import build_model

    model = build_model(name, INPUT_SHAPES[name], 10, seed=0)
    flex = flex_ops_of_keras_step(model)
    t0 = time.perf_counter()
    artifact = export_litert_training(model, model_name=name)
    seconds = time.perf_counter() - t0
    return {
        "model": name,
        "parameters": artifact.layout.size,
        "keras_step_flex_ops": flex,
        "artifact_seconds": seconds,
        "train_flatbuffer_bytes": len(artifact.train_flatbuffer),
        "artifact_bytes": len(artifact.to_bytes()),
        "frozen_inference": artifact.frozen is not None,
        "ops": builtin_ops(artifact.train_flatbuffer),
        "gradient_rel_error": gradient_error(model, artifact),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure` rows."""
    lines = [
        "| model | parameters | Keras training step: ops beyond TFLITE_BUILTINS | training "
        "artifact (builtins only) | artifact size | gradient rel. error vs TensorFlow |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        flex = ", ".join(f"`{op}`" for op in r["keras_step_flex_ops"]) or "none"
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {flex} | converts "
            f"({r['artifact_seconds']:.1f} s) | {r['artifact_bytes'] / 1024:.0f} KiB"
            f"{' (with constant-weight inference)' if r['frozen_inference'] else ''} | "
            f"{r['gradient_rel_error']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Convert every zoo model both ways and write the results."""
    p = argparse.ArgumentParser(
        prog="siren bench litert-builtins", description=help_description(__doc__)
    )
    p.add_argument("--models", default=",".join(INPUT_SHAPES), help="comma-separated zoo models")
    p.add_argument(
        "--out", type=Path, default=RESULTS / "litert-builtins.md", help="Markdown output file"
    )
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in INPUT_SHAPES]
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {', '.join(INPUT_SHAPES)}")
    from models.tf_setup import quiet_tensorflow

    quiet_tensorflow()
    import tensorflow as tf

    rows = []
    for name in models:
        print(f"converting {name} ...", flush=True)
        rows.append(measure(name))
    table = format_table(rows)
    print(table)
    ops = sorted({op for r in rows for op in r["ops"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Training in LiteRT with builtin operators only\n\n"
        f"Command: `siren bench litert-builtins --models {','.join(models)}`; "
        f"TensorFlow {tf.__version__}, {platform.machine()}, Python {platform.python_version()}."
        "\n\nBoth conversions use `TFLiteConverter` with `target_spec.supported_ops = "
        "[TFLITE_BUILTINS]` and resource variables. The Keras step is what the `keras` backend "
        "runs (Keras cross-entropy from logits, `GradientTape`, Keras Adam); the stock LiteRT "
        "wheels (`ai-edge-litert`, `tflite-runtime`) have no Flex delegate, so its ops beyond "
        "the builtins cannot run on a board (measured with TensorFlow's op determinism off; "
        "with it on, as boards and simulators run Keras, TensorFlow builds the cross-entropy "
        "from other ops and the three gradient ops remain). The training artifact writes the "
        "backward pass "
        "from builtin operators (`models/litert_training.py`). The gradient error is the "
        "largest per-tensor `‖g_litert − g_tf‖ / ‖g_tf‖` on one batch of 32 images with an "
        "all-zero border (max-pooling ties), weights moved off their initial values.\n\n"
        f"{table}\n\nBuiltin operators the training artifacts use: "
        + ", ".join(f"`{op}`" for op in ops)
        + ".\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
