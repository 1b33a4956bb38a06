"""Cost of building and checking signed envelopes (``siren bench protocol``).

For the SIREN CNN (225,034 float32 parameters, the 8-tensor layout of the Keras Fashion-MNIST
CNN) and for a 1,000,000-parameter model, measures the median over repeats of:

* encode + sign -- :func:`protocol.encode_update` (float32 bytes, one SHA-256, one signature);
* decode + verify -- :func:`protocol.decode_message` (framing, header, signature, SHA-256,
  finite check, copy);
* admit -- :meth:`protocol.Admission.admit` (decode + verify + every admission rule);

and, to show where the time goes, the parts: SHA-256 of the payload, the Ed25519 signature and
verification of the header alone (these two must not depend on the model size), the float32
byte conversion and the finite check. Prints a table and writes
``benchmarks/results/protocol.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nacl
import numpy as np

from benchmarks import help_description
from protocol import (
    Admission,
    AdmissionPolicy,
    AllowList,
    TensorLayout,
    decode_message,
    encode_update,
    weights_sha256,
)
from protocol.envelope import MAGIC
from protocol.keys import generate_signing_key

RESULTS = Path(__file__).resolve().parent / "results"

#: Keras CNN for 28x28x1 inputs: conv 32 (3x3) - pool - conv 64 (3x3) - pool - dense 128 - 10.
SIREN_CNN_LAYOUT = TensorLayout(
    [
        ("sequential/conv2d/kernel", (3, 3, 1, 32)),
        ("sequential/conv2d/bias", (32,)),
        ("sequential/conv2d_1/kernel", (3, 3, 32, 64)),
        ("sequential/conv2d_1/bias", (64,)),
        ("sequential/dense/kernel", (1600, 128)),
        ("sequential/dense/bias", (128,)),
        ("sequential/dense_1/kernel", (128, 10)),
        ("sequential/dense_1/bias", (10,)),
    ]
)
#: A 1,000,000-parameter model as ten tensors of 100,000 values.
MILLION_LAYOUT = TensorLayout([(f"block_{i}/kernel", (250, 400)) for i in range(10)])

MODELS: dict[str, TensorLayout] = {
    "SIREN CNN": SIREN_CNN_LAYOUT,
    "1M params": MILLION_LAYOUT,
}

OPERATIONS: tuple[tuple[str, str], ...] = (
    ("encode_sign", "encode + sign"),
    ("decode_verify", "decode + verify"),
    ("admit", "admit (decode + rules)"),
    ("sha256", "  SHA-256 of payload"),
    ("sign_header", "  Ed25519 sign header"),
    ("verify_header", "  Ed25519 verify header"),
    ("to_bytes", "  float32 -> bytes"),
    ("finite", "  finite check"),
)


def _time_ms(func: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, minimum) wall time of ``func`` in milliseconds over ``repeats`` calls."""
    func()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        func()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6, min(times) / 1e6


def measure(layout: TensorLayout, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median and minimum milliseconds of each operation in :data:`OPERATIONS` for one layout.

    Keys are the operation names (medians), ``<name>_min`` (minima), ``header_bytes`` and
    ``message_bytes``.
    """
    rng = np.random.default_rng(seed)
    global_w = rng.standard_normal(layout.size).astype(np.float32)
    delta = (rng.standard_normal(layout.size) * 1e-3).astype(np.float32)
    key = generate_signing_key()
    base = weights_sha256(global_w)
    allow = AllowList({"board-0": key.verify_key})

    def encode() -> bytes:
        return encode_update(
            run="bench",
            round=1,
            client="board-0",
            signing_key=key,
            delta=delta,
            layout=layout,
            base_sha256=base,
            samples=6000,
            alarm=False,
        )

    data = encode()
    header_length = int.from_bytes(data[4:8], "little")
    signed = data[: 8 + header_length]
    signature = data[8 + header_length : 72 + header_length]
    payload = data[72 + header_length :]
    assert signed.startswith(MAGIC)

    def admit() -> object:
        admission = Admission(
            run="bench",
            keys=allow,
            policy=AdmissionPolicy(layout),
            round=1,
            base_sha256=base,
        )
        decision = admission.admit(data)
        assert decision.accepted, decision.detail
        return decision

    operations: dict[str, Callable[[], object]] = {
        "encode_sign": encode,
        "decode_verify": lambda: decode_message(data, allow),
        "admit": admit,
        "sha256": lambda: hashlib.sha256(payload).digest(),
        "sign_header": lambda: key.sign(signed),
        "verify_header": lambda: key.verify_key.verify(signed, signature),
        "to_bytes": lambda: delta.astype("<f4").tobytes(),
        "finite": lambda: bool(np.isfinite(delta).all()),
    }
    results: dict[str, float] = {
        "header_bytes": float(header_length),
        "message_bytes": float(len(data)),
    }
    for name, func in operations.items():
        results[name], results[f"{name}_min"] = _time_ms(func, repeats)
    return results


def render_markdown(results: dict[str, dict[str, float]], repeats: int, command: str) -> str:
    """The results file: environment, a table of medians, and the ratio between the models."""
    names = list(results)
    lines = [
        "# Protocol codec: encode+sign and decode+verify cost",
        "",
        f"Command: `{command}`  ",
        f"Median and minimum of {repeats} repeats after one warm-up, single thread (the machine "
        "is shared, so medians carry some noise; minima show the unloaded cost). "
        f"Python {platform.python_version()}, NumPy {np.__version__}, PyNaCl {nacl.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at the end of the run.",
        "",
        "| operation (ms) | "
        + " | ".join(f"{n} median | {n} min" for n in names)
        + " | ratio of medians |",
        "| --- | " + " | ".join("---: | ---:" for _ in names) + " | ---: |",
    ]
    for op, label in OPERATIONS:
        cells = [f"{results[n][op]:.3f} | {results[n][op + '_min']:.3f}" for n in names]
        ratio = results[names[-1]][op] / max(results[names[0]][op], 1e-9)
        lines.append(f"| {label.strip()} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    for key, label in (("header_bytes", "header bytes"), ("message_bytes", "message bytes")):
        cells = [f"{int(results[n][key]):,} | " for n in names]
        ratio = results[names[-1]][key] / results[names[0]][key]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    sizes = ", ".join(f"{n}: d = {MODELS[n].size:,}" for n in names)
    lines += [
        "",
        f"Models: {sizes}. The last column is {names[-1]} / {names[0]}.",
        "",
        "Signing and verifying touch only the header (a few hundred bytes), so their cost is the "
        "same for both models; everything that grows with d is one pass each of float32 "
        "conversion, SHA-256, finite check and copy.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``benchmarks/results/protocol.md``."""
    parser = argparse.ArgumentParser(
        prog="siren bench protocol", description=help_description(__doc__)
    )
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats per operation")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "protocol.md", help="Markdown results file"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    results = {name: measure(layout, args.repeats) for name, layout in MODELS.items()}
    names = list(results)
    print(
        f"{'operation (ms)':28s}"
        + "".join(f"{n + ' med':>15s}{n + ' min':>15s}" for n in names)
        + f"{'ratio':>8s}"
    )
    for op, label in OPERATIONS:
        row = "".join(f"{results[n][op]:15.3f}{results[n][op + '_min']:15.3f}" for n in names)
        ratio = results[names[-1]][op] / max(results[names[0]][op], 1e-9)
        print(f"{label:28s}{row}{ratio:8.2f}")
    command = "python -m benchmarks.protocol_codec" + (
        f" --repeats {args.repeats}" if args.repeats != 50 else ""
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_markdown(results, args.repeats, command), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
