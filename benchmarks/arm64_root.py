"""An arm64 Debian bookworm userland for running board code on an x86 host (QEMU user emulation).

Boards run aarch64 Linux (Raspberry Pi OS 64-bit is Debian bookworm underneath). This module
builds such a root filesystem with ``debootstrap`` and runs commands in it through ``chroot``; the
kernel hands every aarch64 binary to ``qemu-aarch64-static`` via ``binfmt_misc``. Everything comes
from Debian's packages and PyPI. Timings measured inside the root are **emulated** — several times
slower than a board and never to be quoted as board figures.

Steps and guarantees:

* :func:`ensure_binfmt` mounts ``binfmt_misc`` when needed and enables the ``qemu-aarch64`` entry;
  missing host tools are reported with the Debian packages that provide them.
* :func:`build_root` runs ``debootstrap --arch=arm64 --variant=minbase`` against the Debian mirror
  apt uses on the host, into a temporary sibling of the cache path, and renames it into place only
  after a marker file describing the finished root was written. A root without the marker (an
  interrupted build) is never reused.
* :func:`sync_host_config` copies the host's ``/etc/resolv.conf``, its CA bundle (including locally
  added CAs) and its pip configuration (config files, the files they name, ``PIP_*`` variables)
  into the root so pip inside reaches the same indexes as pip on the host. Local directories
  named by pip settings (``find-links``, ``file://`` indexes) are bound read-only while commands
  run.
* :func:`session` mounts ``/proc``, ``/sys`` and ``/dev`` and always unmounts them (the last of
  overlapping sessions does), with an aarch64 ``/proc/cpuinfo`` (see :func:`aarch64_cpuinfo`);
  :func:`run_in_root` runs a command via ``chroot`` (optionally as another user, with a clean
  environment), streaming or capturing its output; :func:`start_in_root` starts one in the
  background (a board service that a check stops or kills).
* :func:`install_project` copies a source tree into the root and pip-installs it into a venv;
  :func:`verify_ml_stack` checks that TensorFlow trains and LiteRT infers inside the root.

Command line (as root)::

    python -m benchmarks.arm64_root build            # build or reuse the cached root
    python -m benchmarks.arm64_root shell            # interactive shell inside it
    python -m benchmarks.arm64_root run -- uname -m  # one command inside it
    python -m benchmarks.arm64_root install .        # copy + pip install a project into a venv
    python -m benchmarks.arm64_root verify           # venv + TF/LiteRT check, writes results
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

RESULTS = Path(__file__).resolve().parent / "results"

#: Environment variable naming the cached root (overrides :data:`DEFAULT_ROOT`).
ROOT_ENV = "SIREN_ARM64_ROOT"
#: Where the root is cached when neither an explicit path nor :data:`ROOT_ENV` is given.
DEFAULT_ROOT = Path("~/.cache/siren-edge/arm64-bookworm")
#: Marker written inside a finished root, relative to the root.
MARKER = Path("etc/siren-edge-root.json")
#: Version of the marker's content; a root with another format is rebuilt.
MARKER_FORMAT = 1
#: Venv inside the root used by ``install`` and ``verify``.
DEFAULT_VENV = "/opt/siren/venv"
#: Where ``install`` copies a project's source tree inside the root.
DEFAULT_SRC = "/opt/siren/src"
#: Directory and file names never copied into the root with a project.
PROJECT_EXCLUDES = (
    ".venv",
    ".git",
    "runs",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
    "*.egg-info",
)
#: Packages the verification installs (the board's heavy dependencies).
VERIFY_PACKAGES = ("tensorflow>=2.16", "ai-edge-litert>=1.2", "pynacl", "paho-mqtt", "numpy")
#: PATH inside the root.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Host pip configuration files (global, then site-wide XDG); user files are added per HOME.
PIP_SYSTEM_CONFIGS = (Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"))
#: pip options whose values name local files or directories.
PIP_PATH_OPTIONS = (
    "cert",
    "client-cert",
    "constraint",
    "requirement",
    "find-links",
    "index-url",
    "extra-index-url",
    "build-constraint",
)
#: Host tools -> the Debian package providing them.
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "update-binfmts": "binfmt-support",
    "qemu-aarch64-static": "qemu-user-static",
    "chroot": "coreutils",
    "du": "coreutils",
    "mount": "mount",
    "umount": "mount",
}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = "qemu-aarch64"
#: Inside the root: the aarch64 ``/proc/cpuinfo`` shown instead of the host's (see :func:`session`).
CPUINFO_FILE = Path("etc/siren-edge-cpuinfo")
#: One processor of a Raspberry Pi 4 (Cortex-A72) as its kernel describes it in ``/proc/cpuinfo``.
CORTEX_A72 = (
    "BogoMIPS\t: 108.00\n"
    "Features\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\n"
    "CPU architecture: 8\n"
    "CPU variant\t: 0x0\n"
    "CPU part\t: 0xd08\n"
    "CPU revision\t: 3\n"
)


def _say(line: str) -> None:
    """Progress line, flushed at once (it interleaves with the output of commands we run)."""
    print(line, flush=True)


class Arm64RootError(RuntimeError):
    """The host cannot build or run the arm64 root; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class RootSpec:
    """What a root must be to be reused: suite, architecture, variant and included packages."""

    suite: str = "bookworm"
    arch: str = "arm64"
    variant: str = "minbase"
    include: tuple[str, ...] = ("python3", "python3-venv", "python3-pip", "ca-certificates")


@dataclasses.dataclass(frozen=True)
class BinfmtEntry:
    """One parsed ``/proc/sys/fs/binfmt_misc/<name>`` entry."""

    enabled: bool
    interpreter: str
    flags: str

    @property
    def fix_binary(self) -> bool:
        """``F`` flag: the interpreter was opened at registration, so it also works in a chroot."""
        return "F" in self.flags


@dataclasses.dataclass(frozen=True)
class PipSettings:
    """The host's pip settings as they must appear inside the root.

    Attributes
    ----------
    config_files
        ``(host file, path inside the root)`` pairs to copy.
    files
        Other local files the settings name (CA bundle, constraints): copied to the same path.
    directories
        Local directories the settings name (``find-links``, ``file://`` indexes): bind-mounted
        read-only at the same path while commands run.
    env
        ``PIP_*`` variables of the host environment, forwarded to commands in the root.
    """

    config_files: tuple[tuple[Path, str], ...] = ()
    files: tuple[Path, ...] = ()
    directories: tuple[Path, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What :func:`build_root` did."""

    root: Path
    reused: bool
    mirror: str
    seconds: float
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class InstallReport:
    """What :func:`install_project` / :func:`install_packages` did."""

    venv: str
    requirements: tuple[str, ...]
    venv_seconds: float
    pip_seconds: float
    size_bytes: int
    created: bool = True  # False: the venv existed, pip may only have checked the requirements


# --------------------------------------------------------------------------------------------
# pure parts: paths, mirrors, markers, binfmt entries, pip settings, command lines


def root_path(
    explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """The cached root's location.

    Parameters
    ----------
    explicit
        A path given by the caller (wins when not None/empty).
    env
        Environment to read :data:`ROOT_ENV` from (default ``os.environ``).

    Returns
    -------
    Path
        Absolute path: ``explicit``, else ``$SIREN_ARM64_ROOT``, else :data:`DEFAULT_ROOT`,
        with ``~`` expanded.
    """
    env = os.environ if env is None else env
    chosen = str(explicit) if explicit else env.get(ROOT_ENV) or str(DEFAULT_ROOT)
    return Path(chosen).expanduser().absolute()


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def parse_one_line_sources(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Parse ``sources.list`` one-line entries.

    Returns
    -------
    list of (type, uri, suites)
        ``deb``/``deb-src`` entries in file order; the ``[option=value]`` block is skipped.
    """
    entries: list[tuple[str, str, tuple[str, ...]]] = []
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line, count=1)
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("deb", "deb-src"):
            entries.append((parts[0], parts[1], (parts[2],)))
    return entries


def parse_deb822_sources(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Parse deb822 ``*.sources`` stanzas (``Types``, ``URIs``, ``Suites``, ``Enabled``).

    Returns
    -------
    list of (type, uri, suites)
        One entry per type x URI of every enabled stanza, in file order.
    """
    entries: list[tuple[str, str, tuple[str, ...]]] = []
    stanzas: list[dict[str, str]] = [{}]
    key = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if not raw.strip():
            if stanzas[-1]:
                stanzas.append({})
            continue
        if raw[:1] in (" ", "\t") and key:
            stanzas[-1][key] += " " + raw.strip()
            continue
        if ":" in raw:
            name, value = raw.split(":", 1)
            key = name.strip().lower()
            stanzas[-1][key] = value.strip()
    for stanza in stanzas:
        if not stanza or stanza.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites = tuple(stanza.get("suites", "").split())
        for kind in stanza.get("types", "").split():
            for uri in stanza.get("uris", "").split():
                entries.append((kind, uri, suites))
    return entries


def choose_mirror(entries: Iterable[tuple[str, str, tuple[str, ...]]], suite: str) -> str | None:
    """The binary-package mirror carrying ``suite`` itself (not ``-security``/``-updates``).

    Parameters
    ----------
    entries
        ``(type, uri, suites)`` as returned by the parsers.
    suite
        Debian suite to bootstrap, e.g. ``bookworm``.

    Returns
    -------
    str or None
        The first ``deb`` entry over http(s)/ftp/file listing ``suite``; otherwise the first
        such entry listing any ``suite-*`` variant that is not a security archive; else None.
    """
    usable = [
        (uri.rstrip("/"), suites)
        for kind, uri, suites in entries
        if kind == "deb" and urlparse(uri).scheme in ("http", "https", "ftp", "file")
    ]
    for uri, suites in usable:
        if suite in suites:
            return uri
    for uri, suites in usable:
        if "security" not in uri and any(s.startswith(suite + "-") for s in suites):
            return uri
    return None


def find_debian_mirror(apt_dir: Path = Path("/etc/apt"), suite: str = "bookworm") -> str:
    """The Debian mirror apt uses on this host, read from ``sources.list`` and ``sources.list.d``.

    Only files apt itself reads are considered (``sources.list``, ``*.list``, ``*.sources``).

    Raises
    ------
    Arm64RootError
        When no enabled ``deb`` entry carries ``suite``; the message names the files read.
    """
    entries: list[tuple[str, str, tuple[str, ...]]] = []
    read: list[str] = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        entries += parse_one_line_sources(main_list.read_text(errors="replace"))
        read.append(str(main_list))
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix == ".list":
                entries += parse_one_line_sources(f.read_text(errors="replace"))
            elif f.suffix == ".sources":
                entries += parse_deb822_sources(f.read_text(errors="replace"))
            else:
                continue
            read.append(str(f))
    mirror = choose_mirror(entries, suite)
    if mirror is None:
        raise Arm64RootError(
            f"no Debian mirror for {suite!r} in {read or [str(main_list)]}; "
            "pass one with --mirror (e.g. http://deb.debian.org/debian)"
        )
    return mirror


def marker_content(spec: RootSpec, mirror: str, debootstrap_seconds: float) -> dict[str, Any]:
    """The JSON object written to :data:`MARKER` once a root is complete."""
    return {
        "format": MARKER_FORMAT,
        "suite": spec.suite,
        "arch": spec.arch,
        "variant": spec.variant,
        "include": sorted(spec.include),
        "mirror": mirror,
        "debootstrap_seconds": round(debootstrap_seconds, 1),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def marker_satisfies(marker: Mapping[str, Any] | None, spec: RootSpec) -> bool:
    """Whether a finished root described by ``marker`` can serve ``spec``.

    Suite, architecture, variant and format must match and the root must include at least the
    requested packages; the mirror it came from does not matter.
    """
    if not isinstance(marker, Mapping) or marker.get("format") != MARKER_FORMAT:
        return False
    if any(marker.get(k) != getattr(spec, k) for k in ("suite", "arch", "variant")):
        return False
    included = marker.get("include")
    return isinstance(included, list) and set(spec.include) <= set(included)


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of ``root``, or None when absent or unreadable (an unfinished root)."""
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(root: Path, spec: RootSpec = RootSpec()) -> bool:
    """Whether ``root`` is a finished root for ``spec`` (its marker exists and satisfies it)."""
    return (root / "usr/bin/python3").exists() and marker_satisfies(read_marker(root), spec)


def partial_path(root: Path, pid: int) -> Path:
    """The temporary sibling a build of ``root`` by process ``pid`` writes into."""
    return root.with_name(f".{root.name}.partial-{pid}")


def parse_binfmt_entry(text: str) -> BinfmtEntry:
    """Parse a ``binfmt_misc`` entry file (``enabled``, ``interpreter …``, ``flags: …``)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fields: dict[str, str] = {}
    for ln in lines[1:]:
        key, _, value = ln.partition(" ")
        fields[key] = value.strip()
    return BinfmtEntry(
        enabled=bool(lines) and lines[0] == "enabled",
        interpreter=fields.get("interpreter", ""),
        flags=fields.get("flags:", ""),
    )


def debootstrap_command(target: Path, mirror: str, spec: RootSpec = RootSpec()) -> list[str]:
    """The ``debootstrap`` command line building ``spec`` into ``target`` from ``mirror``."""
    return [
        "debootstrap",
        f"--arch={spec.arch}",
        f"--variant={spec.variant}",
        f"--include={','.join(spec.include)}",
        spec.suite,
        str(target),
        mirror,
    ]


def parse_passwd(text: str) -> dict[str, tuple[int, int, str]]:
    """``/etc/passwd`` text -> ``{name: (uid, gid, home)}``."""
    users: dict[str, tuple[int, int, str]] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[2].isdigit() and parts[3].isdigit():
            users[parts[0]] = (int(parts[2]), int(parts[3]), parts[5])
    return users


def parse_group_members(text: str, user: str) -> list[int]:
    """Ids of the ``/etc/group`` groups listing ``user`` as a supplementary member."""
    gids = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit() and user in parts[3].split(","):
            gids.append(int(parts[2]))
    return gids


def chroot_command(
    root: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    userspec: str | None = None,
    groups: Sequence[int] = (),
    cwd: str | None = None,
) -> list[str]:
    """The host command running ``argv`` inside ``root`` with exactly ``env``.

    ``chroot [--userspec=U:G [--groups=…]] ROOT /usr/bin/env -i [-C CWD] K=V… ARGV…``: ``env -i``
    (coreutils, inside the root) starts from an empty environment so nothing of the host leaks in.

    Parameters
    ----------
    root
        The root filesystem.
    argv
        Program and arguments as seen inside the root.
    env
        The complete environment of the program.
    userspec
        ``uid:gid`` to run as (None: stay root).
    groups
        Supplementary group ids (only with ``userspec``).
    cwd
        Working directory inside the root.
    """
    if not argv:
        raise ValueError("chroot_command needs a program to run (argv is empty)")
    cmd = ["chroot"]
    if userspec is not None:
        cmd.append(f"--userspec={userspec}")
        if groups:
            cmd.append("--groups=" + ",".join(str(g) for g in groups))
    cmd += [str(root), "/usr/bin/env", "-i"]
    if cwd:
        cmd += ["-C", cwd]
    bad = [k for k in env if not k or "=" in k]
    if bad:
        raise ValueError(f"environment names must be non-empty and contain no '=': {bad}")
    cmd += [f"{k}={v}" for k, v in env.items()]
    return cmd + list(argv)


def parse_mountinfo(text: str) -> list[str]:
    """Mount points listed in ``/proc/self/mountinfo`` text (octal escapes decoded)."""
    points = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def mounts_under(path: Path, mountinfo: str | None = None) -> list[str]:
    """Mount points at or below ``path`` (read from ``/proc/self/mountinfo`` by default)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    prefix = str(path).rstrip("/")
    return [p for p in parse_mountinfo(mountinfo) if p == prefix or p.startswith(prefix + "/")]


def _local_paths(option: str, value: str) -> list[Path]:
    """Local paths named by one pip option value (URLs other than ``file://`` name none)."""
    out = []
    for item in value.split():
        parsed = urlparse(item)
        if parsed.scheme == "file":
            out.append(Path(unquote(parsed.path)))
        elif not parsed.scheme and item.startswith("/"):
            out.append(Path(item))
        elif not parsed.scheme and option in ("cert", "client-cert", "constraint", "requirement"):
            out.append(Path(item).expanduser().absolute())
    return out


def _index_tree(path: Path) -> Path:
    """A PEP 503 ``…/simple`` index links to files beside it: bind its parent directory."""
    return path.parent if path.name == "simple" else path


def pip_settings(
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    system_configs: Sequence[Path] = PIP_SYSTEM_CONFIGS,
) -> PipSettings:
    """Collect the host's pip settings that pip inside the root also needs.

    Reads the global config files (``/etc/pip.conf``, ``/etc/xdg/pip/pip.conf``), the user's
    (``~/.config/pip/pip.conf``, ``~/.pip/pip.conf``), ``$PIP_CONFIG_FILE`` and the ``PIP_*``
    variables. User files are placed in ``/root`` inside the root. Every local path those settings
    name is returned as a file to copy or a directory to bind (a ``file://…/simple`` index binds
    its parent, where PEP 503 mirrors keep the files the index links to).

    Parameters
    ----------
    env
        Host environment (default ``os.environ``).
    home
        Host home directory (default ``$HOME``).
    system_configs
        Global config files to read.
    """
    env = os.environ if env is None else env
    home = Path(env.get("HOME", "/root")) if home is None else home
    configs: list[tuple[Path, str]] = [(p, str(p)) for p in system_configs if p.is_file()]
    for rel in (".config/pip/pip.conf", ".pip/pip.conf"):
        if (home / rel).is_file():
            configs.append((home / rel, "/root/" + rel))
    if env.get("PIP_CONFIG_FILE") and Path(env["PIP_CONFIG_FILE"]).is_file():
        p = Path(env["PIP_CONFIG_FILE"]).absolute()
        configs.append((p, str(p)))
    values: list[tuple[str, str]] = []
    for host_file, _ in configs:
        parser = configparser.RawConfigParser()
        try:
            parser.read(host_file)
        except configparser.Error as exc:
            raise Arm64RootError(f"cannot parse pip config {host_file}: {exc}") from exc
        for section in parser.sections():
            values += [(k, v) for k, v in parser.items(section) if k in PIP_PATH_OPTIONS]
    pip_env = tuple(sorted((k, v) for k, v in env.items() if k.startswith("PIP_")))
    for k, v in pip_env:
        option = k[4:].lower().replace("_", "-")
        if option in PIP_PATH_OPTIONS:
            values.append((option, v))
    files: list[Path] = []
    dirs: list[Path] = []
    for option, value in values:
        for p in _local_paths(option, value):
            if p.is_dir():
                tree = _index_tree(p) if option.endswith("index-url") else p
                if tree not in dirs:
                    dirs.append(tree)
            elif p.is_file() and p not in files:
                files.append(p)
    return PipSettings(tuple(configs), tuple(files), tuple(dirs), pip_env)


def parse_cpu_list(text: str) -> list[int]:
    """CPU numbers of a sysfs list such as ``0-3,6`` (``/sys/devices/system/cpu/present``)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def aarch64_cpuinfo(cpus: Sequence[int]) -> str:
    """An aarch64 ``/proc/cpuinfo`` listing ``cpus`` as Cortex-A72 cores (a Raspberry Pi 4's).

    QEMU 7.2 user emulation (Debian bookworm's) passes the host's x86 ``/proc/cpuinfo`` through
    to aarch64 programs; QEMU 8.1 and later emulate it. pytorch/cpuinfo, which LiteRT's
    interpreter and XNNPACK use to size their kernels, finds no ARM core in the x86 text and
    crashes (SIGSEGV in ``Interpreter(...)``). Only the description changes: the instructions
    available are still the emulated CPU's (reported through ``AT_HWCAP``).
    """
    blocks = [f"processor\t: {n}\n{CORTEX_A72}" for n in cpus]
    return "\n".join(blocks) + "\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B\n"


def parse_du(output: str) -> int:
    """Bytes from the first line of ``du -s -B1`` output."""
    first = output.strip().split(maxsplit=1)
    if not first or not first[0].isdigit():
        raise ValueError(f"unexpected du output: {output[:200]!r}")
    return int(first[0])


def format_bytes(n: float) -> str:
    """Human-readable size in binary units (``1.2 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# host checks


def missing_tools(which: Any = shutil.which) -> dict[str, str]:
    """Host tools not on PATH -> the Debian package that provides each."""
    return {tool: pkg for tool, pkg in HOST_TOOLS.items() if which(tool) is None}


def require_host() -> None:
    """Fail with one clear message unless this is a root shell with every needed tool.

    Raises
    ------
    Arm64RootError
        Not root, or tools missing (the message lists the ``apt-get install`` line).
    """
    missing = missing_tools()
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        raise Arm64RootError(
            f"missing host tools {sorted(missing)}: install them with `apt-get install {pkgs}`"
            " (qemu-user-static, debootstrap and binfmt-support are what the arm64 root needs)"
        )
    if os.geteuid() != 0:
        raise Arm64RootError("the arm64 root needs root privileges (debootstrap, mount, chroot)")


def _run_host(cmd: Sequence[str], what: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise Arm64RootError(
            f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def ensure_binfmt(binfmt_dir: Path = BINFMT_DIR) -> BinfmtEntry:
    """Make the kernel run aarch64 ELF binaries through QEMU, and return the entry.

    Mounts ``binfmt_misc`` at ``binfmt_dir`` when it is not mounted (an empty directory), then
    ``update-binfmts --enable qemu-aarch64`` when the entry is absent or disabled.

    Raises
    ------
    Arm64RootError
        When the entry is still missing afterwards (the message says what to install).
    """
    entry_file = binfmt_dir / BINFMT_ENTRY
    if not (binfmt_dir / "register").exists():
        _run_host(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt_dir)], "mounting binfmt_misc"
        )
    if not entry_file.exists() or not parse_binfmt_entry(entry_file.read_text()).enabled:
        _run_host(["update-binfmts", "--enable", BINFMT_ENTRY], "enabling qemu-aarch64")
    if not entry_file.exists():
        raise Arm64RootError(
            f"{entry_file} is still missing after update-binfmts: "
            "`apt-get install --reinstall qemu-user-static binfmt-support`"
        )
    entry = parse_binfmt_entry(entry_file.read_text())
    if not entry.enabled:
        raise Arm64RootError(f"{entry_file} stays disabled; check `update-binfmts --display`")
    return entry


def install_interpreter(root: Path, entry: BinfmtEntry) -> None:
    """Without the ``F`` flag the kernel looks the interpreter up inside the chroot: copy it in."""
    if entry.fix_binary or not entry.interpreter:
        return
    target = root / entry.interpreter.lstrip("/")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(entry.interpreter, target)


# --------------------------------------------------------------------------------------------
# host configuration copied into the root


def _copy_into(root: Path, host_file: Path, inside: str) -> None:
    target = root / inside.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()
    shutil.copyfile(host_file, target)


def sync_host_config(root: Path, pip: PipSettings | None = None) -> PipSettings:
    """Copy the host's DNS, CA and pip configuration into ``root`` (idempotent, cheap).

    * ``/etc/resolv.conf`` (resolved through symlinks; a symlink inside the root is replaced);
    * the CAs the host added locally (``/usr/local/share/ca-certificates``) and the host's bundle
      ``/etc/ssl/certs/ca-certificates.crt`` over the root's, so TLS through an intercepting proxy
      or to a private index validates as on the host;
    * pip config files and the local files they name (see :func:`pip_settings`).

    Returns
    -------
    PipSettings
        The settings used (their directories are bound by :func:`session`).
    """
    pip = pip_settings() if pip is None else pip
    resolv = Path("/etc/resolv.conf")
    if resolv.exists():
        _copy_into(root, resolv.resolve(), "/etc/resolv.conf")
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir():
        for crt in sorted(local_cas.rglob("*.crt")):
            _copy_into(root, crt, str(crt))
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        _copy_into(root, bundle, str(bundle))
    for host_file, inside in pip.config_files:
        _copy_into(root, host_file, inside)
    for f in pip.files:
        _copy_into(root, f, str(f))
    return pip


# --------------------------------------------------------------------------------------------
# mounts and running commands


def _mount(cmd: Sequence[str]) -> None:
    _run_host(cmd, "mount")


def _unmount(target: Path) -> None:
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        # Busy (a process inside still holds it): detach lazily rather than leave it mounted.
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def holders_path(root: Path) -> Path:
    """The file listing the processes with an open :func:`session` on ``root`` (a sibling)."""
    return root.with_name(f".{root.name}.sessions")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def update_holders(
    path: Path,
    *,
    add: int | None = None,
    remove: int | None = None,
    alive: Callable[[int], bool] = _pid_alive,
) -> list[int]:
    """Add or remove one entry of a process in the session holders file; return the live rest.

    Entries of processes that no longer run (a session killed with ``kill -9``) are dropped, so
    their mounts are released by the next session to close. A process holds one entry per open
    session (sessions nest). The caller holds the lock of :func:`_holders_lock`.
    """
    try:
        pids = [int(x) for x in path.read_text().split() if x.isdigit()]
    except FileNotFoundError:
        pids = []
    pids = [p for p in pids if alive(p)]
    if remove is not None and remove in pids:
        pids.remove(remove)
    if add is not None:
        pids.append(add)
    if pids:
        path.write_text("".join(f"{p}\n" for p in pids))
    else:
        path.unlink(missing_ok=True)
    return pids


@contextlib.contextmanager
def _holders_lock(root: Path) -> Iterator[None]:
    with open(root.with_name(f".{root.name}.sessions.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def unmount_all(root: Path) -> list[str]:
    """Unmount everything mounted at or below ``root``, innermost first; return what was."""
    points = mounts_under(root)
    for point in reversed(points):  # mountinfo lists parents before their children
        _unmount(Path(point))
    left = mounts_under(root)
    if left:
        raise Arm64RootError(f"could not unmount {left}")
    return points


def _mount_all(root: Path, settings: PipSettings, binds: Sequence[Path], cpuinfo: bool) -> None:
    existing = set(mounts_under(root))
    plan: list[tuple[str, list[str], bool]] = [
        ("proc", ["mount", "-t", "proc", "proc"], False),
        ("sys", ["mount", "--rbind", "/sys"], True),
        ("dev", ["mount", "--rbind", "/dev"], True),
    ]
    for rel, cmd, recursive in plan:
        target = root / rel
        if str(target) in existing:
            continue
        target.mkdir(exist_ok=True)
        _mount([*cmd, str(target)])
        if recursive:
            _mount(["mount", "--make-rslave", str(target)])
    cpuinfo_target = root / "proc/cpuinfo"
    if cpuinfo and str(cpuinfo_target) not in existing:
        present = Path("/sys/devices/system/cpu/present")
        cpus = parse_cpu_list(present.read_text()) if present.exists() else []
        fake = root / CPUINFO_FILE
        fake.write_text(aarch64_cpuinfo(cpus or range(os.cpu_count() or 1)))
        _mount(["mount", "--bind", str(fake), str(cpuinfo_target)])
    for host_dir in [*settings.directories, *binds]:
        target = root / str(host_dir).lstrip("/")
        if str(target) in existing or not host_dir.is_dir():
            continue
        target.mkdir(parents=True, exist_ok=True)
        _mount(["mount", "--bind", str(host_dir), str(target)])
        _mount(["mount", "-o", "remount,bind,ro", str(target)])


@contextlib.contextmanager
def session(
    root: Path,
    *,
    pip: PipSettings | None = None,
    binds: Sequence[Path] = (),
    sync: bool = True,
    cpuinfo: bool = True,
) -> Iterator[PipSettings]:
    """Mount ``/proc``, ``/sys``, ``/dev`` and pip's local directories in ``root``; always unmount.

    ``/sys`` and ``/dev`` are recursive bind mounts made slaves, so unmounting them never
    propagates back to the host's mounts. Extra host directories in ``binds`` (and the
    directories pip settings name) are bound read-only at the same path.

    Sessions may overlap, in one process (nested) or several (two boards started separately):
    each registers in :func:`holders_path` under a lock, mounts only what is missing, and the
    last one to close unmounts everything below ``root`` (:func:`unmount_all`). Holders that
    died without closing are ignored, so their mounts go with the next session to close.

    With ``cpuinfo`` (default), ``/proc/cpuinfo`` inside the root shows the host's CPUs as
    Cortex-A72 cores (:func:`aarch64_cpuinfo`): with the host's x86 text, LiteRT crashes.

    Yields
    ------
    PipSettings
        The pip settings synced into the root (empty when ``sync`` is False).
    """
    require_host()
    if not is_complete(root) and not (root / "usr/bin/env").exists():
        raise Arm64RootError(f"{root} is not a root filesystem; build it first")
    holders = holders_path(root)
    with _holders_lock(root):
        update_holders(holders, add=os.getpid())
        try:
            settings = sync_host_config(root, pip) if sync else PipSettings()
            _mount_all(root, settings, binds, cpuinfo)
        except BaseException:
            if not update_holders(holders, remove=os.getpid()):
                unmount_all(root)
            raise
    try:
        yield settings
    finally:
        with _holders_lock(root):
            if not update_holders(holders, remove=os.getpid()):
                unmount_all(root)


def root_env(
    home: str = "/root",
    extra: Mapping[str, str] | None = None,
    pip: PipSettings | None = None,
) -> dict[str, str]:
    """The environment of a command inside the root: PATH, HOME, LANG, pip's, then ``extra``."""
    env = {
        "PATH": ROOT_PATH,
        "HOME": home,
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "dumb"),
    }
    if pip is not None:
        env.update(dict(pip.env))
    env.update(extra or {})
    return env


def resolve_user(root: Path, user: str) -> tuple[str, list[int], str]:
    """``(uid:gid, supplementary gids, home)`` of ``user`` from the root's passwd/group files.

    Raises
    ------
    Arm64RootError
        When the user does not exist inside the root.
    """
    users = parse_passwd((root / "etc/passwd").read_text())
    if user not in users:
        raise Arm64RootError(f"no user {user!r} inside {root} (known: {sorted(users)})")
    uid, gid, home = users[user]
    groups = parse_group_members((root / "etc/group").read_text(), user)
    return f"{uid}:{gid}", sorted({gid, *groups}), home


def root_command(
    root: Path,
    argv: Sequence[str],
    *,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pip: PipSettings | None = None,
) -> list[str]:
    """The host command running ``argv`` inside ``root`` as ``user`` with :func:`root_env` plus
    ``env`` (see :func:`run_in_root` for the parameters). Its process is the program itself
    (``chroot`` and ``env`` exec it), so signals sent to it reach the program."""
    userspec: str | None = None
    groups: list[int] = []
    home = "/root"
    if user is not None and user != "root":
        userspec, groups, home = resolve_user(root, user)
    full_env = root_env(home=home, extra=env, pip=pip)
    if user is not None:
        full_env.setdefault("USER", user)
        full_env.setdefault("LOGNAME", user)
    return chroot_command(root, argv, env=full_env, userspec=userspec, groups=groups, cwd=cwd)


def start_in_root(
    root: Path,
    argv: Sequence[str],
    *,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pip: PipSettings | None = None,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start ``argv`` inside ``root`` in the background and return its process (a service such
    as a board: stop it, or ``kill -9`` it, through the returned :class:`subprocess.Popen`).

    The mounts must stay active while it runs: start and wait for it inside :func:`session`.
    ``popen`` is passed to :class:`subprocess.Popen` (``stdout``, ``stderr``, ``text``, ...).
    """
    popen.setdefault("stdin", subprocess.DEVNULL)
    cmd = root_command(root, argv, user=user, env=env, cwd=cwd, pip=pip)
    return subprocess.Popen(cmd, **popen)


def run_in_root(
    root: Path,
    argv: Sequence[str],
    *,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    capture: bool = False,
    check: bool = True,
    timeout: float | None = None,
    pip: PipSettings | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``root`` via ``chroot`` (mounts must be active: use :func:`session`).

    Parameters
    ----------
    root, argv
        Root filesystem and the command as seen inside it.
    user
        Run as this user of the root (None: root).
    env
        Extra environment on top of :func:`root_env`'s.
    cwd
        Working directory inside the root.
    capture
        Capture stdout/stderr (text) instead of streaming them to ours.
    check
        Raise :class:`Arm64RootError` on a non-zero exit (with captured stderr when captured).
    timeout
        Seconds before the command is killed.
    pip
        pip settings whose ``PIP_*`` variables are forwarded.
    stdin
        Standard input (default: none; ``None`` inherits ours, for interactive shells).
    """
    cmd = root_command(root, argv, user=user, env=env, cwd=cwd, pip=pip)
    proc = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, stdin=stdin)
    if check and proc.returncode != 0:
        detail = f"\n{proc.stderr.strip()[-4000:]}" if capture and proc.stderr else ""
        shown = shlex.join(argv)
        shown = shown if len(shown) < 200 else shown[:200] + " …"
        raise Arm64RootError(f"inside the root, `{shown}` exited {proc.returncode}{detail}")
    return proc


def du_bytes(path: Path) -> int:
    """Disk usage of ``path`` in bytes, as ``du -s -B1`` counts it (hard links once)."""
    return parse_du(_run_host(["du", "-s", "-B1", str(path)], "du"))


# --------------------------------------------------------------------------------------------
# building


def _remove_tree(path: Path) -> None:
    """Delete ``path`` after checking nothing is mounted below it (never delete a bound /dev)."""
    busy = mounts_under(path)
    if busy:
        raise Arm64RootError(f"refusing to delete {path}: still mounted below it: {busy}")
    shutil.rmtree(path)


def build_root(
    root: Path | None = None,
    *,
    mirror: str | None = None,
    spec: RootSpec = RootSpec(),
    force: bool = False,
    log: Callable[[str], None] = _say,
) -> BuildReport:
    """Build the arm64 root, or reuse it when already complete.

    The build runs ``debootstrap`` (:func:`debootstrap_command`) into :func:`partial_path`, copies
    the host's DNS/CA/pip configuration in, checks that python3 runs inside and that ``ssl``
    loads the CA bundle, writes the marker and only then renames the directory to ``root``. A
    lock file next to ``root`` serialises concurrent builds; stale partial directories of
    interrupted builds are removed first.

    Parameters
    ----------
    root
        Target path (default :func:`root_path`).
    mirror
        Debian mirror (default :func:`find_debian_mirror`).
    spec
        What to build.
    force
        Rebuild even when a complete root exists (the old one is replaced only on success).
    log
        Progress printer.
    """
    require_host()
    root = root_path() if root is None else root
    t0 = time.perf_counter()
    entry = ensure_binfmt()
    if not force and is_complete(root, spec):
        marker = read_marker(root) or {}
        return BuildReport(root, True, str(marker.get("mirror", "")), time.perf_counter() - t0, 0)
    mirror = find_debian_mirror(suite=spec.suite) if mirror is None else mirror
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(f".{root.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_complete(root, spec):  # another process finished it meanwhile
            return BuildReport(root, True, mirror, time.perf_counter() - t0, 0)
        for stale in root.parent.glob(f".{root.name}.partial-*"):
            if not stale.is_dir():  # its session lock file
                stale.unlink()
                continue
            log(f"removing the unfinished build {stale}")
            unmount_all(stale)  # mounts an interrupted debootstrap may have left
            _remove_tree(stale)
        tmp = partial_path(root, os.getpid())
        cmd = debootstrap_command(tmp, mirror, spec)
        log(f"building {root} ({spec.suite} {spec.arch} {spec.variant}): {shlex.join(cmd)}")
        t_boot = time.perf_counter()
        tail: list[str] = []
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as boot:
            assert boot.stdout is not None
            for line in boot.stdout:
                tail = [*tail[-14:], line.rstrip()]
                log(f"  {line.rstrip()}")
        debootstrap_s = time.perf_counter() - t_boot
        if boot.returncode != 0:
            log_file = tmp / "debootstrap/debootstrap.log"
            hint = f" (log: {log_file})" if log_file.exists() else ""
            raise Arm64RootError(
                f"debootstrap failed (exit {boot.returncode}){hint}:\n" + "\n".join(tail)
            )
        log(f"debootstrap finished in {debootstrap_s:.0f} s")
        install_interpreter(tmp, entry)
        with session(tmp):
            probe = run_in_root(
                tmp,
                [
                    "python3",
                    "-c",
                    "import platform, ssl; ctx = ssl.create_default_context(); "
                    "print(platform.machine(), platform.python_version(), "
                    "ctx.cert_store_stats()['x509_ca'])",
                ],
                capture=True,
            )
        machine, py, cas = probe.stdout.split()
        if machine != "aarch64" or int(cas) == 0:
            raise Arm64RootError(f"probe inside the new root gave {probe.stdout.strip()!r}")
        log(f"inside: {machine}, Python {py}, {cas} CA certificates")
        (tmp / MARKER).write_text(json.dumps(marker_content(spec, mirror, debootstrap_s), indent=2))
        if root.exists():
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            root.rename(old)
            root_tmp_swap = old
        else:
            root_tmp_swap = None
        tmp.rename(root)
        tmp.with_name(f".{tmp.name}.sessions.lock").unlink(missing_ok=True)
        if root_tmp_swap is not None:
            _remove_tree(root_tmp_swap)
    return BuildReport(root, False, mirror, time.perf_counter() - t0, du_bytes(root))


# --------------------------------------------------------------------------------------------
# venvs and projects


def copy_project(src: Path, root: Path, dest: str = DEFAULT_SRC) -> Path:
    """Copy the source tree ``src`` to ``dest`` inside ``root`` (replacing it), without
    :data:`PROJECT_EXCLUDES` (virtualenvs, git data, run outputs, caches, build output).

    Returns
    -------
    Path
        The host path of the copy.
    """
    src = src.resolve()
    if not (src / "pyproject.toml").is_file() and not (src / "setup.py").is_file():
        raise Arm64RootError(f"{src} is not a Python project (no pyproject.toml or setup.py)")
    target = root / dest.lstrip("/")
    if target.exists():
        _remove_tree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, target, ignore=shutil.ignore_patterns(*PROJECT_EXCLUDES), symlinks=True)
    return target


def install_packages(
    root: Path,
    requirements: Sequence[str],
    *,
    venv: str = DEFAULT_VENV,
    pip_args: Sequence[str] = (),
    pip: PipSettings | None = None,
    log: Callable[[str], None] = _say,
) -> InstallReport:
    """Create ``venv`` inside ``root`` (if missing) and ``pip install`` ``requirements`` into it.

    Must run inside :func:`session`. Output of pip is streamed.
    """
    t0 = time.perf_counter()
    created = not (root / venv.lstrip("/") / "bin/python").exists()
    if created:
        log(f"creating {venv}")
        run_in_root(root, ["python3", "-m", "venv", venv], pip=pip)
    venv_s = time.perf_counter() - t0
    log(f"pip install {' '.join(requirements)}")
    t1 = time.perf_counter()
    run_in_root(root, [f"{venv}/bin/pip", "install", *pip_args, *requirements], pip=pip)
    pip_s = time.perf_counter() - t1
    size = du_bytes(root / venv.lstrip("/"))
    return InstallReport(venv, tuple(requirements), venv_s, pip_s, size, created)


def install_project(
    root: Path,
    src: Path,
    *,
    extras: Sequence[str] = (),
    venv: str = DEFAULT_VENV,
    dest: str = DEFAULT_SRC,
    pip_args: Sequence[str] = (),
    pip: PipSettings | None = None,
    log: Callable[[str], None] = _say,
) -> InstallReport:
    """Copy the project at ``src`` into ``root`` and pip-install it (with ``extras``) into ``venv``.

    Must run inside :func:`session`.
    """
    copy_project(src, root, dest)
    spec = f"{dest}[{','.join(extras)}]" if extras else dest
    return install_packages(root, [spec], venv=venv, pip_args=pip_args, pip=pip, log=log)


#: Runs inside the root with the venv's python; prints one JSON line.
VERIFY_SCRIPT = r"""
import json, os, platform, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
out = {"machine": platform.machine(), "python": platform.python_version()}
t = time.perf_counter()
import numpy as np
import tensorflow as tf
out["import_tf_s"] = time.perf_counter() - t
out["tensorflow"] = tf.__version__
import keras
out["keras"] = keras.__version__
out["numpy"] = np.__version__
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 8)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int32")
model = tf.keras.Sequential([
    tf.keras.Input((8,)),
    tf.keras.layers.Dense(16, activation="relu"),
    tf.keras.layers.Dense(2),
])
model.compile(
    optimizer=tf.keras.optimizers.Adam(0.05),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
t = time.perf_counter()
hist = model.fit(x, y, epochs=5, batch_size=32, verbose=0)
out["train_s"] = time.perf_counter() - t
out["train_accuracy"] = float(hist.history["accuracy"][-1])
t = time.perf_counter()
flat = tf.lite.TFLiteConverter.from_keras_model(model).convert()
out["convert_s"] = time.perf_counter() - t
out["tflite_bytes"] = len(flat)
t = time.perf_counter()
import ai_edge_litert
from ai_edge_litert.interpreter import Interpreter
out["import_litert_s"] = time.perf_counter() - t
try:
    from importlib.metadata import version
    out["ai_edge_litert"] = version("ai-edge-litert")
except Exception:
    out["ai_edge_litert"] = getattr(ai_edge_litert, "__version__", "")
t = time.perf_counter()
interp = Interpreter(model_content=flat)
inp = interp.get_input_details()[0]
interp.resize_tensor_input(inp["index"], [64, 8])
interp.allocate_tensors()
interp.set_tensor(inp["index"], x[:64])
interp.invoke()
lite = interp.get_tensor(interp.get_output_details()[0]["index"])
out["litert_s"] = time.perf_counter() - t
keras_out = model(x[:64]).numpy()
out["litert_max_abs_diff"] = float(np.max(np.abs(lite - keras_out)))
out["litert_accuracy"] = float(np.mean(lite.argmax(1) == y[:64]))
print("VERIFY " + json.dumps(out))
"""


#: Runs inside the root after the project was installed: the board's own LiteRT path.
PROJECT_SCRIPT = r"""
import json, os, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
t = time.perf_counter()
from models.litert import KerasEvaluator, litert_evaluator
from models.weights import get_flat_weights
from models.zoo import build_model
from protocol.envelope import __name__ as _envelope
out = {"import_s": time.perf_counter() - t}
model = build_model("digits-mlp", (64,), 10)
weights = get_flat_weights(model)
rng = np.random.default_rng(0)
x = rng.random((200, 64), dtype=np.float32)
y = rng.integers(0, 10, 200)
t = time.perf_counter()
lite = litert_evaluator(model)
out["export_s"] = time.perf_counter() - t
out["evaluator"] = type(lite).__name__
t = time.perf_counter()
out["litert_accuracy"] = lite.accuracy(weights, x, y)
out["alarm_eval_s"] = time.perf_counter() - t
out["keras_accuracy"] = KerasEvaluator(model).accuracy(weights, x, y)
print("PROJECT " + json.dumps(out))
"""


def verify_project(
    root: Path, venv: str = DEFAULT_VENV, pip: PipSettings | None = None
) -> dict[str, Any]:
    """Inside ``root``: the installed project exports a zoo model to LiteRT and its evaluator
    agrees with Keras (the board alarm's path). Must run inside :func:`session`.

    Raises
    ------
    Arm64RootError
        When the script fails or LiteRT and Keras accuracies differ.
    """
    proc = run_in_root(
        root, [f"{venv}/bin/python", "-c", PROJECT_SCRIPT], capture=True, pip=pip, cwd="/"
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROJECT ")]
    if not lines:
        raise Arm64RootError(f"project check printed no result:\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1][len("PROJECT ") :])
    if result["litert_accuracy"] != result["keras_accuracy"]:
        raise Arm64RootError(f"project check: LiteRT and Keras disagree: {result}")
    return result


def verify_ml_stack(
    root: Path, venv: str = DEFAULT_VENV, pip: PipSettings | None = None
) -> dict[str, Any]:
    """Inside ``root``: import TensorFlow, train a tiny Keras model, convert it and run it in
    LiteRT's Interpreter; return versions, timings (seconds, **emulated**) and the largest
    difference between Keras and LiteRT outputs.

    Must run inside :func:`session`.

    Raises
    ------
    Arm64RootError
        When the script fails or LiteRT disagrees with Keras by more than 1e-4.
    """
    t = time.perf_counter()
    proc = run_in_root(root, [f"{venv}/bin/python", "-c", VERIFY_SCRIPT], capture=True, pip=pip)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VERIFY ")]
    if not lines:
        raise Arm64RootError(f"verification printed no result:\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1][len("VERIFY ") :])
    result["process_s"] = time.perf_counter() - t
    if result["litert_max_abs_diff"] > 1e-4:
        raise Arm64RootError(f"LiteRT output differs from Keras: {result}")
    return result


def pip_freeze(root: Path, venv: str = DEFAULT_VENV) -> dict[str, str]:
    """``{distribution: version}`` installed in ``venv`` inside ``root`` (read from metadata)."""
    site = list((root / venv.lstrip("/")).glob("lib/python3*/site-packages"))
    out: dict[str, str] = {}
    for dist in site[0].glob("*.dist-info") if site else []:
        name, _, ver = dist.name[: -len(".dist-info")].partition("-")
        out[name.lower().replace("_", "-")] = ver
    return out


def largest_packages(root: Path, venv: str = DEFAULT_VENV, top: int = 8) -> list[tuple[str, int]]:
    """The ``top`` largest entries of the venv's site-packages, ``(name, bytes)``."""
    site = list((root / venv.lstrip("/")).glob("lib/python3*/site-packages"))
    if not site:
        return []
    sizes = [(p.name, du_bytes(p)) for p in site[0].iterdir() if p.is_dir()]
    return sorted(sizes, key=lambda s: -s[1])[:top]


def format_report(
    build: BuildReport,
    install: InstallReport,
    result: Mapping[str, Any],
    packages: Sequence[tuple[str, int]],
    host: Mapping[str, str],
    project: tuple[InstallReport, Mapping[str, Any]] | None = None,
) -> str:
    """The Markdown written by ``verify`` (every timing labelled as emulated).

    Parameters
    ----------
    build, install, result
        What :func:`build_root`, :func:`install_packages` and :func:`verify_ml_stack` returned.
    packages
        Largest site-packages entries, ``(name, bytes)``.
    host
        ``host`` (description line), ``debootstrap_s`` and ``suite`` from the root's marker.
    project
        The project's install report and :func:`verify_project` result, when it was checked.
    """
    debootstrap = host.get("debootstrap_s", "?")
    venv_bytes = project[0].size_bytes if project is not None else install.size_bytes
    build_line = (
        f"reused (debootstrap took {debootstrap} s when it was built)"
        if build.reused
        else f"{build.seconds:.0f} s (debootstrap {debootstrap} s)"
    )
    rows = [
        ("build or reuse the root", build_line),
        ("create the venv", f"{install.venv_seconds:.1f} s" if install.created else "existed"),
        (
            f"pip install ({len(install.requirements)} requirements)"
            + ("" if install.created else ", venv already populated"),
            f"{install.pip_seconds:.0f} s",
        ),
        ("`import tensorflow`", f"{result['import_tf_s']:.1f} s"),
        ("train 5 epochs, 512 samples, 8-16-2 MLP", f"{result['train_s']:.1f} s"),
        ("convert to a LiteRT flatbuffer", f"{result['convert_s']:.1f} s"),
        ("`import ai_edge_litert`", f"{result['import_litert_s']:.2f} s"),
        ("LiteRT: load, allocate, infer 64 samples", f"{result['litert_s']:.3f} s"),
        ("whole TensorFlow/LiteRT check process", f"{result['process_s']:.0f} s"),
    ]
    if project is not None:
        p_install, p_result = project
        rows += [
            ("copy + pip install the project (no dependencies)", f"{p_install.pip_seconds:.0f} s"),
            ("project: export digits-mlp to LiteRT", f"{p_result['export_s']:.1f} s"),
            ("project: LiteRT accuracy of 200 samples", f"{p_result['alarm_eval_s']:.3f} s"),
        ]
    lines = [
        "# arm64 board userland (Debian bookworm under QEMU user emulation)",
        "",
        "Made by `python -m benchmarks.arm64_root verify`. **Every timing below is emulated**:",
        "aarch64 code runs through `qemu-aarch64-static` on an x86_64 host, several times slower",
        "than a board. They show that the steps work, not how fast a board is.",
        "",
        f"- host: {host.get('host', '')}",
        f"- root: Debian {host.get('suite', 'bookworm')} arm64 minbase from {build.mirror}: "
        f"{format_bytes(build.size_bytes - venv_bytes)} without the venv, "
        f"{format_bytes(build.size_bytes)} with it",
        f"- inside: {result['machine']}, Python {result['python']}",
        f"- installed: {', '.join(f'`{r}`' for r in install.requirements)}",
        f"- TensorFlow {result['tensorflow']}, Keras {result['keras']}, "
        f"ai-edge-litert {result['ai_edge_litert']}, numpy {result['numpy']}",
        f"- venv `{install.venv}`: {format_bytes(install.size_bytes)}",
        f"- tiny model: train accuracy {result['train_accuracy']:.3f}, LiteRT accuracy on 64 "
        f"samples {result['litert_accuracy']:.3f}, largest |Keras - LiteRT| "
        f"{result['litert_max_abs_diff']:.1e}, flatbuffer {result['tflite_bytes']} bytes",
    ]
    if project is not None:
        p_install, p_result = project
        lines.append(
            f"- project installed with `--no-deps` into the same venv (then "
            f"{format_bytes(p_install.size_bytes)}): {p_result['evaluator']} accuracy "
            f"{p_result['litert_accuracy']:.3f} = Keras {p_result['keras_accuracy']:.3f}"
        )
    lines += [
        "",
        "| step (emulated) | time |",
        "| --- | ---: |",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        "Largest entries of the venv's site-packages:",
        "",
        "| package | size |",
        "| --- | ---: |",
        *[f"| {name} | {format_bytes(size)} |" for name, size in packages],
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line


def _env_pairs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env expects NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def _cmd_build(args: argparse.Namespace) -> int:
    report = build_root(root_path(args.root), mirror=args.mirror, force=args.force)
    state = "reused" if report.reused else f"built in {report.seconds:.0f} s"
    size = f", {format_bytes(report.size_bytes)}" if report.size_bytes else ""
    print(f"{report.root}: {state}{size}")
    return 0


def _complete_root(args: argparse.Namespace) -> Path:
    root = root_path(args.root)
    if not is_complete(root):
        raise Arm64RootError(
            f"no finished root at {root}: run `python -m benchmarks.arm64_root build`"
        )
    ensure_binfmt()
    return root


def _cmd_shell(args: argparse.Namespace) -> int:
    root = _complete_root(args)
    with session(root, binds=[Path(b) for b in args.bind]) as pip:
        proc = run_in_root(
            root, ["/bin/bash", "-l"], user=args.user, env=_env_pairs(args.env),
            check=False, stdin=None, pip=pip,
        )  # fmt: skip
    return proc.returncode


def _cmd_run(args: argparse.Namespace) -> int:
    root = _complete_root(args)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise SystemExit("run: give a command after --")
    with session(root, binds=[Path(b) for b in args.bind]) as pip:
        proc = run_in_root(
            root, argv, user=args.user, env=_env_pairs(args.env), cwd=args.cwd,
            check=False, stdin=None, pip=pip,
        )  # fmt: skip
    return proc.returncode


def _cmd_install(args: argparse.Namespace) -> int:
    root = _complete_root(args)
    extras = [e for e in args.extras.split(",") if e]
    pip_args = ["--no-deps"] if args.no_deps else []
    with session(root) as pip:
        report = install_project(
            root, Path(args.src), extras=extras, venv=args.venv, pip_args=pip_args, pip=pip
        )
    print(
        f"installed {args.src} into {report.venv}: pip {report.pip_seconds:.0f} s (emulated), "
        f"venv {format_bytes(report.size_bytes)}"
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    t_binfmt = time.perf_counter()
    require_host()
    ensure_binfmt()
    binfmt_s = time.perf_counter() - t_binfmt
    build = build_root(root_path(args.root), mirror=args.mirror)
    root = build.root
    marker = read_marker(root) or {}
    project: tuple[InstallReport, dict[str, Any]] | None = None
    with session(root) as pip:
        if args.fresh_venv and (root / args.venv.lstrip("/")).exists():
            _remove_tree(root / args.venv.lstrip("/"))
        install = install_packages(root, list(args.packages), venv=args.venv, pip=pip)
        packages = largest_packages(root, args.venv)
        result = verify_ml_stack(root, args.venv, pip=pip)
        if args.project:
            p_install = install_project(
                root, Path(args.project), venv=args.venv, pip_args=["--no-deps"], pip=pip
            )
            project = (p_install, verify_project(root, args.venv, pip=pip))
    build = dataclasses.replace(build, size_bytes=du_bytes(root), mirror=str(marker.get("mirror")))
    host = {
        "host": f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs); binfmt check {binfmt_s:.2f} s",
        "debootstrap_s": str(marker.get("debootstrap_seconds", "?")),
        "suite": str(marker.get("suite", "bookworm")),
    }
    text = format_report(build, install, result, packages, host, project)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    root = root_path(args.root)
    marker = read_marker(root)
    print(
        json.dumps({"root": str(root), "complete": is_complete(root), "marker": marker}, indent=2)
    )
    return 0 if marker else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks.arm64_root`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.arm64_root",
        description="Build and use an arm64 Debian bookworm root under QEMU user emulation.",
    )
    p.add_argument("--root", help=f"root path (default ${ROOT_ENV} or {DEFAULT_ROOT})")
    s = p.add_subparsers(dest="command", required=True)
    b = s.add_parser("build", help="build the root, or reuse it when complete")
    b.add_argument("--mirror", help="Debian mirror (default: the one apt uses on this host)")
    b.add_argument("--force", action="store_true", help="rebuild even when complete")
    b.set_defaults(func=_cmd_build)
    for name, func, help_text in (
        ("shell", _cmd_shell, "interactive shell inside the root"),
        ("run", _cmd_run, "run one command inside the root: run [options] -- CMD ARGS..."),
    ):
        c = s.add_parser(name, help=help_text)
        c.add_argument("--user", help="run as this user of the root (default root)")
        c.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
        c.add_argument("--bind", action="append", default=[], metavar="HOST_DIR",
                       help="bind a host directory read-only at the same path")  # fmt: skip
        if name == "run":
            c.add_argument("--cwd", help="working directory inside the root")
            c.add_argument("argv", nargs=argparse.REMAINDER)
        c.set_defaults(func=func)
    i = s.add_parser("install", help="copy a project into the root and pip-install it into a venv")
    i.add_argument("src", help="project directory on the host")
    i.add_argument("--venv", default=DEFAULT_VENV)
    i.add_argument("--extras", default="", help="comma-separated extras")
    i.add_argument("--no-deps", action="store_true", help="pip install --no-deps")
    i.set_defaults(func=_cmd_install)
    v = s.add_parser("verify", help="venv with TensorFlow + LiteRT inside the root; tiny checks")
    v.add_argument("--mirror", help="Debian mirror when the root must be built")
    v.add_argument("--venv", default=DEFAULT_VENV)
    v.add_argument("--packages", nargs="+", default=list(VERIFY_PACKAGES))
    v.add_argument("--fresh-venv", action="store_true", help="delete the venv first")
    v.add_argument(
        "--project",
        default=str(Path(__file__).resolve().parents[1]),
        help="also install this project with --no-deps and run its LiteRT export ('' to skip)",
    )
    v.add_argument(
        "--out", default=str(RESULTS / "arm64-root.md"), help="Markdown report ('' for none)"
    )
    v.set_defaults(func=_cmd_verify)
    n = s.add_parser("info", help="print the root's path and marker")
    n.set_defaults(func=_cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the sub-command; errors print one line, exit 1."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Arm64RootError as exc:
        print(f"arm64 root: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
