"""One network thread for many MQTT connections: paho clients on a shared ``selectors`` loop.

paho's own network thread (``loop_start``) waits with ``select.select``, which cannot watch
file descriptors numbered 1024 or above, and costs one thread per connection. A simulated
fleet keeps hundreds of board connections in one process, so it drives them here instead,
through paho's external-loop interface (``loop_read``, ``loop_write``, ``loop_misc`` and the
socket open/close/write-interest callbacks), on one thread with the platform's best selector
(epoll on Linux: no descriptor limit beyond ``ulimit -n``).

Every paho call of a client on this loop happens on the loop's thread: other threads hand work
over with :meth:`SharedNetworkLoop.call_soon` / :meth:`SharedNetworkLoop.call`. Connection
losses are retried with exponential back-off per client (``reconnect_min`` doubling up to
``reconnect_max`` seconds, reset after a successful CONNACK), like paho's own loop.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.mqtt import set_tcp_nodelay

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    client: Any
    host: str
    port: int
    keepalive: int
    delay_min: float
    delay_max: float
    delay: float = 0.0
    next_attempt: float = 0.0
    fd: int | None = None
    removed: bool = False
    attempts: int = field(default=0)


class SharedNetworkLoop:
    """Drives the sockets of many paho clients from one thread.

    Parameters
    ----------
    name : str
        Thread name.
    misc_interval : float
        Seconds between two ``loop_misc`` passes (keep-alive pings and timeouts).
    """

    def __init__(self, name: str = "mqtt-shared-loop", misc_interval: float = 0.5) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r.fileno(), selectors.EVENT_READ, None)
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._entries: dict[int, _Entry] = {}
        self._misc_interval = misc_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- public, any thread ------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop's thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (clients should have been removed) and close the loop's sockets."""
        self._stop.set()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def call_soon(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the loop's thread as soon as possible."""
        self._calls.put(action)
        self._wake()

    def call(self, action: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``action`` on the loop's thread and return its result (or raise its error).

        Raises
        ------
        TimeoutError
            If the loop did not run it within ``timeout`` seconds.
        """
        if threading.current_thread() is self._thread:
            return action()
        answer: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

        def run() -> None:
            try:
                answer.put((True, action()))
            except Exception as exc:
                answer.put((False, exc))

        self.call_soon(run)
        try:
            ok, value = answer.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"the network loop did not run the call within {timeout} s"
            ) from None
        if not ok:
            raise value
        return value

    def add(
        self,
        client: Any,
        host: str,
        port: int,
        *,
        keepalive: int = 30,
        reconnect_min: float = 1.0,
        reconnect_max: float = 30.0,
    ) -> None:
        """Connect ``client`` (a paho client, not started) and keep it connected.

        Its ``on_socket_*`` callbacks are taken over by the loop.
        """
        entry = _Entry(client, host, port, keepalive, reconnect_min, reconnect_max)
        entry.delay = reconnect_min

        def register() -> None:
            client.on_socket_open = lambda c, u, sock: self._opened(entry, sock)
            client.on_socket_close = lambda c, u, sock: self._closed(entry, sock)
            client.on_socket_register_write = lambda c, u, sock: self._interest(entry, True)
            client.on_socket_unregister_write = lambda c, u, sock: self._interest(entry, False)
            client.connect_async(host, port, keepalive=keepalive)
            self._entries[id(client)] = entry
            self._attempt(entry)

        self.call_soon(register)

    def remove(self, client: Any) -> None:
        """Stop watching ``client`` and stop reconnecting it (call ``disconnect`` first)."""

        def unregister() -> None:
            entry = self._entries.pop(id(client), None)
            if entry is None:
                return
            entry.removed = True
            if entry.fd is not None:
                self._unregister(entry)

        self.call_soon(unregister)

    @property
    def clients(self) -> int:
        """Number of clients driven by the loop."""
        return len(self._entries)

    # -- loop thread -------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _opened(self, entry: _Entry, sock: Any) -> None:
        set_tcp_nodelay(sock)
        entry.fd = sock.fileno()
        self._sel.register(entry.fd, selectors.EVENT_READ, entry)

    def _unregister(self, entry: _Entry) -> None:
        if entry.fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(entry.fd)
        entry.fd = None

    def _closed(self, entry: _Entry, sock: Any) -> None:
        if entry.fd is not None:
            self._unregister(entry)
        if not entry.removed and not self._stop.is_set():
            entry.next_attempt = time.monotonic() + entry.delay
            entry.delay = min(entry.delay * 2, entry.delay_max)

    def _interest(self, entry: _Entry, write: bool) -> None:
        if entry.fd is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(entry.fd, events, entry)

    def _attempt(self, entry: _Entry) -> None:
        entry.next_attempt = 0.0
        entry.attempts += 1
        try:
            entry.client.reconnect()
        except OSError as exc:
            logger.debug("connection attempt %d failed: %s", entry.attempts, exc)
            if entry.fd is not None:
                self._unregister(entry)
            entry.next_attempt = time.monotonic() + entry.delay
            entry.delay = min(entry.delay * 2, entry.delay_max)

    def _run(self) -> None:
        next_misc = time.monotonic() + self._misc_interval
        while not self._stop.is_set():
            now = time.monotonic()
            due = [e.next_attempt for e in self._entries.values() if e.next_attempt > 0]
            timeout = max(0.0, min([next_misc, *due]) - now)
            for key, mask in self._sel.select(timeout):
                entry = key.data
                if entry is None:
                    self._drain_wakeup()
                    continue
                client = entry.client
                if mask & selectors.EVENT_READ and entry.fd is not None:
                    client.loop_read()
                    if client.is_connected():
                        entry.delay = entry.delay_min
                if mask & selectors.EVENT_WRITE and entry.fd is not None:
                    client.loop_write()
            self._run_calls()
            now = time.monotonic()
            if now >= next_misc:
                for entry in list(self._entries.values()):
                    if entry.fd is not None:
                        entry.client.loop_misc()
                next_misc = now + self._misc_interval
            for entry in list(self._entries.values()):
                if 0 < entry.next_attempt <= now and not entry.removed:
                    self._attempt(entry)
        self._run_calls()

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _run_calls(self) -> None:
        while True:
            try:
                action = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                action()
            except Exception:
                logger.exception("error in a call on the network loop")
