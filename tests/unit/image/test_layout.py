"""Partition maths, sfdisk input/output, fstab, Wi-Fi settings and the static boot-file checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest

from image import layout as lay

MIB = 2**20


def test_align_up() -> None:
    assert lay.align_up(0) == 0
    assert lay.align_up(1) == lay.ALIGN
    assert lay.align_up(lay.ALIGN) == lay.ALIGN
    assert lay.align_up(lay.ALIGN + 1) == 2 * lay.ALIGN
    assert lay.align_up(5, 4) == 8
    with pytest.raises(ValueError):
        lay.align_up(-1)
    with pytest.raises(ValueError):
        lay.align_up(1, 0)


def test_plan_layout_aligns_and_orders_partitions() -> None:
    layout = lay.plan_layout(root_bytes=1000 * MIB + 5, boot_bytes=256 * MIB)
    boot, root = layout.boot, layout.root
    assert boot.start * lay.SECTOR == lay.ALIGN  # the MBR and gap before it
    assert boot.bytes == 256 * MIB and boot.type == "c"
    assert root.start == boot.end and root.type == "83"
    for p in (boot, root):
        assert p.offset % lay.ALIGN == 0 and p.bytes % lay.ALIGN == 0
    assert root.bytes >= 1000 * MIB + 5 and root.bytes - (1000 * MIB + 5) < lay.ALIGN
    assert layout.total_bytes == root.offset + root.bytes


def test_plan_layout_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        lay.plan_layout(0)
    with pytest.raises(ValueError, match="multiple"):
        lay.plan_layout(MIB, align=1000)


def test_root_fs_bytes_leaves_room_and_aligns() -> None:
    size = lay.root_fs_bytes(3000 * MIB)
    assert size % lay.ALIGN == 0
    assert size >= int(3000 * MIB * 1.12) + 384 * MIB
    with pytest.raises(ValueError):
        lay.root_fs_bytes(-1)


def test_sfdisk_script_text() -> None:
    layout = lay.plan_layout(64 * MIB, 32 * MIB)
    text = lay.sfdisk_script(layout, 0xDEADBEEF)
    assert "label: dos\n" in text and "label-id: 0xdeadbeef\n" in text
    assert f"start={layout.boot.start}, size={layout.boot.size}, type=c\n" in text
    assert f"start={layout.root.start}, size={layout.root.size}, type=83\n" in text
    with pytest.raises(ValueError):
        lay.sfdisk_script(layout, 2**32)


def test_parse_sfdisk_json_and_find_boot() -> None:
    text = json.dumps(
        {
            "partitiontable": {
                "label": "dos",
                "id": "0x1",
                "unit": "sectors",
                "sectorsize": 512,
                "partitions": [
                    {"node": "x1", "start": 8192, "size": 524288, "type": "c"},
                    {"node": "x2", "start": 532480, "size": 1000, "type": "83"},
                ],
            }
        }
    )
    parts = lay.parse_sfdisk_json(text)
    assert parts == [lay.Partition(8192, 524288, "c"), lay.Partition(532480, 1000, "83")]
    assert lay.find_boot_partition(parts).offset == 8192 * 512
    with pytest.raises(ValueError, match="no FAT"):
        lay.find_boot_partition(parts[1:])
    with pytest.raises(ValueError):
        lay.parse_sfdisk_json("not json")
    with pytest.raises(ValueError, match="sector size"):
        lay.parse_sfdisk_json(json.dumps({"partitiontable": {"sectorsize": 4096}}))


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (Debian fdisk) not installed")
def test_sfdisk_writes_the_planned_table(tmp_path) -> None:
    layout = lay.plan_layout(8 * MIB, 8 * MIB)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(layout.total_bytes)
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(img)],
        input=lay.sfdisk_script(layout, 0x1234ABCD), text=True, check=True, capture_output=True,
    )  # fmt: skip
    out = subprocess.run(["sfdisk", "--json", str(img)], capture_output=True, text=True).stdout
    assert lay.parse_sfdisk_json(out) == [layout.boot, layout.root]
    assert json.loads(out)["partitiontable"]["id"] == "0x1234abcd"


def test_fstab_names_filesystems_by_label_and_hides_the_boot_partition() -> None:
    text = lay.fstab_text()
    root, boot = (ln.split("\t") for ln in text.splitlines()[1:])
    assert root[:3] == ["LABEL=SIRENROOT", "/", "ext4"]
    assert boot[:3] == ["LABEL=SIRENBOOT", "/boot/firmware", "vfat"]
    assert "umask=0077" in boot[3]  # a waiting bundle holds a private key
    assert len(lay.BOOT_LABEL) <= 11


def test_wpa_psk_matches_the_standard_vector() -> None:
    # IEEE 802.11i-2004, annex H.4.1, test vector 1 (wpa_passphrase prints the same).
    assert lay.wpa_psk("IEEE", "password") == (
        "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
    )
    assert (
        lay.wpa_psk("x", "12345678")
        == hashlib.pbkdf2_hmac("sha1", b"12345678", b"x", 4096, 32).hex()
    )
    with pytest.raises(ValueError):
        lay.wpa_psk("x", "short")
    with pytest.raises(ValueError):
        lay.wpa_psk("", "long enough")


def test_wpa_supplicant_conf_holds_no_passphrase() -> None:
    text = lay.wpa_supplicant_conf('my "lab"', "secret-passphrase", "DE")
    assert "secret-passphrase" not in text
    assert 'ssid="my \\"lab\\""' in text and "country=DE" in text
    ssid = 'my "lab"'
    assert "psk=" + lay.wpa_psk(ssid, "secret-passphrase") in text
    with pytest.raises(ValueError, match="country"):
        lay.wpa_supplicant_conf("x", "12345678", "germany")


KVER = "6.1.0-40-arm64"
CONFIG = f"""# Do not modify this file!
[pi4]
max_framebuffers=2
[all]
arm_64bit=1
enable_uart=1
kernel=vmlinuz-{KVER}
initramfs initrd.img-{KVER}
"""
CMDLINE = "console=tty0 console=ttyS1,115200 root=LABEL=SIRENROOT rw fsck.repair=yes rootwait\n"
NAMES = [
    "bootcode.bin", "start.elf", "fixup.dat", "start4.elf", "fixup4.dat", "config.txt",
    "cmdline.txt", f"vmlinuz-{KVER}", f"initrd.img-{KVER}", "bcm2711-rpi-4-b.dtb",
    "bcm2837-rpi-3-b.dtb",
]  # fmt: skip


def test_parse_config_txt_sections_and_initramfs() -> None:
    lines = lay.parse_config_txt(CONFIG)
    assert ("pi4", "max_framebuffers", "2") in lines
    assert ("all", "kernel", f"vmlinuz-{KVER}") in lines
    assert ("all", "initramfs", f"initrd.img-{KVER}") in lines
    assert lay.parse_cmdline(CMDLINE)["root"] == "LABEL=SIRENROOT"
    assert lay.kernel_version_of(f"vmlinuz-{KVER}") == KVER
    assert lay.kernel_version_of("config.txt") is None


def test_boot_checks_pass_on_consistent_files() -> None:
    findings = lay.check_boot_files(NAMES, CONFIG, CMDLINE, [KVER])
    assert all(f.ok for f in lay.required_findings(findings)), lay.summarize(findings)
    pi5 = [f for f in findings if lay.PI5_DTB in f.what]
    assert len(pi5) == 1 and not pi5[0].ok  # reported, not required


@pytest.mark.parametrize(
    ("names", "config", "cmdline", "modules", "needle"),
    [
        ([n for n in NAMES if n != "start4.elf"], CONFIG, CMDLINE, [KVER], "Raspberry Pi 4"),
        (NAMES, CONFIG.replace("arm_64bit=1", ""), CMDLINE, [KVER], "arm_64bit"),
        ([n for n in NAMES if not n.startswith("initrd")], CONFIG, CMDLINE, [KVER], "MISSING"),
        (NAMES, CONFIG, CMDLINE, ["6.1.0-39-arm64"], "NO modules"),
        (NAMES, CONFIG, CMDLINE.replace("LABEL=SIRENROOT", "/dev/mmcblk0p2"), [KVER], "root="),
        (NAMES, CONFIG, CMDLINE.replace("rootwait", ""), [KVER], "rootwait"),
        (NAMES, CONFIG, CMDLINE + "second line\n", [KVER], "line(s)"),
        (NAMES, CONFIG.replace(f"kernel=vmlinuz-{KVER}", ""), CMDLINE, [KVER], "no kernel"),
    ],
)
def test_boot_checks_catch_each_fault(names, config, cmdline, modules, needle) -> None:
    findings = lay.check_boot_files(names, config, cmdline, modules)
    failed = [f for f in lay.required_findings(findings) if not f.ok]
    assert failed and any(needle in f.what for f in failed), lay.summarize(failed)
