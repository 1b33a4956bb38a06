"""The device selection and the PyTorch path of the heavy rules.

The torch path must give the numpy rule's result: identical selections, kept flags and
``info["selected"]``, aggregates within 1e-5 relative, weights and scores within float
tolerance, on random and adversarial inputs (sign flips, a huge row, exact ties, constant
columns, signed zeros, values near the float32 limit). Torch runs on the CPU here; the tests
that need it are skipped when PyTorch is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.aggregators import aggregate, devices, torch_ops
from coordinator.aggregators.devices import DEVICE_RULES, resolve_device, torch_module
from coordinator.errors import (
    DeviceUnavailableError,
    InvalidParameterError,
    InvalidUpdatesError,
)

NEEDS_TORCH = pytest.mark.skipif(
    torch_module() is None, reason="PyTorch is not installed (the torch extra)"
)


def _params(name: str, k: int, server: np.ndarray) -> dict[str, Any]:
    f = max(1, (k - 3) // 4)
    return {
        "krum": {"f": f},
        "multi_krum": {"f": f},
        "bulyan": {"f": f},
        "median": {},
        "trimmed_mean": {"beta": f},
        "geometric_median": {},
        "fltrust": {"server_update": server},
        "foolsgold": {},
        "repeated_median": {},
        "residual_reweighting": {},
    }[name]


def _inputs(case: str, k: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if case == "random":
        return rng.standard_normal((k, d)).astype(np.float32)
    if case == "sign_flip":
        mu = rng.choice([-1.0, 1.0], size=d)
        x = mu + 0.05 * rng.standard_normal((k, d))
        x[: (k - 3) // 4] *= -4.0
        return x.astype(np.float32)
    if case == "huge_row":
        x = rng.standard_normal((k, d))
        x[1] *= 1e20
        return x.astype(np.float32)
    if case == "ties":
        # Small integers: every sum is exact on every device, so equal scores are exactly
        # equal and the documented tie-breaking alone decides. Duplicated rows, constant
        # columns and signed zeros.
        x = rng.integers(-3, 4, size=(k, d)).astype(np.float32)
        x[1] = x[0]
        x[3] = x[2]
        x[:, 0] = 2.0
        x[::2, 1] = -0.0
        x[1::2, 1] = 0.0
        return x
    if case == "near_float32_limit":
        x = rng.standard_normal((k, d)) * 1e37
        x[0, :] = 3.0e38
        x[1, :] = -3.0e38
        return x.astype(np.float32)
    raise AssertionError(case)


def _assert_same(a: Any, b: Any, rel: float = 1e-5) -> None:
    assert [v.kept for v in a.verdicts] == [v.kept for v in b.verdicts]
    assert a.info.get("selected") == b.info.get("selected")
    scale = max(float(np.max(np.abs(a.vector))), 1e-30)
    assert np.max(np.abs(a.vector.astype(np.float64) - b.vector)) <= rel * scale
    assert b.vector.dtype == np.float32 and b.vector.shape == a.vector.shape
    wa = np.array([v.weight for v in a.verdicts])
    wb = np.array([v.weight for v in b.verdicts])
    np.testing.assert_allclose(wb, wa, rtol=1e-6, atol=1e-9)
    for u, v in zip(a.verdicts, b.verdicts, strict=True):
        if u.score is None:
            assert v.score is None
        else:
            assert v.score == pytest.approx(u.score, rel=1e-6, abs=1e-9 * max(1.0, abs(u.score)))
        # Reasons carry the same numbers, printed to 3-4 digits.
        assert v.reason.split(":")[0] == u.reason.split(":")[0]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny device blocks, so that even small inputs span many column blocks."""
    monkeypatch.setitem(torch_ops.DEVICE_BLOCK_BYTES, "cpu", 4096)
    monkeypatch.setitem(torch_ops.SLOPE_ELEMENTS, "cpu", 1)


CASES = [
    ("random", 11, 700, 1),
    ("random", 12, 300, 2),
    ("sign_flip", 15, 600, 3),
    ("huge_row", 11, 300, 4),
    ("ties", 11, 400, 5),
    ("ties", 12, 301, 6),
]


@NEEDS_TORCH
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("name", sorted(DEVICE_RULES))
@pytest.mark.parametrize(("case", "k", "d", "seed"), CASES)
def test_torch_cpu_gives_the_numpy_result(name: str, case: str, k: int, d: int, seed: int) -> None:
    x = _inputs(case, k, d, seed)
    server = x.mean(axis=0) + np.float32(0.1)
    params = _params(name, k, server)
    expected = aggregate(name, x, **params)
    got = aggregate(name, x, device="cpu", **params)
    _assert_same(expected, got)
    if name == "trimmed_mean":
        np.testing.assert_array_equal(got.vector, expected.vector)


@NEEDS_TORCH
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "repeated_median"])
def test_values_near_the_float32_limit(name: str) -> None:
    # The repeated median's float32 slopes overflow here and are redone in float64.
    x = _inputs("near_float32_limit", 9, 64, 7)
    params = _params(name, 9, x[0])
    _assert_same(aggregate(name, x, **params), aggregate(name, x, device="cpu", **params))


@NEEDS_TORCH
@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_residual_reweighting_variants_match(variant: str) -> None:
    x = _inputs("sign_flip", 13, 500, 8)
    a = aggregate("residual_reweighting", x, variant=variant)
    b = aggregate("residual_reweighting", x, variant=variant, device="cpu")
    _assert_same(a, b)
    np.testing.assert_array_equal(a.info["replaced"], b.info["replaced"])


@NEEDS_TORCH
def test_foolsgold_state_is_the_same_over_rounds() -> None:
    rng = np.random.default_rng(9)
    ids = [f"c{i}" for i in range(6)]
    state_a = state_b = None
    for _ in range(3):
        x = rng.standard_normal((6, 200)).astype(np.float32)
        x[4] = x[5] = -x[0]  # two sybils
        a = aggregate("foolsgold", x, state=state_a, client_ids=ids)
        b = aggregate("foolsgold", x, state=state_b, client_ids=ids, device="cpu")
        _assert_same(a, b)
        state_a, state_b = a.state, b.state
        np.testing.assert_array_equal(state_a.history, state_b.history)


@NEEDS_TORCH
def test_torch_trimmed_mean_rejects_non_finite_values_naming_the_clients() -> None:
    x = np.ones((7, 50), dtype=np.float32)
    x[4, 10] = np.nan
    x[2, 3] = np.inf
    with pytest.raises(InvalidUpdatesError, match=r"clients \[2, 4\]"):
        aggregate("trimmed_mean", x, beta=1, device="cpu")


@NEEDS_TORCH
def test_gram_matrix_is_float64_and_exactly_symmetric(small_blocks: None) -> None:
    x = np.zeros((2, 5000), dtype=np.float32)
    x[0, 0] = 3.0
    x[1, 4999] = 4.0
    x[:, 2500] = 1e-4
    g = torch_ops.gram_matrix(x, "cpu")
    assert g.dtype == np.float64
    np.testing.assert_array_equal(g, g.T)
    assert g[0, 0] == 9.0 + float(np.float32(1e-4)) ** 2


@NEEDS_TORCH
def test_the_rule_strategy_runs_on_the_device_and_records_it() -> None:
    from coordinator.rounds import RuleStrategy
    from coordinator.strategy import Submission

    rng = np.random.default_rng(10)
    subs = [Submission(i, rng.standard_normal(40).astype(np.float32), 10) for i in range(7)]
    g = np.zeros(40, dtype=np.float32)
    on_numpy = RuleStrategy("krum", {"f": 1}).step(1, g, subs)
    on_cpu = RuleStrategy("krum", {"f": 1}, device="cpu").step(1, g, subs)
    np.testing.assert_array_equal(on_cpu.new_global, on_numpy.new_global)
    assert on_cpu.record["device"] == "cpu"
    assert "device" not in on_numpy.record


# --- device selection (no PyTorch needed) -----------------------------------------------------


def test_numpy_is_the_default_and_needs_nothing() -> None:
    assert resolve_device(None) == "numpy"
    assert resolve_device("numpy") == "numpy"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_an_unknown_device_lists_the_valid_ones(bad: str) -> None:
    with pytest.raises(InvalidParameterError, match=r"numpy, cpu, cuda, auto|cuda:N"):
        resolve_device(bad)


def test_without_torch_the_torch_devices_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(devices, "torch_module", lambda: None)
    for device in ("cpu", "cuda"):
        with pytest.raises(DeviceUnavailableError, match=r"pip install 'siren-edge\[torch\]'"):
            resolve_device(device)
    assert resolve_device("auto") == "numpy"
    assert devices.available_devices() == ["numpy"]
    with pytest.raises(DeviceUnavailableError):
        aggregate("median", np.ones((3, 2)), device="cpu")


def test_auto_without_a_gpu_runs_numpy() -> None:
    torch = torch_module()
    if torch is not None and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == "numpy"


@NEEDS_TORCH
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    torch = torch_module()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailableError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError, match="sees no CUDA GPU"):
        aggregate("krum", np.ones((5, 3)), f=1, device="cuda:0")


def test_the_coordinator_setting_is_checked_when_loaded() -> None:
    from coordinator.config import AggregatorSettings, ConfigError

    assert AggregatorSettings().device == "numpy"
    assert AggregatorSettings(device="cuda:1").device == "cuda:1"
    with pytest.raises(ConfigError, match=r"aggregator\.device must be one of"):
        AggregatorSettings(device="gpu")


def test_an_unavailable_device_in_the_config_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from coordinator.config import AggregatorSettings, ConfigError

    monkeypatch.setattr(devices, "torch_module", lambda: None)
    with pytest.raises(ConfigError, match=r"aggregator.device: .*siren-edge\[torch\]"):
        AggregatorSettings("krum", {"f": 1}, device="cpu").resolved_device()


def test_sim_run_device_option_reaches_the_config_and_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    from firmware_sim.cli import add_run_options
    from firmware_sim.options import check_config, config_from_args
    from siren_cli.errors import CommandError

    parser = argparse.ArgumentParser()
    add_run_options(parser)
    assert config_from_args(parser.parse_args([])).device == "numpy"
    config = config_from_args(parser.parse_args(["--aggregator", "median", "--device", "cpu"]))
    assert config.device == "cpu"
    monkeypatch.setattr(devices, "torch_module", lambda: None)
    with pytest.raises(CommandError, match=r"--device cpu: .*siren-edge\[torch\]"):
        check_config(config)


def test_the_run_header_says_where_the_heavy_rules_run() -> None:
    import argparse

    from firmware_sim.cli import add_run_options
    from firmware_sim.options import config_from_args, describe_device

    parser = argparse.ArgumentParser()
    add_run_options(parser)

    def header(*argv: str) -> str:
        return describe_device(config_from_args(parser.parse_args(list(argv))))

    assert header("--aggregator", "median") == ""  # numpy, the default: nothing to say
    auto = resolve_device("auto")
    assert header("--aggregator", "median", "--device", "auto") == f", device auto: {auto}"
    assert header("--device", "cpu") == ", device cpu unused (fedavg has no device path)"
    assert header("--aggregator", "siren", "--device", "auto") == (
        ", device auto unused (siren has no device path)"
    )
    if torch_module() is not None:
        assert header("--aggregator", "median", "--device", "cpu") == ", device cpu"
