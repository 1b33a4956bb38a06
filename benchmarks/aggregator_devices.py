"""The heavy aggregation rules on numpy and on every PyTorch device found, side by side.

For each ``K`` boards and ``d`` parameters a ``(K, d)`` float32 matrix of updates is drawn
(standard normal, the first 10% sign-flipped and boosted 4x, as attackers) and every rule of
:data:`coordinator.aggregators.devices.DEVICE_RULES` that the coordinator offers as a defence
(the repeated-median baseline excepted) aggregates it once per device: ``numpy`` (the numpy
rules), ``cpu`` (PyTorch on the CPU) and each ``cuda:N`` PyTorch sees. Every torch result is
compared with the numpy one (same selection and kept clients; aggregate within 1e-5 relative).

Cells that cannot run are skipped with the reason in the table, never guessed:

* **memory**: a cell runs only if ``/proc/meminfo`` MemAvailable, read just before, holds the
  matrix plus what the rules add on the host (residual reweighting keeps a corrected copy of
  the matrix) plus a 1 GB margin. K=1000, d=1e7 is 40 GB of float32.
* **time**: after a warm-up on 64 columns, each rule runs on the first 256 and the first
  ``d / 100`` columns (at least 2,000); its time, a fixed part plus a part linear in ``d``,
  is projected through the two probes, and when it exceeds ``--budget`` seconds the full run
  is skipped and the projection is reported instead. A rule whose 256-column probe alone
  takes over 5 s and scales to three budgets is stopped before the larger probe.

Usage::

    siren bench aggregator-devices                       # the full grid (long)
    siren bench aggregator-devices --k 100 --d 1e5       # one quick cell
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import help_description
from coordinator.aggregators import aggregate
from coordinator.aggregators.devices import available_devices, device_description, torch_module
from coordinator.errors import DeviceUnavailableError, InvalidParameterError

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "aggregator-devices.md"
DEFAULT_K = (100, 1000)
DEFAULT_D = (1_000_000, 10_000_000)
RULES = (
    "krum",
    "multi_krum",
    "bulyan",
    "median",
    "trimmed_mean",
    "geometric_median",
    "fltrust",
    "foolsgold",
    "residual_reweighting",
)
#: Host copies of the matrix a rule makes besides its input (residual reweighting's corrected
#: models); every other rule works in column blocks.
EXTRA_COPIES = {"residual_reweighting": 1.0}
MARGIN_BYTES = 1 << 30
#: Columns of the first, tiny probe; a projection from it beyond ``TINY_FACTOR`` budgets skips
#: the rule at once (the second probe of a rule as slow as that would itself take minutes).
TINY_PROBE = 256
TINY_FACTOR = 3.0
TINY_DECISIVE_SECONDS = 5.0
MIN_PROBE = 2_000


def mem_available() -> int:
    """Bytes the kernel says can be allocated without swapping (``/proc/meminfo``)."""
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable line in /proc/meminfo")


def rule_params(rule: str, k: int, server: np.ndarray) -> dict[str, Any]:
    """The parameters each rule is timed with (f = 10% of K, the attackers' share)."""
    f = max(1, k // 10)
    table: dict[str, dict[str, Any]] = {
        "krum": {"f": f},
        "multi_krum": {"f": f},
        "bulyan": {"f": f},
        "median": {},
        "trimmed_mean": {"beta": f},
        "geometric_median": {},
        "fltrust": {"server_update": server},
        "foolsgold": {"history": False},
        "residual_reweighting": {},
    }
    return table[rule]


def make_updates(k: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(K, d)`` float32 updates (10% boosted sign-flipped attackers) and a server update."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, d), dtype=np.float32)
    x[: max(1, k // 10)] *= np.float32(-4.0)
    server = rng.standard_normal(d, dtype=np.float32)
    return x, server


@dataclass
class Timing:
    """One rule on one device in one cell."""

    seconds: float | None = None
    projected: float | None = None
    probe_d: int = 0
    same: str = ""
    note: str = ""


@dataclass
class Cell:
    """One (K, d) cell: either skipped for memory, or a timing per rule and device."""

    k: int
    d: int
    skipped: str = ""
    timings: dict[tuple[str, str], Timing] = field(default_factory=dict)


def compare(reference: Any, other: Any) -> str:
    """``equal`` (bit-identical aggregate), ``close`` (same selection, aggregate within 1e-5
    relative) or what differs."""
    if [v.kept for v in reference.verdicts] != [v.kept for v in other.verdicts]:
        return "DIFFERENT kept clients"
    if reference.info.get("selected") != other.info.get("selected"):
        return "DIFFERENT selection"
    if np.array_equal(reference.vector, other.vector):
        return "equal"
    scale = max(float(np.max(np.abs(reference.vector))), 1e-30)
    rel = float(np.max(np.abs(reference.vector.astype(np.float64) - other.vector))) / scale
    return "close" if rel <= 1e-5 else f"DIFFERENT aggregate ({rel:.1e})"


def _sliced(params: dict[str, Any], columns: int) -> dict[str, Any]:
    """The rule's parameters for the first ``columns`` columns (FLTrust's server update)."""
    out = dict(params)
    if "server_update" in out:
        out["server_update"] = out["server_update"][:columns]
    return out


def _project(
    rule: str,
    x: np.ndarray,
    params: dict[str, Any],
    device: str,
    probes: tuple[int, int],
    budget: float,
) -> tuple[float | None, str]:
    """``(projected seconds, skip note)`` of the rule on all ``d`` columns.

    The rule runs on the first ``probes[0]`` columns, then (unless that alone projects beyond
    :data:`TINY_FACTOR` budgets and took over :data:`TINY_DECISIVE_SECONDS`) on the first
    ``probes[1]``; the time is taken as a fixed part plus a part linear in ``d``, through the
    two probes, and evaluated at ``d``. The note is empty when the projection is within
    ``budget``.
    """
    d = x.shape[1]
    times = []
    for columns in probes:
        t0 = time.perf_counter()
        aggregate(rule, x[:, :columns], device=device, **_sliced(params, columns))
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            rough = times[0] * d / columns
            if d > columns and rough > TINY_FACTOR * budget and times[0] > TINY_DECISIVE_SECONDS:
                return rough, (
                    f"skipped: projected {rough:.0f} s from a d={columns:,} probe "
                    f"(> {TINY_FACTOR * budget:.0f} s)"
                )
    (c1, c2), (t1, t2) = probes, times
    # Time = fixed part + part linear in d, through the two probes: the fixed part (Krum's
    # scoring, Bulyan's iterated Krum on the (K, K) distances) is large at K=1000 and must not
    # be scaled by d / probe.
    slope = max(0.0, (t2 - t1) / (c2 - c1)) if c2 > c1 else t2 / c2
    projected = t2 + slope * (d - c2)
    if d > c2 and projected > budget:
        return projected, (
            f"skipped: projected {projected:.0f} s from probes of d={c1:,} and {c2:,} "
            f"(> {budget:.0f} s budget)"
        )
    return projected, ""


def measure_cell(
    k: int, d: int, rules: Sequence[str], devices: Sequence[str], budget: float
) -> Cell:
    """Time every rule on every device for one (K, d), skipping what does not fit or would
    exceed ``budget`` seconds (see the module notes)."""
    cell = Cell(k, d)
    matrix_bytes = 4 * k * d
    need = int(matrix_bytes * (1 + max(EXTRA_COPIES.get(r, 0.0) for r in rules))) + MARGIN_BYTES
    available = mem_available()
    if need > available:
        cell.skipped = (
            f"needs {need / 1e9:.1f} GB of host memory (the {matrix_bytes / 1e9:.1f} GB float32 "
            f"matrix + what the rules add + 1 GB), MemAvailable was {available / 1e9:.1f} GB"
        )
        print(f"K={k} d={d:.0e}: skipped: {cell.skipped}", flush=True)
        return cell
    print(f"K={k} d={d:.0e}: drawing the {matrix_bytes / 1e9:.1f} GB matrix", flush=True)
    x, server = make_updates(k, d)
    probe_d = min(d, max(MIN_PROBE, d // 100))
    for rule in rules:
        params = rule_params(rule, k, server)
        extra = int(matrix_bytes * EXTRA_COPIES.get(rule, 0.0)) + MARGIN_BYTES
        reference = None
        for device in devices:
            timing = Timing(probe_d=probe_d)
            cell.timings[(rule, device)] = timing
            if extra > mem_available():
                timing.note = "skipped: the rule's host copy does not fit in MemAvailable"
                print(f"  {rule:22s} {device:8s} {timing.note}", flush=True)
                continue
            # Warm-up on a few columns: compiled kernels, PyTorch's first calls.
            aggregate(rule, x[:, :64], device=device, **_sliced(params, 64))
            timing.projected, timing.note = _project(
                rule, x, params, device, (min(TINY_PROBE, d), probe_d), budget
            )
            if timing.note:
                print(f"  {rule:22s} {device:8s} {timing.note}", flush=True)
                continue
            t0 = time.perf_counter()
            result = aggregate(rule, x, device=device, **params)
            timing.seconds = time.perf_counter() - t0
            if reference is None and device == "numpy":
                reference = result
            elif reference is not None:
                timing.same = compare(reference, result)
            del result
            gc.collect()
            print(
                f"  {rule:22s} {device:8s} {timing.seconds:9.2f} s  {timing.same}",
                flush=True,
            )
    del x
    gc.collect()
    return cell


def machine() -> str:
    """CPU model, cores, memory and load, for the results file."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores shared with other jobs (load average {load}), "
        f"MemAvailable {mem_available() / 1e9:.1f} GB at the start"
    )


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _entry(t: Timing | None) -> str:
    if t is None:
        return "-"
    if t.seconds is not None:
        return _fmt(t.seconds)
    if t.projected is not None:
        return f"skipped (~{t.projected:.0f} s projected)"
    return "skipped (memory)"


def write_report(
    cells: Sequence[Cell],
    devices: Sequence[str],
    path: Path,
    argv: Sequence[str],
    budget: float,
    started: str,
) -> str:
    """The Markdown report (table, machine line, command); returns the text."""
    torch = torch_module()
    gpus = [dev for dev in devices if dev.startswith("cuda")]
    lines = [
        "# Aggregators on numpy and on PyTorch devices",
        "",
        f"Machine: {started}. Measured {datetime.date.today().isoformat()}, Python "
        f"{platform.python_version()}, numpy {np.__version__}, "
        + (f"torch {torch.__version__}." if torch is not None else "PyTorch not installed.")
        + " Devices: "
        + ", ".join(device_description(dev) for dev in devices)
        + ".",
        "",
        "Command: `siren bench aggregator-devices"
        + (" " + " ".join(argv) if argv else "")
        + "` (under `nice -n 10`; one run per cell, the cores were shared with other "
        "long-running jobs, so absolute times vary by a factor of 2-3 from run to run).",
        "",
    ]
    if not gpus:
        lines += [
            "**No CUDA GPU was visible on this machine: the table has no GPU columns.** GPU "
            "figures come from a machine with a GPU: run the same command there (with the "
            "`gpu` extra) and every `cuda:N` device PyTorch sees gets a column.",
            "",
        ]
    lines += [
        "Seconds per aggregation of a (K, d) float32 matrix (10% sign-flipped attackers), "
        "input checks included. `numpy` = the numpy rules (the default device); `cpu` = "
        "PyTorch on the CPU; `cuda:N` = PyTorch on GPU N. `same` compares each torch result "
        "with numpy's: `equal` = bit-identical aggregate, `close` = same selection and kept "
        "clients, aggregate within 1e-5 relative. f = K/10 (trimmed mean: beta = f); "
        "FoolsGold without history (the history update is a host copy, the same on every "
        f"device). Time budget {budget:.0f} s per rule and device: after a warm-up, a rule "
        "runs on the first 256 and the first d/100 columns (at least 2,000); the line through "
        "the two times (a fixed part + a part linear in d) projects the full run, which is "
        "skipped (projection shown) beyond the budget. Cells whose matrix "
        "does not fit in the host's MemAvailable are skipped with the numbers.",
        "",
    ]
    header = "| K | d | rule | " + " | ".join(devices)
    torch_devices = [dev for dev in devices if dev != "numpy"]
    header += "".join(f" | {dev} / numpy | same ({dev})" for dev in torch_devices) + " |"
    lines += [header, "|" + " --- |" * (3 + len(devices) + 2 * len(torch_devices))]
    for cell in cells:
        if cell.skipped:
            blanks = " | ".join("-" for _ in range(len(devices) + 2 * len(torch_devices) - 1))
            lines.append(f"| {cell.k} | {cell.d:.0e} | all | skipped: {cell.skipped} | {blanks} |")
            continue
        rules = list(dict.fromkeys(rule for rule, _ in cell.timings))
        for rule in rules:
            row = [str(cell.k), f"{cell.d:.0e}", rule]
            row += [_entry(cell.timings.get((rule, dev))) for dev in devices]
            base = cell.timings.get((rule, "numpy"))
            for dev in torch_devices:
                t = cell.timings.get((rule, dev))
                if base and t and base.seconds and t.seconds:
                    row.append(f"{t.seconds / base.seconds:.2f}x")
                else:
                    row.append("-")
                row.append(t.same if t and t.same else "-")
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "What runs on the device: the Gram matrix (Krum, Multi-Krum, Bulyan, FoolsGold, "
        "geometric median) and FLTrust's dot products in float64; the sorted column blocks of "
        "median, trimmed mean and Bulyan's coordinate stage; the repeated-median slope tensors "
        "of residual reweighting. Scores, selections, Weiszfeld iterations on the (K, K) Gram "
        "matrix and the final weighted combination stay numpy (docs/gpu-coordinator.md).",
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


def _size(value: str) -> int:
    """A board count or update size from the command line: ``100``, ``1e6`` or ``1000000``.

    Raises
    ------
    argparse.ArgumentTypeError
        When ``value`` is not a positive whole number.
    """
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number.is_integer() or number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return int(number)


def _devices(requested: Sequence[str] | None) -> list[str]:
    """The devices to time: numpy first, then each requested device as it resolves here
    (``auto`` to ``cuda`` or ``numpy``), once each; by default every device found.

    Raises
    ------
    coordinator.errors.InvalidParameterError
        When a device is unknown.
    coordinator.errors.DeviceUnavailableError
        When this machine cannot provide a device (the message says why).
    """
    from coordinator.aggregators.devices import resolve_device

    devices = ["numpy"]
    for name in requested or available_devices():
        resolved = resolve_device(name)
        if resolved not in devices:
            devices.append(resolved)
    return devices


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid and write the report (``siren bench aggregator-devices``)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="siren bench aggregator-devices", description=help_description(__doc__)
    )
    p.add_argument(
        "--k",
        nargs="+",
        type=_size,
        default=list(DEFAULT_K),
        help=f"board counts (default: {' '.join(str(k) for k in DEFAULT_K)})",
    )
    p.add_argument(
        "--d",
        nargs="+",
        type=_size,
        default=list(DEFAULT_D),
        help="update sizes, e.g. 1e6 (default: 1e6 1e7)",
    )
    p.add_argument(
        "--rules",
        nargs="+",
        default=list(RULES),
        choices=RULES,
        metavar="RULE",
        help=f"rules to time: {', '.join(RULES)} (default: all)",
    )
    p.add_argument(
        "--devices",
        nargs="+",
        default=None,
        help="devices to time besides numpy: cpu, cuda, cuda:N or auto "
        "(default: every torch device found)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds per rule and device beyond which a projected run is skipped (300)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="Markdown report, overwritten (default: the repository's "
        "benchmarks/results/aggregator-devices.md)",
    )
    args = p.parse_args(args_list)
    try:
        devices = _devices(args.devices)
    except (InvalidParameterError, DeviceUnavailableError) as exc:
        p.error(f"--devices: {exc}")
    started = machine()
    print(f"devices: {', '.join(devices)}", flush=True)
    cells = [measure_cell(k, d, args.rules, devices, args.budget) for k in args.k for d in args.d]
    write_report(cells, devices, args.out, args_list, args.budget, started)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
