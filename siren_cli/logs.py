"""Logging set-up shared by the ``siren`` commands and the processes they start."""

from __future__ import annotations

import logging
import sys

#: Libraries whose INFO records describe their own internals (model export, tracing), not ours.
CHATTY_LIBRARIES = ("absl", "tensorflow", "h5py", "matplotlib", "PIL")


def configure_logging(verbose: bool = False) -> None:
    """Log INFO and up (DEBUG with ``verbose``) to stderr; third-party chatter from WARNING up."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for name in CHATTY_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
