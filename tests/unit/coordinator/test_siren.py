"""SIREN server decision process (Algorithm 2, Fig. 3 cases 1-4), weight analysis, rollback,
penalty and award, and the saved state.

The root test set here is real but tiny: 20 samples ``x_j = e_j`` (j < 20) of class 1 for a
linear classifier ``predict(x) = [x·w > 0]`` over ``d = 21`` parameters. A model's root accuracy
is therefore the fraction of its first 20 coordinates that are positive, and coordinate 20
(not seen by any root sample) steers the direction of an update for the weight analysis.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from coordinator.errors import UnknownAggregatorError
from coordinator.rounds import Submission, make_strategy
from coordinator.siren import SirenStrategy, cosine, decode_vector, encode_vector
from coordinator.siren_params import describe_parameters

N_ROOT = 20
D = N_ROOT + 1


class LinearRootSet:
    """Root set of ``N_ROOT`` one-hot samples of class 1 for a linear classifier."""

    def __init__(self) -> None:
        self.x = np.eye(N_ROOT, D, dtype=np.float64)
        self.y = np.ones(N_ROOT, dtype=np.int64)
        self.calls = 0

    def accuracy(self, weights: np.ndarray) -> float:
        self.calls += 1
        predicted = (self.x @ np.asarray(weights, dtype=np.float64) > 0).astype(np.int64)
        return float(np.mean(predicted == self.y))

    def server_update(self, global_weights: np.ndarray, round_index: int) -> np.ndarray:
        raise AssertionError("SIREN never asks for a server update")


def upd(correct: int, direction: float = 10.0) -> np.ndarray:
    """An update that, added to the zero model, scores ``correct/20`` on the root set."""
    v = np.full(D, -1.0, dtype=np.float32)
    v[:correct] = 1.0
    v[N_ROOT] = direction
    return v


ZERO = np.zeros(D, dtype=np.float32)


def sub(cid: int, delta: np.ndarray, alarm: bool, n: int = 100) -> Submission:
    return Submission(cid, delta, n, alarm)


def make(num_clients: int = 6, **params: object) -> tuple[SirenStrategy, LinearRootSet]:
    """SIREN as printed (profile ``paper-text``: absolute C_s, C_p = 0.45·K) unless overridden;
    the ``authors`` profile has tests of its own at the end of the module."""
    oracle = LinearRootSet()
    params.setdefault("profile", "paper-text")
    return SirenStrategy(oracle=oracle, num_clients=num_clients, **params), oracle


# --------------------------------------------------------------------------- root set sanity


def test_root_set_accuracy_is_the_share_of_positive_root_coordinates():
    oracle = LinearRootSet()
    assert oracle.accuracy(ZERO) == 0.0
    assert oracle.accuracy(upd(17)) == pytest.approx(0.85)
    assert oracle.accuracy(upd(20)) == 1.0


# --------------------------------------------------------------------------- cases 1 and 2


def test_case_1_no_alarm_aggregates_everyone_sample_weighted_without_testing():
    siren, oracle = make()
    subs = [sub(0, upd(18), False, n=100), sub(1, upd(16), False, n=300)]
    result = siren.step(1, ZERO, subs)
    # α = 100/400 and 300/400. Coordinates 0-15: 1; 16-17: 0.25 - 0.75 = -0.5; 18-19: -1; 20: 10.
    expected = np.array([1.0] * 16 + [-0.5] * 2 + [-1.0] * 2 + [10.0], dtype=np.float32)
    np.testing.assert_allclose(result.new_global, expected, rtol=0, atol=1e-6)
    rec = result.record
    assert rec["case"] == 1 and rec["branch"] == "no-alarm"
    assert rec["alarming"] == [] and rec["silent"] == [0, 1] and rec["benign"] == [0, 1]
    assert rec["rollback"] is False and rec["base"] == "g_t"
    assert rec["alpha"] == {"0": 0.25, "1": 0.75}
    assert rec["root_accuracy"] == {} and oracle.calls == 0  # the server tests nothing
    assert result.verdicts[1]["kept"] and result.verdicts[1]["weight"] == 0.75
    np.testing.assert_array_equal(siren.previous, ZERO)  # g_t trusted: it becomes g_{t-1}


def test_case_2_poisoned_update_without_alarm_is_aggregated():
    # The first attacked round: no board alarms yet, so the poisoned update goes through (the
    # boards will alarm on the resulting global next round). The server sees case 1/2 alike.
    siren, _ = make()
    subs = [sub(0, upd(20), False), sub(1, -4.0 * upd(20), False)]
    result = siren.step(1, ZERO, subs)
    assert result.record["case"] == 1
    assert result.record["benign"] == [0, 1] and result.record["malicious"] == []
    # (1 + -4) / 2 on every coordinate: 0.5 * (1 - 4) = -1.5 and 0.5 * (10 - 40) = -15.
    np.testing.assert_allclose(result.new_global[:N_ROOT], -1.5)
    assert result.new_global[N_ROOT] == pytest.approx(-15.0)
    assert siren.counts[1] == 0.0


# --------------------------------------------------------------------------- case 3


def test_case_3_false_alarms_keep_silent_clients_and_penalize_alarming_ones():
    siren, _ = make()
    subs = [
        sub(0, upd(4, -10.0), True),  # malicious, false alarm, poor update (acc 0.20)
        sub(1, upd(3, -10.0), True),  # malicious (acc 0.15): similar to client 0, aligned
        sub(2, upd(18), False),  # benign silent, acc 0.90
        sub(3, upd(17), False),  # benign silent, acc 0.85
        sub(4, upd(15), False),  # silent but 0.15 below the best silent: not benign
    ]
    result = siren.step(1, ZERO, subs)
    rec = result.record
    assert rec["case"] == 3 and rec["branch"] == "false-alarm"
    assert rec["alarming"] == [0, 1] and rec["silent"] == [2, 3, 4]
    assert rec["max_alarming_accuracy"] == pytest.approx(0.20)
    assert rec["max_silent_accuracy"] == pytest.approx(0.90)
    assert rec["reference"] == {"alarming": 0, "silent": 2}
    assert rec["benign"] == [2, 3] and rec["malicious"] == [0, 1, 4]
    assert rec["rollback"] is False and rec["base"] == "g_t"
    # Mean of upd(18) and upd(17): 1 on 0-16, 0 on 17, -1 on 18-19, 10 on the last.
    expected = np.array([1.0] * 17 + [0.0] + [-1.0] * 2 + [10.0], dtype=np.float32)
    np.testing.assert_allclose(result.new_global, expected, atol=1e-6)
    assert rec["penalty_counts"] == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0, "4": 1.0, "5": 0.0}
    assert result.verdicts[0]["reason"] == "siren case 3: judged malicious"
    assert result.verdicts[0]["score"] == pytest.approx(0.20)


def test_case_3_poisoned_global_rolls_back_to_the_previous_global():
    siren, _ = make()
    g1 = ZERO
    siren.step(1, g1, [sub(0, upd(10), False), sub(1, upd(10), False)])
    g2 = np.full(D, 0.5, dtype=np.float32)  # pretend this g_2 came out poisoned
    subs = [
        sub(0, upd(18) - g2, True, n=100),  # benign boards alarm; their models score ~0.9
        sub(1, upd(17) - g2, True, n=300),
        sub(2, upd(2, -10.0) - g2, False),  # malicious silent, poor (acc 0.10)
    ]
    result = siren.step(2, g2, subs)
    rec = result.record
    assert rec["case"] == 3 and rec["branch"] == "poisoned-global"
    assert rec["benign"] == [0, 1] and rec["malicious"] == [2]
    assert rec["rollback"] is True and rec["base"] == "g_{t-1}"
    # Rebase: g_1 + Σ α (g_2 + Δ_i − g_1) = 0.25·upd(18) + 0.75·upd(17).
    expected = np.array([1.0] * 17 + [-0.5] + [-1.0] * 2 + [10.0], dtype=np.float32)
    np.testing.assert_allclose(result.new_global, expected, atol=1e-6)
    # Step 5: g_2 is dropped; g_1 stays the server's previous global.
    np.testing.assert_array_equal(siren.previous, g1)
    assert siren.counts[2] == 1.0


def test_literal_rollback_applies_the_printed_formula():
    siren, _ = make(rollback="literal")
    g1 = np.full(D, -0.25, dtype=np.float32)
    siren.step(1, g1, [sub(0, upd(10), False)])
    g2 = np.full(D, 0.5, dtype=np.float32)
    subs = [sub(0, upd(18) - g2, True), sub(1, upd(18) - g2, True), sub(2, upd(0), False)]
    result = siren.step(2, g2, subs)
    assert result.record["rollback"] is True
    # g_1 + mean(Δ) = -0.25 + upd(18) - 0.5: it keeps the offset g_1 - g_2 = -0.75.
    np.testing.assert_allclose(result.new_global, upd(18) - 0.75, atol=1e-6)


def test_case_3_without_silent_clients_takes_the_poisoned_global_branch():
    siren, _ = make()
    subs = [sub(0, upd(18), True), sub(1, upd(17), True)]
    rec = siren.step(1, ZERO, subs).record
    assert rec["case"] == 3 and rec["branch"] == "poisoned-global"
    assert rec["silent"] == [] and rec["max_silent_accuracy"] is None
    assert rec["benign"] == [0, 1] and rec["malicious"] == []
    # No earlier global exists yet: the base stays g_t although the decision is a rollback.
    assert rec["rollback"] is True and rec["base"] == "g_t"
    assert siren.previous is None


def test_case_3_boundaries_are_strict_within_and_non_strict_between_groups():
    # Alarming: 0.90 and 0.80 differ by exactly C_s → NOT similar (needs < C_s): case 4.
    siren, _ = make()
    rec = siren.step(1, ZERO, [sub(0, upd(18), True), sub(1, upd(16), True)]).record
    assert rec["case"] == 4 and rec["benign"] == [0] and rec["malicious"] == [1]
    # max_a − max_s exactly C_s (0.90 vs 0.80) → false alarms (the test is ≤ C_s).
    siren, _ = make()
    subs = [sub(0, upd(18), True), sub(1, upd(16), False)]
    rec = siren.step(1, ZERO, subs).record
    assert rec["case"] == 3 and rec["branch"] == "false-alarm"
    assert rec["benign"] == [1] and rec["malicious"] == [0]


def test_false_alarm_check_rescues_good_alarming_clients():
    siren, _ = make(false_alarm_check=True)
    subs = [
        sub(0, upd(17), True),  # benign but alarming (paper rule in a clean round)
        sub(1, upd(18), False),
    ]
    rec = siren.step(1, ZERO, subs).record
    assert rec["case"] == 3 and rec["branch"] == "false-alarm"
    assert rec["benign"] == [0, 1] and rec["malicious"] == []
    assert rec["weight_analysis"]["0"]["reference"] == 1  # re-tested against the best silent


# --------------------------------------------------------------------------- case 4


def test_case_4_keeps_the_alarming_clients_close_to_the_best_and_drops_silent_ones():
    siren, _ = make()
    siren.step(1, ZERO, [sub(i, upd(10), False) for i in range(4)])
    g2 = ZERO
    subs = [
        sub(0, upd(19), True, n=200),  # benign, best (0.95)
        sub(1, upd(18), True, n=200),  # benign (0.90)
        sub(2, upd(1, -10.0), True),  # malicious alarming (0.05)
        sub(3, upd(19, -40.0), False),  # malicious silent
    ]
    result = siren.step(2, g2, subs)
    rec = result.record
    assert rec["case"] == 4 and rec["branch"] == "divergent"
    assert rec["reference"]["alarming"] == 0
    assert rec["benign"] == [0, 1] and rec["malicious"] == [2, 3]
    assert rec["rollback"] is True and rec["base"] == "g_{t-1}"
    assert rec["root_accuracy"] == {"0": 0.95, "1": 0.9, "2": 0.05}  # silent ones not tested
    expected = 0.5 * (upd(19) + upd(18))
    np.testing.assert_allclose(result.new_global, expected, atol=1e-6)
    assert [siren.counts[i] for i in range(4)] == [0.0, 0.0, 1.0, 1.0]


def test_case_4_can_ignore_silent_clients_instead_of_penalizing_them():
    siren, _ = make(case4_silent="ignored")
    subs = [sub(0, upd(19), True), sub(1, upd(1, -10.0), True), sub(2, upd(19), False)]
    result = siren.step(1, ZERO, subs)
    assert result.record["ignored"] == [2] and result.record["malicious"] == [1]
    assert siren.counts[2] == 0.0
    assert result.verdicts[2]["reason"] == "siren case 4: silent client ignored"


def test_weight_analysis_alone_makes_a_round_divergent():
    # Accuracies are all within C_s; client 2 points away from the best update (cos < 0).
    subs = [sub(0, upd(18), True), sub(1, upd(17), True), sub(2, upd(18, -30.0), True)]
    siren, _ = make()
    rec = siren.step(1, ZERO, subs).record
    # cos(upd(18), upd(18,-30)) = (20 - 300) / (sqrt(120) sqrt(920)) < 0.
    assert rec["weight_analysis"]["2"]["cosine"] == pytest.approx(-280 / np.sqrt(120 * 920))
    assert rec["weight_analysis"]["2"]["passed"] is False
    assert rec["case"] == 4 and rec["benign"] == [0, 1] and rec["malicious"] == [2]
    # Without weight analysis the same round is case 3 with everybody benign.
    siren, _ = make(weight_analysis=False)
    rec = siren.step(1, ZERO, subs).record
    assert rec["case"] == 3 and rec["benign"] == [0, 1, 2] and rec["weight_analysis"] == {}


def test_cosine_of_zero_vector_is_undefined_and_passes():
    assert cosine(ZERO, upd(3)) is None
    siren, _ = make()
    rec = siren.step(1, ZERO, [sub(0, upd(18), True), sub(1, upd(18) * 0, True)]).record
    # The zero update scores 0 on the root set, so it fails on accuracy, not on its angle.
    assert rec["weight_analysis"]["1"] == {"reference": 0, "cosine": None, "passed": True}
    assert rec["malicious"] == [1]


# --------------------------------------------------------------------------- penalty and award


def test_false_alarm_path_over_rounds_bans_the_alarming_boards():
    # Malicious boards 0 and 1 alarm every round on a clean global and send poor updates;
    # C_p = 0.45 * 6 = 2.7, so their third penalty (count 3 > 2.7) bans them.
    siren, _ = make(num_clients=6, award=False)
    g = ZERO
    cases = []
    for t in range(1, 6):
        subs = [sub(0, upd(2, -10.0), True), sub(1, upd(2, -10.0), True)]
        subs += [sub(c, upd(18) - g, False) for c in (2, 3, 4, 5)]
        result = siren.step(t, g, subs)
        cases.append(result.record["case"])
        # The global only ever moves to the benign models' mean.
        np.testing.assert_allclose(result.new_global, upd(18), atol=1e-6)
        g = result.new_global
        if t == 3:
            assert result.record["newly_banned"] == [0, 1]
        if t >= 4:
            assert result.record["refused"] == [0, 1] and result.record["alarming"] == []
            assert result.verdicts[0]["reason"] == "siren: banned, refused without checking"
    assert cases == [3, 3, 3, 1, 1]
    assert siren.counts[0] == 3.0 and siren.banned == {0, 1}


def test_ban_then_award_then_rejoin_with_hysteresis():
    siren, _ = make(num_clients=4, c_p=1.5, probe_probability=1.0)
    bad = [sub(0, upd(19), False), sub(1, upd(18), False), sub(2, upd(1, -10.0), True)]
    siren.step(1, ZERO, bad)  # case 3 false alarm: client 2 count 1
    rec = siren.step(2, ZERO, bad).record  # count 2 > 1.5: banned
    assert rec["newly_banned"] == [2] and rec["banned"] == [2]
    # Round 3: client 2 now sends a good update, silently. It is refused but probed.
    good = [sub(0, upd(19), False), sub(1, upd(18), False), sub(2, upd(18), False)]
    result = siren.step(3, ZERO, good)
    rec = result.record
    assert rec["refused"] == [2] and rec["probed"] == [2] and rec["awarded"] == [2]
    assert rec["probe_reference"] == 0
    assert rec["benign"] == [0, 1] and not result.verdicts[2]["kept"]
    assert rec["penalty_counts"]["2"] == 1.5 and rec["banned"] == [2]  # 1.5 is not < C_p
    rec = siren.step(4, ZERO, good).record
    assert rec["penalty_counts"]["2"] == 1.0 and rec["rejoined"] == [2] and rec["banned"] == []
    rec = siren.step(5, ZERO, good).record
    assert rec["benign"] == [0, 1, 2] and rec["refused"] == []


def test_probed_banned_client_still_malicious_gains_penalty():
    siren, _ = make(num_clients=4, c_p=0.5, probe_probability=1.0)
    bad = [sub(0, upd(19), False), sub(1, upd(1, -10.0), True)]
    siren.step(1, ZERO, bad)
    assert siren.banned == {1}
    rec = siren.step(2, ZERO, bad).record
    assert rec["probe_malicious"] == [1] and rec["penalty_counts"]["1"] == 2.0
    assert rec["weight_analysis"]["1"]["reference"] == 0


def test_unprobed_banned_clients_are_not_touched():
    siren, _ = make(num_clients=4, c_p=0.5, probe_probability=0.0)
    bad = [sub(0, upd(19), False), sub(1, upd(1, -10.0), True)]
    siren.step(1, ZERO, bad)
    for t in range(2, 5):
        rec = siren.step(t, ZERO, bad).record
        assert rec["probed"] == [] and rec["penalty_counts"]["1"] == 1.0


def test_probe_draws_are_deterministic_and_follow_the_probability():
    siren, _ = make(num_clients=4, probe_probability=0.5, seed=3)
    draws = [siren._probe(t, 7) for t in range(400)]
    again = [siren._probe(t, 7) for t in range(400)]
    assert draws == again
    assert 150 < sum(draws) < 250


def test_without_penalty_counts_grow_but_nobody_is_banned():
    siren, _ = make(num_clients=2, penalty=False)
    for t in range(1, 6):
        rec = siren.step(t, ZERO, [sub(0, upd(19), False), sub(1, upd(1, -10.0), True)]).record
    assert rec["penalty_counts"]["1"] == 5.0 and rec["banned"] == []


def test_everyone_banned_keeps_the_global_model():
    siren, _ = make(num_clients=2, c_p=0.5, probe_probability=0.0)
    g = np.full(D, 0.125, dtype=np.float32)
    siren.step(1, ZERO, [sub(0, upd(19), True), sub(1, upd(1, -10.0), True)])
    siren.banned.add(0)  # force the corner case
    result = siren.step(2, g, [sub(0, upd(19), True), sub(1, upd(19), True)])
    assert result.record["case"] == 0 and result.record["benign"] == []
    np.testing.assert_array_equal(result.new_global, g)


# --------------------------------------------------------------------------- α variants


def test_alpha_all_keeps_the_rejected_mass_on_the_base():
    siren, _ = make(alpha="all")
    subs = [sub(0, upd(18), True, n=100), sub(1, upd(1, -10.0), True, n=300)]
    result = siren.step(1, ZERO, subs)
    assert result.record["alpha"] == {"0": 0.25}
    np.testing.assert_allclose(result.new_global, 0.25 * upd(18), atol=1e-6)


def test_alpha_uniform_ignores_declared_sample_counts():
    siren, _ = make(alpha="uniform")
    result = siren.step(1, ZERO, [sub(0, upd(18), False, n=1), sub(1, upd(16), False, n=10**6)])
    np.testing.assert_allclose(result.new_global, 0.5 * (upd(18) + upd(16)), atol=1e-6)


# --------------------------------------------------------------------------- parameters and state


def test_make_strategy_builds_siren_with_table_2_defaults():
    strategy = make_strategy(
        "siren", {}, oracle=LinearRootSet(), num_clients=10, num_rounds=40, profile="paper-text"
    )
    assert isinstance(strategy, SirenStrategy)
    p = strategy.params
    assert (p.c_s, p.c_a, p.weight_analysis) == (0.10, 0.5, True)
    assert (p.server_threshold, p.penalty_basis) == ("absolute", "clients")
    assert strategy.c_p == pytest.approx(4.5)


def test_make_strategy_defaults_to_the_authors_profile_with_c_p_from_the_rounds():
    strategy = make_strategy("siren", {}, oracle=LinearRootSet(), num_clients=10, num_rounds=40)
    assert isinstance(strategy, SirenStrategy)
    p = strategy.params
    assert (p.profile, p.server_threshold, p.penalty_basis) == ("authors", "relative", "rounds")
    assert strategy.c_p == 18.0  # int(0.45 * 40), not 0.45 * 10
    # Explicit parameters win over the profile argument.
    mixed = make_strategy(
        "siren",
        {"server_threshold": "absolute"},
        oracle=LinearRootSet(),
        num_clients=10,
        num_rounds=10,
        profile="authors",
    )
    assert isinstance(mixed, SirenStrategy)
    assert mixed.params.server_threshold == "absolute" and mixed.c_p == 4.0


def test_parameter_listing_shows_table_2_defaults():
    text = describe_parameters()
    assert text.startswith("c_s=0.1, c_p=None, c_p_fraction=0.45, c_a=0.5, weight_analysis=True")


def test_parameters_are_typed_and_validated():
    siren, _ = make(c_s=0.2, c_p=3, weight_analysis="false", probe_probability=1)
    assert siren.params.c_s == 0.2 and siren.c_p == 3.0 and siren.params.weight_analysis is False
    with pytest.raises(UnknownAggregatorError, match="valid: c_s, c_p"):
        make(cs=0.1)
    with pytest.raises(ValueError, match="c_s expects float"):
        make(c_s="high")
    with pytest.raises(ValueError, match="rollback must be one of"):
        make(rollback="sideways")
    with pytest.raises(ValueError, match="num_clients"):
        SirenStrategy(oracle=LinearRootSet(), num_clients=0, profile="paper-text")
    with pytest.raises(ValueError, match=r"pass num_rounds \(T\)"):
        SirenStrategy(oracle=LinearRootSet(), num_clients=10, profile="authors")
    with pytest.raises(ValueError, match="unknown SIREN profile 'paper'; valid: authors"):
        make(profile="paper")
    with pytest.raises(ValueError, match="server_threshold must be one of"):
        make(server_threshold="percent")


def test_duplicate_client_ids_are_rejected():
    siren, _ = make()
    with pytest.raises(ValueError, match="duplicate client ids"):
        siren.step(1, ZERO, [sub(0, upd(3), False), sub(0, upd(3), False)])


def test_vector_encoding_is_exact():
    v = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
    blob = json.loads(json.dumps(encode_vector(v)))
    np.testing.assert_array_equal(decode_vector(blob), v)
    with pytest.raises(ValueError, match="header says"):
        decode_vector({**blob, "size": 1000})


def test_state_survives_a_json_round_trip_and_a_restart():
    def rounds(
        strategy: SirenStrategy, start: int, stop: int, g: np.ndarray
    ) -> tuple[list[dict], np.ndarray]:
        out = []
        for t in range(start, stop):
            poisoned = t % 2 == 0
            subs = [
                sub(0, upd(19) - g, poisoned),
                sub(1, upd(18) - g, poisoned),
                sub(2, upd(1, -10.0), True),
            ]
            result = strategy.step(t, g, subs)
            g = result.new_global
            out.append({"record": result.record, "global": result.new_global.tolist()})
        return out, g

    kwargs: dict[str, Any] = {"num_clients": 3, "c_p": 1.5, "probe_probability": 0.5, "seed": 1}
    a, _ = make(**kwargs)
    b, _ = make(**kwargs)
    reference, _ = rounds(a, 1, 9, ZERO)
    _, g4 = rounds(b, 1, 5, ZERO)
    saved = json.loads(json.dumps(b.state_dict()))
    assert 2 in saved["banned"] and saved["previous_global"]["encoding"] == "base64-float32-le"
    c, _ = make(**kwargs)
    c.load_state_dict(saved)
    assert c.counts == b.counts and c.banned == b.banned and c.last_round == 4
    np.testing.assert_array_equal(c.previous, b.previous)
    resumed, _ = rounds(c, 5, 9, g4)
    assert resumed == reference[4:]
    assert any(r["record"]["probed"] for r in resumed)  # the probe draws resumed too


# --------------------------------------------------------------------------- profiles


def test_relative_threshold_is_a_fraction_of_the_reference_accuracy():
    # Everybody alarms. 0.40 vs 0.35: 5 points apart, 12.5% of 0.40. Absolute C_s = 0.10 keeps
    # both alarming clients (case 3, g_t dropped); relative C_s = 0.10 · 0.40 = 4 points rejects
    # client 1 (case 4).
    subs = [sub(0, upd(8), True), sub(1, upd(7), True)]
    ra = make(profile="paper-text")[0].step(1, ZERO, subs).record
    rr = make(profile="authors", num_rounds=10)[0].step(1, ZERO, subs).record
    assert ra["root_accuracy"]["1"] == pytest.approx(0.35)
    assert ra["case"] == 3 and ra["benign"] == [0, 1]
    assert rr["case"] == 4 and rr["benign"] == [0] and rr["malicious"] == [1]
    assert rr["server_threshold"] == "relative" and ra["server_threshold"] == "absolute"
    # At high accuracy the two readings agree: 0.95 vs 0.90 is 5 points, 5.3% of 0.95.
    high = [sub(0, upd(19), True), sub(1, upd(18), True)]
    assert make(profile="authors", num_rounds=10)[0].step(1, ZERO, high).record["case"] == 3


def test_relative_threshold_applies_to_the_false_alarm_test():
    # Alarming best 0.50, silent best 0.40: 10 points. Absolute: 10 <= 10, false alarms.
    # Relative: 10 > 0.10 · 0.50 = 5 points, g_t is judged poisoned. Silent best 0.45: 5 points,
    # equal to the relative margin, so false alarms again (the test is <=).
    subs = [sub(0, upd(10), True), sub(1, upd(8), False)]
    assert make(profile="paper-text")[0].step(1, ZERO, subs).record["branch"] == "false-alarm"
    rr = make(profile="authors", num_rounds=10)[0].step(1, ZERO, subs).record
    assert rr["branch"] == "poisoned-global" and rr["rollback"] is True
    equal = [sub(0, upd(10), True), sub(1, upd(9), False)]
    rr = make(profile="authors", num_rounds=10)[0].step(1, ZERO, equal).record
    assert rr["branch"] == "false-alarm"


def test_authors_profile_bans_after_int_045_t_penalties():
    # T = 5 rounds: C_p = int(2.25) = 2, so the third penalty bans; with the paper's 0.45·K and
    # K = 6, C_p = 2.7 and the third penalty bans too, but with T = 10 (C_p = 4) it takes five.
    def penalties_until_ban(strategy: SirenStrategy) -> int:
        for t in range(1, 20):
            rec = strategy.step(
                t, ZERO, [sub(0, upd(18), False), sub(1, upd(18), True), sub(2, upd(17), False)]
            ).record
            if 1 in rec["newly_banned"]:
                return int(rec["penalty_counts"]["1"])
        raise AssertionError("never banned")

    short, _ = make(profile="authors", num_rounds=5)
    assert short.c_p == 2.0 and penalties_until_ban(short) == 3
    long, _ = make(profile="authors", num_rounds=10)
    assert long.c_p == 4.0 and penalties_until_ban(long) == 5
    by_clients, _ = make(profile="authors", num_rounds=10, penalty_basis="clients")
    assert by_clients.c_p == pytest.approx(2.7) and penalties_until_ban(by_clients) == 3
