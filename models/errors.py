"""Errors raised by the ``models`` package."""

from __future__ import annotations


class ModelsError(Exception):
    """Base class of every error raised by ``models``."""


class DatasetNotFoundError(ModelsError):
    """The dataset files are in none of the searched places."""


class CorruptDatasetError(ModelsError):
    """A dataset file exists but its content is not what the format requires."""


class PartitionError(ModelsError):
    """A partitioning request cannot be satisfied (too few samples, bad parameters)."""


class UnknownModelError(ModelsError):
    """A model name that is not in the zoo."""


class ModelInputError(ModelsError):
    """A zoo model that cannot take the dataset's images (too small for its layers)."""


class LayoutMismatchError(ModelsError):
    """A flat weight vector does not fit the model's layout."""


class LiteRTUnavailableError(ModelsError):
    """Neither ``ai-edge-litert`` nor ``tflite-runtime`` can be imported."""


class LiteRTExportError(ModelsError):
    """A converted LiteRT model does not hold the weights the way the evaluator needs."""


class ArtifactError(ModelsError):
    """A LiteRT training artifact cannot be read, or does not fit what the board runs."""
