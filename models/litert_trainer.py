"""Local training of flat weight vectors in LiteRT: the board's ``litert`` training backend.

:class:`LiteRTTrainer` runs a :class:`~models.litert_artifact.TrainingArtifact` in the stock
LiteRT interpreter (``ai-edge-litert`` or ``tflite-runtime``) and offers what the board step
needs of :class:`models.training.Trainer` -- ``train``, ``evaluate``, ``weights``, ``layout``,
``initial_weights`` -- with the same batching and shuffling, so both backends see the same
batches in the same order for the same ``rng``. Importing or using it never imports TensorFlow.

Every batch is padded to the batch size B (padding rows weigh 0), so the interpreter keeps one
set of tensor shapes and never reallocates; the loss and gradient are the mean over the real
samples, exactly as Keras averages an unpadded short batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ArtifactError
from models.litert import FrozenLiteRTEvaluator, LiteRTEvaluator, interpreter_class
from models.litert_artifact import TrainingArtifact
from models.tf_setup import native_stderr_silenced
from models.training import TrainConfig, TrainStats
from models.weights import WeightLayout

#: Samples per ``infer`` call of :meth:`LiteRTTrainer.evaluate`.
EVAL_BATCH = 256


class LiteRTTrainer:
    """Train/evaluate flat weight vectors with a LiteRT training artifact.

    Parameters
    ----------
    artifact : TrainingArtifact or path
        The artifact (or its file).
    config : TrainConfig
        Local training hyper-parameters; its optimizer (and SGD momentum) must be the
        artifact's, which runs it inside the graph.
    num_threads : int
        Interpreter threads (1 on a single-core budget).
    model_name : str, optional
        The zoo model the board was told to train; must be the artifact's.

    Raises
    ------
    ArtifactError
        The artifact holds another model or optimizer, or its weights do not fit its layout.
    LiteRTUnavailableError
        No LiteRT runtime is installed.
    """

    backend = "litert"

    def __init__(
        self,
        artifact: TrainingArtifact | Path | str,
        config: TrainConfig,
        *,
        num_threads: int = 1,
        model_name: str | None = None,
    ) -> None:
        art = (
            artifact if isinstance(artifact, TrainingArtifact) else TrainingArtifact.load(artifact)
        )
        if model_name is not None and model_name != art.model:
            raise ArtifactError(
                f"the LiteRT training artifact holds model {art.model!r}, the board trains "
                f"{model_name!r}; build the artifact for {model_name!r}"
            )
        if config.optimizer != art.optimizer or (
            config.optimizer == "sgd" and config.momentum != art.momentum
        ):
            raise ArtifactError(
                f"the LiteRT training artifact runs {art.optimizer} (momentum {art.momentum}), "
                f"the board is configured for {config.optimizer} (momentum {config.momentum})"
            )
        self.artifact = art
        self.config = config
        self.model_name = art.model
        self.num_classes = art.num_classes
        self.input_shape = art.input_shape
        self.layout: WeightLayout = art.layout
        with native_stderr_silenced():
            self._interpreter = interpreter_class()(
                model_content=art.train_flatbuffer, num_threads=num_threads
            )
            runners = {
                name: self._interpreter.get_signature_runner(name)
                for name in ("train", "gradient", "infer", "get_weights", "set_weights")
            }
            self._reset = self._interpreter.get_signature_runner("reset_optimizer")
            self._get = runners["get_weights"]
            # The first run applies the CPU delegate, which the runtime announces on stderr.
            weights = np.array(self._get()["weights"], dtype=np.float32)
        if weights.shape != (self.layout.size,):
            raise ArtifactError(
                f"the artifact's weights have {weights.size} values, its layout {self.layout.size}"
            )
        self._train = runners["train"]
        self._gradient = runners["gradient"]
        self._infer = runners["infer"]
        self._set = runners["set_weights"]
        self.initial_weights = weights
        self._lr = np.array([config.learning_rate], dtype=np.float32)

    def load(self, weights: np.ndarray) -> None:
        """Load a flat weight vector into the interpreter's variables."""
        vec = np.ascontiguousarray(weights, dtype=np.float32)
        if vec.shape != (self.layout.size,):
            raise ArtifactError(f"weights of shape {vec.shape}, expected ({self.layout.size},)")
        self._set(flat=vec)

    def weights(self) -> np.ndarray:
        """The interpreter's current weights as one float32 vector (a fresh array)."""
        return np.array(self._get()["weights"], dtype=np.float32)

    def _padded(self, x: np.ndarray, y: np.ndarray, size: int) -> tuple[Any, Any, Any]:
        """``(x, y, weight)`` padded with zero-weight rows to ``size`` samples."""
        n = len(y)
        xb = np.zeros((size, *x.shape[1:]), dtype=np.float32)
        xb[:n] = x
        yb = np.zeros(size, dtype=np.int32)
        yb[:n] = y
        wb = np.zeros(size, dtype=np.float32)
        wb[:n] = 1.0
        return xb, yb, wb

    def train(
        self,
        start: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        rng: np.random.Generator,
        epochs: int | None = None,
    ) -> tuple[np.ndarray, TrainStats]:
        """Train from flat weights ``start`` on ``(x, y)``; return the new flat weights.

        The same schedule as :meth:`models.training.Trainer.train`: each epoch visits the data
        once in the order ``rng.permutation(N)``, in batches of B (the last one shorter, padded
        here); the optimizer state starts from zero. Cost: ``epochs · ceil(N / B)`` steps.
        """
        n = len(y)
        if n == 0:
            return np.array(start, dtype=np.float32, copy=True), TrainStats(0, 0, 0.0)
        self.load(start)
        self._reset()
        bs = self.config.batch_size
        size = min(bs, n)
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        y32 = np.asarray(y, dtype=np.int32)
        full = np.ones(size, dtype=np.float32)
        total_loss, steps = 0.0, 0
        for _ in range(epochs if epochs is not None else self.config.epochs):
            order = rng.permutation(n)
            for i in range(0, n, bs):
                idx = order[i : i + bs]
                if len(idx) == size:
                    xb, yb, wb = x32[idx], y32[idx], full
                else:
                    xb, yb, wb = self._padded(x32[idx], y32[idx], size)
                out = self._train(x=xb, y=yb, weight=wb, learning_rate=self._lr)
                total_loss += float(out["loss"])
                steps += 1
        return self.weights(), TrainStats(steps, n, total_loss / max(steps, 1))

    def gradient(
        self, weights: np.ndarray, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """The flat gradient of the mean loss of ``weights`` on the batch ``(x, y)``, and the loss.

        Nothing is updated (the interpreter is left holding ``weights``).
        """
        self.load(weights)
        out = self._gradient(
            x=np.ascontiguousarray(x, dtype=np.float32),
            y=np.asarray(y, dtype=np.int32),
            weight=np.ones(len(y), dtype=np.float32),
        )
        return np.array(out["gradient"], dtype=np.float32), float(out["loss"])

    def logits(
        self, weights: np.ndarray, x: np.ndarray, batch_size: int = EVAL_BATCH
    ) -> np.ndarray:
        """Logits of ``weights`` on ``x`` (the interpreter is left holding ``weights``)."""
        self.load(weights)
        outs = []
        for i in range(0, len(x), batch_size):
            batch = np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)
            if len(batch) < batch_size and len(x) > batch_size:
                # Keep the interpreter's shapes: pad the last batch rather than reallocate.
                padded = np.zeros((batch_size, *batch.shape[1:]), dtype=np.float32)
                padded[: len(batch)] = batch
                outs.append(np.array(self._infer(x=padded)["logits"])[: len(batch)])
            else:
                outs.append(np.array(self._infer(x=batch)["logits"]))
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes), np.float32)

    def evaluate(self, weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy loss and top-1 accuracy of ``weights`` on ``(x, y)``."""
        n = len(y)
        if n == 0:
            return 0.0, 0.0
        z = self.logits(weights, x).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        labels = np.asarray(y, dtype=np.int64)
        loss = float(-np.mean(log_p[np.arange(n), labels]))
        return loss, float(np.mean(np.argmax(z, axis=1) == labels))


def artifact_evaluator(artifact: TrainingArtifact, num_threads: int = 1) -> Any:
    """The alarm's evaluator from a training artifact alone (no TensorFlow).

    :class:`~models.litert.FrozenLiteRTEvaluator` on the artifact's constant-weight inference
    flatbuffer when it carries one (convolutional models), else
    :class:`~models.litert.LiteRTEvaluator` on a second interpreter of the training flatbuffer,
    whose ``set_weights`` and ``infer`` signatures it uses (the trainer's is left alone).
    """
    if artifact.frozen is not None:
        return FrozenLiteRTEvaluator(artifact.frozen, num_threads=num_threads)
    return LiteRTEvaluator(artifact.train_flatbuffer, artifact.layout, num_threads=num_threads)


__all__ = ["EVAL_BATCH", "LiteRTTrainer", "artifact_evaluator"]
