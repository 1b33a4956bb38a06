"""A service stopped by a signal says so in its log, once."""

from __future__ import annotations

import signal

import pytest

from siren_cli.signals import stop_on_signals


def test_a_stop_signal_is_logged_once_and_sets_the_event(caplog: pytest.LogCaptureFixture) -> None:
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        caplog.set_level("INFO", logger="siren")
        stop = stop_on_signals()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert stop.is_set()
        assert caplog.text.count("stopping on SIGTERM (state is kept") == 1
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
