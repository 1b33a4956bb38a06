"""How a program reaches the MQTT broker: the ``[broker]`` table of board and coordinator files.

Example (every key shown; relative paths are relative to the file's directory)::

    [broker]
    host = "coordinator.local"
    port = 8883
    protocol = 5                   # 5, or 311 for MQTT 3.1.1 brokers
    username = "board-007"
    password_file = "mqtt.password"
    tls = true
    ca_file = "ca.crt"
    cert_file = ""                 # optional client certificate and key
    key_file = ""
    keepalive = 30
    reconnect_min = 1
    reconnect_max = 30

The password is never written into the table: ``password_file`` names a separate file whose
stripped content is the password.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from protocol.errors import SettingsError
from protocol.settings import resolve_path, section_values

__all__ = [
    "BROKER_COMMENTS",
    "BrokerSettings",
    "broker_problem",
    "broker_to_toml",
    "read_password_file",
    "wait_for_broker",
]

#: What each key of a ``[broker]`` table means (written above it in generated files).
BROKER_COMMENTS: dict[str, str] = {
    "": "How to reach the MQTT broker.",
    "host": "broker host name or address (must match its TLS certificate)",
    "port": "8883 is MQTT over TLS",
    "protocol": "5 (MQTT v5), or 311 for MQTT 3.1.1 brokers",
    "username": "MQTT user (a board's user is its client id)",
    "password_file": "file holding the MQTT password (mode 0600); never the password itself",
    "tls": "connect with TLS, verifying the broker's certificate against ca_file",
    "ca_file": 'CA certificate the broker\'s certificate must chain to ("" = system store)',
    "cert_file": 'client certificate (mutual TLS deployments; "" = none)',
    "key_file": "client certificate's private key (mode 0600)",
    "keepalive": "MQTT keep-alive, seconds",
    "reconnect_min": "reconnect back-off: first wait, seconds (doubles up to reconnect_max)",
    "reconnect_max": "reconnect back-off: longest wait, seconds",
    "session_expiry": "seconds the broker keeps the coordinator's queued updates while it is away",
}


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the MQTT broker.

    A program subclasses it to raise its own configuration error (``error``) and to add its own
    fields (the coordinator's session expiry).

    Attributes
    ----------
    host, port : str, int
        Broker address.
    protocol : int
        5 (MQTT v5, default) or 311 (MQTT 3.1.1, e.g. the embedded amqtt broker).
    username, password : str or None
        Credentials (a board's client id and its generated password in deployments).
    tls : bool
        Connect with TLS, verifying the broker against ``ca_file`` (or the system store).
    ca_file, cert_file, key_file : Path or None
        CA bundle; optional client certificate and key.
    keepalive : int
        MQTT keep-alive in seconds.
    reconnect_min, reconnect_max : int
        Exponential reconnect back-off bounds in seconds.
    """

    #: Raised by validation; subclasses set their program's ``ConfigError``.
    error: ClassVar[type[Exception]] = SettingsError

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: int = 5
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 30
    reconnect_min: int = 1
    reconnect_max: int = 30

    def __post_init__(self) -> None:
        if self.protocol not in (5, 311):
            raise self.error(f"broker.protocol must be 5 or 311, got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise self.error(f"broker.port must be in 1..65535, got {self.port}")
        if self.reconnect_min < 1 or self.reconnect_max < self.reconnect_min:
            raise self.error(
                "broker.reconnect_min must be >= 1 and <= reconnect_max, got "
                f"{self.reconnect_min}..{self.reconnect_max}"
            )


def read_password_file(
    table: Mapping[str, Any], base_dir: Path | None, error: type[Exception]
) -> dict[str, Any]:
    """A copy of the ``[broker]`` table with ``password_file`` replaced by ``password``.

    The file (resolved against ``base_dir``) is read and its stripped content becomes
    ``password``; a table without ``password_file`` (or with an empty one) is copied unchanged
    but for dropping that key. Build the settings from the result with
    :func:`protocol.settings.build_section`.

    Raises
    ------
    error
        If the password file cannot be read.
    """
    values = dict(table)
    password_file = values.pop("password_file", None)
    if password_file:
        pw_path = resolve_path(password_file, base_dir)
        try:
            values["password"] = pw_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise error(f"cannot read broker password file {pw_path}: {exc}") from None
    return values


def broker_to_toml(
    settings: BrokerSettings, relative_to: Path | None, password_file: str | None = None
) -> dict[str, Any]:
    """The ``[broker]`` table of ``settings``, without the password.

    Paths are written relative to ``relative_to`` when below it; ``password_file``, when given,
    is written as the reference to the file holding the password (written by the caller with
    permissions 0600).
    """
    table = section_values(settings, relative_to, skip={"password"})
    if password_file:
        table["password_file"] = password_file
    return table


def set_tcp_nodelay(sock: Any) -> None:
    """Turn off Nagle's algorithm on an MQTT connection's socket (paho leaves it on).

    With it on, a model published right after a small packet (an acknowledgement) waits for
    that packet's TCP acknowledgement, which the peer may delay by up to 40 ms: measured on a
    50-board fleet, the global model reached the boards 25-35 ms after ``publish()``, and 1-7 ms
    with this option. Sockets that are not TCP are left alone.
    """
    with contextlib.suppress(OSError, AttributeError, ValueError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_mqtt_client(
    settings: BrokerSettings,
    client_id: str,
    *,
    manual_ack: bool = False,
    persistent_session: bool = False,
) -> Any:
    """A configured paho client, not yet connected: VERSION2 callbacks, MQTT v5 unless
    ``settings.protocol`` is 311, credentials, TLS, the reconnect back-off and no cap on queued
    messages.

    ``persistent_session`` asks MQTT 3.1.1 for a kept session (``clean_session=False``); with v5
    the session is chosen when connecting (``clean_start`` and the session expiry).
    """
    import paho.mqtt.client as mqtt

    v5 = settings.protocol == 5
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent_session,
        manual_ack=manual_ack,
    )
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
        )
    client.reconnect_delay_set(settings.reconnect_min, settings.reconnect_max)
    client.max_queued_messages_set(0)
    client.on_socket_open = lambda _client, _userdata, sock: set_tcp_nodelay(sock)
    return client


def broker_problem(settings: BrokerSettings, timeout: float = 5.0) -> str | None:
    """Why the broker of ``settings`` cannot be reached, in one line, or None when it can.

    Resolves the host, opens a TCP connection and, with ``tls``, completes a TLS handshake with
    the configured CA, client certificate and host name check -- exactly what the MQTT client
    will do, but synchronously, so that a wrong host, a closed port, an unknown CA or a host
    name that is not in the broker's certificate is reported within ``timeout`` seconds instead
    of as silence. It sends no MQTT packet (a CONNECT would take over the session of the client
    id it used); refused credentials show in the client's CONNACK, which the programs log.
    """
    import ssl

    where = f"{settings.host}:{settings.port}"
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve broker host {settings.host!r}: {exc.strerror or exc}"
    except UnicodeError as exc:
        return f"invalid broker host {settings.host!r}: {exc}"
    last = ""
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except TimeoutError:
            last = f"no answer from {where} within {timeout:g} s"
            sock.close()
            continue
        except OSError as exc:
            last = f"cannot connect to {where}: {exc.strerror or exc}"
            sock.close()
            continue
        if not settings.tls:
            sock.close()
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None
            )
            if settings.cert_file:
                context.load_cert_chain(
                    str(settings.cert_file), str(settings.key_file) if settings.key_file else None
                )
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            return f"TLS settings for {where} are unusable: {exc}"
        try:
            with context.wrap_socket(sock, server_hostname=settings.host) as tls:
                # TLS 1.3 servers refuse a client certificate after the handshake: read briefly.
                tls.settimeout(0.3)
                with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
                    tls.recv(1)
            return None
        except ssl.SSLCertVerificationError as exc:
            ca = f" (CA file {settings.ca_file})" if settings.ca_file else " (system CA store)"
            return f"TLS handshake with {where} failed: {exc.verify_message}{ca}"
        except ssl.SSLError as exc:
            return f"TLS handshake with {where} failed: {exc.reason or exc}"
        except TimeoutError:
            return f"TLS handshake with {where} timed out after {timeout:g} s (is it a TLS port?)"
        except OSError as exc:
            return f"TLS handshake with {where} failed: {exc.strerror or exc}"
        finally:
            sock.close()
    return last or f"no address for broker host {settings.host!r}"


def wait_for_broker(
    settings: BrokerSettings,
    stop: Any,
    report: Any,
    *,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
    timeout: float = 5.0,
    attempts: int | None = None,
) -> bool:
    """Probe the broker (:func:`broker_problem`) until it answers, ``stop`` (an Event) is set or
    ``attempts`` probes (when given) failed.

    Every failed attempt is reported once through ``report(message)`` with the wait before the
    next one; waits double from ``first_delay`` up to ``max_delay``. Returns whether the broker
    answered (False: stopped or out of attempts first).
    """
    delay = first_delay
    tried = 0
    while not stop.is_set():
        problem = broker_problem(settings, timeout=timeout)
        if problem is None:
            return True
        tried += 1
        if attempts is not None and tried >= attempts:
            report(problem)
            return False
        report(f"{problem}; retrying in {delay:g} s")
        if stop.wait(delay):
            break
        delay = min(2 * delay, max_delay)
    return False
