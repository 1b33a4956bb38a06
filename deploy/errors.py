"""Errors raised by the ``deploy`` package."""

from __future__ import annotations


class DeployError(Exception):
    """A deployment folder cannot be written or changed (bad names, existing keys, tools)."""
