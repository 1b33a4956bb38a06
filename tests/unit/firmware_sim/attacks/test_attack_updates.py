"""Attacks on the update vector, the declared sample count and the alarm bit."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_sim.attacks.statistical import alie_z

from .builders import adversary, board_data, rng, tiny_dataset, update

G = np.array([1.0, 2.0], dtype=np.float32)


def five_updates():
    """Boards 0-2 benign with rows [1,0], [3,0], [5,6]; boards 3, 4 (malicious) [0,0], [2,2]."""
    rows = [[1, 0], [3, 0], [5, 6], [0, 0], [2, 2]]
    return [update(i, r, num_samples=10 + i) for i, r in enumerate(rows)]


def test_sign_flip_sends_exactly_minus_four_times_the_honest_update():
    ups = [update(i, [0.5 * (i + 1), -1.25, 3.0]) for i in range(5)]
    adv = adversary("sign_flip", (1, 3))
    out = adv.tamper_round(1, np.zeros(3, np.float32), ups, rng())
    for i in (1, 3):
        np.testing.assert_array_equal(out[i].delta, np.float32(-4) * ups[i].delta)
        assert out[i].delta.dtype == np.float32
        assert out[i].num_samples == ups[i].num_samples and out[i].alarm is False
    for i in (0, 2, 4):
        assert out[i] is ups[i]


def test_sign_flip_boost_parameter_and_camouflage_rounds():
    ups = [update(i, [1.0, -2.0]) for i in range(3)]
    adv = adversary("sign_flip", (0,), clients=3, boost=-2, start_round=2, every=2)
    assert adv.tamper_round(1, G, ups, rng())[0] is ups[0]  # before start_round: honest
    np.testing.assert_array_equal(adv.tamper_round(2, G, ups, rng())[0].delta, [-2.0, 4.0])
    assert adv.tamper_round(3, G, ups, rng())[0] is ups[0]  # between attacking rounds
    np.testing.assert_array_equal(adv.tamper_round(4, G, ups, rng())[0].delta, [-2.0, 4.0])
    assert adv.round_metrics(None, G) == {"attack_active": True}


def test_targeted_poison_boosts_by_k_over_c_by_default():
    ups = [update(i, [1.0, -0.5]) for i in range(5)]
    adv = adversary("targeted_poison", (1, 3), dataset=tiny_dataset(), source=1, target=2)
    assert adv.attack.values["boost"] == 2.5  # K/c = 5/2
    out = adv.tamper_round(1, G, ups, rng())
    np.testing.assert_array_equal(out[1].delta, [2.5, -1.25])
    assert out[0] is ups[0]
    adv3 = adversary("targeted_poison", (1,), dataset=tiny_dataset(), source=1, target=2, boost=3)
    np.testing.assert_array_equal(adv3.tamper_round(1, G, ups, rng())[1].delta, [3.0, -1.5])


def test_multiplicative_noise_with_zero_std_is_the_honest_update():
    ups = [update(0, [0.5, -0.25]), update(1, [1.0, 1.0])]
    adv = adversary("gaussian_noise", (0,), clients=2, std=0)
    np.testing.assert_array_equal(adv.tamper_round(1, G, ups, rng())[0].delta, [0.5, -0.25])


def test_multiplicative_noise_scales_the_local_weights_by_n_1_std():
    d = 20_000
    g = np.ones(d, np.float32)
    ups = [update(0, np.ones(d)), update(1, np.ones(d))]
    adv = adversary("gaussian_noise", (0,), clients=2, std=2)
    out = adv.tamper_round(1, g, ups, rng(3))
    eps = (out[0].delta.astype(np.float64) + 1.0) / 2.0  # (w * eps - g + g) / w with w = 2
    assert abs(eps.mean() - 1.0) < 0.05
    assert abs(eps.std() - 2.0) < 0.05
    assert out[1] is ups[1]


def test_random_update_ignores_training_and_differs_per_board():
    d = 20_000
    ups = [update(i, np.full(d, 5.0)) for i in range(3)]
    adv = adversary("gaussian_noise", (0, 2), clients=3, mode="random", std=3)
    out = adv.tamper_round(1, np.zeros(d, np.float32), ups, rng())
    for i in (0, 2):
        assert abs(out[i].delta.mean()) < 0.1  # centred on 0, not on the honest 5
        assert abs(out[i].delta.std() - 3.0) < 0.1
    assert not np.array_equal(out[0].delta, out[2].delta)


def test_alie_z_follows_the_supporter_count():
    assert alie_z(5, 2) == pytest.approx(0.8416212335729143)  # s = 1, Phi^-1(4/5)
    assert alie_z(10, 4) == pytest.approx(0.8416212335729143)  # s = 2, Phi^-1(8/10)
    assert alie_z(10, 1) == pytest.approx(0.0)  # s = 5, Phi^-1(1/2)
    assert alie_z(10, 8) == pytest.approx(1.2815515655446004)  # s clamped to 1: Phi^-1(0.9)


def test_alie_sends_mean_minus_z_std_of_the_benign_updates():
    adv = adversary("alie", (3, 4))
    out = adv.tamper_round(1, G, five_updates(), rng())
    # benign mean [3, 2]; population std [sqrt(8/3), sqrt(8)]; z = Phi^-1(0.8)
    expected = [1.62563828, -0.38046434]
    for i in (3, 4):
        np.testing.assert_allclose(out[i].delta, expected, rtol=1e-6)
    assert adv.round_metrics(None, G)["alie_z"] == pytest.approx(0.8416212335729143)


def test_alie_partial_knowledge_and_explicit_z():
    adv = adversary("alie", (3, 4), knowledge="partial", z=1.0)
    out = adv.tamper_round(1, G, five_updates(), rng())
    np.testing.assert_allclose(out[3].delta, [0.0, 0.0])  # own mean [1,1], std [1,1]
    adv_full = adversary("alie", (3, 4), z=1.0)
    out = adv_full.tamper_round(1, G, five_updates(), rng())
    np.testing.assert_allclose(out[4].delta, [3 - np.sqrt(8 / 3), 2 - np.sqrt(8)], rtol=1e-6)


def test_ipm_sends_minus_epsilon_times_the_mean():
    out = adversary("ipm", (3, 4)).tamper_round(1, G, five_updates(), rng())
    np.testing.assert_allclose(out[3].delta, [-1.5, -1.0])
    np.testing.assert_allclose(out[4].delta, [-1.5, -1.0])
    part = adversary("ipm", (3, 4), knowledge="partial", epsilon=2)
    np.testing.assert_allclose(part.tamper_round(1, G, five_updates(), rng())[3].delta, [-2, -2])


def test_weight_attack_small_data_trains_on_few_samples_but_declares_the_shard():
    ds = tiny_dataset()  # 40 training samples
    adv = adversary("weight_attack", (1,), dataset=ds)
    clean = board_data(ds)
    assert adv.board_data(1, clean, rng()) is clean
    trained = adv.round_data(1, 1, clean)
    assert trained.num_train == 2  # round(0.04 * 40)
    ups = [update(0, [1.0, 1.0], 40), update(1, [1.0, 1.0], trained.num_train)]
    out = adv.tamper_round(1, G, ups, rng())
    assert out[1].num_samples == 40 != trained.num_train
    np.testing.assert_array_equal(out[1].delta, ups[1].delta)


def test_weight_attack_inflate_explicit_count_and_flipped_labels():
    ds = tiny_dataset()
    adv = adversary("weight_attack", (0,), dataset=ds, mode="inflate", flip_labels=True)
    clean = board_data(ds)
    adv.board_data(0, clean, rng())
    trained = adv.round_data(0, 1, clean)
    assert trained.num_train == 40
    np.testing.assert_array_equal(trained.y_train, 3 - clean.y_train)
    out = adv.tamper_round(1, G, [update(0, [1.0, 0.0], 40)], rng())
    assert out[0].num_samples == 400
    fixed = adversary("weight_attack", (0,), dataset=ds, mode="inflate", count=7)
    fixed.board_data(0, clean, rng())
    assert fixed.round_data(0, 1, clean) is clean  # honest training, only the count lies
    assert fixed.tamper_round(1, G, [update(0, [1.0, 0.0], 40)], rng())[0].num_samples == 7


def test_false_alarm_alone_raises_only_the_malicious_alarm_bits():
    ups = [update(i, [1.0, 2.0]) for i in range(4)]
    adv = adversary("false_alarm", (1, 2), clients=4, start_round=2)
    assert [u.alarm for u in adv.tamper_round(1, G, ups, rng())] == [False] * 4
    out = adv.tamper_round(2, G, ups, rng())
    assert [u.alarm for u in out] == [False, True, True, False]
    for a, b in zip(out, ups):
        np.testing.assert_array_equal(a.delta, b.delta)
        assert a.num_samples == b.num_samples


def test_false_alarm_combines_with_another_attack():
    ups = [update(i, [1.0, 2.0]) for i in range(3)]
    adv = adversary("sign_flip", (0,), clients=3, false_alarm=True)
    out = adv.tamper_round(1, G, ups, rng())
    assert [u.alarm for u in out] == [True, False, False]
    np.testing.assert_array_equal(out[0].delta, [-4.0, -8.0])
    assert adv.describe()["attack_false_alarm"] is True


def test_huge_values_sends_constant_or_scaled_updates_that_stay_finite():
    ups = [update(0, [0.5, -0.25]), update(1, [1.0, 1.0])]
    const = adversary("huge_values", (1,), clients=2)
    out = const.tamper_round(1, G, ups, rng())
    np.testing.assert_array_equal(out[1].delta, np.full(2, 1e15, dtype=np.float32))
    assert out[0] is ups[0] and out[1].delta.dtype == np.float32
    top = float(np.finfo(np.float32).max)
    scaled = adversary("huge_values", (0,), clients=2, mode="scale", value=1e39)
    out = scaled.tamper_round(1, G, ups, rng())
    # 0.5e39 is beyond float32: clipped to its largest finite value; -0.25e39 fits.
    np.testing.assert_array_equal(out[0].delta, np.array([top, -2.5e38], dtype=np.float32))
    assert np.isfinite(out[0].delta).all()
