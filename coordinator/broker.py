"""Deployment configuration of the Mosquitto broker: TLS, per-board credentials, topic ACLs.

``siren coordinator broker-config`` (and ``siren deploy``) write into one directory:

* ``mosquitto.conf`` -- a single TLS listener and nothing else (no plain-text port: every
  listener option stands below its ``listener`` line, because one in the global section makes
  Mosquitto open its default listener on 1883), anonymous access off,
  ``use_username_as_clientid`` on that listener (a board cannot take over another board's MQTT
  session), persistence (retained global model and the coordinator's queued updates survive a
  restart). With ``auth = "mtls"`` the listener requires a client certificate signed by the
  deployment's CA and takes the certificate's common name as the user name;
* ``passwd`` -- one line per MQTT user in Mosquitto 2's ``$7$`` format: PBKDF2-HMAC-SHA512 with
  101 iterations and a 12-byte random salt, base64-encoded (what ``mosquitto_passwd`` writes);
* ``acl`` -- the coordinator may read every topic of the run and is the only user that may
  publish the global model; each board (user name = client id) has its own block: it may read
  the global model and write only ``update/<own id>`` and ``status/<own id>``. A user without a
  block may do nothing, so removing a board's block and reloading revokes it at once;
* ``coordinator.password`` -- the coordinator's generated MQTT password (mode 0600).

Files Mosquitto reads (``passwd``, ``acl``, the TLS key) are written 0600/0644 and owned by the
account Mosquitto runs as (``run_as``; Mosquitto started as root switches to it, ``mosquitto`` on
Debian, before it reads them -- also when it reloads them on SIGHUP). Rewriting a file keeps its
owner, so reloading after a change never locks Mosquitto out of its own files.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import CoordinatorError
from protocol.errors import TopicError
from protocol.topics import TOPIC_PREFIX, validate_id

#: PBKDF2 iterations of Mosquitto 2's ``$7$`` hashes (mosquitto_passwd's default).
PBKDF2_ITERATIONS = 101
#: Salt length of Mosquitto 2's ``$7$`` hashes.
SALT_BYTES = 12
#: Default MQTT user of the coordinator.
COORDINATOR_USER = "coordinator"


class BrokerConfigError(CoordinatorError):
    """The broker configuration cannot be written (bad names, missing files or tools)."""


def _check_id(value: str, what: str) -> None:
    """Refuse a run id or MQTT user name that is not a protocol identifier, saying which one
    and what is allowed."""
    try:
        validate_id(value, what)
    except TopicError as exc:
        raise BrokerConfigError(str(exc)) from None


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Mosquitto 2 password hash: ``$7$101$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``.

    Parameters
    ----------
    password : str
        The clear-text password (UTF-8).
    salt : bytes, optional
        :data:`SALT_BYTES` bytes; random by default.
    """
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS, 64)
    return (
        f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode('ascii')}"
        f"${base64.b64encode(digest).decode('ascii')}"
    )


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash line written by :func:`hash_password`."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), parts[4]
    mine = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return secrets.compare_digest(base64.b64encode(mine).decode("ascii"), digest)


def new_password() -> str:
    """A random 32-character URL-safe password (192 bits)."""
    return secrets.token_urlsafe(24)


def passwd_text(credentials: Mapping[str, str]) -> str:
    """The password file for ``{user: clear-text password}``, users sorted."""
    for user in credentials:
        _check_id(user, "MQTT user name")
    return "".join(f"{user}:{hash_password(credentials[user])}\n" for user in sorted(credentials))


def acl_text(
    run: str, coordinator_user: str = COORDINATOR_USER, boards: Iterable[str] | None = None
) -> str:
    """ACL file: the coordinator reads the run's topics and alone writes the global model.

    With ``boards``, each board gets its own block (read the global model, write its own update
    and status topics) and every other user may do nothing; without, one ``pattern`` block gives
    every user those rights for its own name (``%u``).
    """
    _check_id(run, "run id")
    _check_id(coordinator_user, "coordinator user")
    base = f"{TOPIC_PREFIX}/{run}"
    lines = ["# siren-edge topic ACLs (Mosquitto acl_file)", ""]
    if boards is None:
        lines += [
            "# every user, boards included (user name = client id)",
            f"pattern read {base}/global",
            f"pattern write {base}/update/%u",
            f"pattern readwrite {base}/status/%u",
            "",
        ]
    lines += [
        "# the coordinator: reads every board's topics, alone writes the global model",
        f"user {coordinator_user}",
        f"topic read {base}/update/+",
        f"topic read {base}/status/+",
        f"topic readwrite {base}/global",
        "",
    ]
    for board in sorted(boards or ()):
        _check_id(board, "board user")
        if board == coordinator_user:
            raise BrokerConfigError(
                f"board user {board!r} is the coordinator's user name; give the board another"
            )
        lines += [
            f"user {board}",
            f"topic read {base}/global",
            f"topic write {base}/update/{board}",
            f"topic readwrite {base}/status/{board}",
            "",
        ]
    return "\n".join(lines)


@dataclass(frozen=True)
class TlsFiles:
    """The listener's CA certificate, server certificate and server key."""

    cafile: Path
    certfile: Path
    keyfile: Path


#: Broker authentication modes: per-board passwords over TLS, or mutual TLS (client certificates).
AUTH_MODES = ("password", "mtls")


def broker_conf_text(
    *,
    directory: Path,
    tls: TlsFiles,
    port: int = 8883,
    bind: str = "0.0.0.0",
    max_packet_bytes: int = 64 * 1024 * 1024,
    run_as: str | None = None,
    auth: str = "password",
) -> str:
    """``mosquitto.conf`` of a deployment (see the module docstring).

    ``run_as`` writes Mosquitto's ``user`` option: the account it switches to when started as
    root (Mosquitto's default is ``mosquitto``). That account must be able to read ``passwd``,
    ``acl`` and the TLS key and to write the directory (persistence and log). ``auth`` is
    ``password`` (TLS, user name and password) or ``mtls`` (TLS with a client certificate
    signed by ``tls.cafile``; its common name is the user name).
    """
    if auth not in AUTH_MODES:
        raise BrokerConfigError(f"auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
    d = directory.resolve()
    general = [
        "# siren-edge broker: TLS only, per-board credentials, topic ACLs",
        *([f"user {run_as}"] if run_as else []),
        "per_listener_settings false",
        "allow_anonymous false",
        *([f"password_file {d / 'passwd'}"] if auth == "password" else []),
        f"acl_file {d / 'acl'}",
        f"max_packet_size {max_packet_bytes}",
        "max_queued_messages 100000",
        "persistence true",
        f"persistence_location {d}/",
        "autosave_interval 60",
        f"log_dest file {d / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "",
    ]
    listener = [
        # Listener options go below their listener line only: one before any listener
        # (use_username_as_clientid, say) makes Mosquitto open its default plain-text
        # listener on port 1883, and the option then applies to that listener alone.
        f"listener {port} {bind}",
        "use_username_as_clientid true",
        f"cafile {tls.cafile.resolve()}",
        f"certfile {tls.certfile.resolve()}",
        f"keyfile {tls.keyfile.resolve()}",
        "tls_version tlsv1.2",
    ]
    if auth == "mtls":
        listener += ["require_certificate true", "use_identity_as_username true"]
    else:
        listener += ["require_certificate false"]
    return "\n".join([*general, *listener, ""])


def account_ids(name: str | None) -> tuple[int, int] | None:
    """``(uid, gid)`` of a local account, or None when ``name`` is None or unknown."""
    if name is None:
        return None
    try:
        import pwd

        entry = pwd.getpwnam(name)
    except (ImportError, KeyError):
        return None
    return entry.pw_uid, entry.pw_gid


def unreachable_for(path: Path, owner: tuple[int, int]) -> Path | None:
    """The first ancestor of ``path`` that account ``owner`` (uid, gid) may not traverse, or
    None. A broker folder under ``/root`` (mode 0700) is unreachable for ``mosquitto``."""
    uid, gid = owner
    for parent in [*reversed(path.resolve().parents), path.resolve()]:
        st = parent.stat()
        if uid == 0:
            continue
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return parent
    return None


def hand_over(directory: Path, owner: tuple[int, int]) -> None:
    """Give ``directory`` and everything in it to ``owner`` (uid, gid): Mosquitto, switched
    to its account, must read the key and password file and write its log and database."""
    os.chown(directory, *owner)
    for child in directory.rglob("*"):
        os.chown(child, *owner, follow_symlinks=False)


def write_private(
    path: Path, text: str | bytes, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Write ``path`` atomically with ``mode``; owned by ``owner`` (uid, gid) when given, else
    by the owner of the file it replaces (rewriting a file never changes who may read it).

    Changing the owner needs root; without it the new file keeps the writer's account.
    """
    if owner is None and path.exists():
        st = path.stat()
        owner = (st.st_uid, st.st_gid)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        data = text.encode("utf-8") if isinstance(text, str) else text
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bundle_credentials(bundles: Path) -> dict[str, str]:
    """``{client id: password}`` of every provisioned bundle below ``bundles``.

    A bundle is a directory with ``keys/client_id`` and ``mqtt.password`` (as written by
    ``siren client provision``).
    """
    out: dict[str, str] = {}
    for password_file in sorted(bundles.glob("*/mqtt.password")):
        id_file = password_file.parent / "keys" / "client_id"
        if not id_file.exists():
            raise BrokerConfigError(f"{password_file.parent} has no keys/client_id")
        client = id_file.read_text(encoding="utf-8").strip()
        out[client] = password_file.read_text(encoding="utf-8").strip()
    return out


def _openssl() -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerConfigError("openssl is needed to generate certificates (apt install openssl)")
    return openssl


def _run_openssl(*args: str) -> None:
    result = subprocess.run([_openssl(), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BrokerConfigError(f"openssl {args[0]} failed: {result.stderr.strip()[-500:]}")


def _is_ipv4(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)


def generate_ca(
    directory: Path, days: int = 3650, name: str = "siren-edge CA"
) -> tuple[Path, Path]:
    """A private certificate authority: ``ca.key`` (0600) and ``ca.crt`` in ``directory``.

    Raises
    ------
    BrokerConfigError
        If ``openssl`` is missing or fails.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key, crt = directory / "ca.key", directory / "ca.crt"
    _run_openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    os.chmod(key, 0o600)
    _run_openssl("req", "-x509", "-new", "-key", str(key), "-sha256", "-days", str(days),
                 "-subj", f"/CN={name}", "-out", str(crt))  # fmt: skip
    return key, crt


def issue_certificate(
    ca_key: Path,
    ca_crt: Path,
    key_out: Path,
    crt_out: Path,
    *,
    common_name: str,
    hostnames: Iterable[str] = (),
    client: bool = False,
    days: int = 825,
) -> None:
    """Issue a certificate signed by the CA: a server certificate for ``hostnames`` (IPv4
    addresses become IP subject alternative names) or, with ``client``, a client certificate
    whose common name is the MQTT user. The key is written 0600.

    Raises
    ------
    BrokerConfigError
        If ``openssl`` is missing or fails.
    """
    key_out.parent.mkdir(parents=True, exist_ok=True)
    csr = key_out.with_suffix(".csr")
    ext = key_out.with_suffix(".ext")
    names = list(hostnames)
    lines = ["basicConstraints=CA:FALSE"]
    if client:
        lines.append("extendedKeyUsage=clientAuth")
    else:
        sans = ",".join(f"IP:{n}" if _is_ipv4(n) else f"DNS:{n}" for n in names or [common_name])
        lines += [f"subjectAltName={sans}", "extendedKeyUsage=serverAuth"]
    ext.write_text("\n".join(lines) + "\n")
    try:
        _run_openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key_out))
        os.chmod(key_out, 0o600)
        _run_openssl("req", "-new", "-key", str(key_out), "-subj", f"/CN={common_name}",
                     "-out", str(csr))  # fmt: skip
        serial = ca_crt.with_suffix(".srl")
        _run_openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
                     "-CAserial", str(serial), "-CAcreateserial", "-days", str(days),
                     "-sha256", "-extfile", str(ext), "-out", str(crt_out))  # fmt: skip
    finally:
        csr.unlink(missing_ok=True)
        ext.unlink(missing_ok=True)


def generate_self_signed(directory: Path, hostnames: Iterable[str], days: int = 825) -> TlsFiles:
    """Create a private CA and a server certificate for ``hostnames`` with the ``openssl`` CLI.

    Writes ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` (keys mode 0600). Boards pin
    ``ca.crt``.

    Raises
    ------
    BrokerConfigError
        If ``openssl`` is missing or fails.
    """
    names = list(hostnames) or ["localhost"]
    ca_key, ca_crt = generate_ca(directory, days=max(days, 825), name="siren-edge broker CA")
    key, crt = directory / "server.key", directory / "server.crt"
    issue_certificate(ca_key, ca_crt, key, crt, common_name=names[0], hostnames=names, days=days)
    return TlsFiles(ca_crt, crt, key)


@dataclass(frozen=True)
class BrokerFiles:
    """Paths written by :func:`write_broker_config`."""

    conf: Path
    passwd: Path
    acl: Path
    coordinator_password: Path
    users: tuple[str, ...]


def read_passwd(path: Path) -> dict[str, str]:
    """``{user: hash}`` of an existing password file (empty when there is none)."""
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        user, sep, hashed = line.partition(":")
        if sep and user and not line.startswith("#"):
            out[user] = hashed
    return out


def write_broker_config(
    directory: Path,
    *,
    run: str,
    tls: TlsFiles,
    port: int = 8883,
    bind: str = "0.0.0.0",
    boards: Mapping[str, str] | None = None,
    all_boards: Iterable[str] | None = None,
    coordinator_user: str = COORDINATOR_USER,
    coordinator_password: str | None = None,
    coordinator_password_file: Path | None = None,
    run_as: str | None = None,
    auth: str = "password",
    owner: tuple[int, int] | None = None,
) -> BrokerFiles:
    """Write ``mosquitto.conf``, ``passwd``, ``acl`` and the coordinator's password file.

    Parameters
    ----------
    directory : Path
        Output directory (created).
    run : str
        Run id the ACLs are written for.
    tls : TlsFiles
        Listener certificates.
    port, bind : int, str
        TLS listener address.
    boards : mapping, optional
        ``{client id: password}`` of boards whose password is new or changed (see
        :func:`read_bundle_credentials`).
    all_boards : iterable of str, optional
        Every board of the deployment (default: the keys of ``boards``). A board without a
        new password keeps its line of the existing ``passwd``; a user of the old file that is
        not listed loses its line and its ACL block (revoked). With ``auth="mtls"`` passwords
        are not used, only the ids.
    coordinator_user, coordinator_password : str
        The coordinator's MQTT account; the password is kept if its file exists, else
        generated.
    coordinator_password_file : Path, optional
        Where the coordinator's password is written (0600; default
        ``directory/coordinator.password``).
    run_as : str, optional
        Mosquitto's ``user`` option (see :func:`broker_conf_text`).
    auth : str
        ``password`` or ``mtls`` (see :func:`broker_conf_text`).
    owner : (uid, gid), optional
        Owner of the files Mosquitto reads (when running as root). Default: the owner of the
        file being replaced, else the account of ``run_as``, else the writer's.

    Raises
    ------
    BrokerConfigError
        On invalid names, a board named like the coordinator, a board without any password,
        or missing TLS files.
    """
    for path in (tls.cafile, tls.certfile, tls.keyfile):
        if not path.exists():
            raise BrokerConfigError(f"TLS file {path} does not exist")
    directory.mkdir(parents=True, exist_ok=True)
    new = dict(boards or {})
    every = list(dict.fromkeys([*(all_boards if all_boards is not None else new)]))
    if coordinator_user in every or coordinator_user in new:
        raise BrokerConfigError(f"a board may not be called {coordinator_user!r}")
    unknown = sorted(set(new) - set(every))
    if unknown:
        raise BrokerConfigError(f"passwords given for boards {unknown} that are not listed")
    owner = owner or account_ids(run_as)
    pw_path = coordinator_password_file or directory / "coordinator.password"
    if coordinator_password is None:
        if pw_path.exists():
            coordinator_password = pw_path.read_text(encoding="utf-8").strip()
        else:
            coordinator_password = new_password()
    write_private(pw_path, coordinator_password + "\n", 0o600)
    passwd = directory / "passwd"
    old = read_passwd(passwd)
    kept = old.get(coordinator_user, "")
    same = bool(kept) and verify_password(coordinator_password, kept)
    lines = {coordinator_user: kept if same else hash_password(coordinator_password)}
    for board in every:
        _check_id(board, "MQTT user name")
        if board in new:
            lines[board] = hash_password(new[board])
        elif board in old:
            lines[board] = old[board]
        elif auth == "password":
            raise BrokerConfigError(f"no password for board {board!r} (its bundle's is needed)")
    text = "".join(f"{user}:{lines[user]}\n" for user in sorted(lines))
    write_private(passwd, text, 0o600, owner)
    acl = directory / "acl"
    write_private(acl, acl_text(run, coordinator_user, boards=every), 0o644, owner)
    conf = directory / "mosquitto.conf"
    text = broker_conf_text(
        directory=directory, tls=tls, port=port, bind=bind, run_as=run_as, auth=auth
    )
    write_private(conf, text, 0o644, owner)
    return BrokerFiles(conf, passwd, acl, pw_path, tuple(sorted(lines)))
