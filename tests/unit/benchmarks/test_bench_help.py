"""Every ``siren bench`` benchmark (and each part of ``siren bench participation``) prints its
help and exits 0: a literal ``%`` in a help string would make argparse fail on ``--help``."""

from __future__ import annotations

import importlib

import pytest

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
    assert "usage: siren bench" in capsys.readouterr().out
