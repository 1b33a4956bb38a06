"""Partitioners: disjoint shards, label statistics that match p and alpha, held-out splits."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import PartitionError
from models.partition import (
    make_federated_split,
    partition_classes,
    partition_dirichlet,
    partition_iid,
    partition_noniid,
    partition_overlap,
)

# Balanced synthetic labels: 10 classes x 2,000 samples.
LABELS = np.repeat(np.arange(10), 2000)


def _assert_partition(shards: list[np.ndarray], n: int) -> None:
    together = np.concatenate(shards)
    assert together.size == n, "every sample assigned exactly once"
    assert np.unique(together).size == n


def test_iid_shards_are_disjoint_equal_and_label_balanced():
    rng = np.random.default_rng(1)
    shards = partition_iid(LABELS.size, 10, rng)
    _assert_partition(shards, LABELS.size)
    assert {s.size for s in shards} == {2000}
    for s in shards:
        share = np.bincount(LABELS[s], minlength=10) / s.size
        assert np.all(np.abs(share - 0.1) < 0.03)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_noniid_own_label_share_matches_p(p):
    rng = np.random.default_rng(2)
    shards = partition_noniid(LABELS, 10, p, rng)
    _assert_partition(shards, LABELS.size)
    # With 10 boards and 10 labels, board l is group l: its share of label l is p in expectation.
    own = [np.mean(LABELS[s] == c) for c, s in enumerate(shards)]
    assert abs(np.mean(own) - p) < 0.02
    # Other labels share the rest uniformly: (1 - p) / 9 each.
    other = [np.mean(LABELS[s] == (c + 1) % 10) for c, s in enumerate(shards)]
    assert abs(np.mean(other) - (1 - p) / 9) < 0.02


def test_noniid_groups_split_boards_evenly():
    rng = np.random.default_rng(3)
    shards = partition_noniid(LABELS, 20, 0.9, rng)  # 10 groups of 2 boards
    _assert_partition(shards, LABELS.size)
    for c, s in enumerate(shards):
        assert np.mean(LABELS[s] == c // 2) > 0.8


def test_noniid_rejects_p_outside_unit_interval():
    with pytest.raises(PartitionError, match="p must be in"):
        partition_noniid(LABELS, 10, 1.5, np.random.default_rng(0))


@pytest.mark.parametrize("alpha", [0.3, 3.0])
def test_dirichlet_proportion_variance_matches_alpha(alpha):
    # For q ~ Dir(alpha 1_K): Var(q_k) = (1/K)(1 - 1/K) / (K alpha + 1).
    k = 10
    labels = np.repeat(np.arange(300), 400)  # many classes for a stable estimate
    shards = partition_dirichlet(labels, k, alpha, np.random.default_rng(4))
    _assert_partition(shards, labels.size)
    counts = np.stack([np.bincount(labels[s], minlength=300) for s in shards])  # (K, classes)
    props = counts / counts.sum(axis=0, keepdims=True)
    expected = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    assert abs(props.var() / expected - 1) < 0.2


def test_split_root_and_local_tests_are_disjoint_from_training():
    split = make_federated_split(LABELS, 10, "noniid", p=0.5, root_size=100, seed=5)
    train = np.concatenate([s.train_idx for s in split.shards])
    test = np.concatenate([s.test_idx for s in split.shards])
    assert split.root_idx.size == 100
    assert np.intersect1d(split.root_idx, train).size == 0
    assert np.intersect1d(split.root_idx, test).size == 0
    assert np.intersect1d(train, test).size == 0
    assert train.size + test.size + 100 == LABELS.size
    for s in split.shards:
        n = s.train_idx.size + s.test_idx.size
        assert abs(s.test_idx.size - round(0.1 * n)) <= 1


def test_split_is_seeded():
    a = make_federated_split(LABELS, 5, "dirichlet", alpha=0.5, seed=9)
    b = make_federated_split(LABELS, 5, "dirichlet", alpha=0.5, seed=9)
    c = make_federated_split(LABELS, 5, "dirichlet", alpha=0.5, seed=10)
    np.testing.assert_array_equal(a.shards[0].train_idx, b.shards[0].train_idx)
    assert not np.array_equal(a.shards[0].train_idx, c.shards[0].train_idx)


def test_split_rejects_impossible_requests():
    with pytest.raises(PartitionError, match="unknown partition"):
        make_federated_split(LABELS, 5, "shards")
    with pytest.raises(PartitionError, match="at least one sample"):
        make_federated_split(LABELS[:50], 60, "iid", root_size=0)


@pytest.mark.parametrize(("boards", "classes"), [(100, 2), (7, 3), (10, 1)])
def test_classes_gives_every_board_c_distinct_labels_in_equal_parts(boards, classes):
    shards = partition_classes(LABELS, boards, classes, np.random.default_rng(3))
    _assert_partition(shards, LABELS.size)
    holders = np.zeros(10, dtype=int)
    for s in shards:
        held = np.unique(LABELS[s])
        assert held.size == classes
        holders[held] += 1
        # Within a board, every class it holds is (nearly) equally represented.
        counts = np.bincount(LABELS[s], minlength=10)[held]
        assert counts.max() - counts.min() <= 2000 // holders[held].min()
    # Labels are dealt evenly: each is held by floor or ceil of K*c/L boards.
    assert holders.max() - holders.min() <= 1


def test_classes_residual_paper_setting_is_600_images_of_two_classes():
    """Residual-based reweighting §4.4: 100 participants with 300 images of each of two classes
    (the 60,000 training images of MNIST / Fashion-MNIST)."""
    labels = np.repeat(np.arange(10), 6000)
    split = make_federated_split(labels, 100, "classes", classes=2, root_size=0, seed=0)
    for shard in split.shards:
        idx = np.concatenate([shard.train_idx, shard.test_idx])
        assert idx.size == 600
        assert sorted(np.bincount(labels[idx], minlength=10)[np.unique(labels[idx])]) == [300, 300]


def test_classes_rejects_more_classes_than_labels():
    with pytest.raises(PartitionError, match="classes per board"):
        partition_classes(LABELS, 10, 11, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="classes per board"):
        make_federated_split(LABELS, 10, "classes", classes=0)


@pytest.mark.parametrize(("n", "boards"), [(1337, 2000), (1337, 1000), (100, 7), (5, 5)])
def test_overlap_gives_every_board_two_samples_at_least_and_covers_every_sample(n, boards):
    shards = partition_overlap(n, boards, np.random.default_rng(0))
    assert len(shards) == boards
    size = max(2, -(-n // boards))
    for shard in shards:
        assert shard.size == size and np.unique(shard).size == size  # no sample twice
        assert shard.min() >= 0 and shard.max() < n
    assert np.unique(np.concatenate(shards)).size == n


def test_overlap_split_of_2000_digits_boards_trains_and_tests_on_every_board():
    digits_train = np.repeat(np.arange(10), 144)[:1437]
    split = make_federated_split(digits_train, 2000, "overlap", root_size=100, seed=1)
    assert split.num_clients == 2000
    root = set(split.root_idx.tolist())
    for shard in split.shards:
        assert shard.train_idx.size >= 1 and shard.test_idx.size >= 1
        assert not root & (set(shard.train_idx.tolist()) | set(shard.test_idx.tolist()))
    again = make_federated_split(digits_train, 2000, "overlap", root_size=100, seed=1)
    assert all(np.array_equal(a.train_idx, b.train_idx) for a, b in zip(split.shards, again.shards))
    with pytest.raises(PartitionError, match="at least 2 samples"):
        partition_overlap(1, 3, np.random.default_rng(0))
