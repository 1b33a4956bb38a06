"""Shared types of the aggregator registry: verdicts, results, rule specs and validation.

Every rule is a pure function ``rule(updates, ctx, **params) -> AggregationResult`` over a
``(K, d)`` float32 matrix of client updates. ``ctx`` carries what some rules need besides the
matrix: per-client sample counts, a seeded ``numpy.random.Generator`` and, for stateful rules,
the state returned by the previous round. Rules never mutate their input (the registry hands them
a read-only view) and draw randomness only from ``ctx.rng``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from coordinator.errors import (
    ByzantineBoundError,
    InvalidParameterError,
    InvalidUpdatesError,
    UnknownAggregatorError,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Verdict:
    """What a rule did with one client's update.

    Attributes
    ----------
    kept : bool
        Whether the update contributed to the aggregate at all.
    weight : float
        Its share in the aggregate (weights of kept clients sum to 1 for mean-type rules; for
        coordinate-wise rules, the fraction of coordinates where the client's value was used).
    score : float or None
        The rule's score for the client (Krum score, trust score, ...), if it has one.
    reason : str
        Short human-readable explanation, e.g. ``"krum: selected"``.
    """

    kept: bool
    weight: float
    score: float | None
    reason: str


@dataclass(frozen=True)
class AggregationResult:
    """Output of a rule: the aggregate update, one verdict per client, and the new state."""

    vector: np.ndarray
    verdicts: tuple[Verdict, ...]
    state: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregationContext:
    """Inputs besides the update matrix.

    Attributes
    ----------
    weights : np.ndarray
        float64 per-client sample counts (all ones when the caller gave none).
    rng : np.random.Generator
        The only source of randomness a rule may use.
    state : Any
        State returned by the previous call of a stateful rule (None on the first round).
    device : str
        Where the rule's heavy part runs (:mod:`coordinator.aggregators.devices`): ``"numpy"``
        (default), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, already resolved. Rules without a
        device path ignore it.
    """

    weights: np.ndarray
    rng: np.random.Generator
    state: Any = None
    device: str = "numpy"


Rule = Callable[..., AggregationResult]


@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: its function, typed parameters with defaults, and a summary."""

    name: str
    func: Rule
    params: dict[str, inspect.Parameter]
    stateful: bool
    summary: str
    checks_finite: bool = False

    def describe(self) -> str:
        """One line: name, parameters with defaults, summary."""
        parts = []
        for p in self.params.values():
            default = "required" if p.default is inspect.Parameter.empty else repr(p.default)
            parts.append(f"{p.name}={default}")
        return f"{self.name}({', '.join(parts)}): {self.summary}"


REGISTRY: dict[str, RuleSpec] = {}


def register(
    name: str, *, stateful: bool = False, checks_finite: bool = False
) -> Callable[[Rule], Rule]:
    """Decorator adding ``func`` to :data:`REGISTRY` under ``name``.

    The rule's keyword-only parameters (after ``updates`` and ``ctx``) become its typed parameters;
    the first line of its docstring becomes the summary. ``checks_finite=True`` declares that the
    rule itself rejects non-finite values (through :func:`reject_non_finite`) in the pass it makes
    over the matrix anyway, so :func:`aggregate` skips its own finiteness pass for it.
    """

    def decorator(func: Rule) -> Rule:
        if name in REGISTRY:
            raise ValueError(f"aggregator {name!r} registered twice")
        sig = inspect.signature(func)
        params = {
            p.name: p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        summary = (inspect.getdoc(func) or name).splitlines()[0]
        REGISTRY[name] = RuleSpec(name, func, params, stateful, summary, checks_finite)
        return func

    return decorator


def validate_updates(updates: Any, *, check_finite: bool = True) -> np.ndarray:
    """Return ``updates`` as a read-only ``(K, d)`` float32 array, or raise.

    With ``check_finite=False`` the NaN/inf scan is left to the caller (a rule registered with
    ``checks_finite=True`` does it in its own pass and calls :func:`reject_non_finite`); values
    beyond the float32 range still become inf in the conversion and are rejected there.

    Raises
    ------
    InvalidUpdatesError
        Not 2-D, no clients, no parameters, or any NaN/inf value (with the first bad client).
    """
    arr = np.asarray(updates)
    if arr.ndim != 2:
        raise InvalidUpdatesError(f"updates must be a (K, d) matrix, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidUpdatesError(f"updates must have K >= 1 clients and d >= 1, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InvalidUpdatesError(f"updates must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 range become inf, rejected below
        arr = arr.astype(np.float32, copy=False)
    if check_finite:
        # Fast path: NaN and inf propagate through a sum, so a finite sum proves every value
        # finite with one reduction; a non-finite sum (possibly an overflow) triggers the exact
        # check.
        with np.errstate(over="ignore", invalid="ignore"):
            total = arr.sum()
        if not np.isfinite(total):
            reject_non_finite(arr)
    view = arr.view()
    view.flags.writeable = False
    return view


def reject_non_finite(updates: np.ndarray) -> None:
    """Raise :class:`InvalidUpdatesError` naming the clients with NaN/inf values, if any.

    Parameters
    ----------
    updates : np.ndarray
        ``(K, d)`` float matrix. Scanned row by row (O(K d)); rules call this only once they
        have seen a non-finite value, to report which clients sent one.

    Raises
    ------
    InvalidUpdatesError
        Some value is NaN or infinite (the message lists up to 10 such clients).
    """
    finite_rows = np.isfinite(updates).all(axis=1)
    if not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
        raise InvalidUpdatesError(
            f"updates contain NaN or infinite values (clients {bad[:10].tolist()}); "
            "every value must be finite"
        )


def validate_weights(weights: Any, k: int) -> np.ndarray:
    """Return per-client weights as float64 ``(K,)``; ones when ``weights`` is None."""
    if weights is None:
        return np.ones(k, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise InvalidUpdatesError(f"weights must have shape ({k},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise InvalidUpdatesError("weights must be finite, non-negative and not all zero")
    return w


def get_rule(name: str) -> RuleSpec:
    """Look a rule up by name; unknown names raise with the list of valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(REGISTRY))
        raise UnknownAggregatorError(f"unknown aggregator {name!r}; valid: {valid}") from None


def aggregate(
    name: str,
    updates: Any,
    *,
    weights: Any = None,
    rng: np.random.Generator | int | None = None,
    state: Any = None,
    device: str | None = None,
    **params: Any,
) -> AggregationResult:
    """Aggregate a ``(K, d)`` update matrix with the registered rule ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`REGISTRY`.
    updates : array_like
        ``(K, d)`` client updates; converted to float32, validated finite, never mutated.
    weights : array_like, optional
        Per-client sample counts (default: all equal).
    rng : Generator or int, optional
        Randomness source (an int seeds a new Generator; default seed 0 for determinism).
    state : Any, optional
        Previous state of a stateful rule.
    device : str, optional
        Where the heavy part of the rule runs: ``"numpy"`` (default, the numpy rules),
        ``"cpu"`` or ``"cuda"``/``"cuda:N"`` (PyTorch), ``"auto"`` (the GPU when PyTorch sees
        one, else numpy); see :mod:`coordinator.aggregators.devices`. The result means the
        same on every device; rules outside ``devices.DEVICE_RULES`` always run numpy.
    **params
        The rule's own parameters (see ``REGISTRY[name].describe()``).

    Raises
    ------
    UnknownAggregatorError
        Unknown rule or parameter (the message lists the valid ones).
    InvalidUpdatesError, ByzantineBoundError
        Malformed input or too few clients for the rule's bound.
    DeviceUnavailableError
        ``device`` needs PyTorch or a GPU this machine does not have.
    """
    from coordinator.aggregators.devices import resolve_device

    spec = get_rule(name)
    where = resolve_device(device)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        valid = ", ".join(spec.params) or "none"
        raise UnknownAggregatorError(
            f"aggregator {name!r} has no parameter(s) {', '.join(unknown)}; valid: {valid}"
        )
    missing = [
        p
        for p, info in spec.params.items()
        if info.default is inspect.Parameter.empty and p not in params
    ]
    if missing:
        raise UnknownAggregatorError(f"aggregator {name!r} needs parameter(s) {', '.join(missing)}")
    mat = validate_updates(updates, check_finite=not spec.checks_finite)
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
    ctx = AggregationContext(validate_weights(weights, mat.shape[0]), generator, state, where)
    return spec.func(mat, ctx, **params)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the rule modules: bounds checks, column blocks, weighted combinations.
# ---------------------------------------------------------------------------------------------

#: Target size in bytes of one column block of the update matrix processed at a time. Blocks of
#: this size stay in the CPU caches, which is what makes the block-wise passes fast, and they
#: bound the temporary memory of every rule to a few blocks instead of copies of the matrix.
BLOCK_BYTES = 1 << 20

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_num_threads = max(1, min(4, os.cpu_count() or 1))


def set_num_threads(n: int) -> None:
    """Set how many threads the block-wise passes of the rules may use (default: cores, max 4).

    Results do not depend on this number: blocks write disjoint output slices and per-block
    partial sums are combined in block order.
    """
    global _pool, _num_threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidParameterError(f"number of threads must be a positive int, got {n!r}")
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n


def get_num_threads() -> int:
    """Number of threads used by the block-wise passes (see :func:`set_num_threads`)."""
    return _num_threads


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_num_threads, thread_name_prefix="siren-agg")
        return _pool


def parallel_map(func: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """``[func(item) for item in items]`` on the shared thread pool, results in input order."""
    seq = list(items)
    if _num_threads == 1 or len(seq) < 2:
        return [func(item) for item in seq]
    return list(_get_pool().map(func, seq))


_blas_lock = threading.RLock()
_blas_controller: Any = None
_blas_controller_ready = False


def _get_blas_controller() -> Any:
    global _blas_controller, _blas_controller_ready
    if not _blas_controller_ready:
        try:
            from threadpoolctl import ThreadpoolController

            _blas_controller = ThreadpoolController()
        except Exception:  # threadpoolctl missing or unable to inspect the process
            _blas_controller = None
        _blas_controller_ready = True
    return _blas_controller


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the body with the BLAS library limited to one thread.

    The rules call BLAS on small ``(K, block)`` operands, where BLAS's own threads gain little
    and, when the cores are busy with other processes, spin-wait so badly that a product can
    take ten times longer. Parallelism comes from the rules' own pool over column blocks
    instead (see :func:`parallel_map`). Uses threadpoolctl (installed with scikit-learn); if it
    is unavailable the body runs with BLAS's default threading. The limit is process-wide, so
    concurrent callers take turns (re-entrant within one thread).
    """
    controller = _get_blas_controller()
    if controller is None:
        yield
        return
    with _blas_lock, controller.limit(limits=1, user_api="blas"):
        yield


def block_width(k: int, itemsize: int = 4, target_bytes: int = BLOCK_BYTES) -> int:
    """Number of columns per block so that a ``(k, width)`` block is about ``target_bytes``."""
    return int(max(256, min(1 << 16, target_bytes // max(1, k * itemsize))))


def column_blocks(d: int, width: int) -> Iterator[slice]:
    """Consecutive column slices ``[0, width), [width, 2 width), ...`` covering ``range(d)``."""
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def map_column_blocks(func: Callable[[slice], T], d: int, width: int) -> list[T]:
    """Apply ``func`` to every column block of ``range(d)``; results come back in block order.

    The blocks run on a small thread pool (numpy releases the GIL in the sorts and arithmetic the
    rules use), so ``func`` must only write to its own slice of any shared output.
    """
    blocks = list(column_blocks(d, width))
    if _num_threads == 1 or len(blocks) < 2:
        return [func(b) for b in blocks]
    return list(_get_pool().map(func, blocks))


def check_count(name: str, value: Any, *, minimum: int = 0) -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidParameterError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_flag(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (numpy bools included); raise otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def require_clients(rule: str, k: int, needed: int, formula: str, **numbers: int) -> None:
    """Raise :class:`ByzantineBoundError` unless ``k >= needed``.

    ``formula`` is the bound as text (``"2f+3"``) and ``numbers`` the values it was computed
    from, so the message reads e.g. ``krum needs K >= 2f+3 = 7 clients for f=2, got K=5``.
    """
    if k < needed:
        given = ", ".join(f"{key}={val}" for key, val in numbers.items())
        raise ByzantineBoundError(
            f"{rule} needs K >= {formula} = {needed} clients for {given}, got K={k}"
        )


def weighted_combination(updates: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Return ``sum_i c_i * updates[i]`` as a ``(d,)`` float32 vector.

    One float32 matrix-vector product (BLAS ``sgemv``): a single pass over the matrix, no copy.
    Accumulation is in float32, so the relative error is at most about ``K * 2**-24`` of
    ``sum_i |c_i| |x_i|`` per coordinate -- below the resolution of the float32 updates
    themselves for the client counts of federated rounds. With a single non-zero coefficient the
    result is that row times the coefficient (exactly the row when the coefficient is 1).

    Complexity: O(K d) time, O(d) extra memory.
    """
    c = np.asarray(coefficients, dtype=np.float64)
    nonzero = np.flatnonzero(c)
    if nonzero.size == 0:
        return np.zeros(updates.shape[1], dtype=np.float32)
    if nonzero.size == 1:
        i = int(nonzero[0])
        return (updates[i] * np.float32(c[i])).astype(np.float32, copy=False)
    with single_threaded_blas():
        out = np.asarray(c.astype(np.float32) @ updates, dtype=np.float32)
    if not np.isfinite(out).all():
        # float32 accumulation overflowed (updates near float32's largest value): redo the sum
        # in float64, one column block at a time. A coordinate whose true value is beyond
        # float32's range stays infinite, for the caller's guard to see.
        wide = np.empty(updates.shape[1], dtype=np.float64)
        step = max(1, BLOCK_BYTES // (8 * max(1, updates.shape[0])))
        for start in range(0, updates.shape[1], step):
            block = np.asarray(updates[:, start : start + step], dtype=np.float64)
            wide[start : start + step] = c @ block
        with np.errstate(over="ignore"):
            out = wide.astype(np.float32)
    return out
