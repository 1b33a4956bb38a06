"""Checks of a running deployment's broker, from the outside: what listens, and what it accepts.

``siren deploy check DIR`` finds the Mosquitto process started with the deployment's
``mosquitto.conf`` and proves, on the real broker rather than on the configuration text, that

* that process listens on the TLS port and on nothing else (no plain-text MQTT on 1883, on any
  address: the listening sockets are read from ``/proc/net/tcp*`` and matched to the process's
  file descriptors);
* a TLS handshake to the broker host verifies with the deployment's CA and host name;
* plain-text MQTT to the TLS port gets no CONNACK.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: TCP state code of a listening socket in /proc/net/tcp.
_LISTEN = "0A"


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _decode_address(hex_addr: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_addr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6 stores four little-endian 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_sockets(pids: Iterable[int], proc: Path = Path("/proc")) -> set[tuple[str, int]]:
    """``{(address, port)}`` of the TCP sockets the processes ``pids`` listen on (IPv4 and
    IPv6), read from ``/proc/net/tcp`` and ``/proc/net/tcp6``."""
    inodes: set[int] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    found: set[tuple[str, int]] = set()
    for name, v6 in (("tcp", False), ("tcp6", True)):
        with contextlib.suppress(OSError):
            lines = (proc / "net" / name).read_text().splitlines()[1:]
            for line in lines:
                cols = line.split()
                if len(cols) < 10 or cols[3] != _LISTEN or int(cols[9]) not in inodes:
                    continue
                addr, port = cols[1].split(":")
                found.add((_decode_address(addr, v6), int(port, 16)))
    return found


def _last_error(log: Path) -> str | None:
    """The last ``Error``/``Warning`` line of a Mosquitto log (why it stopped), if any."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return None
    for line in reversed(lines):
        if "Error" in line or "Warning" in line:
            return line.strip()
    return None


def processes_with_argument(argument: str) -> list[int]:
    """Pids of the processes started with ``argument`` as their configuration file: the
    argument after ``-c`` or ``--config`` (``mosquitto -c``, ``siren coordinator run
    --config``), or ``--config=...``. An absolute ``argument`` also matches a relative path
    naming the same file from the process's working folder. An editor or ``tail`` that merely
    has the file open is not such a process."""
    pids = []
    target = os.path.realpath(argument)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = [os.fsdecode(a) for a in (entry / "cmdline").read_bytes().split(b"\0")]
            configs = [b for a, b in itertools.pairwise(args) if a in ("-c", "--config")]
            configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
            if argument in configs:
                pids.append(int(entry.name))
                continue
            relative = [c for c in configs if c and not os.path.isabs(c)]
            if relative and os.path.isabs(argument):
                cwd = os.readlink(entry / "cwd")
                if any(os.path.realpath(os.path.join(cwd, c)) == target for c in relative):
                    pids.append(int(entry.name))
    return sorted(pids)


@dataclass(frozen=True)
class Finding:
    """One check's outcome."""

    ok: bool
    what: str


def tls_handshake(host: str, port: int, cafile: Path, timeout: float = 5.0) -> str | None:
    """None when a TLS handshake to ``host:port`` verifies against ``cafile`` and the host
    name, else why it failed (one line)."""
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        return f"certificate rejected: {exc.verify_message}"
    except (OSError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"


#: An MQTT v3.1.1 CONNECT of client id "probe" without credentials.
_PLAIN_CONNECT = bytes.fromhex("100f00044d5154540402003c000370726f6265")


def plaintext_refused(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether ``host:port`` answers a clear-text MQTT CONNECT with anything but a CONNACK."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_PLAIN_CONNECT)
            try:
                reply = sock.recv(4)
            except (TimeoutError, OSError):
                return True
            return not reply.startswith(b"\x20")
    except OSError:
        return True


def check_broker(
    conf: Path, host: str, port: int, cafile: Path, *, pids: list[int] | None = None
) -> list[Finding]:
    """Check the running broker of ``conf`` (see the module docstring)."""
    findings: list[Finding] = []
    pids = pids if pids is not None else processes_with_argument(str(conf))
    if not pids:
        what = f"no running process was started with {conf}"
        log = conf.parent / "mosquitto.log"
        last = _last_error(log)
        if last is not None:
            what += f"; the broker's log {log} ends with: {last}"
        return [Finding(False, what)]
    unreadable = [p for p in pids if not os.access(f"/proc/{p}/fd", os.R_OK)]
    if unreadable:
        findings.append(
            Finding(
                False,
                f"cannot read the sockets of mosquitto (pid {', '.join(map(str, unreadable))}): "
                "run this check as root (or as the account Mosquitto runs as)",
            )
        )
    sockets = listening_sockets([p for p in pids if p not in unreadable])
    others = sorted(s for s in sockets if s[1] != port)
    if not unreadable:
        findings.append(
            Finding(
                bool(sockets) and not others,
                f"listening sockets of mosquitto (pid {', '.join(map(str, pids))}): "
                + (", ".join(f"{a}:{p}" for a, p in sorted(sockets)) or "none")
                + (f" -- not the TLS port: {others}" if others else ""),
            )
        )
    problem = tls_handshake(host, port, cafile)
    findings.append(
        Finding(
            problem is None,
            f"TLS handshake with {host}:{port} verified against {cafile.name}"
            if problem is None
            else f"TLS handshake with {host}:{port}: {problem}",
        )
    )
    refused = plaintext_refused(host, port)
    findings.append(
        Finding(refused, f"plain-text MQTT to {host}:{port} {'refused' if refused else 'ACCEPTED'}")
    )
    return findings
