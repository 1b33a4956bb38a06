"""Graceful stop for long-running commands (board client, coordinator service)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger("siren")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM and SIGINT; services check it and stop between two messages
    (the first signal is logged, so that a service's log says why it stopped)."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if not stop.is_set():
            logger.info(
                "stopping on %s (state is kept: starting again resumes)",
                signal.Signals(signum).name,
            )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
