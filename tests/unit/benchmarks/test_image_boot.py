"""The QEMU boot check's pure parts: command lines for both machines, the guest's kernel
command line, SD-card sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import image_boot as ib


def _cmd(machine: str) -> list[str]:
    return ib.qemu_command(
        machine, kernel=Path("/k"), initrd=Path("/i"), dtb=Path("/d.dtb"), append="root=x",
        disk=Path("/card.img"), relay=["/usr/bin/python3", "/r.py", "1234"], broker_port=1234,
        console=Path("/c.log"), qmp=Path("/q.sock"), memory_mib=2048, smp=2,
    )  # fmt: skip


def test_virt_command_restricts_the_network_to_the_broker() -> None:
    cmd = _cmd("virt")
    net = cmd[cmd.index("-netdev") + 1]
    assert "restrict=on" in net.split(",")
    assert f"guestfwd=tcp:{ib.GUEST_BROKER_IP}:1234-cmd:/usr/bin/python3 /r.py 1234" in net
    assert "hostfwd" not in net
    assert cmd[cmd.index("-M") + 1] == "virt" and "cortex-a72" in cmd
    assert "virtio-blk-pci,drive=disk0" in cmd and "-dtb" not in cmd


def test_raspi3b_command_uses_the_images_device_tree_and_sd_card() -> None:
    cmd = _cmd("raspi3b")
    assert cmd[cmd.index("-dtb") + 1] == "/d.dtb"
    assert "file=/card.img,format=raw,if=sd" in cmd and "usb-net,netdev=net0" in cmd
    assert cmd[cmd.index("-m") + 1] == "1G"
    with pytest.raises(ValueError):
        ib.qemu_command(
            "raspi3b", kernel=Path("/k"), initrd=Path("/i"), dtb=None, append="", disk=Path("/c"),
            relay=["x"], broker_port=1, console=Path("/c"), qmp=Path("/q"), memory_mib=1, smp=1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="virt or raspi3b"):
        _cmd("raspi4b")


def test_guest_cmdline_keeps_the_images_own_and_adds_the_console_last() -> None:
    line = ib.guest_cmdline("console=tty0 root=LABEL=SIRENROOT rw rootwait\n", "virt")
    assert line.startswith("console=tty0 root=LABEL=SIRENROOT rw rootwait ")
    consoles = [t for t in line.split() if t.startswith("console=")]
    assert consoles[-1] == "console=ttyAMA0,115200"
    assert "\n" not in line


def test_next_power_of_two() -> None:
    assert [ib.next_power_of_two(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [
        1, 2, 4, 1024, 1024, 2048,
    ]  # fmt: skip
