"""Every ``siren bench`` benchmark (and each part of ``siren bench participation``) prints its
help and exits 0: a literal ``%`` in a help string would make argparse fail on ``--help``."""

from __future__ import annotations

import importlib

import pytest

from benchmarks import help_description
from benchmarks.cli import BENCHMARKS

HELP_ARGV = [(name, ["--help"]) for name in BENCHMARKS] + [
    ("participation", [part, "--help"]) for part in ("sampling", "compare", "transports")
]


@pytest.mark.parametrize(
    ("name", "argv"), HELP_ARGV, ids=[" ".join(a[:-1]) or n for n, a in HELP_ARGV]
)
def test_every_benchmark_prints_its_help(
    name: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(BENCHMARKS[name][0])
    with pytest.raises(SystemExit) as exited:
        module.main(argv)
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "usage: siren bench" in text
    assert "``" not in text and ":mod:" not in text and ":func:" not in text  # plain text


def test_help_description_is_the_first_paragraph_in_plain_text() -> None:
    doc = """Cost of the alarm (``siren bench
    alarm``), with :func:`~models.trainer.fit` and ``numpy``.

    Details."""
    assert help_description(doc) == "Cost of the alarm, with models.trainer.fit and numpy."
    assert help_description(None) == ""
