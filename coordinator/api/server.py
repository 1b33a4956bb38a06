"""Serving the API with uvicorn on a background thread, bound to a loopback address."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI


@dataclass
class ApiServer:
    """A running uvicorn server (see :func:`start_api_server`)."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        """The dashboard's URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def start_api_server(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0
) -> ApiServer:
    """Serve ``app`` with uvicorn on a daemon thread, bound to a loopback address.

    Parameters
    ----------
    app : FastAPI
        The application of :func:`create_app`.
    host : str
        A loopback address (``127.0.0.1`` or ``::1``); anything else is refused.
    port : int
        TCP port; 0 picks a free one (read it from the result).
    timeout : float
        Seconds to wait for the server to accept connections.

    Returns
    -------
    ApiServer
        With the bound port and ``url``; call ``stop()`` to shut it down.

    Raises
    ------
    ValueError
        If ``host`` is not a loopback address or ``port`` is outside 0..65535.
    OSError
        If the port cannot be bound (e.g. already in use).
    """
    import uvicorn

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the API listens on a loopback address only, not {host!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"API port must be in 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="siren-api", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise OSError(f"the API server did not start on {host}:{bound}")
    return ApiServer(server, thread, host, bound)
