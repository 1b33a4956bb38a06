"""The image's root filesystem, built once under QEMU user emulation and cached.

Building it takes a quarter of an hour or more here (every arm64 program of the build runs
through ``qemu-aarch64-static``), so :func:`build_image_root` keeps the finished directory in a
cache folder of its own (default ``~/.cache/siren-edge/image-root-bookworm``, never the
``arm64-bookworm`` root of :mod:`benchmarks.arm64_root`) and reuses it while its
:class:`ImageRootSpec` is unchanged. The build goes in stages into a sibling ``.partial``
folder; a stage that finished is not run again after an interruption, and the folder is renamed
into place only when every stage is done.

Stages:

1. ``debootstrap --variant=minbase --components=main,non-free-firmware`` with the base system
   (systemd, udev, networking, SSH server, Python) from the mirror apt uses on this host;
2. ``apt-get install --no-install-recommends`` of the kernel (``linux-image-arm64``), Debian's
   Raspberry Pi boot files (``raspi-firmware``, whose kernel hook fills ``/boot/firmware`` with
   the kernel, initrd, device trees, ``config.txt`` and ``cmdline.txt``), Wi-Fi firmware, and
   updates from the suite's ``-updates`` and security archives. ``/etc/default/raspi-firmware``
   is written first so ``cmdline.txt`` names the root filesystem by label;
3. the board's virtual environment (the lean board install: TensorFlow, LiteRT, PyNaCl,
   paho-mqtt, NumPy from PyPI's aarch64 wheels).

The cached root still carries build-time files (the host's DNS, CA and pip settings that
:func:`benchmarks.arm64_root.session` copies in so apt and pip work): :mod:`image.assemble`
removes them from its copy before making the filesystem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from image.errors import ImageError
from image.layout import BOOT_LABEL, ROOT_LABEL

#: Environment variable naming the cached image root.
ROOT_ENV = "SIREN_IMAGE_ROOT"
#: Default cache folder of the image root.
DEFAULT_ROOT = Path("~/.cache/siren-edge/image-root-bookworm")
#: Marker of a finished image root, relative to the root.
MARKER = Path("etc/siren-image-root.json")
#: Folder (inside the partial build) recording finished stages.
STAGES_DIR = ".siren-image-stages"
#: Where the board's venv lives (the default of ``siren deploy``'s bundles).
DEFAULT_VENV = "/opt/siren/venv"

#: The base system, installed by debootstrap (dependencies resolved by it).
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "systemd-timesyncd",
    "systemd-resolved",
    "iproute2",
    "iputils-ping",
    "netbase",
    "procps",
    "ca-certificates",
    "openssl",
    "openssh-server",
    "python3",
    "python3-venv",
    "fdisk",
    "dosfstools",
    "e2fsprogs",
    "initramfs-tools",
    "zstd",
)
#: Kernel, Raspberry Pi boot files and firmware, Wi-Fi.
BOOT_PACKAGES = (
    "linux-image-arm64",
    "raspi-firmware",
    "firmware-brcm80211",
    "wpasupplicant",
    "wireless-regdb",
)


def default_requirements() -> tuple[str, ...]:
    """The board's libraries (``requirements-board.txt`` of every bundle)."""
    from edge_client.provision import BOARD_REQUIREMENTS

    return BOARD_REQUIREMENTS


@dataclasses.dataclass(frozen=True)
class ImageRootSpec:
    """What the cached root is made of; a root built from another spec is rebuilt."""

    suite: str = "bookworm"
    arch: str = "arm64"
    components: tuple[str, ...] = ("main", "non-free-firmware")
    base: tuple[str, ...] = BASE_PACKAGES
    boot: tuple[str, ...] = BOOT_PACKAGES
    requirements: tuple[str, ...] = dataclasses.field(default_factory=default_requirements)
    venv: str = DEFAULT_VENV
    root_label: str = ROOT_LABEL
    boot_label: str = BOOT_LABEL

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (lists sorted where order does not matter)."""
        d = dataclasses.asdict(self)
        for k in ("base", "boot", "requirements", "components"):
            d[k] = sorted(d[k])
        return d

    def digest(self) -> str:
        """Short SHA-256 of :meth:`as_dict`: two roots with the same digest have the same spec."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class RootReport:
    """What :func:`build_image_root` did."""

    root: Path
    reused: bool
    mirror: str
    seconds: float
    stage_seconds: dict[str, float]


def root_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else ``$SIREN_IMAGE_ROOT``, else :data:`DEFAULT_ROOT` (``~`` expanded)."""
    chosen = str(explicit) if explicit else os.environ.get(ROOT_ENV) or str(DEFAULT_ROOT)
    return Path(chosen).expanduser().absolute()


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of a finished root, or None."""
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(root: Path, spec: ImageRootSpec) -> bool:
    """Whether ``root`` is a finished image root of ``spec``."""
    marker = read_marker(root)
    return marker is not None and marker.get("spec_digest") == spec.digest()


def debootstrap_command(target: Path, mirror: str, spec: ImageRootSpec) -> list[str]:
    """The ``debootstrap`` command of stage 1."""
    return [
        "debootstrap",
        f"--arch={spec.arch}",
        "--variant=minbase",
        f"--components={','.join(spec.components)}",
        f"--include={','.join(spec.base)}",
        spec.suite,
        str(target),
        mirror,
    ]


def security_mirror(apt_dir: Path = Path("/etc/apt"), suite: str = "bookworm") -> str:
    """The security archive apt uses on this host for ``suite`` (Debian's when none is set)."""
    from benchmarks import arm64_root as ar

    entries: list[tuple[str, str, tuple[str, ...]]] = []
    if (apt_dir / "sources.list").is_file():
        entries += ar.parse_one_line_sources((apt_dir / "sources.list").read_text())
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix == ".list":
                entries += ar.parse_one_line_sources(f.read_text(errors="replace"))
            elif f.suffix == ".sources":
                entries += ar.parse_deb822_sources(f.read_text(errors="replace"))
    for kind, uri, suites in entries:
        if kind == "deb" and f"{suite}-security" in suites:
            return uri.rstrip("/")
    return "http://deb.debian.org/debian-security"


def apt_sources(mirror: str, security: str, spec: ImageRootSpec) -> str:
    """``/etc/apt/sources.list`` of the image: the suite, its updates and security archives."""
    comps = " ".join(spec.components)
    return (
        f"deb {mirror} {spec.suite} {comps}\n"
        f"deb {mirror} {spec.suite}-updates {comps}\n"
        f"deb {security} {spec.suite}-security {comps}\n"
    )


def raspi_firmware_defaults(spec: ImageRootSpec) -> str:
    """``/etc/default/raspi-firmware``: the root partition by label (as Debian's Raspberry Pi
    images do), serial and screen consoles chosen per board by the package (``auto``)."""
    return (
        "# siren-edge image: read by raspi-firmware's kernel hook, which writes cmdline.txt\n"
        "# and config.txt into /boot/firmware at every kernel or initramfs update.\n"
        "CONSOLES=auto\n"
        f"ROOTPART=LABEL={spec.root_label}\n"
        "KERNEL_ARCH=arm64\n"
    )


def _say(line: str) -> None:
    print(f"[image root] {line}", flush=True)


def _stream(cmd: Sequence[str], log: Callable[[str], None], what: str) -> None:
    tail: list[str] = []
    with subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-19:], line.rstrip()]
            log(f"  {line.rstrip()}")
    if proc.returncode != 0:
        raise ImageError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _stage_done(partial: Path, stage: str) -> bool:
    return (partial / STAGES_DIR / stage).exists()


def _mark_stage(partial: Path, stage: str, seconds: float) -> None:
    (partial / STAGES_DIR).mkdir(exist_ok=True)
    (partial / STAGES_DIR / stage).write_text(f"{seconds:.1f}\n")


def _stage_seconds(partial: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    folder = partial / STAGES_DIR
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if f.name != "spec.json":
            try:
                out[f.name] = float(f.read_text().strip())
            except ValueError:
                continue
    return out


NONINTERACTIVE = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}
DPKG_KEEP_OURS = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]


def _install_boot_packages(
    root: Path, mirror: str, security: str, spec: ImageRootSpec, pip: Any, log: Any
) -> None:
    from benchmarks import arm64_root as ar

    (root / "etc/apt/sources.list").write_text(apt_sources(mirror, security, spec))
    (root / "etc/default").mkdir(parents=True, exist_ok=True)
    (root / "etc/default/raspi-firmware").write_text(raspi_firmware_defaults(spec))
    # No service starts inside the build (ssh, timesyncd ...): invoke-rc.d asks policy-rc.d.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        apt = ["apt-get", "-y", "-q", *DPKG_KEEP_OURS]
        log("apt-get update")
        ar.run_in_root(root, ["apt-get", "-q", "update"], env=NONINTERACTIVE, pip=pip)
        log("apt-get upgrade (the suite's updates and security fixes)")
        ar.run_in_root(root, [*apt, "upgrade"], env=NONINTERACTIVE, pip=pip)
        log(f"apt-get install {' '.join(spec.boot)} (kernel hooks run under emulation: slow)")
        ar.run_in_root(
            root,
            [*apt, "install", "--no-install-recommends", *spec.boot],
            env=NONINTERACTIVE,
            pip=pip,
        )
        ar.run_in_root(root, ["apt-get", "-q", "clean"], env=NONINTERACTIVE, pip=pip)
    finally:
        policy.unlink(missing_ok=True)
    firmware = root / "boot/firmware"
    missing = [n for n in ("config.txt", "cmdline.txt") if not (firmware / n).is_file()]
    if missing or not list(firmware.glob("vmlinuz-*")):
        raise ImageError(
            f"raspi-firmware's hook did not fill {firmware} (missing {missing or 'vmlinuz-*'}): "
            f"found {sorted(p.name for p in firmware.iterdir()) if firmware.is_dir() else []}"
        )


def _install_venv(root: Path, spec: ImageRootSpec, pip: Any, log: Any) -> None:
    from benchmarks import arm64_root as ar

    venv = spec.venv
    if not (root / venv.lstrip("/") / "bin/python").exists():
        log(f"python3 -m venv {venv}")
        ar.run_in_root(root, ["python3", "-m", "venv", venv], pip=pip)
    reqs = root / "tmp/requirements-board.txt"
    reqs.write_text("".join(f"{r}\n" for r in spec.requirements))
    log("pip install the board's libraries (TensorFlow, LiteRT, ...; ~1.6 GB from PyPI)")
    ar.run_in_root(
        root,
        [f"{venv}/bin/python", "-m", "pip", "install", "--disable-pip-version-check",
         "--progress-bar", "off", "-r", "/tmp/requirements-board.txt"],
        pip=pip,
    )  # fmt: skip
    reqs.unlink()


def build_image_root(
    root: Path | None = None,
    *,
    spec: ImageRootSpec | None = None,
    mirror: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = _say,
) -> RootReport:
    """Build the image's arm64 root (or reuse the cached one) and return where it is.

    Parameters
    ----------
    root
        The cache folder (default :func:`root_path`).
    spec
        What to build (default :class:`ImageRootSpec`).
    mirror
        Debian mirror (default: the one apt uses on this host).
    force
        Rebuild even when a finished root of ``spec`` is cached (it is replaced on success).
    log
        Progress printer.

    Raises
    ------
    ImageError
        A host tool is missing (the message has the ``apt-get install`` line), or a stage failed.
    """
    from benchmarks import arm64_root as ar

    spec = spec or ImageRootSpec()
    root = root_path() if root is None else root
    t0 = time.monotonic()
    try:
        ar.require_host()
        entry = ar.ensure_binfmt()
    except ar.Arm64RootError as exc:
        raise ImageError(str(exc)) from exc
    if not force and is_complete(root, spec):
        marker = read_marker(root) or {}
        return RootReport(
            root, True, str(marker.get("mirror", "")), time.monotonic() - t0,
            dict(marker.get("stage_seconds", {})),
        )  # fmt: skip
    try:
        mirror = mirror or ar.find_debian_mirror(suite=spec.suite)
    except ar.Arm64RootError as exc:
        raise ImageError(str(exc)) from exc
    security = security_mirror(suite=spec.suite)
    partial = root.with_name(f".{root.name}.partial")
    spec_file = partial / STAGES_DIR / "spec.json"
    if partial.exists():
        try:
            same = json.loads(spec_file.read_text()).get("digest") == spec.digest()
        except (OSError, ValueError):
            same = False
        if not same or not _stage_done(partial, "1-debootstrap"):
            log(f"removing the unfinished build {partial} (another spec or an interrupted "
                "debootstrap)")  # fmt: skip
            ar.unmount_all(partial)
            ar._remove_tree(partial)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not _stage_done(partial, "1-debootstrap"):
            cmd = debootstrap_command(partial, mirror, spec)
            log(f"stage 1/3, the base system: {shlex.join(cmd)}")
            t = time.monotonic()
            _stream(cmd, log, "debootstrap")
            ar.install_interpreter(partial, entry)
            (partial / STAGES_DIR).mkdir(exist_ok=True)
            spec_file.write_text(json.dumps({"digest": spec.digest(), **spec.as_dict()}, indent=1))
            _mark_stage(partial, "1-debootstrap", time.monotonic() - t)
        with ar.session(partial) as pip:
            if not _stage_done(partial, "2-boot-packages"):
                log("stage 2/3: kernel, Raspberry Pi boot files, updates")
                t = time.monotonic()
                _install_boot_packages(partial, mirror, security, spec, pip, log)
                _mark_stage(partial, "2-boot-packages", time.monotonic() - t)
            if not _stage_done(partial, "3-venv"):
                log("stage 3/3: the board's virtual environment")
                t = time.monotonic()
                _install_venv(partial, spec, pip, log)
                _mark_stage(partial, "3-venv", time.monotonic() - t)
    except ar.Arm64RootError as exc:
        raise ImageError(str(exc)) from exc
    stages = _stage_seconds(partial)
    marker = {
        "spec_digest": spec.digest(),
        "spec": spec.as_dict(),
        "mirror": mirror,
        "security_mirror": security,
        "stage_seconds": stages,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (partial / MARKER).write_text(json.dumps(marker, indent=1))
    if root.exists():
        old = root.with_name(f".{root.name}.old")
        if old.exists():
            ar._remove_tree(old)
        ar.unmount_all(root)
        root.rename(old)
        partial.rename(root)
        ar._remove_tree(old)
    else:
        partial.rename(root)
    for stale in (root.with_name(f".{partial.name}.sessions.lock"),):
        stale.unlink(missing_ok=True)
    log(f"image root ready at {root} in {time.monotonic() - t0:.0f} s (emulated build)")
    return RootReport(root, False, mirror, time.monotonic() - t0, stages)


def package_versions(root: Path) -> dict[str, str]:
    """``{package: version}`` of every installed Debian package, read from dpkg's status file."""
    out: dict[str, str] = {}
    name = version = ""
    installed = False
    status = root / "var/lib/dpkg/status"
    for line in [*status.read_text().splitlines(), ""]:
        if not line.strip():
            if name and version and installed:
                out[name] = version
            name = version = ""
            installed = False
        elif line.startswith("Package: "):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Version: "):
            version = line.split(":", 1)[1].strip()
        elif line.startswith("Status: "):
            installed = line.split(":", 1)[1].split()[-1] == "installed"
    return out


def python_versions(root: Path, venv: str = DEFAULT_VENV) -> dict[str, str]:
    """``{distribution: version}`` of the venv inside ``root`` (from its metadata folders)."""
    site = sorted((root / venv.lstrip("/")).glob("lib/python3*/site-packages"))
    out: dict[str, str] = {}
    for dist in site[0].glob("*.dist-info") if site else []:
        meta = dist / "METADATA"
        name = ver = ""
        try:
            for line in meta.read_text(errors="replace").splitlines():
                if line.startswith("Name: "):
                    name = line[6:].strip()
                elif line.startswith("Version: "):
                    ver = line[9:].strip()
                if (name and ver) or not line:
                    break
        except OSError:
            continue
        if name:
            out[name.lower().replace("_", "-")] = ver
    return out


def remove_root(root: Path) -> None:
    """Delete a cached image root (after checking nothing is mounted below it)."""
    from benchmarks import arm64_root as ar

    if root.exists():
        ar.unmount_all(root)
        shutil.rmtree(root)
