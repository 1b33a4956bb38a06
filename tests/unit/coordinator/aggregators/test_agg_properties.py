"""Contract properties checked over every rule in the registry (hypothesis).

Each rule gets parameters that satisfy its bounds from :data:`PARAMS`; a test fails when a rule
is registered without an entry, so new rules cannot skip these checks silently.

Stated distance for the robustness property: honest updates are ``mu + sigma * z`` with
``mu`` of entries +-1 and ``sigma = 0.05``; among ``K`` clients, ``f`` either send their update
sign-flipped and boosted by -4 or send ``mu + 10 z`` (large noise). A robust rule's aggregate must
lie within ``2 sigma sqrt(d)`` of the honest mean (about twice the spread of a single honest
update around it); FedAvg ends at least ``5 sigma sqrt(d)`` away.

Every property is also checked for the rules of :data:`DEVICE_RULES` with their heavy part on
PyTorch's CPU device (ids ending in ``-torch-cpu``; skipped when PyTorch is not installed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from coordinator.aggregators import REGISTRY, aggregate
from coordinator.aggregators.devices import DEVICE_RULES, torch_module
from coordinator.errors import ByzantineBoundError

Params = Callable[[int, int, np.ndarray], dict[str, Any]]


def _none(k: int, f: int, server: np.ndarray) -> dict[str, Any]:
    return {}


def _f(k: int, f: int, server: np.ndarray) -> dict[str, Any]:
    return {"f": f}


def _beta(k: int, f: int, server: np.ndarray) -> dict[str, Any]:
    return {"beta": f}


def _server(k: int, f: int, server: np.ndarray) -> dict[str, Any]:
    return {"server_update": server}


#: Parameters satisfying each rule's bounds for K clients of which f may be Byzantine, given
#: K >= 4f + 3 (the strictest bound, Bulyan's).
PARAMS: dict[str, Params] = {
    "fedavg": _none,
    "krum": _f,
    "multi_krum": _f,
    "bulyan": _f,
    "median": _none,
    "trimmed_mean": _beta,
    "geometric_median": _none,
    "fltrust": _server,
    "foolsgold": _none,
    "repeated_median": _none,
    "residual_reweighting": _none,
    "dspo_score": _none,
    "dspo_vote": _none,
    "pdrr_krum": _f,
    "pdrr_trimmed_mean": _beta,
    "pdrr_median": _none,
}

#: For rules with a bound: (K, params) that violate it by one client, for a given f >= 1.
VIOLATIONS: dict[str, Callable[[int], tuple[int, dict[str, Any]]]] = {
    "krum": lambda f: (2 * f + 2, {"f": f}),
    "multi_krum": lambda f: (2 * f + 2, {"f": f}),
    "pdrr_krum": lambda f: (2 * f + 2, {"f": f}),
    "bulyan": lambda f: (4 * f + 2, {"f": f}),
    "trimmed_mean": lambda f: (2 * f, {"beta": f}),
    "pdrr_trimmed_mean": lambda f: (2 * f, {"beta": f}),
    "median": lambda f: (2 * f, {"f": f}),
    "geometric_median": lambda f: (2 * f, {"f": f}),
    "repeated_median": lambda f: (2, {}),
    "residual_reweighting": lambda f: (2, {}),
    "foolsgold": lambda f: (1, {}),
}
#: Rules without a client-count bound (they make no majority assumption, or none is defined).
NO_BOUND = {"fedavg", "fltrust", "dspo_score", "dspo_vote", "pdrr_median"}

#: Rules held to the robustness bound against sign-flip and large-noise attackers.
ROBUST = {
    "krum",
    "multi_krum",
    "bulyan",
    "median",
    "trimmed_mean",
    "geometric_median",
    "fltrust",
    "repeated_median",
    "residual_reweighting",
    "pdrr_krum",
    "pdrr_trimmed_mean",
    "pdrr_median",
}
#: Rules whose threat model is different, with what is checked instead.
OTHER_THREAT_MODEL = {
    # FoolsGold down-weights clients whose updates look alike (sybils) and assumes diverse
    # honest clients; attackers sending different outliers are not its target. Checked
    # against identical attacker updates among diverse honest ones.
    "foolsgold": "sybil",
    # DSPO is a defence against data poisoning (label flipping): scores are adjusted cosines
    # around the coordinate-median pivot, which colluding model-poisoning outliers can satisfy.
    "dspo_score": None,
    "dspo_vote": None,
}
SIGMA = 0.05

FAST = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_every_registered_rule_has_a_parameter_entry() -> None:
    assert set(PARAMS) == set(REGISTRY)
    assert set(VIOLATIONS) | NO_BOUND == set(REGISTRY)
    assert not set(VIOLATIONS) & NO_BOUND
    assert ROBUST | set(OTHER_THREAT_MODEL) | {"fedavg"} == set(REGISTRY)


@st.composite
def shapes(draw: st.DrawFn, min_d: int = 1, max_d: int = 24) -> tuple[int, int, int, int]:
    f = draw(st.integers(1, 2))
    k = draw(st.integers(4 * f + 3, 4 * f + 6))
    d = draw(st.integers(min_d, max_d))
    seed = draw(st.integers(0, 2**32 - 1))
    return f, k, d, seed


RULES = sorted(PARAMS)
NEEDS_TORCH = pytest.mark.skipif(
    torch_module() is None, reason="PyTorch is not installed (the torch extra)"
)


def on_devices(names: Any) -> list[Any]:
    """``(name, device)`` parameters: every rule on numpy, the device rules on torch's CPU."""
    out = [pytest.param(n, "numpy", id=n) for n in sorted(names)]
    out += [
        pytest.param(n, "cpu", id=f"{n}-torch-cpu", marks=NEEDS_TORCH)
        for n in sorted(names)
        if n in DEVICE_RULES
    ]
    return out


def _call(name: str, x: np.ndarray, f: int, server: np.ndarray, device: str = "numpy") -> Any:
    return aggregate(name, x, device=device, **PARAMS[name](x.shape[0], f, server))


def test_every_device_rule_is_registered() -> None:
    assert set(DEVICE_RULES) <= set(REGISTRY)


@pytest.mark.parametrize(("name", "device"), on_devices(RULES))
@FAST
@given(shape=shapes())
def test_client_order_does_not_matter(
    name: str, device: str, shape: tuple[int, int, int, int]
) -> None:
    # Continuous random values: exact ties (where documented tie-breaking applies) have
    # probability zero, except Krum scores with a single neighbour, which K >= 4f+3 avoids.
    f, k, d, seed = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, d)).astype(np.float32)
    server = rng.standard_normal(d).astype(np.float32)
    perm = rng.permutation(k)
    a = _call(name, x, f, server, device)
    b = _call(name, x[perm], f, server, device)
    # PDRR-Krum re-aggregates the clients left after removal with Krum; when few are left it
    # scores with a single neighbour, where two mutual nearest neighbours tie by construction.
    assume(a.info.get("reaggregate_neighbours", 2) >= 2)
    np.testing.assert_allclose(b.vector, a.vector, rtol=1e-4, atol=1e-5)
    wa = np.array([v.weight for v in a.verdicts])
    wb = np.array([v.weight for v in b.verdicts])
    np.testing.assert_allclose(wb, wa[perm], rtol=1e-4, atol=1e-6)
    assert [v.kept for v in b.verdicts] == [a.verdicts[i].kept for i in perm]


@pytest.mark.parametrize(("name", "device"), on_devices(RULES))
@FAST
@given(shape=shapes(), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_identical_updates_give_that_update(
    name: str, device: str, shape: tuple[int, int, int, int], scale: float
) -> None:
    f, k, d, seed = shape
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal(d)).astype(np.float32)
    result = _call(name, np.tile(x, (k, 1)), f, x, device)
    assert result.vector.shape == (d,)
    assert result.vector.dtype == np.float32
    np.testing.assert_allclose(result.vector, x, rtol=1e-5, atol=1e-6 * scale)
    assert len(result.verdicts) == k


@pytest.mark.parametrize(("name", "device"), on_devices(RULES))
@FAST
@given(shape=shapes())
def test_input_is_left_unchanged(name: str, device: str, shape: tuple[int, int, int, int]) -> None:
    f, k, d, seed = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, d)).astype(np.float32)
    x[0] *= 50.0
    server = rng.standard_normal(d).astype(np.float32)
    weights = rng.integers(1, 100, size=k).astype(np.float64)
    kept_x, kept_s, kept_w = x.copy(), server.copy(), weights.copy()
    result = aggregate(name, x, weights=weights, device=device, **PARAMS[name](k, f, server))
    assert np.array_equal(x, kept_x)
    assert np.array_equal(server, kept_s)
    assert np.array_equal(weights, kept_w)
    assert x.flags.writeable
    assert np.all(np.isfinite(result.vector))
    for v in result.verdicts:
        assert v.weight >= 0.0
        assert v.kept or v.weight == 0.0


@pytest.mark.parametrize(("name", "device"), on_devices(VIOLATIONS))
@settings(max_examples=5, deadline=None)
@given(f=st.integers(1, 4), d=st.integers(1, 6))
def test_bound_violations_raise_with_the_numbers(name: str, device: str, f: int, d: int) -> None:
    k, params = VIOLATIONS[name](f)
    x = np.random.default_rng(f * 31 + d).standard_normal((k, d)).astype(np.float32)
    with pytest.raises(ByzantineBoundError, match=rf"K >= .*got K={k}\b"):
        aggregate(name, x, device=device, **params)


def _attacked(
    shape: tuple[int, int, int, int], attack: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(updates, honest mean, server update) with the f attackers at random positions."""
    f, k, d, seed = shape
    rng = np.random.default_rng(seed)
    mu = rng.choice([-1.0, 1.0], size=d)
    honest = mu + SIGMA * rng.standard_normal((k - f, d))
    if attack == "sign_flip":
        bad = -4.0 * (mu + SIGMA * rng.standard_normal((f, d)))
    elif attack == "noise":
        bad = mu + 10.0 * rng.standard_normal((f, d))
    elif attack == "sybil_flip":
        bad = np.tile(-4.0 * mu, (f, 1))
    else:
        raise AssertionError(attack)
    x = np.vstack([bad, honest]).astype(np.float32)[rng.permutation(k)]
    server = (mu + SIGMA * rng.standard_normal(d)).astype(np.float32)
    return x, honest.mean(axis=0), server


def _distance(
    name: str, shape: tuple[int, int, int, int], attack: str, device: str = "numpy", **extra: Any
) -> float:
    f, _, d, _ = shape
    x, honest_mean, server = _attacked(shape, attack)
    result = aggregate(name, x, device=device, **PARAMS[name](x.shape[0], f, server), **extra)
    return float(np.linalg.norm(result.vector - honest_mean) / (SIGMA * np.sqrt(d)))


#: Extra parameters of the robustness property. PDRR-Krum's detection presumes that Krum picked
#: an attacker: honest updates that share their sign pattern (as here, ±1 plus 5% noise) all
#: correlate with an honest pick and are removed (see the test after the next), so the property
#: holds for it only with the safeguard that keeps Krum's pick when too many are flagged.
ROBUST_EXTRA: dict[str, dict[str, Any]] = {"pdrr_krum": {"fallback": True}}


@pytest.mark.parametrize("attack", ["sign_flip", "noise"])
@pytest.mark.parametrize(("name", "device"), on_devices(ROBUST))
@FAST
@given(shape=shapes(min_d=8, max_d=40))
def test_robust_rules_stay_near_the_honest_mean(
    name: str, device: str, attack: str, shape: tuple[int, int, int, int]
) -> None:
    assert _distance(name, shape, attack, device, **ROBUST_EXTRA.get(name, {})) <= 2.0


def test_pdrr_krum_as_published_removes_honest_updates_that_agree_in_sign() -> None:
    # Two sign-flipping attackers among nine honest updates that agree in sign: Krum picks an
    # honest update, every honest update has rho ~ 1 >= 0.5 and is removed with it, and Krum over
    # what is left picks an attacker. The safeguard keeps Krum's honest pick.
    shape = (2, 11, 20, 7)
    assert _distance("pdrr_krum", shape, "sign_flip") >= 5.0
    assert _distance("pdrr_krum", shape, "sign_flip", fallback=True) <= 2.0


@pytest.mark.parametrize("attack", ["sign_flip", "noise"])
@FAST
@given(shape=shapes(min_d=8, max_d=40))
def test_fedavg_is_pulled_away(attack: str, shape: tuple[int, int, int, int]) -> None:
    assert _distance("fedavg", shape, attack) >= 5.0


@pytest.mark.parametrize(
    ("name", "device"), on_devices(n for n, m in OTHER_THREAT_MODEL.items() if m == "sybil")
)
@FAST
@given(shape=shapes(min_d=8, max_d=40), extra=st.integers(0, 1))
def test_sybil_defences_give_identical_attackers_no_weight(
    name: str, device: str, shape: tuple[int, int, int, int], extra: int
) -> None:
    # FoolsGold's setting: diverse (non-IID) honest updates, >= 2 attackers sending the same
    # sign-flipped, boosted vector. The attackers' total weight must vanish.
    f, k, d, seed = shape
    f += 1 + extra
    rng = np.random.default_rng(seed)
    honest = rng.standard_normal((k - f, d))
    bad = np.tile(-4.0 * rng.standard_normal(d), (f, 1))
    order = rng.permutation(k)
    x = np.vstack([bad, honest]).astype(np.float32)[order]
    result = _call(name, x, f, x[0], device)
    attackers = np.flatnonzero(order < f)
    assert sum(result.verdicts[i].weight for i in attackers) <= 1e-6
    assert sum(v.weight for v in result.verdicts) == pytest.approx(1.0)
