"""A private MQTT broker for simulations and tests: Mosquitto when installed, else amqtt.

:func:`start_broker` picks a free TCP port on 127.0.0.1, writes a Mosquitto configuration into a
working directory and spawns ``mosquitto -c <conf>``; the broker listens on loopback (or, for a
fleet whose boards run on other hosts, on the address given) and
accepts anonymous clients (it is private to this machine and this run). Where no ``mosquitto``
binary exists it starts the pure-Python amqtt broker in a background thread instead; amqtt
speaks MQTT 3.1.1 only, which :attr:`BrokerHandle.protocol` tells clients.

Deployments do not use this module: they run the system Mosquitto with the TLS, password and
ACL configuration written by ``siren coordinator broker-config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: MQTT protocol versions as numbers (paho's MQTTv5 = 5, MQTTv311 = 4 on the wire).
MQTT_V5 = 5
MQTT_V311 = 311

#: Default Mosquitto packet size limit of the private broker (64 MiB, the protocol's maximum).
DEFAULT_MAX_PACKET_BYTES = 64 * 1024 * 1024

_MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The broker could not be started (binary missing, port busy, crashed on start)."""


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary: on ``PATH`` or in the Debian location, else ``None``."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (asked from the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1", exclude: Iterable[int] = ()) -> list[int]:
    """``count`` distinct TCP ports on ``host`` that nothing listens on right now, none in
    ``exclude``. Every socket stays bound until all are chosen, so the kernel cannot hand the
    same port out twice (separate :func:`free_port` calls can return the same port)."""
    avoid = set(exclude)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in avoid:
                avoid.add(port)
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """Poll until a TCP connection to ``host:port`` succeeds; ``False`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


@dataclass(frozen=True)
class BrokerAuth:
    """Accounts and ACLs of a simulation's private Mosquitto, as in a deployment.

    Attributes
    ----------
    run : str
        The run whose topics the ACLs name.
    passwords : dict
        ``{user: password}``: the coordinator's account and one per board (user = client id).
    coordinator_user : str
        The account that alone may publish the global model.
    """

    run: str
    passwords: dict[str, str]
    coordinator_user: str = "coordinator"


def mqtt_password_for(private_key_seed: bytes) -> str:
    """A simulated board's (or coordinator's) MQTT password, derived from its Ed25519 key seed:
    whoever holds the key (the fleet worker hosting the board) knows it, nothing else has to
    be handed out. Deployments use independent random passwords instead."""
    import hashlib
    import hmac

    return hmac.new(private_key_seed, b"siren-edge mqtt password", hashlib.sha256).hexdigest()


def mosquitto_test_config(
    port: int,
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    persistence: bool = True,
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
    auth: BrokerAuth | None = None,
) -> str:
    """Text of a private Mosquitto 2 configuration listening on ``host`` (loopback by default).

    Without ``auth`` anyone on the machine may connect and publish anywhere. With it, as in a
    deployment (:mod:`coordinator.broker`): no anonymous access, one account per board with its
    own topics only, the coordinator alone publishes the global model; the ``passwd`` and
    ``acl`` files are written into ``workdir``. With ``persistence`` the broker saves retained
    messages, sessions and their queued QoS 1 messages to ``workdir`` when stopped, so a
    restarted broker still holds the retained global model and the coordinator's queued updates.
    """
    access = ["allow_anonymous true"]
    listener_options: list[str] = []
    if auth is not None:
        from coordinator.broker import acl_text, passwd_text

        boards = [u for u in auth.passwords if u != auth.coordinator_user]
        (workdir / "passwd").write_text(passwd_text(auth.passwords))
        (workdir / "passwd").chmod(0o600)
        (workdir / "acl").write_text(acl_text(auth.run, auth.coordinator_user, boards=boards))
        access = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {workdir / 'passwd'}",
            f"acl_file {workdir / 'acl'}",
        ]
        listener_options = ["use_username_as_clientid true"]
    lines = [
        f"# private broker of a siren-edge simulation: listens on {host}"
        + (", accounts and ACLs as in a deployment" if auth else ", anonymous"),
        # Started as root, Mosquitto would switch to the 'mosquitto' user, which may not be able
        # to write the working directory: a private broker runs as whoever started it.
        *(["user root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        *access,
        f"max_packet_size {max_packet_bytes}",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        "set_tcp_nodelay true",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        "autosave_interval 5",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages false",
        # Listener options stand below their listener line (one above it would open
        # Mosquitto's default listener on port 1883).
        f"listener {port} {host}",
        *listener_options,
    ]
    return "\n".join(lines) + "\n"


@dataclass
class BrokerHandle:
    """A running private broker.

    Attributes
    ----------
    host, port : str, int
        Where clients connect.
    kind : str
        ``"mosquitto"`` or ``"amqtt"``.
    protocol : int
        MQTT version clients must use: 5, or 311 for amqtt.
    workdir : Path
        Configuration, log and persistence files.
    """

    host: str
    port: int
    kind: str
    protocol: int
    workdir: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _config_path: Path | None = field(default=None, repr=False)
    _binary: str | None = field(default=None, repr=False)
    _open_files: int | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of a Mosquitto broker."""
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        """Whether the broker process (or thread) is alive."""
        if self._process is not None:
            return self._process.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM lets Mosquitto save its persistence file; ``kill`` does not)."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    self._process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout)
            return
        if self._thread is not None and self._stop is not None:
            loop, event = self._stop
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
            self._thread.join(timeout)

    def restart(self, *, down_seconds: float = 0.0) -> None:
        """Stop, optionally stay down for ``down_seconds``, and start again on the same port."""
        if self.kind != "mosquitto" or self._binary is None or self._config_path is None:
            raise BrokerError("only a spawned Mosquitto broker can be restarted")
        self.stop()
        if down_seconds > 0:
            time.sleep(down_seconds)
        self._process = _spawn_mosquitto(
            self._binary, self._config_path, self.workdir, self._open_files
        )
        _await_mosquitto(self._process, self.host, self.port, self.workdir)

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn_mosquitto(
    binary: str, config: Path, workdir: Path, open_files: int | None = None
) -> subprocess.Popen[bytes]:
    stderr = open(workdir / "mosquitto.stderr", "ab")  # noqa: SIM115 - owned by the process
    limit = None
    if open_files is not None:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        soft = open_files if hard == resource.RLIM_INFINITY else min(open_files, hard)

        def limit() -> None:  # in the child, before exec: the broker's own limit only
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    try:
        return subprocess.Popen(
            [binary, "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=limit,
        )
    finally:
        stderr.close()


def _await_mosquitto(
    process: subprocess.Popen[bytes], host: str, port: int, workdir: Path, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = ""
            for name in ("mosquitto.stderr", "mosquitto.log"):
                path = workdir / name
                if path.exists():
                    log += path.read_text(errors="replace")[-2000:]
            raise BrokerError(
                f"mosquitto exited with status {process.returncode} on start; log:\n{log}"
            )
        if wait_for_port(host, port, timeout=0.2):
            return
    process.kill()
    raise BrokerError(f"mosquitto did not listen on {host}:{port} within {timeout:.0f} s")


def start_mosquitto(
    workdir: str | os.PathLike[str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    persistence: bool = True,
    binary: str | None = None,
    auth: BrokerAuth | None = None,
    open_files: int | None = None,
) -> BrokerHandle:
    """Spawn a private Mosquitto on ``host`` (loopback by default) and wait until it accepts
    connections.

    Parameters
    ----------
    workdir : path
        Directory for ``mosquitto.conf``, the log and the persistence file (created).
    port : int, optional
        TCP port; a free one by default.
    persistence : bool
        Keep retained messages and sessions across :meth:`BrokerHandle.restart`.
    binary : str, optional
        The ``mosquitto`` executable; found on ``PATH`` by default.
    auth : BrokerAuth, optional
        Accounts and ACLs (see :func:`mosquitto_test_config`); anonymous without.
    open_files : int, optional
        The broker process's open-files soft limit (``ulimit -n``); this process's own limit
        otherwise.

    Raises
    ------
    BrokerError
        If the binary is missing or the broker does not come up within 10 s.
    """
    exe = binary or find_mosquitto()
    if exe is None:
        raise BrokerError("no mosquitto binary found (install the Debian package 'mosquitto')")
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    chosen = port if port is not None else free_port(host)
    config = root / "mosquitto.conf"
    config.write_text(
        mosquitto_test_config(chosen, root, host=host, persistence=persistence, auth=auth)
    )
    process = _spawn_mosquitto(exe, config, root, open_files)
    _await_mosquitto(process, host, chosen, root)
    return BrokerHandle(
        host,
        chosen,
        "mosquitto",
        MQTT_V5,
        root,
        process,
        _config_path=config,
        _binary=exe,
        _open_files=open_files,
    )


def start_amqtt(
    workdir: str | os.PathLike[str], *, port: int | None = None, host: str = "127.0.0.1"
) -> BrokerHandle:
    """Start the embedded amqtt broker (MQTT 3.1.1) in a daemon thread on ``host:port``.

    Raises
    ------
    BrokerError
        If amqtt is not installed or does not start within 10 s.
    """
    try:
        from amqtt.broker import Broker
    except ImportError as exc:  # pragma: no cover - amqtt is a dependency
        raise BrokerError(f"amqtt is not installed: {exc}") from exc
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    chosen = port if port is not None else free_port(host)
    for noisy in ("amqtt", "transitions"):  # per-packet and state-machine chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{chosen}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            stop = asyncio.Event()
            holder["stop"] = (loop, stop)
            broker = Broker(config)
            try:
                await broker.start()
            except Exception as exc:
                holder["error"] = exc
                ready.set()
                return
            ready.set()
            await stop.wait()
            await broker.shutdown()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
    thread.start()
    # Broker.start() returns once its listeners are bound (no probe connection needed).
    if not ready.wait(10.0) or "error" in holder:
        raise BrokerError(f"amqtt broker did not start: {holder.get('error', 'timeout')}")
    return BrokerHandle(
        host, chosen, "amqtt", MQTT_V311, root, _thread=thread, _stop=holder.get("stop")
    )


def start_broker(
    workdir: str | os.PathLike[str],
    *,
    prefer: str = "auto",
    port: int | None = None,
    auth: BrokerAuth | None = None,
    host: str = "127.0.0.1",
) -> BrokerHandle:
    """Start a private broker: ``prefer`` is ``"auto"`` (Mosquitto if installed, else amqtt),
    ``"mosquitto"`` or ``"amqtt"``. ``auth`` applies to Mosquitto; the embedded amqtt broker
    stays anonymous (it is the fallback for machines without Mosquitto). It listens on
    ``host``: loopback by default; another address of this machine when boards on other hosts
    must reach it (a simulated fleet on a Ray cluster).

    Raises
    ------
    BrokerError
        If the requested broker cannot start, or ``prefer`` is unknown.
    """
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise BrokerError(f"broker must be auto, mosquitto or amqtt, got {prefer!r}")
    if uses_mosquitto(prefer):
        return start_mosquitto(workdir, port=port, auth=auth, host=host)
    return start_amqtt(workdir, port=port, host=host)


def uses_mosquitto(prefer: str) -> bool:
    """Whether :func:`start_broker` with ``prefer`` starts Mosquitto (else amqtt)."""
    return prefer == "mosquitto" or (prefer == "auto" and find_mosquitto() is not None)
