"""Speed and memory of every registered aggregation rule, side by side with Flower and byzfl.

One run times every rule of :data:`coordinator.aggregators.REGISTRY` on the same float32 update
matrices for each ``K`` (clients) and ``d`` (parameters), and -- when the optional ``peers``
extra is installed -- the same inputs through the other libraries' implementations of the rules
they share:

* ``flwr-strategy``: Flower's strategy classes (``flwr.serverapp.strategy``: ``FedAvg``,
  ``Krum``, ``MultiKrum``, ``FedMedian``, ``FedTrimmedAvg``, ``Bulyan``), called through
  ``aggregate_train`` on reply messages built before the clock starts;
* ``flwr-fn``: Flower's older aggregation functions (``flwr.server.strategy.aggregate``);
* ``byzfl-np`` / ``byzfl-torch``: byzfl's aggregators on the numpy matrix and on a zero-copy
  torch view of it. byzfl's package ``__init__`` imports torchvision, so only its
  ``aggregators`` module is loaded, from its file.

It prints a table of median times and ratios (fastest peer / ours) and writes Markdown (and a
PNG chart when matplotlib is available) to ``benchmarks/results/``. Timing policy: a first call
warms up (and is the only call when it takes longer than ``--budget`` seconds); then up to
``--repeats`` timed calls while the budget lasts; the table shows the median. A peer whose
predicted time (scaled from a smaller measured case as ``K^2 d``) exceeds ``--max-call``
seconds is not run (its cell says so). Memory: peak extra bytes allocated during one call of
our rule (``tracemalloc``, which sees numpy's allocations), and the peak resident set growth
during the first call of every implementation (Linux ``VmHWM`` reset via
``/proc/self/clear_refs``).

Usage::

    python -m benchmarks.aggregators                     # full grid, all rules, peers if present
    python -m benchmarks.aggregators --k 50 --d 1000000 --rules krum median --repeats 3
    siren bench aggregators --k 50 --d 1000000           # the same through the CLI
    python -m benchmarks.aggregators --rules fedavg trimmed_mean --merge
                                    # re-measure two rules, keep the other rows of the file

Installing the peers (benchmark only; the project never imports them)::

    pip install flwr==1.41.0            # the ``peers`` extra
    pip install torch==2.13.0           # CPU wheel
    pip install --no-deps byzfl         # its dependencies would pull a torchvision that does
                                        # not load beside the CPU torch

``flwr==1.41.0`` pins older fastapi, starlette, uvicorn, typer, rich, protobuf and packaging
than the project uses; install the peers in a separate virtual environment (with the project
installed editable) or reinstall the project's versions afterwards -- Flower's aggregation code
runs with the newer ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import logging
import os
import platform
import statistics
import sys
import time
import tracemalloc
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregators import REGISTRY, aggregate
from coordinator.aggregators.coordinatewise import trimmed_mean_backend

DEFAULT_K = (10, 50, 200)
DEFAULT_D = (100_000, 1_000_000)
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Rules that are only slow-path research rules; their targets are absolute seconds.
ABSOLUTE_TARGETS = {"residual_reweighting": 20.0, "repeated_median": 20.0}
TARGET_K, TARGET_D, TARGET_RATIO = 50, 1_000_000, 3.0

Call = Callable[[], object]


def byzantine_count(k: int) -> int:
    """Number of attackers in the benchmark inputs and the ``f`` given to the rules: K // 10."""
    return max(1, k // 10)


@dataclasses.dataclass
class Case:
    """One benchmark input: ``K`` updates of ``d`` parameters, ``f`` of them sign-flipped."""

    k: int
    d: int
    f: int
    updates: np.ndarray
    server_update: np.ndarray
    samples: np.ndarray


def make_case(k: int, d: int, seed: int) -> Case:
    """Honest updates ``mu + noise``; the first ``f`` are sign-flipped and scaled by -4."""
    rng = np.random.default_rng(seed)
    f = byzantine_count(k)
    mu = rng.standard_normal(d, dtype=np.float32)
    mu *= np.float32(0.01)
    x = rng.standard_normal((k, d), dtype=np.float32)
    x *= np.float32(0.01)
    x += mu
    x[:f] *= np.float32(-4.0)
    server = rng.standard_normal(d, dtype=np.float32)
    server *= np.float32(0.01)
    server += mu
    samples = rng.integers(50, 500, size=k).astype(np.float64)
    return Case(k, d, f, x, server, samples)


# ---------------------------------------------------------------------------------------------
# Our rules
# ---------------------------------------------------------------------------------------------


def rule_params(name: str, case: Case) -> dict[str, Any] | None:
    """Parameters for rule ``name`` on ``case`` that satisfy its bounds; None if unknown."""
    spec = REGISTRY[name]
    params: dict[str, Any] = {}
    if "f" in spec.params:
        params["f"] = case.f
    if "beta" in spec.params and name.endswith("trimmed_mean"):
        params["beta"] = case.f
    if "server_update" in spec.params:
        params["server_update"] = case.server_update
    missing = [
        p for p, info in spec.params.items() if info.default is info.empty and p not in params
    ]
    return None if missing else params


def our_call(name: str, case: Case) -> Call | None:
    params = rule_params(name, case)
    if params is None:
        return None
    weights = case.samples if name == "fedavg" else None
    return lambda: aggregate(name, case.updates, weights=weights, **params)


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Peer:
    """Another library: a name, its version, and call builders for the rules it shares."""

    name: str
    version: str
    builders: dict[str, Callable[[Case], Call]]
    cleanup: Callable[[], None] = lambda: None


def _load_byzfl_aggregators() -> types.ModuleType:
    """Import ``byzfl.aggregators.aggregators`` without running byzfl's package ``__init__``."""
    if "byzfl" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None or spec.origin is None:
            raise ImportError("byzfl is not installed")
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["byzfl"] = pkg
    return importlib.import_module("byzfl.aggregators.aggregators")


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


def load_peers(names: Sequence[str]) -> tuple[list[Peer], list[str]]:
    """Load the requested peers that are installed; return them and notes on the missing ones."""
    peers: list[Peer] = []
    notes: list[str] = []
    for name in names:
        try:
            peers.append(_PEER_LOADERS[name]())
        except Exception as exc:  # a peer that does not import is reported, not fatal
            notes.append(f"{name}: not available ({type(exc).__name__}: {exc})")
    return peers, notes


def _flwr_fn_peer() -> Peer:
    import flwr.server.strategy.aggregate as fa

    def results(case: Case) -> list[tuple[list[np.ndarray], int]]:
        return [([case.updates[i]], int(case.samples[i])) for i in range(case.k)]

    def fedavg(case: Case) -> Call:
        res = results(case)
        return lambda: fa.aggregate(res)

    def krum(case: Case) -> Call:
        res = results(case)
        return lambda: fa.aggregate_krum(res, case.f, 0)

    def multi_krum(case: Case) -> Call:
        res = results(case)
        return lambda: fa.aggregate_krum(res, case.f, case.k - case.f)

    def median(case: Case) -> Call:
        res = results(case)
        return lambda: fa.aggregate_median(res)

    def trimmed(case: Case) -> Call:
        res = results(case)
        return lambda: fa.aggregate_trimmed_avg(res, case.f / case.k)

    def bulyan(case: Case) -> Call:
        res = results(case)
        # aggregate_bulyan pops from the list it is given: hand it a fresh list each call.
        return lambda: fa.aggregate_bulyan(list(res), case.f, fa.aggregate_krum, to_keep=0)

    builders: dict[str, Callable[[Case], Call]] = {
        "fedavg": fedavg,
        "krum": krum,
        "multi_krum": multi_krum,
        "median": median,
        "trimmed_mean": trimmed,
        "bulyan": bulyan,
    }
    return Peer("flwr-fn", _version("flwr"), builders)


def _flwr_strategy_peer() -> Peer:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import strategy as st
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    # Messages need a run/task identity; a ServerApp would have set it.
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1

    def replies(case: Case) -> list[Any]:
        msgs = []
        for i in range(case.k):
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"update": Array(case.updates[i])}),
                    "metrics": MetricRecord({"num-examples": int(case.samples[i])}),
                }
            )
            instruction = Message(RecordDict(), dst_node_id=i + 1, message_type="train")
            msgs.append(Message(content, reply_to=instruction))
        return msgs

    class StrategyCall:
        """Some strategies consume the arrays of the replies they aggregate, so every timed
        call gets freshly built replies (built by ``prepare``, outside the clock)."""

        def __init__(self, case: Case, strategy: Any) -> None:
            self.case = case
            self.strategy = strategy
            self.msgs: list[Any] = []

        def prepare(self) -> None:
            self.msgs = []
            gc.collect()
            self.msgs = replies(self.case)

        def __call__(self) -> object:
            arrays, _ = self.strategy.aggregate_train(1, self.msgs)
            self.msgs = []
            if arrays is None:
                raise RuntimeError(f"{type(self.strategy).__name__} returned no aggregate")
            return arrays

    def make(factory: Callable[[Case], Any]) -> Callable[[Case], Call]:
        def build(case: Case) -> Call:
            return StrategyCall(case, factory(case))

        return build

    builders = {
        "fedavg": make(lambda c: st.FedAvg()),
        "krum": make(lambda c: st.Krum(num_malicious_nodes=c.f)),
        "multi_krum": make(
            lambda c: st.MultiKrum(num_malicious_nodes=c.f, num_nodes_to_select=c.k - c.f)
        ),
        "median": make(lambda c: st.FedMedian()),
        "trimmed_mean": make(lambda c: st.FedTrimmedAvg(beta=c.f / c.k)),
        "bulyan": make(lambda c: st.Bulyan(num_malicious_nodes=c.f)),
    }
    return Peer("flwr-strategy", _version("flwr"), builders)


def _byzfl_peer(use_torch: bool) -> Peer:
    agg = _load_byzfl_aggregators()
    if use_torch:
        import torch

        def data(case: Case) -> Any:
            return torch.from_numpy(case.updates)

        name, version = "byzfl-torch", f"{_version('byzfl')} (torch {_version('torch')})"
    else:

        def data(case: Case) -> Any:
            return case.updates

        name, version = "byzfl-np", _version("byzfl")

    def make(factory: Callable[[Case], Any]) -> Callable[[Case], Call]:
        def build(case: Case) -> Call:
            vectors = data(case)
            rule = factory(case)
            return lambda: rule(vectors)

        return build

    builders = {
        "fedavg": make(lambda c: agg.Average()),
        "krum": make(lambda c: agg.Krum(f=c.f)),
        "multi_krum": make(lambda c: agg.MultiKrum(f=c.f)),
        "median": make(lambda c: agg.Median()),
        "trimmed_mean": make(lambda c: agg.TrMean(f=c.f)),
        "geometric_median": make(lambda c: agg.GeometricMedian()),
    }
    return Peer(name, version, builders)


_PEER_LOADERS: dict[str, Callable[[], Peer]] = {
    "flwr-strategy": _flwr_strategy_peer,
    "flwr-fn": _flwr_fn_peer,
    "byzfl-np": lambda: _byzfl_peer(False),
    "byzfl-torch": lambda: _byzfl_peer(True),
}
PEER_NAMES = tuple(_PEER_LOADERS)

PEER_NOTES = {
    "fedavg": "peers weigh by sample count as we do, except byzfl (plain mean)",
    "geometric_median": "byzfl runs a fixed 3 Weiszfeld steps (nu=0.1); ours runs to tol=1e-6",
    "bulyan": "flwr-strategy selects theta updates by one Multi-Krum pass, not iterated Krum",
    "multi_krum": "flwr and byzfl average the K-f best; so do we (m = K - f)",
}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclasses.dataclass
class Timing:
    """Median seconds over ``runs`` timed calls, plus memory figures (bytes; None if unknown)."""

    seconds: float
    runs: int
    rss_peak: int | None = None
    traced_peak: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def measure(call: Call, repeats: int, budget: float, trace: bool) -> Timing:
    """Time ``call`` (see the module docstring for the policy).

    A call with a ``prepare`` attribute gets ``prepare()`` before every call, off the clock.
    """
    prepare: Callable[[], None] = getattr(call, "prepare", lambda: None)
    try:
        prepare()
    except Exception as exc:
        return Timing(float("nan"), 0, error=f"setup {type(exc).__name__}: {exc}"[:200])
    gc.collect()
    rss_before = _read_status_kb("VmRSS")
    can_reset = _reset_peak_rss()
    start = time.perf_counter()
    try:
        call()
    except Exception as exc:
        return Timing(float("nan"), 0, error=f"{type(exc).__name__}: {exc}"[:200])
    first = time.perf_counter() - start
    hwm = _read_status_kb("VmHWM")
    rss_peak = None
    if can_reset and rss_before is not None and hwm is not None:
        rss_peak = max(0, hwm - rss_before) * 1024
    times: list[float] = []
    spent = first
    traced = None
    try:
        if first < budget:
            while len(times) < repeats and spent < budget:
                prepare()
                t0 = time.perf_counter()
                call()
                dt = time.perf_counter() - t0
                times.append(dt)
                spent += dt
        if trace and first < budget / 4:
            prepare()
            gc.collect()
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                base, _ = tracemalloc.get_traced_memory()
                call()
                _, peak = tracemalloc.get_traced_memory()
                traced = max(0, peak - base)
            finally:
                tracemalloc.stop()
    except Exception as exc:
        return Timing(float("nan"), 0, error=f"{type(exc).__name__}: {exc}"[:200])
    if not times:
        times = [first]
    return Timing(statistics.median(times), len(times), rss_peak, traced)


@dataclasses.dataclass
class Row:
    k: int
    d: int
    rule: str
    ours: Timing | None
    peers: dict[str, Timing | str]
    #: The table cells as printed, for a row read back from an earlier results file.
    cells: list[str] | None = None

    def best_peer(self) -> tuple[str, float] | None:
        found = [
            (name, t.seconds) for name, t in self.peers.items() if isinstance(t, Timing) and t.ok
        ]
        return min(found, key=lambda item: item[1]) if found else None

    def ratio(self) -> float | None:
        if self.cells is not None:  # as printed: the times in the cells are rounded
            printed = self.cells[-2]
            return float(printed[:-1]) if printed.endswith("x") else None
        best = self.best_peer()
        if best is None or self.ours is None or not self.ours.ok or self.ours.seconds <= 0:
            return None
        return best[1] / self.ours.seconds


#: Growth of a peer's time with K: K^2 d for pairwise-distance rules; Flower's older Bulyan
#: recomputes all distances for each of its theta Krum steps, so K^3 d.
K_EXPONENT = {("flwr-fn", "bulyan"): 3}


def predicted_seconds(
    history: dict[tuple[str, str], list[tuple[int, int, float]]],
    peer: str,
    rule: str,
    k: int,
    d: int,
) -> float | None:
    """Scale the largest measured smaller case of (peer, rule) as ``K^2 d`` (or ``K^3 d``)."""
    past = [(pk, pd, t) for pk, pd, t in history.get((peer, rule), []) if pk <= k and pd <= d]
    if not past:
        return None
    pk, pd, t = max(past, key=lambda item: item[0] * item[0] * item[1])
    return float(t * (k / pk) ** K_EXPONENT.get((peer, rule), 2) * (d / pd))


def read_floor(x: np.ndarray, repeats: int) -> dict[str, float]:
    """Time one read pass over ``x``: the floor of any rule that reads its whole input.

    The pass is a max-reduction (no arithmetic to speak of, so memory-bound): over the whole
    matrix in one thread, and over its row halves in two threads of a fresh pool. Returns the
    faster median (``seconds``), the bandwidth it implies (``gbps``) and the thread count.
    """
    from concurrent.futures import ThreadPoolExecutor

    flat = x.reshape(-1)
    halves = [flat[: flat.size // 2], flat[flat.size // 2 :]]
    best: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for threads in (1, 2):
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                if threads == 1:
                    flat.max()
                else:
                    list(pool.map(np.max, halves))
                times.append(time.perf_counter() - t0)
            med = statistics.median(times[1:])  # the first pass warms up
            if not best or med < best["seconds"]:
                best = {"seconds": med, "threads": float(threads)}
    best["gbps"] = x.nbytes / best["seconds"] / 1e9
    return best


def _parse_cell(cell: str) -> Timing | str | None:
    """Inverse of :func:`_cell` (up to rounding): a time, a 'not run' note, or None for '-'."""
    text = cell.strip()
    if text == "-":
        return None
    if text == "error":
        return Timing(float("nan"), 0, error="error (earlier run)")
    one_run = text.endswith("(1 run)")
    value = text.removesuffix("(1 run)").strip()
    try:
        if value.endswith(" ms"):
            seconds = float(value[:-3]) / 1000
        elif value.endswith(" s"):
            seconds = float(value[:-2])
        else:
            return text
    except ValueError:
        return text
    return Timing(seconds, 1 if one_run else 2)


def load_rows(path: Path) -> tuple[list[Row], list[str], list[str]]:
    """Read the measurement table of an earlier results file.

    Returns its rows (cells kept verbatim, times parsed for the targets and the chart), its
    peer column names, and its provenance lines (the command, load averages, total time).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| K | d | rule | ours |"))
    head = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    peer_names = head[4:-2]
    rows: list[Row] = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        ours = _parse_cell(cells[3])
        peers: dict[str, Timing | str] = {}
        for name, cell in zip(peer_names, cells[4:-2]):
            parsed = _parse_cell(cell)
            if parsed is not None:
                peers[name] = parsed
        rows.append(
            Row(
                int(cells[0]),
                int(cells[1].replace(",", "")),
                cells[2],
                ours if isinstance(ours, Timing) else None,
                peers,
                cells,
            )
        )
    provenance = []
    for line in lines[:start]:
        if "Produced by `" in line:
            provenance.append("command `" + line.split("Produced by `", 1)[1].split("`")[0] + "`")
        elif line.startswith(("- Load average", "- Total benchmark time")):
            provenance.append(line[2:].split(". The machine")[0].rstrip("."))
    return rows, peer_names, provenance


def merge_rows(old: Sequence[Row], new: Sequence[Row]) -> list[Row]:
    """``old`` with every ``(K, d, rule)`` measured again in ``new`` replaced (or added)."""
    merged = {(r.k, r.d, r.rule): r for r in old}
    merged.update({(r.k, r.d, r.rule): r for r in new})
    return sorted(merged.values(), key=lambda r: (r.d, r.k, r.rule))


def run(
    ks: Sequence[int],
    ds: Sequence[int],
    rules: Sequence[str],
    peers: Sequence[Peer],
    repeats: int,
    budget: float,
    max_call: float,
    seed: int,
    log: Callable[[str], None] = print,
    floor: dict[str, float] | None = None,
) -> list[Row]:
    """Measure every rule (ours and peers) on every ``(K, d)`` case.

    When the target case ``(TARGET_K, TARGET_D)`` is part of the grid and ``floor`` is a dict,
    :func:`read_floor` of its input is stored there too.
    """
    rows: list[Row] = []
    history: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
    for d in sorted(ds):
        for k in sorted(ks):
            case = make_case(k, d, seed)
            log(f"== K={k} d={d} f={case.f} (input {case.updates.nbytes / 2**20:.0f} MiB)")
            if floor is not None and (k, d) == (TARGET_K, TARGET_D):
                floor.update(read_floor(case.updates, repeats))
                log(f"   read floor: {_fmt_seconds(floor['seconds'])} ({floor['gbps']:.1f} GB/s)")
            for rule in rules:
                call = our_call(rule, case)
                ours = None
                if call is not None:
                    ours = measure(call, repeats, budget, trace=True)
                    log(f"   {rule:22s} ours          {_fmt_timing(ours)}")
                row = Row(k, d, rule, ours, {})
                for peer in peers:
                    if rule not in peer.builders:
                        continue
                    guess = predicted_seconds(history, peer.name, rule, k, d)
                    if guess is not None and guess > max_call:
                        row.peers[peer.name] = f"not run (predicted ~{guess:.0f} s)"
                        log(f"   {rule:22s} {peer.name:13s} {row.peers[peer.name]}")
                        continue
                    try:
                        peer_call = peer.builders[rule](case)
                    except Exception as exc:
                        row.peers[peer.name] = f"setup failed: {type(exc).__name__}"
                        continue
                    timing = measure(peer_call, repeats, budget, trace=False)
                    row.peers[peer.name] = timing
                    if timing.ok:
                        history.setdefault((peer.name, rule), []).append((k, d, timing.seconds))
                    log(f"   {rule:22s} {peer.name:13s} {_fmt_timing(timing)}")
                    del peer_call
                rows.append(row)
            for peer in peers:
                peer.cleanup()
            del case
            gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt_seconds(s: float) -> str:
    if s != s:  # NaN
        return "error"
    if s < 0.1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def _fmt_timing(t: Timing) -> str:
    if not t.ok:
        return f"error: {t.error}"
    mem = f", rss +{t.rss_peak / 2**20:.0f} MiB" if t.rss_peak is not None else ""
    traced = f", traced +{t.traced_peak / 2**20:.0f} MiB" if t.traced_peak is not None else ""
    return f"{_fmt_seconds(t.seconds)} (n={t.runs}{mem}{traced})"


def _cell(value: Timing | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if not value.ok:
        return "error"
    return _fmt_seconds(value.seconds) + ("" if value.runs > 1 else " (1 run)")


def _mem_cell(t: Timing | None, input_bytes: int) -> str:
    if t is None or not t.ok:
        return "-"
    parts = []
    if t.traced_peak is not None:
        parts.append(f"{t.traced_peak / 2**20:.0f} MiB ({t.traced_peak / input_bytes:.2f}x)")
    if t.rss_peak is not None:
        parts.append(f"rss +{t.rss_peak / 2**20:.0f} MiB")
    return ", ".join(parts) or "-"


def table(rows: Sequence[Row], peer_names: Sequence[str]) -> str:
    """Markdown table: one line per (K, d, rule)."""
    head = ["K", "d", "rule", "ours", *peer_names, "fastest peer / ours", "ours: peak extra memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.cells is not None:
            lines.append("| " + " | ".join(row.cells) + " |")
            continue
        ratio = row.ratio()
        input_bytes = row.k * row.d * 4
        cells = [
            str(row.k),
            f"{row.d:,}",
            row.rule,
            _cell(row.ours),
            *(_cell(row.peers.get(p)) for p in peer_names),
            f"{ratio:.1f}x" if ratio is not None else "-",
            _mem_cell(row.ours, input_bytes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: Sequence[Row], floor: dict[str, float] | None = None) -> str:
    """The issue's targets at K=50, d=1e6, each with its measured value and verdict.

    With a measured read ``floor`` (see :func:`read_floor`), a missed ratio target whose
    peer time divided by the ratio is below the time of one read pass over the input says so:
    no implementation that reads its input can meet it on this machine.
    """
    lines = []
    for row in rows:
        if (row.k, row.d) != (TARGET_K, TARGET_D) or row.ours is None or not row.ours.ok:
            continue
        if row.rule in ABSOLUTE_TARGETS:
            limit = ABSOLUTE_TARGETS[row.rule]
            ok = row.ours.seconds < limit
            lines.append(
                f"- `{row.rule}`: {_fmt_seconds(row.ours.seconds)} (target < {limit:.0f} s): "
                + ("met" if ok else "**missed**")
            )
            continue
        best = row.best_peer()
        ratio = row.ratio()
        if best is None or ratio is None:
            continue
        ok = ratio >= TARGET_RATIO
        line = (
            f"- `{row.rule}`: ours {_fmt_seconds(row.ours.seconds)}, fastest peer {best[0]} "
            f"{_fmt_seconds(best[1])}: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x): "
            + ("met" if ok else "**missed**")
        )
        needed = best[1] / TARGET_RATIO
        if not ok and floor and floor["seconds"] > needed:
            line += (
                f" -- out of reach: {TARGET_RATIO:.0f}x needs {_fmt_seconds(needed)}, but one "
                f"read pass over the input already takes {_fmt_seconds(floor['seconds'])} "
                "(measured floor above)"
            )
        lines.append(line)
    return "\n".join(lines) if lines else "(the K=50, d=1,000,000 case was not part of this run)"


def machine_info() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores",
        f"- Python {platform.python_version()}, numpy {np.__version__}",
    ]


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def write_markdown(
    path: Path,
    rows: Sequence[Row],
    peers: Sequence[Peer],
    notes: Sequence[str],
    argv: Sequence[str],
    load_before: str,
    load_after: str,
    elapsed: float,
    chart: Path | None,
    floor: dict[str, float] | None = None,
    earlier: Sequence[str] = (),
    backend: str | None = None,
) -> None:
    """Write the results file; ``earlier`` is the provenance of rows kept from a merged file."""
    peer_names = [p.name for p in peers]
    command = " ".join(["python -m benchmarks.aggregators", *argv])
    produced = f"Produced by `{command}`."
    if earlier:
        produced = (
            f"Rows of the rules named in `{command}` were measured by that command; the other "
            "rows are kept from an earlier run (" + "; ".join(earlier) + ")."
        )
    out = [
        "# Aggregator speed",
        "",
        "Median wall-clock time of one aggregation call of a `(K, d)` float32 update matrix "
        "(`f = K // 10` clients sign-flipped x(-4); rules that take `f` get it, trimmed mean "
        "trims `f` per side). " + produced,
        "",
        *machine_info(),
        f"- Trimmed-mean kernel: {backend or trimmed_mean_backend()}.",
        "- Peers: "
        + (", ".join(f"{p.name} {p.version}" for p in peers) if peers else "none installed"),
        f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after}. The machine "
        "is shared, so absolute times vary between runs; ratios compare calls made back to back.",
        f"- Total benchmark time: {elapsed / 60:.1f} min.",
        "",
    ]
    if floor:
        out[-1:-1] = [
            f"- Measured floor: one read pass over the K={TARGET_K}, d={TARGET_D:,} input "
            f"({TARGET_K * TARGET_D * 4 / 1e6:.0f} MB, a max-reduction, best of 1 and 2 threads) "
            f"takes {_fmt_seconds(floor['seconds'])}, {floor['gbps']:.1f} GB/s.",
        ]
    if notes:
        out += ["Peers not measured:", "", *(f"- {n}" for n in notes), ""]
    out += [
        f"## Targets at K={TARGET_K}, d={TARGET_D:,}",
        "",
        targets(rows, floor),
        "",
        "## All measurements",
        "",
        table(rows, peer_names),
        "",
        "Columns: `ours` is `coordinator.aggregators.aggregate(rule, ...)` including input "
        "validation. `(1 run)` marks calls too slow to repeat within the time budget. "
        "Peak extra memory: bytes allocated by numpy during one call (tracemalloc) and as a "
        "multiple of the input size, then the growth of the resident set during the first call "
        "(it misses memory reused from earlier calls, so it can read low).",
        "",
        "Notes on what the peers compute:",
        "",
        *(f"- `{rule}`: {text}" for rule, text in PEER_NOTES.items()),
        "",
        "What `ours` does that the peers do not: a finiteness check of the whole input and "
        "per-client verdicts. Most rules spend one extra pass over the matrix on the check; "
        "FedAvg and the trimmed mean do it inside the one pass they make over the matrix. "
        "FedAvg is memory-bound "
        "-- one pass over the matrix computes it -- so no one-pass mean can be several times "
        "faster than another: the floor line above is the time of that pass. The trimmed mean "
        "finds the two order statistics of every coordinate with an insertion network over the "
        "clients (O(K d) for trims up to 7, vectorized across coordinates; compiled with numba "
        "when it is installed, else a numpy sort along the client axis), then adds the clipped "
        "values in float64 and counts the verdicts in a second pass over the same cache-sized "
        "tile; byzfl and Flower sort the whole client axis. Without numba the numpy path "
        "returns the same bits at about byzfl's speed.",
        "",
    ]
    if chart is not None:
        out += [f"![times at K={TARGET_K}, d={TARGET_D:,}]({chart.name})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out), encoding="utf-8")


def write_chart(path: Path, rows: Sequence[Row], peer_names: Sequence[str]) -> bool:
    """Bar chart (log scale) of the K=50, d=1e6 case; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sel = [r for r in rows if (r.k, r.d) == (TARGET_K, TARGET_D)]
    if not sel:
        return False
    series = ["ours", *peer_names]
    fig, ax = plt.subplots(figsize=(max(8, len(sel) * 0.7), 4.5))
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        xs, ys = [], []
        for i, row in enumerate(sel):
            t = row.ours if name == "ours" else row.peers.get(name)
            if isinstance(t, Timing) and t.ok:
                xs.append(i + j * width)
                ys.append(t.seconds)
        ax.bar(xs, ys, width=width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per call (log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sel))])
    ax.set_xticklabels([r.rule for r in sel], rotation=45, ha="right")
    ax.set_title(f"Aggregation time, K={TARGET_K}, d={TARGET_D:,}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="siren bench aggregators",
        description="Time every aggregation rule (and Flower/byzfl where they share a rule).",
    )
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_K), help="client counts")
    parser.add_argument(
        "--d", type=int, nargs="+", default=list(DEFAULT_D), help="parameter counts"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument(
        "--rules", nargs="+", default=None, help="rules to time (default: every registered rule)"
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=list(PEER_NAMES),
        choices=PEER_NAMES,
        help="peer implementations to compare with (default: all that are installed)",
    )
    parser.add_argument("--no-peers", action="store_true", help="time our rules only")
    parser.add_argument(
        "--budget", type=float, default=60.0, help="seconds per measurement before repeats stop"
    )
    parser.add_argument(
        "--max-call",
        type=float,
        default=300.0,
        help="skip a peer call predicted to take longer than this many seconds",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of --out that this run does not measure (same peers), so that a "
        "run restricted by --rules/--k/--d updates the full results file in place",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / "aggregators.md",
        help="Markdown output (a PNG chart is written next to it)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if any(k < 1 for k in args.k) or any(d < 1 for d in args.d):
        parser.error("--k and --d must be positive")
    if args.rules is None:
        args.rules = sorted(REGISTRY)
    unknown = sorted(set(args.rules) - set(REGISTRY))
    if unknown:
        parser.error(f"unknown rule(s) {', '.join(unknown)}; valid: {', '.join(sorted(REGISTRY))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    args = parse_args(argv)
    shown_argv = list(sys.argv[1:] if argv is None else argv)
    peers, notes = ([], []) if args.no_peers else load_peers(args.peers)
    for note in notes:
        print(f"note: {note}")
    earlier_rows: list[Row] = []
    earlier: list[str] = []
    peer_names = [p.name for p in peers]
    if args.merge and args.out.exists():
        earlier_rows, earlier_peers, earlier = load_rows(args.out)
        if earlier_peers != peer_names:
            print(
                f"error: {args.out} has peer columns {earlier_peers}, this run {peer_names}; "
                "merge needs the same peers",
                file=sys.stderr,
            )
            return 2
    backend = trimmed_mean_backend()  # loads (compiles) the kernel before anything is timed
    print(f"trimmed-mean kernel: {backend}")
    load_before = _load()
    start = time.perf_counter()
    floor: dict[str, float] = {}
    rows = run(
        args.k,
        args.d,
        args.rules,
        peers,
        args.repeats,
        args.budget,
        args.max_call,
        args.seed,
        floor=floor,
    )
    elapsed = time.perf_counter() - start
    print()
    print(table(rows, peer_names))
    print()
    print(targets(rows, floor))
    if earlier_rows:
        rows = merge_rows(earlier_rows, rows)
    chart_path = args.out.with_suffix(".png")
    chart = chart_path if write_chart(chart_path, rows, peer_names) else None
    write_markdown(
        args.out,
        rows,
        peers,
        notes,
        shown_argv,
        load_before,
        _load(),
        elapsed,
        chart,
        floor=floor or None,
        earlier=earlier,
        backend=backend,
    )
    print(f"\nwrote {args.out}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
