"""Data-poisoning attacks: label flipping (untargeted and targeted) and the pixel backdoor."""

from __future__ import annotations

import numpy as np

from firmware_sim.attacks.backdoor import apply_trigger, default_trigger_size

from .builders import adversary, board_data, rng, tiny_dataset, update

G = np.zeros(2, np.float32)


def test_label_flip_trains_on_l_to_l_minus_1_minus_l_in_attacking_rounds_only():
    ds = tiny_dataset(num_classes=4)
    clean = board_data(ds)
    adv = adversary("label_flip", (0,), dataset=ds, start_round=3)
    assert adv.board_data(0, clean, rng()) is clean  # the fleet keeps the clean data
    assert adv.round_data(0, 2, clean) is clean
    flipped = adv.round_data(0, 3, clean)
    expected = {0: 3, 1: 2, 2: 1, 3: 0}
    assert flipped.y_train.tolist() == [expected[int(y)] for y in clean.y_train]
    np.testing.assert_array_equal(flipped.x_train, clean.x_train)
    np.testing.assert_array_equal(flipped.y_test, clean.y_test)  # local test split untouched
    assert adv.round_data(1, 3, clean) is clean  # an unknown (benign) board keeps its data


def test_random_label_flip_gives_every_label_another_class_uniformly():
    from firmware_sim.attacks.flipping import relabel_randomly

    y = np.repeat(np.arange(4), 3000)
    flipped = relabel_randomly(y, 4, np.random.default_rng(0))
    assert not np.any(flipped == y) and set(flipped.tolist()) == {0, 1, 2, 3}
    for label in range(4):  # each other class about equally often (1000 of 3000 expected)
        counts = np.bincount(flipped[y == label], minlength=4)
        assert counts[label] == 0
        assert all(900 < c < 1100 for i, c in enumerate(counts) if i != label)
    ds = tiny_dataset(num_classes=4)
    clean = board_data(ds)
    adv = adversary("random_label_flip", (0,), dataset=ds)
    adv.board_data(0, clean, rng())
    once = adv.round_data(0, 1, clean).y_train
    assert not np.any(once == clean.y_train)
    assert adv.round_data(0, 2, clean).y_train.tolist() == once.tolist()  # drawn once per board


def test_targeted_label_flip_changes_only_the_source_class():
    ds = tiny_dataset(num_classes=4)
    clean = board_data(ds)
    adv = adversary("targeted_label_flip", (0,), dataset=ds, source=1, target=3)
    adv.board_data(0, clean, rng())
    got = adv.round_data(0, 1, clean).y_train
    assert got.tolist() == [3 if y == 1 else int(y) for y in clean.y_train]
    assert (got == 1).sum() == 0 and (got == 3).sum() == 2 * (clean.y_train == 3).sum()


def test_targeted_probe_is_the_source_class_and_main_task_the_others():
    ds = tiny_dataset(num_classes=4, n_test=20)
    probe = adversary("targeted_label_flip", (0,), dataset=ds, source=1, target=3).attack.probe()
    assert probe is not None and probe.target == 3
    assert len(probe.x_attack) == 5  # test labels 0..3 repeated: five of class 1
    assert np.all(probe.x_attack == 0.25)
    assert len(probe.y_main) == 15 and 1 not in probe.y_main.tolist()


def test_trigger_is_a_checkerboard_in_the_upper_left_corner():
    assert default_trigger_size((8, 8, 1)) == 3
    assert default_trigger_size((28, 28, 1)) == 4
    x = np.full((2, 8, 8, 1), 0.5, np.float32)
    out = apply_trigger(x, 3)
    corner = out[0, :3, :3, 0]
    np.testing.assert_array_equal(corner, [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(out[:, 3:, :, :], 0.5)
    np.testing.assert_array_equal(out[:, :3, 3:, :], 0.5)
    np.testing.assert_array_equal(x, 0.5)  # input untouched


def test_naive_backdoor_poisons_a_fraction_of_each_copy_with_the_target_label():
    ds = tiny_dataset(num_classes=4, n_train=40)
    clean = board_data(ds)
    adv = adversary("backdoor", (0,), dataset=ds, target=2)
    adv.board_data(0, clean, rng())
    data = adv.round_data(0, 1, clean)
    assert data.num_train == 80  # epoch_factor 2
    for copy in range(2):
        x = data.x_train[40 * copy : 40 * (copy + 1)]
        y = data.y_train[40 * copy : 40 * (copy + 1)]
        triggered = x[:, 0, 0, 0] == 1.0  # no clean image is white (grey levels <= 0.75)
        assert triggered.sum() == 13  # round(20/64 * 40) = round(12.5)
        assert np.all(y[triggered] == 2)
        np.testing.assert_array_equal(y[~triggered], clean.y_train[~triggered])
        np.testing.assert_array_equal(x[~triggered], clean.x_train[~triggered])
    # The update of the doubled data is sent as trained, with the true shard size declared.
    ups = [update(0, [0.5, 1.0], num_samples=80), update(1, [1.0, 1.0], 40)]
    out = adv.tamper_round(1, G, ups, rng())
    np.testing.assert_array_equal(out[0].delta, [0.5, 1.0])
    assert out[0].num_samples == 40


def test_model_replacement_attacks_once_with_a_hundredfold_update():
    ds = tiny_dataset()
    clean = board_data(ds)
    adv = adversary("backdoor", (0,), dataset=ds, mode="model_replacement", start_round=2)
    adv.board_data(0, clean, rng())
    ups = [update(0, [0.5, -1.0], 40), update(1, [1.0, 1.0], 40)]
    assert adv.round_data(0, 1, clean) is clean
    assert adv.tamper_round(1, G, ups, rng())[0] is ups[0]
    assert adv.round_data(0, 2, clean).num_train == 80
    np.testing.assert_array_equal(adv.tamper_round(2, G, ups, rng())[0].delta, [50.0, -100.0])
    assert adv.round_data(0, 3, clean) is clean
    assert adv.tamper_round(3, G, ups, rng())[0] is ups[0]
    assert adv.describe()["attack_schedule"]["once"] is True


def test_backdoor_probe_triggers_every_non_target_test_image():
    ds = tiny_dataset(num_classes=4, n_test=20)
    probe = adversary("backdoor", (0,), dataset=ds, target=2).attack.probe()
    assert probe is not None and probe.target == 2
    assert len(probe.x_attack) == 15  # five of the 20 test images are of class 2
    assert np.all(probe.x_attack[:, 0, 0, 0] == 1.0) and np.all(probe.x_attack[:, 0, 1, 0] == 0)
    assert len(probe.y_main) == 20  # main task: the whole clean test set
