"""Round close at K = 100, 500, 1000 boards: batch rules vs the streaming close, side by side.

Part 1 (in process, no network) for each ``K`` and ``d``: the ``(K, d)`` updates of a round
(:func:`firmware_sim.loadgen.synthetic_updates`, 10% boosted flipped attackers) are admitted into a
:class:`coordinator.streaming.StreamingRound` the way the engine does it (Gram rows, when a
distance-based rule or SIREN is measured; bucket counts and labels, when the median is, in bursts of
16 updates; the running sums and tail heaps of :mod:`coordinator.streaming_tails`, when the
trimmed mean is; FLTrust's server update known from the start), timing the admission work per
update. Then every rule closes the round twice on the same buffer: the batch rule
(:func:`coordinator.aggregators.aggregate`, the whole computation after the last update) and the
streaming close (:class:`coordinator.streaming_rules.StreamedClose`); both results are compared
(selection, kept clients, aggregate). SIREN's weight analysis is timed as the cosines of every
update with a reference update (:func:`coordinator.siren.cosine` vs
:class:`coordinator.streaming_rules.StreamingCosines`). One read pass over the matrix (the fastest
of three runs each of ``max`` on one thread and on the rules' thread pool) is measured next to them.

Part 2 (real Mosquitto on loopback, :mod:`benchmarks.round_close_mqtt`): updates admitted per
second by the coordinator service with admission in its own process and in 1 or 2 shard
processes, and the engine's close time of that round.

Targets at K=1000, d=1e6: close < 1 s for Krum, Multi-Krum, FLTrust and SIREN's
weight analysis; median and trimmed mean within 3x one read pass.

Usage::

    siren bench round-close                                  # the full grid (long at 1e6)
    siren bench round-close --k 100 --d 100000 --skip-mqtt   # one quick cell
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import help_description
from coordinator.aggregators import aggregate
from coordinator.aggregators.base import map_column_blocks
from coordinator.aggregators.coordinatewise import trim_count
from coordinator.siren import cosine
from coordinator.streaming import GROUP, StreamingRound, warm_up
from coordinator.streaming_bucket_close import warm_up as warm_up_buckets
from coordinator.streaming_rules import StreamedClose, StreamingCosines
from coordinator.streaming_select import warm_up as warm_up_select
from coordinator.streaming_tails import TailSums
from coordinator.streaming_tails import warm_up as warm_up_tails
from firmware_sim.loadgen import synthetic_updates

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_K = (100, 500, 1000)
DEFAULT_D = (100_000, 1_000_000)
RULES = ("krum", "multi_krum", "bulyan", "fltrust", "median", "trimmed_mean", "siren_wa")
UNDER_ONE_SECOND = ("krum", "multi_krum", "fltrust", "siren_wa")
READ_PASS_BOUND = ("median", "trimmed_mean")
#: The trimmed mean's beta in every cell (10% trimmed per side).
TRIMMED_BETA = 0.1


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def _params(rule: str, k: int, g0: np.ndarray) -> dict[str, Any]:
    f = max(1, k // 10)
    table: dict[str, dict[str, Any]] = {
        "krum": {"f": f},
        "multi_krum": {"f": f},
        "bulyan": {"f": f},
        "fltrust": {"server_update": g0},
        "median": {},
        "trimmed_mean": {"beta": TRIMMED_BETA},
    }
    return table[rule]


def read_pass(x: np.ndarray, repeats: int = 3) -> float:
    """Seconds of one read of every value of ``x``: the fastest of ``repeats`` runs each of
    numpy's ``max`` on one thread and on the rules' thread pool (column blocks), so that the
    ratios to it are not flattered by one slow read."""
    best = np.inf
    for _ in range(repeats):
        single, _ = _timed(lambda: x.max())
        pooled, _ = _timed(lambda: map_column_blocks(lambda c: x[:, c].max(), x.shape[1], 1 << 15))
        best = min(best, single, pooled)
    return float(best)


def _same(a: Any, b: Any) -> str:
    """``equal`` / ``close`` / ``DIFFERENT``: selection and kept clients, then the aggregate."""
    if [v.kept for v in a.verdicts] != [v.kept for v in b.verdicts]:
        return "DIFFERENT"
    sel_a, sel_b = a.info.get("selected"), b.info.get("selected")
    if sel_a is not None and set(np.atleast_1d(sel_a)) != set(np.atleast_1d(sel_b)):
        return "DIFFERENT"
    if np.array_equal(a.vector, b.vector):
        return "equal"
    return "close" if np.allclose(a.vector, b.vector, rtol=1e-5, atol=1e-6) else "DIFFERENT"


def measure_cell(k: int, d: int, rules: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Admission and close times of one ``(K, d)`` (see the module docstring)."""
    rng = np.random.default_rng([seed, 9])
    g0 = rng.standard_normal(d).astype(np.float32)
    pairwise = bool(set(rules) & {"krum", "multi_krum", "bulyan", "siren_wa"})
    coordinatewise = "median" in rules
    stream = StreamingRound(k, d, pairwise=pairwise, coordinatewise=coordinatewise)
    stream.reset(0)
    # The trimmed mean's sums and heaps, kept as the engine keeps them, timed on their own.
    tails = None
    if "trimmed_mean" in rules:
        tails = TailSums(d, k)
        tails.reset(trim_count(TRIMMED_BETA, k))
    stream.set_server_update(g0)
    admit = 0.0
    counting = 0.0
    tails_s = 0.0

    def flush() -> None:
        nonlocal admit, counting, tails_s
        if tails is not None:
            dt, _ = _timed(lambda: tails.flush(stream.buffer))  # type: ignore[union-attr]
            tails_s += dt
            admit += dt
        if stream.buckets is not None:
            dt, _ = _timed(lambda: stream.buckets.flush(stream.buffer))  # type: ignore[union-attr]
            counting += dt
            admit += dt
        dt, _ = _timed(stream.flush)
        admit += dt

    for i, vec in synthetic_updates(k, d, attackers=k // 10, seed=seed):
        t0 = time.perf_counter()
        stream.add(i, vec)
        admit += time.perf_counter() - t0
        if tails is not None:
            tails.add(i)
        if (i + 1) % GROUP == 0:
            flush()
    flush()
    stream.tails = tails
    rows = list(range(k))
    x = stream.matrix(rows)
    reads = read_pass(x)
    cell: dict[str, Any] = {
        "k": k,
        "d": d,
        "admit_per_update": admit / k,
        "buckets_per_update": counting / k if stream.buckets is not None else None,
        "tails_per_update": tails_s / k if tails is not None else None,
        "pairwise": pairwise,
        "read_pass": reads,
        "rules": {},
    }
    for rule in rules:
        if rule == "siren_wa":
            ref = 0
            t0 = time.perf_counter()
            want = [cosine(x[i], x[ref]) for i in range(k)]
            batch_s = time.perf_counter() - t0
            cos = StreamingCosines(stream, cosine, k)
            t0 = time.perf_counter()
            got = [cos(i, ref) for i in range(k)]
            stream_s = time.perf_counter() - t0
            same = all(
                (g is None and w is None)
                or (g is not None and w is not None and (g >= 0) == (w >= 0))
                for g, w in zip(got, want)
            )
            cell["rules"][rule] = {
                "batch": batch_s,
                "streaming": stream_s,
                "same": "equal" if same else "DIFFERENT",
                "how": f"streamed ({cos.exact_calls} recomputed)",
            }
            continue
        params = _params(rule, k, g0)
        t0 = time.perf_counter()
        result = aggregate(rule, x, **params)
        batch_s = time.perf_counter() - t0
        close = StreamedClose(stream, rows)
        t0 = time.perf_counter()
        streamed = close.aggregate(rule, **params)
        stream_s = time.perf_counter() - t0
        cell["rules"][rule] = {
            "batch": batch_s,
            "streaming": stream_s,
            "same": _same(streamed, result),
            "how": close.how,
        }
        print(
            f"  K={k} d={d:.0e} {rule:13s} batch {batch_s:8.3f} s  streaming "
            f"{stream_s:8.3f} s  {cell['rules'][rule]['same']}  ({close.how})",
            flush=True,
        )
    return cell


def machine() -> str:
    """CPU model, cores and load, for the results file."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores shared with other jobs (load average {load})"


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def write_report(cells: list[dict[str, Any]], admission: list[dict[str, Any]], path: Path) -> str:
    """Markdown tables of the cells and the admission runs; returns the text."""
    lines = [
        "# Round close: batch rules vs streaming close",
        "",
        f"Machine: {machine()}. Measured {datetime.date.today().isoformat()} with "
        "`siren bench round-close` (one run per cell; the cores were shared with other "
        "long-running jobs, so absolute times vary by a factor of 2-3 from run to run; "
        "batch and streaming of a cell ran back to back on the same buffer).",
        "",
        "Batch = the rule computed from the (K, d) matrix after the last update (what the "
        "coordinator did before); streaming = the close from the state built on admission "
        "(`coordinator.streaming_rules`). `admit/update` = the streaming admission work per "
        "update (copy, norms, server-update dot; Gram rows when a distance-based rule or SIREN "
        "is measured; bucket counts and labels when the median is, in bursts of 16; the "
        "trimmed mean's running sums and tail heaps when it is), `of which buckets` = their "
        "share (`coordinator.streaming_buckets`: boundaries: the sorted values of the first 63 "
        "updates, or 64 of those of the first 127 or 255 (at most a third of the round), and 4 "
        "beyond either end of them, then each update's values counted and labelled with their "
        "bucket), `of which tails` = the trimmed mean's (`coordinator.streaming_tails`: each "
        "coordinate's sum, and its trim + 1 lowest and highest values in heaps with their "
        "sums). `read pass` = one read of "
        "the whole matrix, the fastest of three on one thread and three on the rules' thread "
        "pool. Results: `equal` = same selection and bit-identical "
        "aggregate, `close` = same selection, aggregate within float tolerance.",
        "",
        "| K | d | rule | batch close (s) | streaming close (s) | speed-up | result | "
        "streaming path |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        for rule, r in c["rules"].items():
            ratio = r["batch"] / r["streaming"] if r["streaming"] > 0 else float("inf")
            lines.append(
                f"| {c['k']} | {c['d']:.0e} | {rule} | {_fmt(r['batch'])} | "
                f"{_fmt(r['streaming'])} | {ratio:.0f}x | {r['same']} | {r['how']} |"
            )
    lines += [
        "",
        "| K | d | admit/update, streaming (s) | of which buckets (s) | of which tails (s) | "
        "read pass (s) | median / read pass | trimmed mean / read pass |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        med = c["rules"].get("median", {}).get("streaming")
        tri = c["rules"].get("trimmed_mean", {}).get("streaming")
        rp = c["read_pass"]
        bk = c.get("buckets_per_update")
        tl = c.get("tails_per_update")
        lines.append(
            f"| {c['k']} | {c['d']:.0e} | {c['admit_per_update']:.4f} | "
            f"{'' if bk is None else f'{bk:.4f}'} | {'' if tl is None else f'{tl:.4f}'} | "
            f"{rp:.3f} | "
            f"{'' if med is None else f'{med / rp:.1f}x'} | "
            f"{'' if tri is None else f'{tri / rp:.1f}x'} |"
        )
    lines += _targets(cells)
    kept = _kept_admission(path) if not admission else ""
    if kept:
        lines += ["", kept.rstrip("\n")]
    if admission:
        lines += [
            "",
            "## Admission over MQTT (Mosquitto on loopback, load generator in its own process)",
            "",
            "`shards = 0`: the coordinator's process receives, verifies and decodes; `1`, `2`: "
            "that many admission processes on an MQTT v5 shared subscription. Rate = boards / "
            "(last update admitted − first publish). Close = the engine's aggregate time of "
            "that round (record `timing.aggregate_seconds`). Every admitted update is "
            "committed to SQLite (4 bytes per value) before its acknowledgement.",
            "",
            "| K | d | engine | shards | updates admitted / s | admission (s) | close (s) | "
            "close path |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for a in admission:
            lines.append(
                f"| {a['k']} | {a['d']:.0e} | {a['engine']} | {a['shards']} | "
                f"{a['rate']:.0f} | {a['admit_seconds']:.1f} | {a['close_seconds']:.3f} | "
                f"{a['close_how']} |"
            )
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


_ADMISSION_TITLE = "## Admission over MQTT"
_KEPT_NOTE = "(Kept from the previous report: this run was made with `--skip-mqtt`.)"


def _kept_admission(path: Path) -> str:
    """The MQTT admission section of the report at ``path`` (a run without ``--skip-mqtt``),
    with a note that it was not measured again; "" when there is none."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(_ADMISSION_TITLE)
    if at < 0:
        return ""
    section = text[at:]
    title, _, body = section.partition("\n")
    body = body.replace(_KEPT_NOTE + "\n\n", "").lstrip("\n")
    return f"{title}\n\n{_KEPT_NOTE}\n\n{body}"


def _targets(cells: list[dict[str, Any]]) -> list[str]:
    top = [c for c in cells if c["k"] == 1000 and c["d"] == 1_000_000]
    if not top:
        return []
    c = top[0]
    out = ["", "## Targets at K=1000, d=1e6", ""]
    for rule in UNDER_ONE_SECOND:
        r = c["rules"].get(rule)
        if r is not None:
            ok = "met" if r["streaming"] < 1.0 else "NOT met"
            out.append(f"- {rule}: close {r['streaming']:.3f} s (< 1 s: {ok})")
    for rule in READ_PASS_BOUND:
        r = c["rules"].get(rule)
        if r is not None:
            ratio = r["streaming"] / c["read_pass"]
            ok = "met" if ratio <= 3.0 else "NOT met"
            out.append(
                f"- {rule}: {r['streaming']:.3f} s = {ratio:.1f}x the read pass of "
                f"{c['read_pass']:.3f} s (<= 3x: {ok})"
            )
    return out


def _mqtt_size(value: str) -> tuple[int, int]:
    """An admission run's size from the command line: ``KxD`` (boards x parameters).

    Raises
    ------
    argparse.ArgumentTypeError
        When ``value`` is not two whole numbers >= 1 joined by ``x``.
    """
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected KxD such as 1000x100000, got {value!r}")
    return int(parts[0]), int(parts[1])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``siren bench round-close``."""
    p = argparse.ArgumentParser(
        prog="siren bench round-close", description=help_description(__doc__)
    )
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(DEFAULT_K),
        help=f"board counts of the in-process part (default: {' '.join(map(str, DEFAULT_K))})",
    )
    p.add_argument(
        "--d",
        type=int,
        nargs="+",
        default=list(DEFAULT_D),
        help=f"update sizes of the in-process part (default: {' '.join(map(str, DEFAULT_D))})",
    )
    p.add_argument(
        "--rules",
        nargs="+",
        default=list(RULES),
        choices=RULES,
        metavar="RULE",
        help=f"rules to close both ways: {', '.join(RULES)} (siren_wa: SIREN's weight "
        "analysis) (default: all)",
    )
    p.add_argument("--skip-mqtt", action="store_true", help="only the in-process part")
    p.add_argument(
        "--mqtt",
        nargs="+",
        type=_mqtt_size,
        default=[(1000, 100_000), (200, 1_000_000)],
        metavar="KxD",
        help="sizes of the admission runs over MQTT (default: 1000x100000 200x1000000)",
    )
    p.add_argument(
        "--shards",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="admission processes of the MQTT runs, one run per value (0: admission in the "
        "coordinator's own process); a run with streaming admission off (the batch rules) "
        "is always added (default: 0 1 2)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "round-close.md",
        help="Markdown report, overwritten after every cell (default: the repository's "
        "benchmarks/results/round-close.md)",
    )
    args = p.parse_args(argv)
    if any(v < 1 for v in [*args.k, *args.d]):
        p.error("--k and --d must be >= 1")
    if any(s < 0 for s in args.shards):
        p.error(f"--shards must be >= 0, got {' '.join(map(str, args.shards))}")
    warm_up()
    warm_up_select()
    warm_up_buckets()
    warm_up_tails()
    cells = []
    for d in args.d:
        for k in args.k:
            print(f"K={k} d={d}: admitting {k} updates...", flush=True)
            cells.append(measure_cell(k, d, args.rules))
            write_report(cells, [], args.out)
    admission: list[dict[str, Any]] = []
    if not args.skip_mqtt:
        from benchmarks.round_close_mqtt import measure_admission

        for k, d in args.mqtt:
            for shards in args.shards:
                print(f"MQTT K={k} d={d} shards={shards}...", flush=True)
                admission.append(measure_admission(k=k, d=d, shards=shards))
            admission.append(measure_admission(k=k, d=d, shards=0, streaming=False))
            write_report(cells, admission, args.out)
    print(write_report(cells, admission, args.out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
