"""Partition table maths and the Raspberry Pi boot files' texts and checks (pure functions).

An image is an MBR ("dos") disk with two partitions, both aligned to 4 MiB (a common SD-card
erase block): the FAT32 boot partition the Raspberry Pi firmware reads (``config.txt``,
``cmdline.txt``, the kernel, initrd and device trees, ``start*.elf``) and the ext4 root
filesystem. Both are named by label (``LABEL=``) in ``cmdline.txt`` and ``/etc/fstab``, as in
Debian's own Raspberry Pi images, so the same files work whatever the card is called
(``mmcblk0`` on a Pi, ``vda`` or ``sda`` elsewhere).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence

#: ext4 label of the root filesystem (``cmdline.txt`` and ``fstab`` name it: ``LABEL=``).
ROOT_LABEL = "SIRENROOT"
#: FAT label of the boot partition (at most 11 characters).
BOOT_LABEL = "SIRENBOOT"
SECTOR = 512
#: Alignment of every partition, bytes.
ALIGN = 4 * 1024 * 1024
#: Size of the FAT boot partition, bytes.
BOOT_BYTES = 256 * 1024 * 1024
#: MBR partition type ids: FAT32 with LBA, Linux.
FAT32_LBA = "c"
LINUX = "83"
#: Types a boot partition may have (FAT12/16/32 variants).
FAT_TYPES = ("1", "4", "6", "b", "c", "e", "ef")
#: On the boot partition: the folder a board's bundle is copied to, and the other files the
#: first boot picks up. All of them are removed from the partition once installed.
BUNDLE_DIR = "siren-bundle"
WIFI_FILE = "siren-wifi.conf"
SSH_KEYS_FILE = "siren-authorized_keys"
PREPARED_AT_FILE = ".prepared-at"
FIRSTBOOT_LOG = "siren-firstboot.log"


@dataclasses.dataclass(frozen=True)
class Partition:
    """One MBR partition, in 512-byte sectors."""

    start: int
    size: int
    type: str

    @property
    def offset(self) -> int:
        """Byte offset of the partition in the image."""
        return self.start * SECTOR

    @property
    def bytes(self) -> int:
        """Size in bytes."""
        return self.size * SECTOR

    @property
    def end(self) -> int:
        """First sector after the partition."""
        return self.start + self.size


@dataclasses.dataclass(frozen=True)
class Layout:
    """The image's partitions and total size."""

    boot: Partition
    root: Partition

    @property
    def total_bytes(self) -> int:
        """Size of the image file: up to the end of the root partition."""
        return self.root.end * SECTOR


def align_up(n: int, alignment: int = ALIGN) -> int:
    """The smallest multiple of ``alignment`` that is ``>= n`` (``n >= 0``)."""
    if n < 0 or alignment <= 0:
        raise ValueError(f"align_up needs n >= 0 and alignment > 0, got {n}, {alignment}")
    return -(-n // alignment) * alignment


def root_fs_bytes(content_bytes: int, *, slack: float = 0.12, spare: int = 384 * 2**20) -> int:
    """Size of an ext4 filesystem holding ``content_bytes`` of files with room to spare.

    ``content_bytes * (1 + slack) + spare`` (ext4's metadata, the journal, and first-boot
    writes: the bundle, logs), aligned to :data:`ALIGN`. First boot grows the filesystem to the
    whole card, so the image stays small.
    """
    if content_bytes < 0:
        raise ValueError(f"content size must be >= 0, got {content_bytes}")
    return align_up(int(content_bytes * (1 + slack)) + spare)


def plan_layout(root_bytes: int, boot_bytes: int = BOOT_BYTES, align: int = ALIGN) -> Layout:
    """Partitions for a ``boot_bytes`` FAT partition and a ``root_bytes`` root filesystem.

    The boot partition starts at ``align`` (the space before it holds the MBR), the root
    partition right after it; both start and size are multiples of ``align``.

    Raises
    ------
    ValueError
        When a size is not positive or ``align`` is not a multiple of the sector size.
    """
    if align % SECTOR or align <= 0:
        raise ValueError(f"alignment must be a positive multiple of {SECTOR}, got {align}")
    if root_bytes <= 0 or boot_bytes <= 0:
        raise ValueError(
            f"partition sizes must be positive, got boot {boot_bytes}, root {root_bytes}"
        )
    boot_start = align // SECTOR
    boot = Partition(boot_start, align_up(boot_bytes, align) // SECTOR, FAT32_LBA)
    root = Partition(align_up(boot.end * SECTOR, align) // SECTOR,
                     align_up(root_bytes, align) // SECTOR, LINUX)  # fmt: skip
    return Layout(boot, root)


def sfdisk_script(layout: Layout, disk_id: int) -> str:
    """The ``sfdisk`` input writing ``layout`` as an MBR table with identifier ``disk_id``."""
    if not 0 <= disk_id < 2**32:
        raise ValueError(f"an MBR disk identifier is 32 bits, got {disk_id}")
    return (
        "label: dos\n"
        f"label-id: 0x{disk_id:08x}\n"
        "unit: sectors\n"
        "\n"
        f"start={layout.boot.start}, size={layout.boot.size}, type={layout.boot.type}\n"
        f"start={layout.root.start}, size={layout.root.size}, type={layout.root.type}\n"
    )


def parse_sfdisk_json(text: str) -> list[Partition]:
    """Partitions of ``sfdisk --json`` output (sectors of 512 bytes), in table order.

    Raises
    ------
    ValueError
        When the output is not an MBR/GPT table description or uses another sector size.
    """
    try:
        table = json.loads(text)["partitiontable"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not sfdisk --json output: {text[:200]!r}") from exc
    if table.get("sectorsize", SECTOR) != SECTOR:
        raise ValueError(f"sector size {table.get('sectorsize')} (expected {SECTOR})")
    return [
        Partition(int(p["start"]), int(p["size"]), str(p["type"]).lower())
        for p in table.get("partitions", [])
    ]


def find_boot_partition(parts: Sequence[Partition]) -> Partition:
    """The first FAT partition of a table (the Raspberry Pi firmware's boot partition).

    Raises
    ------
    ValueError
        When no partition has a FAT type id.
    """
    for p in parts:
        if p.type in FAT_TYPES:
            return p
    raise ValueError(f"no FAT partition in the table (types {[p.type for p in parts]})")


# ------------------------------------------------------------------------------------------
# texts written into the image


def fstab_text(root_label: str = ROOT_LABEL, boot_label: str = BOOT_LABEL) -> str:
    """``/etc/fstab``: the root by label, the boot partition at ``/boot/firmware`` readable by
    root alone (a bundle waiting there holds a board's private key)."""
    return (
        "# siren-edge image: filesystems by label\n"
        f"LABEL={root_label}\t/\text4\trw,noatime,errors=remount-ro\t0\t1\n"
        f"LABEL={boot_label}\t/boot/firmware\tvfat\trw,noatime,umask=0077,nofail\t0\t2\n"
    )


def wpa_psk(ssid: str, passphrase: str) -> str:
    """The 256-bit WPA-PSK of a passphrase (PBKDF2-HMAC-SHA1, 4096 rounds, SSID as salt), as
    ``wpa_passphrase`` prints it: the image stores this, never the passphrase.

    Raises
    ------
    ValueError
        When the passphrase is not 8-63 printable ASCII characters or the SSID is empty or
        longer than 32 bytes.
    """
    import hashlib

    if not 8 <= len(passphrase) <= 63 or not all(32 <= ord(c) < 127 for c in passphrase):
        raise ValueError("a WPA passphrase has 8 to 63 printable ASCII characters")
    if not 1 <= len(ssid.encode()) <= 32:
        raise ValueError("an SSID has 1 to 32 bytes")
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


def wpa_supplicant_conf(ssid: str, passphrase: str, country: str) -> str:
    """``wpa_supplicant-wlan0.conf`` for one WPA2 network (hashed key, regulatory country)."""
    if not re.fullmatch(r"[A-Z]{2}", country):
        raise ValueError(f"Wi-Fi country must be two capital letters (ISO 3166), got {country!r}")
    quoted = ssid.replace("\\", "\\\\").replace('"', '\\"')
    return (
        "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\n"
        "update_config=0\n"
        f"country={country}\n"
        "\n"
        "network={\n"
        f'\tssid="{quoted}"\n'
        f"\tpsk={wpa_psk(ssid, passphrase)}\n"
        "}\n"
    )


# ------------------------------------------------------------------------------------------
# static checks of the Raspberry Pi boot files (QEMU does not run the Pi's boot chain)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One static check: passed or not, and what was checked."""

    ok: bool
    what: str


def parse_cmdline(text: str) -> dict[str, str]:
    """Kernel parameters of ``cmdline.txt`` (``key=value`` or bare ``key`` -> ``""``); the
    last occurrence of a key wins, as in the kernel."""
    out: dict[str, str] = {}
    for token in text.split():
        key, _, value = token.partition("=")
        out[key] = value
    return out


def parse_config_txt(text: str) -> list[tuple[str, str, str]]:
    """``config.txt`` as ``(section, key, value)`` lines (``[pi4]`` style sections; ``all``
    before the first). ``initramfs FILE followkernel`` gives ``("initramfs", "FILE ...")``."""
    section = "all"
    out: list[tuple[str, str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        if "=" in line and (" " not in line or line.index("=") < line.index(" ")):
            key, _, value = line.partition("=")
        else:
            key, _, value = line.partition(" ")
        out.append((section, key.strip(), value.strip()))
    return out


def _config_values(lines: Iterable[tuple[str, str, str]], key: str) -> list[str]:
    return [v for s, k, v in lines if k == key and s in ("all", "pi4", "pi3", "pi5")]


def kernel_version_of(name: str) -> str | None:
    """``6.1.0-28-arm64`` of ``vmlinuz-6.1.0-28-arm64`` or ``initrd.img-6.1.0-28-arm64``."""
    m = re.fullmatch(r"(?:vmlinuz|initrd\.img)-(.+)", name)
    return m.group(1) if m else None


#: Files each Raspberry Pi generation's firmware needs on the boot partition.
PI_FIRMWARE = {
    "Raspberry Pi 4": ("start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb"),
    "Raspberry Pi 3 (QEMU raspi3b)": ("bootcode.bin", "start.elf", "fixup.dat",
                                      "bcm2837-rpi-3-b.dtb"),
}  # fmt: skip
#: The Raspberry Pi 5's device tree (its firmware is in its EEPROM; it needs a kernel that
#: supports the BCM2712).
PI5_DTB = "bcm2712-rpi-5-b.dtb"


def check_boot_files(
    names: Iterable[str],
    config_txt: str,
    cmdline_txt: str,
    module_versions: Iterable[str],
    root_label: str = ROOT_LABEL,
) -> list[Finding]:
    """Static checks of a boot partition (the Raspberry Pi boot chain does not run in QEMU).

    Parameters
    ----------
    names
        File names at the top of the boot partition.
    config_txt, cmdline_txt
        Their contents.
    module_versions
        Kernel versions with modules in the root filesystem (``/lib/modules/*``).
    root_label
        The root filesystem's label ``cmdline.txt`` must name.

    Returns
    -------
    list of Finding
        Each checked property: firmware files present per board generation, ``config.txt``
        boots the 64-bit kernel and names a kernel and initrd that are present and of the same
        version as the root's modules, ``cmdline.txt`` is one line naming the root partition by
        label with ``rootwait``.
    """
    present = {n.lower() for n in names}
    modules = set(module_versions)
    findings: list[Finding] = []
    for board, files in PI_FIRMWARE.items():
        missing = [f for f in files if f.lower() not in present]
        findings.append(
            Finding(not missing, f"{board} firmware and device tree: "
                    + (f"missing {missing}" if missing else ", ".join(files)))
        )  # fmt: skip
    lines = parse_config_txt(config_txt)
    arm64 = _config_values(lines, "arm_64bit")
    findings.append(Finding("1" in arm64, f"config.txt: arm_64bit={arm64 or 'unset'} (need 1)"))
    kernels = _config_values(lines, "kernel")
    initramfs = [v.split()[0] for v in _config_values(lines, "initramfs") if v.split()]
    named: tuple[tuple[str, list[str]], ...] = (("kernel", kernels), ("initramfs", initramfs))
    for what, values in named:
        if not values:
            findings.append(Finding(False, f"config.txt names no {what}"))
            continue
        f = values[-1]
        version = kernel_version_of(f)
        findings.append(Finding(f.lower() in present, f"config.txt {what} {f}: "
                                + ("present" if f.lower() in present else "MISSING")))  # fmt: skip
        findings.append(
            Finding(version in modules,
                    f"{what} {f}: version {version} " + ("has" if version in modules else
                    "has NO") + f" modules in the root (/lib/modules: {sorted(modules)})")
        )  # fmt: skip
    cmd_lines = [ln for ln in cmdline_txt.splitlines() if ln.strip()]
    findings.append(
        Finding(len(cmd_lines) == 1, f"cmdline.txt: {len(cmd_lines)} non-empty line(s) (need 1)")
    )
    params = parse_cmdline(cmdline_txt)
    root = params.get("root", "")
    findings.append(
        Finding(root == f"LABEL={root_label}",
                f"cmdline.txt: root={root or 'unset'} (need LABEL={root_label}, the root "
                "partition's label)")
    )  # fmt: skip
    findings.append(Finding("rootwait" in params, "cmdline.txt: rootwait (wait for the SD card)"))
    findings.append(
        Finding(
            PI5_DTB.lower() in present,
            f"Raspberry Pi 5 device tree {PI5_DTB}: "
            + (
                "present"
                if PI5_DTB.lower() in present
                else "absent (the kernel does not support the Pi 5's BCM2712)"
            ),
        )
    )
    return findings


def required_findings(findings: Sequence[Finding]) -> list[Finding]:
    """The findings that must pass (all but the Pi 5's device tree, which is only reported:
    Debian bookworm's kernel does not support the Pi 5)."""
    return [f for f in findings if PI5_DTB not in f.what]


def summarize(findings: Sequence[Finding]) -> str:
    """One line per finding, ``ok`` or ``FAIL``."""
    return "\n".join(f"{'ok  ' if f.ok else 'FAIL'}  {f.what}" for f in findings)
