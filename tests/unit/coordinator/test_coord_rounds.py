"""The coordinator round step: rule strategies, their verdicts and persisted state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator.errors import UnknownAggregatorError
from coordinator.rounds import RuleStrategy, Submission, decode_array, encode_array


def _subs(matrix: np.ndarray, counts: list[int]) -> list[Submission]:
    return [Submission(10 + i, row, n) for i, (row, n) in enumerate(zip(matrix, counts))]


def test_fedavg_step_adds_the_sample_weighted_mean_to_the_global():
    g = np.array([1.0, 1.0], dtype=np.float32)
    deltas = np.array([[1.0, 0.0], [0.0, 4.0]], dtype=np.float32)
    result = RuleStrategy("fedavg").step(1, g, _subs(deltas, [3, 1]))
    # mean = (3*[1,0] + 1*[0,4]) / 4 = [0.75, 1.0]
    np.testing.assert_allclose(result.new_global, [1.75, 2.0])
    assert result.verdicts[10]["weight"] == pytest.approx(0.75)
    assert result.verdicts[11]["kept"] is True


@pytest.mark.parametrize("rule", ["dspo_vote", "foolsgold"])
def test_stateful_rule_state_survives_a_json_round_trip(rule):
    rng = np.random.default_rng(0)
    g = np.zeros(6, dtype=np.float32)
    rounds = [rng.standard_normal((5, 6)).astype(np.float32) for _ in range(3)]
    for r in rounds:
        r[0] *= -4  # one sign-flipper, so the state is not trivial
    original = RuleStrategy(rule)
    for t, m in enumerate(rounds[:2], 1):
        original.step(t, g, _subs(m, [1] * 5))
    saved = json.loads(json.dumps(original.state_dict()))
    restored = RuleStrategy(rule)
    restored.load_state_dict(saved)
    a = original.step(3, g, _subs(rounds[2], [1] * 5))
    b = restored.step(3, g, _subs(rounds[2], [1] * 5))
    np.testing.assert_array_equal(a.new_global, b.new_global)
    assert a.verdicts == b.verdicts


def test_state_loader_refuses_foreign_classes():
    strategy = RuleStrategy("dspo_vote")
    with pytest.raises(ValueError, match="refusing"):
        strategy.load_state_dict({"state_class": "os.system", "arrays": {}})


def test_array_codec_is_exact_for_numbers_and_strings():
    x = np.array([[1.5, -2.25], [np.pi, 0.0]], dtype=np.float64)
    np.testing.assert_array_equal(decode_array(encode_array(x)), x)
    s = np.array(["a", "bc"])
    assert decode_array(encode_array(s)).tolist() == ["a", "bc"]


class _Oracle:
    def server_update(self, global_weights, round_index):
        return np.ones_like(global_weights)


def test_a_rule_with_missing_or_unknown_parameters_is_refused_when_built():
    # Before any round: a round whose aggregation fails closes with the previous model, so a
    # rule that can never aggregate would otherwise keep the initial model for a whole run.
    with pytest.raises(UnknownAggregatorError, match=r"'krum' needs parameter\(s\) f;.*f=required"):
        RuleStrategy("krum")
    with pytest.raises(UnknownAggregatorError, match=r"has no parameter\(s\) fx"):
        RuleStrategy("fedavg", {"fx": 1})
    with pytest.raises(UnknownAggregatorError, match=r"has no parameter\(s\) b and needs"):
        RuleStrategy("krum", {"b": 1})
    # Parameters the strategy supplies at each step are not required up front.
    g = np.zeros(2, dtype=np.float32)
    deltas = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    assert RuleStrategy("dspo_vote").step(1, g, _subs(deltas, [1, 1, 1])).new_global.shape == (2,)
    fltrust = RuleStrategy("fltrust", oracle=_Oracle())
    assert fltrust.step(1, g, _subs(deltas, [1, 1, 1])).new_global.shape == (2,)
    assert RuleStrategy("krum", {"f": 0}).step(1, g, _subs(deltas, [1, 1, 1])) is not None
