"""Assemble an SD-card image from the cached root, without mounting anything.

:func:`build_image`:

1. builds or reuses the cached arm64 root (:mod:`image.root`) and copies it to a staging folder;
2. installs the board program (the lean board wheel of this source tree) into the image's venv,
   and rebuilds the CA bundle from the image's own certificates, inside the staging folder
   under QEMU user emulation;
3. removes what the build host left there (:func:`scrub`: its DNS, CA, pip settings, the
   machine id, SSH host keys, apt lists) and writes the image's own files
   (:mod:`image.firstboot`, ``fstab``, optional Wi-Fi and SSH settings), enabling units with
   plain symlinks (:func:`enable_unit`);
4. moves ``/boot/firmware`` (filled by ``raspi-firmware``'s kernel hook) to the FAT partition
   and checks the Raspberry Pi boot files statically (:func:`image.layout.check_boot_files`);
5. writes the root filesystem with ``mkfs.ext4 -d``, the FAT32 boot partition with
   ``mkfs.vfat`` + ``mcopy``, the MBR table with ``sfdisk``, copies both filesystems into the
   image file (sparse), checks them with ``e2fsck -n`` / ``fsck.vfat -n``, and compresses the
   image with ``xz``;
6. records the Debian and Python package versions (in the image, and next to it as
   ``IMAGE.manifest.json``) with the image's size and SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from image import firstboot
from image.card import require_tools, run_mtools
from image.errors import ImageError
from image.layout import (
    BOOT_BYTES,
    BOOT_LABEL,
    ROOT_LABEL,
    Finding,
    check_boot_files,
    fstab_text,
    plan_layout,
    required_findings,
    root_fs_bytes,
    sfdisk_script,
    wpa_supplicant_conf,
)
from image.root import (
    ImageRootSpec,
    RootReport,
    build_image_root,
    package_versions,
    python_versions,
    root_path,
)

#: Host tools of the assembly -> the Debian package providing each.
ASSEMBLE_TOOLS = {
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "fsck.vfat": "dosfstools",
    "mcopy": "mtools",
    "sfdisk": "fdisk",
    "xz": "xz-utils",
    "cp": "coreutils",
}
#: Paths (inside the root) of files the build host may have left that no image may carry.
BUILD_LEFTOVERS = (
    "etc/siren-edge-cpuinfo",
    "etc/siren-image-root.json",
    ".siren-image-stages",
    "root/.cache",
    "root/.config/pip",
    "etc/pip.conf",
    "etc/xdg/pip",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "usr/sbin/policy-rc.d",
    "debootstrap",
)
#: Where the image records its manifest inside the root filesystem.
MANIFEST_IN_ROOT = "usr/share/siren-image/manifest.json"
#: Where unit files are looked up inside the root, in systemd's order.
UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")


def _say(line: str) -> None:
    print(f"[image] {line}", flush=True)


@dataclasses.dataclass(frozen=True)
class Wifi:
    """Wi-Fi settings written into the image (the passphrase is stored hashed)."""

    ssid: str
    passphrase: str
    country: str


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What ``siren image build`` was asked."""

    out: Path
    root_cache: Path | None = None
    mirror: str | None = None
    rebuild_root: bool = False
    hostname: str = firstboot.DEFAULT_HOSTNAME
    ssh_keys: str | None = None
    wifi: Wifi | None = None
    compress: bool = True
    xz_level: int = 6
    keep_work: bool = False
    source_root: Path | None = None


@dataclasses.dataclass(frozen=True)
class ImageReport:
    """What :func:`build_image` wrote and measured."""

    image: Path
    raw_bytes: int
    sha256: str
    compressed: Path | None
    compressed_bytes: int | None
    compressed_sha256: str | None
    manifest: Path
    root: RootReport
    steps: dict[str, float]
    findings: list[Finding]
    kernel: str
    root_content_bytes: int
    layout: dict[str, int]


# ------------------------------------------------------------------------------------------
# units, without systemctl


def _find_unit(rootfs: Path, unit: str) -> Path | None:
    template = unit.split("@", 1)[0] + "@." + unit.rsplit(".", 1)[1] if "@" in unit else None
    for d in UNIT_DIRS:
        for name in (unit, template):
            if name and (rootfs / d / name).is_file():
                return rootfs / d / name
    return None


def parse_install_section(text: str) -> dict[str, list[str]]:
    """``WantedBy``, ``RequiredBy``, ``Alias`` and ``Also`` of a unit's ``[Install]`` section."""
    out: dict[str, list[str]] = {"WantedBy": [], "RequiredBy": [], "Alias": [], "Also": []}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Install" and "=" in line:
            key, _, value = line.partition("=")
            if key.strip() in out:
                out[key.strip()] += value.split()
    return out


def enable_unit(rootfs: Path, unit: str, _seen: set[str] | None = None) -> list[str]:
    """Enable ``unit`` in ``rootfs`` as ``systemctl enable`` would: a symlink in each
    ``<target>.wants``/``.requires`` folder of ``/etc/systemd/system``, one per ``Alias``,
    and the units of ``Also``. Template instances (``name@inst.service``) link to the template.
    Returns the symlinks made (paths inside the root).

    Raises
    ------
    ImageError
        When the unit file is not found in the root.
    """
    seen = set() if _seen is None else _seen
    if unit in seen:
        return []
    seen.add(unit)
    path = _find_unit(rootfs, unit)
    if path is None:
        raise ImageError(f"unit {unit} not found in {rootfs} ({', '.join(UNIT_DIRS)})")
    target = "/" + str(path.relative_to(rootfs))
    install = parse_install_section(path.read_text())
    made: list[str] = []
    etc = rootfs / "etc/systemd/system"
    links = [f"{t}.wants/{unit}" for t in install["WantedBy"]]
    links += [f"{t}.requires/{unit}" for t in install["RequiredBy"]]
    links += list(install["Alias"])
    for rel in links:
        link = etc / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        made.append("/" + str(link.relative_to(rootfs)))
    for also in install["Also"]:
        made += enable_unit(rootfs, also, seen)
    return made


def disable_unit(rootfs: Path, unit: str) -> list[str]:
    """Remove every symlink under ``/etc/systemd/system`` named ``unit`` or pointing to it."""
    removed = []
    etc = rootfs / "etc/systemd/system"
    for link in sorted(etc.rglob("*")) if etc.is_dir() else []:
        if link.is_symlink() and (link.name == unit or os.readlink(link).endswith("/" + unit)):
            link.unlink()
            removed.append("/" + str(link.relative_to(rootfs)))
    return removed


# ------------------------------------------------------------------------------------------
# scrubbing what the build host left


def host_local_cas(folder: Path = Path("/usr/local/share/ca-certificates")) -> list[Path]:
    """Certificates the build host added to its trust store (copied into the root by the build
    so apt and pip work through the host's network; no image may trust them)."""
    return sorted(folder.rglob("*.crt")) if folder.is_dir() else []


def _pem_bodies(text: str) -> set[str]:
    bodies: set[str] = set()
    current: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("-----BEGIN CERTIFICATE"):
            inside, current = True, []
        elif line.startswith("-----END CERTIFICATE"):
            inside = False
            bodies.add("".join(current))
        elif inside:
            current.append(line.strip())
    return bodies


def find_leftovers(rootfs: Path, host_cas: Sequence[Path] = ()) -> list[str]:
    """What of the build host, or of a particular machine, is still in ``rootfs`` (empty when
    the root is clean): the host's DNS settings, its local CAs (as files or in the CA bundle),
    pip settings and caches, a machine id, SSH host keys, build markers."""
    found = []
    resolv = rootfs / "etc/resolv.conf"
    if resolv.exists() and not resolv.is_symlink():
        found.append("/etc/resolv.conf is a file (the build host's DNS), not resolved's link")
    bundle = rootfs / "etc/ssl/certs/ca-certificates.crt"
    bodies = _pem_bodies(bundle.read_text(errors="replace")) if bundle.is_file() else set()
    for ca in host_cas:
        if _pem_bodies(ca.read_text(errors="replace")) & bodies:
            found.append(f"the CA bundle trusts the build host's {ca.name}")
    local = rootfs / "usr/local/share/ca-certificates"
    found += (
        [f"/{p.relative_to(rootfs)}" for p in sorted(local.rglob("*.crt"))]
        if local.is_dir()
        else []
    )
    found += [
        f"/{p}" for p in BUILD_LEFTOVERS if (rootfs / p).exists() or (rootfs / p).is_symlink()
    ]
    mid = rootfs / "etc/machine-id"
    if mid.is_file() and mid.read_text().strip():
        found.append("/etc/machine-id is not empty (every board would share it)")
    if (rootfs / "var/lib/dbus/machine-id").is_file():
        found.append("/var/lib/dbus/machine-id exists")
    found += [f"/{p.relative_to(rootfs)}" for p in sorted((rootfs / "etc/ssh").glob("ssh_host_*"))]
    lists = rootfs / "var/lib/apt/lists"
    if lists.is_dir() and any(p.is_file() and p.name != "lock" for p in lists.iterdir()):
        found.append("/var/lib/apt/lists holds the build's package lists")
    return found


def scrub(rootfs: Path, host_cas: Sequence[Path] = ()) -> None:
    """Remove the build host's and the build's traces from ``rootfs`` (see
    :func:`find_leftovers`); the CA bundle is rebuilt separately, inside the root."""
    resolv = rootfs / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    local = rootfs / "usr/local/share/ca-certificates"
    if local.is_dir():
        for p in sorted(local.rglob("*.crt")):
            p.unlink()
    for rel in BUILD_LEFTOVERS:
        p = rootfs / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    lists = rootfs / "var/lib/apt/lists"
    if lists.is_dir():
        for p in lists.iterdir():
            if p.is_file() and p.name != "lock":
                p.unlink()
    for folder in ("tmp", "var/tmp"):
        for p in (rootfs / folder).iterdir() if (rootfs / folder).is_dir() else []:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for junk in [*(rootfs / "boot").glob("*.dpkg-bak"), *(rootfs / "boot").glob("*.new")]:
        junk.unlink()
    for log in ("var/log/apt", "var/log/bootstrap.log", "var/log/alternatives.log"):
        p = rootfs / log
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def write_image_files(rootfs: Path, options: BuildOptions) -> list[str]:
    """Write the image's own files and settings into ``rootfs``; return the units enabled."""
    for f in firstboot.image_files(options.hostname):
        path = rootfs / f.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.text)
        path.chmod(f.mode)
    (rootfs / "etc/fstab").write_text(fstab_text(ROOT_LABEL, BOOT_LABEL))
    (rootfs / "boot/firmware").mkdir(parents=True, exist_ok=True)
    enabled = list(firstboot.ENABLED_UNITS)
    # SSH only with a key; Wi-Fi through wpa_supplicant@wlan0 (not the D-Bus-driven daemon
    # the package enables, which nothing here talks to).
    for unit in ("ssh.service", "ssh.socket", "sshd.service", "wpa_supplicant.service"):
        disable_unit(rootfs, unit)
    if options.ssh_keys:
        ssh = rootfs / "root/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh / "authorized_keys").write_text(options.ssh_keys.rstrip("\n") + "\n")
        (ssh / "authorized_keys").chmod(0o600)
        enabled.append("ssh.service")
    if options.wifi is not None:
        conf = rootfs / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            wpa_supplicant_conf(options.wifi.ssid, options.wifi.passphrase, options.wifi.country)
        )
        conf.chmod(0o600)
        enabled.append("wpa_supplicant@wlan0.service")
    for unit in enabled:
        enable_unit(rootfs, unit)
    return enabled


# ------------------------------------------------------------------------------------------
# filesystems and the image file


def _run(cmd: Sequence[str], what: str, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise ImageError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{(proc.stderr or proc.stdout).strip()[-1500:]}"
        )
    return proc


def copy_sparse(src: Path, dst: Path, offset: int, chunk: int = 4 * 2**20) -> None:
    """Copy ``src`` into ``dst`` at byte ``offset`` without writing all-zero chunks (``dst``
    is already sized: the skipped chunks read back as zeros)."""
    zero = bytes(chunk)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        pos = offset
        while True:
            block = fin.read(chunk)
            if not block:
                break
            if block != zero[: len(block)]:
                fout.seek(pos)
                fout.write(block)
            pos += len(block)


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_boot_fs(folder: Path, target: Path, size: int, volume_id: int) -> None:
    """A FAT32 filesystem of ``size`` bytes labelled :data:`BOOT_LABEL` holding ``folder``."""
    with open(target, "wb") as f:
        f.truncate(size)
    _run(["mkfs.vfat", "-F", "32", "-n", BOOT_LABEL, "-i", f"{volume_id:08x}", str(target)],
         "mkfs.vfat")  # fmt: skip
    entries = sorted(str(p) for p in folder.iterdir())
    if entries:
        run_mtools(["mcopy", "-s", "-p", "-m", "-i", str(target), *entries, "::/"])
    _run(["fsck.vfat", "-n", str(target)], "fsck.vfat -n (the new boot partition)")


def make_root_fs(rootfs: Path, target: Path, size: int) -> None:
    """An ext4 filesystem of ``size`` bytes labelled :data:`ROOT_LABEL` made from ``rootfs``
    (``mkfs.ext4 -d``: ownership, modes, links and extended attributes are copied)."""
    target.unlink(missing_ok=True)
    _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-m", "1", "-d", str(rootfs),
          str(target), f"{size // 1024}k"], "mkfs.ext4 -d")  # fmt: skip
    _run(["e2fsck", "-f", "-n", str(target)], "e2fsck -n (the new root filesystem)")


def _kernel_and_modules(rootfs: Path, boot: Path) -> tuple[str, list[str]]:
    modules = sorted(p.name for p in (rootfs / "lib/modules").iterdir())
    kernels = sorted(p.name[len("vmlinuz-") :] for p in boot.glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(
            f"no vmlinuz-* among the boot files {sorted(p.name for p in boot.iterdir())}"
        )
    return kernels[-1], modules


def _install_board_program(staging: Path, venv: str, source_root: Path | None, log: Any) -> str:
    """Install the board wheel of this source tree into the staging root's venv, rebuild the CA
    bundle from the image's own certificates; return the wheel's file name."""
    from benchmarks import arm64_root as ar
    from deploy.wheel import build_board_wheel

    wheel = build_board_wheel(staging / "tmp", source_root=source_root)
    try:
        with ar.session(staging, sync=False):
            log(f"installing {wheel.name} into {venv} (no network: --no-index --no-deps)")
            ar.run_in_root(
                staging,
                [f"{venv}/bin/python", "-m", "pip", "install", "--disable-pip-version-check",
                 "--no-index", "--no-deps", "--force-reinstall", "-q", f"/tmp/{wheel.name}"],
            )  # fmt: skip
            log("rebuilding the CA bundle from the image's own certificates")
            ar.run_in_root(staging, ["update-ca-certificates", "--fresh"], capture=True)
    except ar.Arm64RootError as exc:
        raise ImageError(str(exc)) from exc
    wheel.unlink()
    return wheel.name


def build_image(options: BuildOptions, log: Callable[[str], None] = _say) -> ImageReport:
    """Build the image described by ``options`` (see the module docstring); return the report.

    Raises
    ------
    ImageError
        A tool is missing (with the ``apt-get install`` line), a step failed, the root still
        holds something of the build host, or a Raspberry Pi boot file check failed.
    """
    require_tools(ASSEMBLE_TOOLS)
    t_all = time.monotonic()
    steps: dict[str, float] = {}
    spec = ImageRootSpec()
    out = options.out.absolute()
    if out.suffix != ".img":
        raise ImageError(f"the image's name must end in .img, got {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)

    t = time.monotonic()
    root = build_image_root(
        root_path(options.root_cache), spec=spec, mirror=options.mirror,
        force=options.rebuild_root,
    )  # fmt: skip
    steps["arm64 root (built or reused from the cache)"] = time.monotonic() - t
    log(f"root {'reused' if root.reused else 'built'}: {root.root}")

    work = out.with_name(f".{out.name}.work")
    if work.exists():
        from benchmarks import arm64_root as ar

        ar.unmount_all(work)
        shutil.rmtree(work)
    work.mkdir()
    staging, boot = work / "rootfs", work / "boot"
    try:
        t = time.monotonic()
        log(f"copying the root to {staging}")
        _run(["cp", "-a", f"{root.root}/.", str(staging)], "copying the root")
        steps["copy the cached root"] = time.monotonic() - t

        t = time.monotonic()
        # The host's CAs go before the bundle is rebuilt from what is left (scrub removes them
        # too, and find_leftovers checks the bundle).
        local_cas = staging / "usr/local/share/ca-certificates"
        for crt in sorted(local_cas.rglob("*.crt")) if local_cas.is_dir() else []:
            crt.unlink()
        wheel = _install_board_program(staging, spec.venv, options.source_root, log)
        steps["install the board wheel, rebuild the CA bundle (emulated)"] = time.monotonic() - t

        t = time.monotonic()
        host_cas = host_local_cas()
        scrub(staging, host_cas)
        enabled = write_image_files(staging, options)
        left = find_leftovers(staging, host_cas)
        if left:
            raise ImageError("the root still holds build-time files: " + "; ".join(left))
        boot.mkdir()
        for p in sorted((staging / "boot/firmware").iterdir()):
            shutil.move(str(p), boot / p.name)
        kernel, modules = _kernel_and_modules(staging, boot)
        findings = check_boot_files(
            [p.name for p in boot.iterdir()],
            (boot / "config.txt").read_text(),
            (boot / "cmdline.txt").read_text(),
            modules,
            spec.root_label,
        )
        failed = [f for f in required_findings(findings) if not f.ok]
        if failed:
            raise ImageError("boot files: " + "; ".join(f.what for f in failed))
        debs = package_versions(staging)
        pys = python_versions(staging, spec.venv)
        manifest: dict[str, Any] = {
            "image": out.name,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "suite": spec.suite,
            "mirror": root.mirror,
            "root_spec_digest": spec.digest(),
            "kernel": kernel,
            "board_wheel": wheel,
            "venv": spec.venv,
            "units_enabled": enabled,
            "ssh": bool(options.ssh_keys),
            "wifi": options.wifi is not None,
            "boot_checks": [dataclasses.asdict(f) for f in findings],
            "debian_packages": debs,
            "python_packages": pys,
        }
        inside = staging / MANIFEST_IN_ROOT
        inside.parent.mkdir(parents=True, exist_ok=True)
        inside.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        steps["scrub, image files, boot-file checks"] = time.monotonic() - t

        t = time.monotonic()
        from benchmarks.arm64_root import du_bytes

        content = du_bytes(staging)
        layout = plan_layout(root_fs_bytes(content), BOOT_BYTES)
        log(f"root filesystem: {content / 2**20:.0f} MiB of files in a "
            f"{layout.root.bytes / 2**20:.0f} MiB ext4 (mkfs.ext4 -d)")  # fmt: skip
        make_root_fs(staging, work / "root.ext4", layout.root.bytes)
        make_boot_fs(boot, work / "boot.vfat", layout.boot.bytes, secrets.randbits(32))
        steps["mkfs.ext4 -d, mkfs.vfat + mcopy, fsck"] = time.monotonic() - t

        t = time.monotonic()
        tmp_img = out.with_name(f".{out.name}.partial")
        with open(tmp_img, "wb") as f:
            f.truncate(layout.total_bytes)
        _run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(tmp_img)], "sfdisk",
             input=sfdisk_script(layout, secrets.randbits(32)))  # fmt: skip
        copy_sparse(work / "boot.vfat", tmp_img, layout.boot.offset)
        copy_sparse(work / "root.ext4", tmp_img, layout.root.offset)
        from image.card import partitions

        table = partitions(tmp_img)
        if [(p.start, p.size) for p in table] != [
            (layout.boot.start, layout.boot.size), (layout.root.start, layout.root.size)
        ]:  # fmt: skip
            raise ImageError(f"partition table of {tmp_img} reads back as {table}")
        tmp_img.replace(out)
        digest = sha256_file(out)
        steps["partition table, image file, SHA-256"] = time.monotonic() - t
    finally:
        if not options.keep_work:
            shutil.rmtree(work, ignore_errors=True)

    compressed = compressed_bytes = compressed_sha = None
    if options.compress:
        t = time.monotonic()
        xz_path = out.with_name(out.name + ".xz")
        log(f"compressing with xz -{options.xz_level} (both cores, niced)")
        _run(["nice", "-n", "10", "xz", f"-{options.xz_level}", "-T2", "-k", "-f", str(out)],
             "xz")  # fmt: skip
        compressed, compressed_bytes = xz_path, xz_path.stat().st_size
        compressed_sha = sha256_file(xz_path)
        steps["xz"] = time.monotonic() - t
    steps["total"] = time.monotonic() - t_all
    manifest["sha256"] = digest
    manifest["raw_bytes"] = out.stat().st_size
    manifest["xz_bytes"] = compressed_bytes
    manifest["xz_sha256"] = compressed_sha
    manifest["layout"] = {
        "boot_start": layout.boot.start, "boot_sectors": layout.boot.size,
        "root_start": layout.root.start, "root_sectors": layout.root.size,
    }  # fmt: skip
    manifest["root_content_bytes"] = content
    manifest["steps_seconds"] = {k: round(v, 1) for k, v in steps.items()}
    manifest["root_stage_seconds"] = root.stage_seconds
    manifest_path = out.with_name(out.name + ".manifest.json")
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return ImageReport(
        image=out, raw_bytes=out.stat().st_size, sha256=digest, compressed=compressed,
        compressed_bytes=compressed_bytes, compressed_sha256=compressed_sha,
        manifest=manifest_path, root=root, steps=steps, findings=findings, kernel=kernel,
        root_content_bytes=content, layout=manifest["layout"],
    )  # fmt: skip


def how_to_write(report: ImageReport) -> str:
    """The lines ``siren image build`` prints after a build."""
    mib = 2**20
    lines = [
        f"image: {report.image} ({report.raw_bytes / mib:.0f} MiB raw)",
        f"  SHA-256 {report.sha256}",
    ]
    if report.compressed is not None and report.compressed_bytes is not None:
        lines += [
            f"compressed: {report.compressed} ({report.compressed_bytes / mib:.0f} MiB)",
            f"  SHA-256 {report.compressed_sha256}",
        ]
    src = report.compressed or report.image
    cat = "xzcat" if report.compressed else "cat"
    lines += [
        f"kernel {report.kernel}; package versions in {report.manifest}",
        "",
        "Write it to an SD card (every byte on the card is replaced):",
        f"  Raspberry Pi Imager: Choose OS > Use custom > {src.name}; no OS customisation",
        f"  or on Linux: {cat} {src} | sudo dd of=/dev/sdX bs=4M conv=fsync status=progress",
        "Then give the card a board: copy the board's bundle folder onto the card's boot",
        "partition (SIRENBOOT) as siren-bundle, or before writing:",
        f"  siren image add-bundle {report.image} /srv/siren/boards/board-000",
    ]
    return "\n".join(lines)
