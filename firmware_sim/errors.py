"""Errors raised by the ``firmware_sim`` package (the attacks have their own,
:mod:`firmware_sim.attacks.errors`)."""

from __future__ import annotations


class FleetError(RuntimeError):
    """A fleet process failed (the message carries the tail of its log)."""
