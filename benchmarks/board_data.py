"""What the on-board benchmarks share: their models and a board's ``data.npz``.

``siren bench alarm`` (:mod:`benchmarks.alarm`) and its per-backend board mode
(:mod:`benchmarks.board_backends`) both measure these models on a board's own data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: model -> (dataset, shard size). SIREN's Fashion-MNIST shard is 60,000 / 10 boards = 6,000.
MODELS = {"siren-cnn": ("fashion-mnist", 6000), "digits-mlp": ("digits", 180)}


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A board's ``data.npz``: training images and labels, then its local test split."""
    with np.load(path, allow_pickle=False) as arrays:
        return (
            np.asarray(arrays["x_train"], dtype=np.float32),
            np.asarray(arrays["y_train"], dtype=np.int64),
            np.asarray(arrays["x_test"], dtype=np.float32),
            np.asarray(arrays["y_test"], dtype=np.int64),
        )
