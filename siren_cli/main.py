"""``siren`` command: one entry point whose subcommands live next to the code they drive.

Each package that offers commands exposes ``register(subparsers)`` in its ``cli`` module; the
function adds a sub-parser whose handler is stored as ``func`` and returns a process exit code.
Heavy imports (TensorFlow) happen inside the handlers so ``siren --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from siren_cli.errors import CommandError
from siren_cli.logs import configure_logging

#: Modules providing ``register(subparsers)``, in the order their commands are listed.
COMMAND_MODULES: tuple[str, ...] = (
    "firmware_sim.cli",
    "edge_client.cli",
    "coordinator.cli",
    "deploy.cli",
    "image.cli",
    "protocol.cli",
    "benchmarks.cli",
)


#: Distributions that install the ``siren`` command: the desktop install and the board wheel.
DISTRIBUTIONS = ("siren-edge", "siren-edge-board")


def installed_version() -> str:
    """The version of the installed distribution providing ``siren`` (``unknown`` when the
    sources run without being installed)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in DISTRIBUTIONS:
        try:
            return f"{version(name)} ({name})"
        except PackageNotFoundError:
            continue
    return "unknown (not installed; run from the sources)"


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand group."""
    parser = argparse.ArgumentParser(
        prog="siren",
        description=(
            "siren-edge: Byzantine-robust federated learning on edge boards. "
            "Simulate fleets, run board clients and the coordinator, manage keys, benchmark."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    parser.add_argument(
        "--version",
        action="version",
        version=f"siren {installed_version()}",
        help="print the version of the installed siren-edge (or of the board wheel) and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A package that is not installed (the board wheel carries only the board's
            # packages): its commands are not offered. A missing import inside an installed
            # package is a real error.
            parts = name.split(".")
            if exc.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; return the process exit status."""
    parser = build_parser()
    # Commands that forward their options to another parser (``siren bench NAME ...``) accept
    # arguments this parser does not know; for every other command they are an error.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "forward_args", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.bench_args = [*getattr(args, "bench_args", []), *extra]
    configure_logging(bool(args.verbose))
    func = getattr(args, "func", None)
    if func is None:
        # A group without its action (e.g. ``siren sim``): show that group's help.
        help_parser = getattr(args, "group_parser", parser)
        help_parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except CommandError as exc:
        print(f"siren: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("siren: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
