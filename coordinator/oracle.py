"""The server's root test set: accuracy of candidate models and the server's own update.

SIREN §5.1 draws 100 samples from the training data, excluded from every board; SIREN uses them
to test client models, FLTrust to train the server update it compares clients against.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RootSetOracle:
    """Root-set evaluation and training with a :class:`models.training.Trainer`.

    Parameters
    ----------
    trainer : models.training.Trainer
        Any trainer of the fleet's model (its hyper-parameters are used for the server update).
    x_root, y_root : np.ndarray
        The root test set.
    seed : int
        Seed of the server-update shuffling.
    """

    def __init__(self, trainer: Any, x_root: np.ndarray, y_root: np.ndarray, seed: int = 0) -> None:
        self.trainer = trainer
        self.x_root = x_root
        self.y_root = y_root
        self.seed = seed

    def accuracy(self, weights: np.ndarray) -> float:
        """Top-1 accuracy of ``weights`` on the root set."""
        return float(self.trainer.evaluate(weights, self.x_root, self.y_root)[1])

    def accuracies(self, weights: list[np.ndarray]) -> list[float]:
        """Accuracy of each candidate model (one graph call for all of them when it can)."""
        many = getattr(self.trainer, "evaluate_many", None)
        if many is None:
            return [self.accuracy(w) for w in weights]
        return [acc for _, acc in many(weights, self.x_root, self.y_root)]

    def warm_up(self) -> None:
        """Trace the batched root-set evaluation now, so that no round pays for it (~0.5 s)."""
        many = getattr(self.trainer, "evaluate_many", None)
        start = getattr(self.trainer, "initial_weights", None)
        if many is not None and start is not None:
            many([start, start], self.x_root, self.y_root)

    def server_update(self, global_weights: np.ndarray, round_index: int) -> np.ndarray:
        """Train on the root set from ``global_weights``; return ``g_server − g_t`` (FLTrust)."""
        rng = np.random.default_rng([self.seed, round_index, 7919])
        new, _ = self.trainer.train(global_weights, self.x_root, self.y_root, rng)
        return (new - global_weights).astype(np.float32)
