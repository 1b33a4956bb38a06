"""Errors raised by the ``image`` package."""

from __future__ import annotations


class ImageError(Exception):
    """An image cannot be built, read or changed; the message says what is wrong or missing."""
