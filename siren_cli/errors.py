"""Errors of the command-line layer."""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing error: ``siren`` prints it without a traceback and exits with status 2.

    Command handlers raise it (usually wrapping a package's own error) when the user's input
    was wrong; the message must say what was wrong and what was expected.
    """


def message_of(exc: BaseException) -> str:
    """The message of ``exc`` as it was written.

    ``str()`` of a ``KeyError`` is the ``repr`` of its argument, quotes added; stripping quotes
    from the ends instead would also cut a quote that belongs to the message (``got 'abc'``).
    """
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)
