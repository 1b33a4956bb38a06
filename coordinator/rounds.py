"""The coordinator's round step: from the admitted submissions of a round to the next global model.

Plain computation with no I/O, shared by the in-process simulator and the MQTT coordinator
service. A *strategy* turns ``(g_t, submissions)`` into ``g_{t+1}`` plus a record of what it
decided. :class:`RuleStrategy` wraps any rule of :mod:`coordinator.aggregators`
(``g_{t+1} = g_t + aggregate(Δ)``); the SIREN decision process is another strategy
(:mod:`coordinator.siren`), selected with the name ``"siren"``. The types both speak
(:class:`Submission`, :class:`StepResult`, :class:`Strategy`, :class:`RootOracle`) live in
:mod:`coordinator.strategy`.
"""

from __future__ import annotations

import base64
import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.aggregators import AggregationResult, aggregate, get_rule
from coordinator.aggregators.devices import DEVICE_RULES, resolve_device
from coordinator.errors import ByzantineBoundError, InvalidParameterError, UnknownAggregatorError
from coordinator.strategy import (
    RootOracle,
    StepResult,
    Strategy,
    Submission,
    stack_submissions,
)


class RuleStrategy:
    """``g_{t+1} = g_t + rule(Δ_1..Δ_K)`` for a registered aggregation rule.

    Parameters
    ----------
    name : str
        Registry name (``fedavg``, ``krum``, ...).
    params : dict
        The rule's parameters.
    oracle : RootOracle, optional
        Needed by rules that take a ``server_update`` (FLTrust); computed each round.
    seed : int
        Seed of the Generator handed to the rule.
    device : str
        Where the rule's heavy part runs (:mod:`coordinator.aggregators.devices`): ``numpy``
        (default), ``cpu``, ``cuda``/``cuda:N`` or ``auto``; resolved here, so a device this
        machine lacks raises :class:`~coordinator.errors.DeviceUnavailableError` at once.
    """

    def __init__(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        oracle: RootOracle | None = None,
        seed: int = 0,
        device: str | None = None,
    ) -> None:
        self.spec = get_rule(name)
        #: The resolved device (``numpy``, ``cpu``, ``cuda``, ``cuda:N``).
        self.device = resolve_device(device)
        self.name = name
        self.params = dict(params or {})
        self.oracle = oracle
        self.seed = seed
        self.state: Any = None
        self.needs_server_update = "server_update" in self.spec.params
        if self.needs_server_update and oracle is None:
            raise ValueError(f"aggregator {name!r} needs the server's root set (an oracle)")
        # Checked here, not when the first round closes: the coordinator closes a round whose
        # aggregation fails with the previous model, so a misconfigured rule would otherwise
        # serve a whole run without ever moving the model.
        supplied = set(self.params) | {"client_ids", "server_update"}  # given at each step
        unknown = sorted(set(self.params) - set(self.spec.params))
        missing = [
            p
            for p, info in self.spec.params.items()
            if info.default is inspect.Parameter.empty and p not in supplied
        ]
        if unknown or missing:
            problems = [f"has no parameter(s) {', '.join(unknown)}"] if unknown else []
            problems += [f"needs parameter(s) {', '.join(missing)}"] if missing else []
            raise UnknownAggregatorError(
                f"aggregator {name!r} {' and '.join(problems)}; {self.spec.describe()}"
            )

    def step(
        self, round_index: int, global_weights: np.ndarray, submissions: Sequence[Submission]
    ) -> StepResult:
        """Aggregate the round's updates with the rule and apply them to ``g_t``."""
        matrix, counts = stack_submissions(submissions)
        params, rng = self.rule_inputs(round_index, global_weights, submissions)
        result = aggregate(
            self.name,
            matrix,
            weights=counts,
            rng=rng,
            state=self.state,
            device=self.device,
            **params,
        )
        return self.finish(result, global_weights, submissions)

    def rule_inputs(
        self,
        round_index: int,
        global_weights: np.ndarray,
        submissions: Sequence[Submission],
        server_update: np.ndarray | None = None,
    ) -> tuple[dict[str, Any], np.random.Generator]:
        """The rule's parameters for this round (with ``client_ids`` and the server update
        where the rule takes them; ``server_update`` given is used instead of asking the
        oracle) and the round's Generator."""
        params = dict(self.params)
        if "client_ids" in self.spec.params:
            # Stateful rules match clients across rounds by id, not by row.
            params["client_ids"] = [str(s.client_id) for s in submissions]
        if self.needs_server_update:
            if server_update is None and self.oracle is not None:
                server_update = self.oracle.server_update(global_weights, round_index)
            params["server_update"] = server_update
        return params, np.random.default_rng([self.seed, round_index])

    def finish(
        self,
        result: AggregationResult,
        global_weights: np.ndarray,
        submissions: Sequence[Submission],
    ) -> StepResult:
        """``g_{t+1} = g_t + result.vector``, the verdicts by client, and the rule's record
        (the rule's new state is kept when it has one)."""
        if self.spec.stateful:
            self.state = result.state
        new_global = (np.asarray(global_weights, dtype=np.float32) + result.vector).astype(
            np.float32
        )
        verdicts = {
            s.client_id: {
                "kept": bool(v.kept),
                "weight": float(v.weight),
                "score": None if v.score is None else float(v.score),
                "reason": v.reason,
            }
            for s, v in zip(submissions, result.verdicts)
        }
        record = {"rule": self.name, **jsonable(result.info)}
        if self.device != "numpy" and self.name in DEVICE_RULES:
            record["device"] = self.device
        return StepResult(new_global, verdicts, record)

    def state_dict(self) -> dict[str, Any]:
        """The rule's state (stateful rules only) in a JSON-friendly form.

        State objects exposing ``as_arrays()`` and a ``from_mapping`` class method (DSPO votes,
        FoolsGold history) are stored as their class path plus exactly encoded arrays.
        """
        state = self.state
        if state is not None and hasattr(state, "as_arrays") and hasattr(state, "from_mapping"):
            cls = type(state)
            return {
                "state_class": f"{cls.__module__}.{cls.__qualname__}",
                "arrays": {k: encode_array(v) for k, v in state.as_arrays().items()},
            }
        return {"state": jsonable(state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rule state saved by :meth:`state_dict`."""
        class_path = state.get("state_class")
        if class_path is None:
            self.state = state.get("state")
            return
        module_name, _, class_name = str(class_path).rpartition(".")
        if not module_name.startswith("coordinator.aggregators."):
            raise ValueError(f"refusing to load state class {class_path!r}")
        cls = getattr(importlib.import_module(module_name), class_name)
        self.state = cls.from_mapping({k: decode_array(v) for k, v in state["arrays"].items()})


#: Default factor of the global-model guard: a round's step ``g_{t+1} − g_t`` may be at most this
#: many times the median L2 norm of the round's updates.
DEFAULT_GUARD_FACTOR = 100.0
#: Default absolute bound of the global-model guard on every weight of ``g_{t+1}``: far above the
#: weights of any trained network, far below where float32 training overflows.
DEFAULT_GUARD_MAX_ABS = 1e6

#: Errors by which a strategy refuses a round's input (a Byzantine bound, a bad parameter):
#: configuration problems that :func:`guarded_step` passes on instead of absorbing.
REFUSALS: tuple[type[Exception], ...] = (
    ByzantineBoundError,
    InvalidParameterError,
    UnknownAggregatorError,
)


def update_norms(submissions: Sequence[Submission]) -> np.ndarray:
    """The ``(K,)`` float64 L2 norms of the submissions' updates (no overflow for any float32)."""
    return np.array(
        [float(np.linalg.norm(np.asarray(s.delta, dtype=np.float64))) for s in submissions],
        dtype=np.float64,
    )


def global_problem(
    global_weights: np.ndarray,
    new_global: np.ndarray,
    bound: float,
    max_abs: float = DEFAULT_GUARD_MAX_ABS,
) -> str | None:
    """Why ``new_global`` may not become the next global model, or None when it may.

    It may not when a value is not finite, when a value exceeds ``max_abs`` in magnitude
    (unless ``g_t`` already did), or when its step ``|g_{t+1} − g_t|`` exceeds ``bound``
    (computed in float64).
    """
    new = np.asarray(new_global)
    if new.shape != np.shape(global_weights):
        return f"the strategy returned shape {new.shape}, expected {np.shape(global_weights)}"
    if not np.isfinite(new).all():
        return f"{int(np.size(new) - np.isfinite(new).sum())} non-finite value(s)"
    largest = float(np.abs(new).max()) if new.size else 0.0
    if largest > max_abs and largest > float(np.abs(global_weights).max(initial=0.0)):
        return f"a weight of magnitude {largest:.4g} exceeds the absolute bound {max_abs:.4g}"
    step = float(np.linalg.norm(new.astype(np.float64) - np.asarray(global_weights, np.float64)))
    if not step <= bound:
        return f"step norm {step:.4g} exceeds the bound {bound:.4g}"
    return None


def guarded_step(
    strategy: Strategy,
    round_index: int,
    global_weights: np.ndarray,
    submissions: Sequence[Submission],
    *,
    factor: float = DEFAULT_GUARD_FACTOR,
    max_abs: float = DEFAULT_GUARD_MAX_ABS,
    norms: np.ndarray | None = None,
    largest: Sequence[float] | None = None,
) -> StepResult:
    """Run ``strategy.step`` and never let it emit a non-finite or absurd global model.

    The step is accepted when every value of ``g_{t+1}`` is finite and at most ``max_abs`` in
    magnitude, and ``|g_{t+1} − g_t|₂ ≤ factor · median_i |Δ_i|₂`` (the median is robust while
    fewer than half of the updates are huge; a rule that averages can move the model at most as
    far as its largest input, so an honest round never comes near the bound; the absolute
    bound holds when the attackers are the majority). Otherwise, or when the
    strategy fails with anything but a refusal (:data:`REFUSALS`), the guard restores the
    strategy's state and

    1. re-runs the step without the outsized updates -- norm above ``factor · median``, or a
       value above ``max_abs`` -- (their verdict says why); if that step passes, it is the
       round's result;
    2. else keeps ``g_t`` as ``g_{t+1}`` (every verdict ``kept = False``).

    The record's ``guard`` entry tells what happened. Refusals propagate unchanged: they mean the
    round cannot be aggregated as configured (too few boards for the rule's bound), which the
    caller handles (the coordinator waits for more boards).

    Parameters
    ----------
    factor : float
        The relative bound's factor (``inf``: no relative bound).
    max_abs : float
        The absolute bound on every weight (``inf``: none). A ``g_t`` already beyond it (an
        initial model with large weights) does not make every round fail: only a step that
        enlarges the largest weight past the bound is refused.
    norms, largest : optional
        The submissions' L2 norms and largest absolute values when already known (a streaming
        round keeps them); otherwise computed here (``O(K d)``).
    """
    snapshot = strategy.state_dict()
    if norms is None:
        norms = update_norms(submissions)
    median = float(np.median(norms)) if len(norms) else 0.0
    bound = factor * median if factor != float("inf") else float("inf")
    problem: str | None
    try:
        result = strategy.step(round_index, global_weights, submissions)
        problem = global_problem(global_weights, result.new_global, bound, max_abs)
    except REFUSALS:
        raise
    except (ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
        problem = f"the strategy failed: {type(exc).__name__}: {exc}"
    if problem is None:
        return result
    guard: dict[str, Any] = {
        "problem": problem,
        "factor": factor,
        "max_abs": max_abs,
        "median_update_norm": median,
    }
    if largest is None:
        largest = [float(np.abs(s.delta).max(initial=0.0)) for s in submissions]
    why_out = {
        s.client_id: (
            f"guard: update norm {n:.4g} > {factor:g} x median {median:.4g}"
            if not n <= bound
            else f"guard: an update value of magnitude {m:.4g} > {max_abs:.4g}"
        )
        for s, n, m in zip(submissions, norms, largest)
        if not (n <= bound and m <= max_abs)
    }
    kept = [s for s in submissions if s.client_id not in why_out]
    strategy.load_state_dict(snapshot)
    if why_out and kept:
        retry_problem: str | None
        try:
            retry = strategy.step(round_index, global_weights, kept)
            retry_problem = global_problem(global_weights, retry.new_global, bound, max_abs)
        except REFUSALS as exc:
            retry_problem = f"the strategy refused the rest: {exc}"
        except (ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
            retry_problem = f"the strategy failed: {type(exc).__name__}: {exc}"
        if retry_problem is None:
            verdicts = dict(retry.verdicts)
            for s, n in zip(submissions, norms):
                if s.client_id in why_out:
                    verdicts[s.client_id] = {
                        "kept": False,
                        "weight": 0.0,
                        "score": float(n),
                        "reason": why_out[s.client_id],
                    }
            guard.update(action="reaggregated", excluded=sorted(why_out))
            return StepResult(retry.new_global, verdicts, {**retry.record, "guard": guard})
        guard["retry_problem"] = retry_problem
        strategy.load_state_dict(snapshot)
    guard["action"] = "kept_previous_global"
    verdicts = {
        s.client_id: {
            "kept": False,
            "weight": 0.0,
            "score": float(n),
            "reason": "guard: the round kept the previous global model",
        }
        for s, n in zip(submissions, norms)
    }
    previous = np.asarray(global_weights, dtype=np.float32).copy()
    return StepResult(previous, verdicts, {"rule": getattr(strategy, "name", ""), "guard": guard})


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """An array as JSON: strings as a list, numbers as base64 of their little-endian bytes."""
    arr = np.asarray(array)
    if arr.dtype.kind in "US":
        return {
            "kind": "str",
            "values": [str(v) for v in arr.ravel().tolist()],
            "shape": list(arr.shape),
        }
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return {
        "kind": "numeric",
        "dtype": le.dtype.str,
        "shape": list(arr.shape),
        "data": base64.b64encode(np.ascontiguousarray(le).tobytes()).decode("ascii"),
    }


def decode_array(blob: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    shape = tuple(int(s) for s in blob["shape"])
    if blob["kind"] == "str":
        return np.array(blob["values"], dtype=np.str_).reshape(shape)
    dtype = np.dtype(blob["dtype"])
    if dtype.kind not in "fiub":
        raise ValueError(f"unsupported array dtype {dtype}")
    raw = base64.b64decode(blob["data"], validate=True)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def rule_parameter_names(name: str) -> list[str]:
    """Names of a rule's parameters (for command-line validation)."""
    return list(get_rule(name).params)


def rule_has_required(name: str, param: str) -> bool:
    """Whether ``param`` is a required parameter of rule ``name``."""
    info = get_rule(name).params.get(param)
    return info is not None and info.default is inspect.Parameter.empty


def jsonable(value: Any) -> Any:
    """Convert NumPy scalars/arrays (and nested containers) into JSON-serializable values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def strategy_names() -> list[str]:
    """Every name :func:`make_strategy` accepts: the registered rules plus ``siren``."""
    from coordinator.aggregators import REGISTRY

    return sorted([*REGISTRY, "siren"])


def make_strategy(
    name: str,
    params: dict[str, Any] | None = None,
    *,
    oracle: RootOracle | None = None,
    num_clients: int = 0,
    num_rounds: int = 0,
    profile: str | None = None,
    seed: int = 0,
    device: str | None = None,
) -> Strategy:
    """Build the server strategy called ``name`` (an aggregation rule, or ``"siren"``).

    Parameters
    ----------
    name : str
        A registered rule or ``"siren"``.
    params : dict, optional
        The rule's (or SIREN's) parameters; they win over ``profile`` and ``seed``.
    oracle : RootOracle, optional
        The server's root set (SIREN, FLTrust).
    num_clients, num_rounds : int
        K and T of the run (SIREN's penalty threshold is a fraction of one of them).
    profile : str, optional
        SIREN profile (:mod:`protocol.siren_profiles`); None: the default. Other rules ignore it.
    seed : int
        The run seed.
    device : str, optional
        Where a registered rule's heavy part runs (see :class:`RuleStrategy`); SIREN's decision
        process has no device path and ignores it (a device name is still checked).
    """
    if name == "siren":
        resolve_device(device)
        from coordinator.siren import SirenStrategy

        if oracle is None:
            raise ValueError("SIREN needs the server's root test set (an oracle)")
        # The run seed drives SIREN's probes of banned boards unless a seed is given explicitly.
        defaults: dict[str, Any] = {"seed": seed}
        if profile is not None:
            defaults["profile"] = profile
        return SirenStrategy(
            oracle=oracle,
            num_clients=num_clients,
            num_rounds=num_rounds,
            **{**defaults, **(params or {})},
        )
    return RuleStrategy(name, params, oracle=oracle, seed=seed, device=device)
