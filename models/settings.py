"""Settings of the seeded federated split, shared by the board's and the coordinator's ``[data]``.

A board rebuilds the split to take its own shard; the coordinator rebuilds the same split to take
the server's root set. Both must agree on every value below, so both settings classes extend
:class:`SplitSettings` and the fields (names, defaults, meaning) are defined once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SPLIT_COMMENTS", "SplitSettings"]

#: What each split key means (written above it in generated ``[data]`` tables).
SPLIT_COMMENTS: dict[str, str] = {
    "dataset": "digits (scikit-learn's bundled 8x8 digits) or fashion-mnist",
    "clients": "number of boards K the training data is split over",
    "partition": "iid, noniid (degree p), dirichlet (alpha) or classes (classes_per_board)",
    "noniid_p": "non-IID degree p: a sample of label l goes to group l with probability p",
    "dirichlet_alpha": "concentration of the dirichlet partition",
    "classes_per_board": "classes each board holds in the classes partition",
    "root_size": "samples set aside as the server's root test set, excluded from every board",
    "local_test_fraction": "share of each board's shard kept as its local test split",
    "train_samples": "use only the first N training samples (0: all)",
    "test_samples": "evaluate on the first N test samples (0: all)",
    "split_seed": "seed of the split (boards and coordinator must agree)",
}


@dataclass(frozen=True)
class SplitSettings:
    """Which dataset, and how :func:`models.partition.make_federated_split` splits it over boards.

    Attributes
    ----------
    dataset : str
        Dataset name (see :func:`models.datasets.load_dataset`).
    clients : int
        Number of boards K the training data is split over.
    partition : str
        ``iid``, ``noniid`` (DSPO's degree-p scheme), ``dirichlet`` or ``classes``.
    noniid_p : float
        Non-IID degree p of the ``noniid`` scheme.
    dirichlet_alpha : float
        Concentration of the ``dirichlet`` scheme.
    classes_per_board : int
        Classes each board holds in the ``classes`` scheme.
    root_size : int
        Samples set aside as the server's root test set (SIREN: 100), excluded from every board.
    local_test_fraction : float
        Share of each board's shard kept as its local test split (SIREN: 10%).
    train_samples, test_samples : int or None
        Use only the first this many training / test samples (``None``: all).
    split_seed : int
        Seed of the split.
    """

    dataset: str = "digits"
    clients: int = 10
    partition: str = "iid"
    noniid_p: float = 0.5
    dirichlet_alpha: float = 0.5
    classes_per_board: int = 2
    root_size: int = 100
    local_test_fraction: float = 0.1
    train_samples: int | None = None
    test_samples: int | None = None
    split_seed: int = 0
