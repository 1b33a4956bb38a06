"""Reproducible measurements; results are committed under ``benchmarks/results/``."""

from __future__ import annotations

import re


def help_description(doc: str | None) -> str:
    """The first paragraph of a benchmark module's docstring as plain text for ``--help``.

    reST roles (:mod:`x`, :func:`~x`) and inline literals are reduced to their text, and the
    ``(``siren bench NAME``)`` self-reference, which the usage line already gives, is dropped.
    """
    first = " ".join((doc or "").strip().split("\n\n")[0].split())
    first = re.sub(r"\s*\(``siren bench [a-z0-9-]+``\)", "", first)
    first = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", first)
    return first.replace("``", "")
