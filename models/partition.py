"""Seeded partitioning of a training set across boards.

Five schemes:

* ``iid`` — a random permutation split into K near-equal shards (SIREN §5.1).
* ``noniid`` — the non-IID degree ``p`` of SIREN §5.1 / DSPO (after Fang et al.): the boards are
  split evenly into ``G = min(L, K)`` groups; a sample with label ``l`` goes to group ``l mod G``
  with probability ``p`` and otherwise to one of the other groups uniformly; inside a group it goes
  to a uniformly chosen board. With balanced classes the expected share of a board's own label is
  ``p``; ``p = 1/L`` is IID.
* ``dirichlet`` — per class, the class's samples are split in proportions drawn from
  ``Dirichlet(alpha · 1_K)``; small ``alpha`` is very skewed, large ``alpha`` approaches IID.
* ``classes`` — every board holds samples of ``c`` classes only (residual-based reweighting §4:
  "each participant contains images of two random digits", 300 of each): each board draws ``c``
  distinct classes, the classes being dealt out as evenly as possible, and a class's samples
  are split equally among the boards that drew it.
* ``overlap`` — for fleets larger than the data set (scale tests: 2,000 boards on the 1,437
  training images of digits): every board gets ``max(2, ceil(n / K))`` samples, a window of a
  random permutation of the ``n`` samples (wrapping around), the K windows starting at evenly
  spaced offsets. The windows cover every sample; neighbouring boards share samples, and with
  ``K > n / 2`` several boards hold the same samples. Two samples at least, so every board keeps
  one to train on and one for its local test split.

:func:`make_federated_split` first draws the server's root test set (SIREN §5.1: default 100
samples from the training data, excluded from every board), partitions the rest, and cuts a local
test split (default 10%) from every board's shard that the board never trains on.
All functions return index arrays into the training set, so data is never copied here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import PartitionError

PARTITION_SCHEMES = ("iid", "noniid", "dirichlet", "classes", "overlap")

#: Samples per board of the ``overlap`` scheme at least (one to train on, one to test on).
OVERLAP_MIN_SAMPLES = 2


@dataclass(frozen=True)
class ClientShard:
    """One board's data, as indices into the training set.

    Attributes
    ----------
    client_id : int
        Board index 0..K-1.
    train_idx : np.ndarray
        Samples the board trains on.
    test_idx : np.ndarray
        The board's local test split (SIREN alarm); disjoint from ``train_idx``.
    """

    client_id: int
    train_idx: np.ndarray
    test_idx: np.ndarray

    @property
    def num_train(self) -> int:
        """Number of training samples (what an honest board reports)."""
        return int(self.train_idx.size)


@dataclass(frozen=True)
class FederatedSplit:
    """All shards plus the server's root test set (indices into the training set)."""

    shards: tuple[ClientShard, ...]
    root_idx: np.ndarray

    @property
    def num_clients(self) -> int:
        """Number of boards K."""
        return len(self.shards)


def _check_clients(n_samples: int, n_clients: int) -> None:
    if n_clients < 1:
        raise PartitionError(f"need at least 1 client, got {n_clients}")
    if n_samples < n_clients:
        raise PartitionError(
            f"cannot give {n_clients} clients at least one sample each from {n_samples} samples"
        )


def partition_iid(n_samples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``range(n_samples)`` uniformly at random into ``n_clients`` near-equal shards."""
    _check_clients(n_samples, n_clients)
    return [np.sort(s) for s in np.array_split(rng.permutation(n_samples), n_clients)]


def partition_overlap(n_samples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Overlapping shards for any number of boards (module docstring, ``overlap``).

    Board ``c`` holds positions ``o_c, o_c + 1, ..., o_c + s - 1`` (mod ``n``) of a random
    permutation, with ``s = max(2, ceil(n / K))`` and ``o_c = floor(c · n / K)``. O(K · s).

    Raises
    ------
    PartitionError
        Fewer than two samples, or no board.
    """
    if n_clients < 1:
        raise PartitionError(f"need at least 1 client, got {n_clients}")
    if n_samples < OVERLAP_MIN_SAMPLES:
        raise PartitionError(
            f"the overlap partition needs at least {OVERLAP_MIN_SAMPLES} samples, got {n_samples}"
        )
    size = max(OVERLAP_MIN_SAMPLES, -(-n_samples // n_clients))
    order = rng.permutation(n_samples)
    starts = (np.arange(n_clients, dtype=np.int64) * n_samples) // n_clients
    window = np.arange(size, dtype=np.int64)
    return [np.sort(order[(start + window) % n_samples]) for start in starts]


def partition_noniid(
    labels: np.ndarray, n_clients: int, p: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Non-IID degree ``p`` partition (SIREN §5.1, DSPO §V-A; see module docstring).

    Parameters
    ----------
    labels : np.ndarray
        Integer labels of the samples to distribute.
    n_clients : int
        Number of boards K.
    p : float
        Probability that a sample of label ``l`` goes to group ``l``; in [0, 1].
    rng : np.random.Generator
        Source of randomness.
    """
    if not 0.0 <= p <= 1.0:
        raise PartitionError(f"non-IID degree p must be in [0, 1], got {p}")
    labels = np.asarray(labels)
    _check_clients(labels.size, n_clients)
    num_labels = int(labels.max()) + 1 if labels.size else 1
    n_groups = min(num_labels, n_clients)
    groups = np.array_split(np.arange(n_clients), n_groups)
    home = labels % n_groups
    if n_groups == 1:
        group_of = home
    else:
        stay = rng.random(labels.size) < p
        # Uniform among the other G-1 groups: offset 1..G-1 from the home group.
        other = (home + rng.integers(1, n_groups, size=labels.size)) % n_groups
        group_of = np.where(stay, home, other)
    owner = np.empty(labels.size, dtype=np.int64)
    for g, members in enumerate(groups):
        idx = np.flatnonzero(group_of == g)
        owner[idx] = members[rng.integers(0, members.size, size=idx.size)]
    shards = [np.flatnonzero(owner == c) for c in range(n_clients)]
    _ensure_nonempty(shards, rng)
    return shards


def partition_dirichlet(
    labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed partition: class ``l`` is split by proportions ``q ~ Dir(alpha · 1_K)``."""
    if alpha <= 0:
        raise PartitionError(f"Dirichlet alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    _check_clients(labels.size, n_clients)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        q = rng.dirichlet(np.full(n_clients, alpha))
        cuts = np.floor(np.cumsum(q)[:-1] * idx.size).astype(np.int64)
        for c, piece in enumerate(np.split(idx, cuts)):
            parts[c].append(piece)
    shards = [np.sort(np.concatenate(p)) for p in parts]
    _ensure_nonempty(shards, rng)
    return shards


def partition_classes(
    labels: np.ndarray, n_clients: int, classes: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Every board gets ``classes`` distinct labels (see the module docstring).

    Boards draw their classes one after the other, each taking ``c`` of the labels held by the
    fewest boards so far (ties broken at random), so every label is held by ``⌊K·c/L⌋`` or
    ``⌈K·c/L⌉`` boards; each label's samples are then cut into equal parts among its holders.
    """
    labels = np.asarray(labels)
    _check_clients(labels.size, n_clients)
    present = np.unique(labels)
    if not 1 <= classes <= present.size:
        raise PartitionError(
            f"classes per board must be in [1, {present.size}] (the labels present), got {classes}"
        )
    held = np.zeros(present.size, dtype=np.int64)
    deck = np.empty((n_clients, classes), dtype=present.dtype)
    for c in range(n_clients):
        pick = np.lexsort((rng.random(present.size), held))[:classes]
        held[pick] += 1
        deck[c] = present[pick]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for label in present:
        holders = np.flatnonzero((deck == label).any(axis=1))
        if holders.size == 0:
            continue
        idx = rng.permutation(np.flatnonzero(labels == label))
        for holder, piece in zip(holders.tolist(), np.array_split(idx, holders.size)):
            parts[holder].append(piece)
    shards = [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]
    _ensure_nonempty(shards, rng)
    return shards


def _ensure_nonempty(shards: list[np.ndarray], rng: np.random.Generator) -> None:
    """Move single samples from the largest shards to empty ones (rare with skewed draws)."""
    for c, shard in enumerate(shards):
        if shard.size:
            continue
        donor = int(np.argmax([s.size for s in shards]))
        if shards[donor].size < 2:
            raise PartitionError("too few samples to give every client at least one")
        pick = int(rng.integers(shards[donor].size))
        shards[c] = shards[donor][pick : pick + 1].copy()
        shards[donor] = np.delete(shards[donor], pick)


def make_federated_split(
    labels: np.ndarray,
    n_clients: int,
    scheme: str = "iid",
    *,
    p: float = 0.5,
    alpha: float = 0.5,
    classes: int = 2,
    root_size: int = 100,
    local_test_fraction: float = 0.1,
    seed: int = 0,
) -> FederatedSplit:
    """Draw the root test set, partition the rest into boards, cut each board's local test split.

    Parameters
    ----------
    labels : np.ndarray
        Labels of the full training set.
    n_clients : int
        Number of boards K.
    scheme : {"iid", "noniid", "dirichlet", "classes", "overlap"}
        Partitioning scheme (see module docstring).
    p, alpha : float
        Non-IID degree and Dirichlet concentration.
    classes : int
        Classes per board of the ``classes`` scheme.
    root_size : int
        Size of the server's root test set, drawn uniformly from the training data (0 for none).
    local_test_fraction : float
        Fraction of each board's shard kept as its local test split (never trained on); shards with
        at least two samples keep at least one test sample and one training sample.
    seed : int
        Seed of every random choice.
    """
    labels = np.asarray(labels)
    if scheme not in PARTITION_SCHEMES:
        raise PartitionError(f"unknown partition {scheme!r}; expected one of {PARTITION_SCHEMES}")
    if not 0.0 <= local_test_fraction < 1.0:
        raise PartitionError(f"local test fraction must be in [0, 1), got {local_test_fraction}")
    if not 0 <= root_size < labels.size:
        raise PartitionError(f"root set of {root_size} from {labels.size} samples is impossible")
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.size)
    root_idx = np.sort(order[:root_size])
    rest = np.sort(order[root_size:])
    if scheme == "iid":
        local = partition_iid(rest.size, n_clients, rng)
    elif scheme == "noniid":
        local = partition_noniid(labels[rest], n_clients, p, rng)
    elif scheme == "classes":
        local = partition_classes(labels[rest], n_clients, classes, rng)
    elif scheme == "overlap":
        local = partition_overlap(rest.size, n_clients, rng)
    else:
        local = partition_dirichlet(labels[rest], n_clients, alpha, rng)
    shards = []
    for c, positions in enumerate(local):
        idx = rng.permutation(rest[positions])
        n_test = round(idx.size * local_test_fraction)
        if local_test_fraction > 0 and idx.size >= 2:
            n_test = min(max(n_test, 1), idx.size - 1)
        shards.append(ClientShard(c, np.sort(idx[n_test:]), np.sort(idx[:n_test])))
    return FederatedSplit(tuple(shards), root_idx)
