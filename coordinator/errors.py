"""Errors raised by the ``coordinator`` package."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of every error raised by ``coordinator``."""


class AggregatorError(CoordinatorError):
    """Base class of aggregation errors."""


class UnknownAggregatorError(AggregatorError, KeyError):
    """An aggregator name or parameter that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidUpdatesError(AggregatorError, ValueError):
    """The update matrix (or weights, state) is malformed: wrong shape, non-finite values."""


class InvalidParameterError(AggregatorError, ValueError):
    """A rule parameter of the right name but an unusable value (wrong type, out of range)."""


class ByzantineBoundError(AggregatorError, ValueError):
    """Too few clients for the number of Byzantine clients the rule must tolerate."""


class DeviceUnavailableError(AggregatorError, RuntimeError):
    """An aggregation device was asked for that this machine cannot provide (PyTorch not
    installed, or no CUDA GPU visible to it)."""
